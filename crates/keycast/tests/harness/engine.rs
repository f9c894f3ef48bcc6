//! Which database the binary under test runs on: every engine-parameterized suite runs
//! each test on SQLite and on a real PostgreSQL server that `scripts/test.sh` starts and
//! names in `KEYCAST_TEST_POSTGRES_URL`. Each PostgreSQL test gets a database of its own
//! on that one server (`CREATE DATABASE`, dropped when the test is done): cheap, isolated,
//! and no server start per test.

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::{run_with_timeout, Launch};

/// The variable naming the test server's admin URL.
pub const SERVER_VAR: &str = "KEYCAST_TEST_POSTGRES_URL";

/// The database engine a test runs keycast on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    Sqlite,
    Postgres,
}

/// The test PostgreSQL server's admin URL; `None` (skipping loudly) outside the suite, a
/// failure inside it (see [`super::peer`]).
pub fn postgres_server() -> Option<String> {
    super::peer(SERVER_VAR)
}

/// A database of one test on the test server, dropped with the last handle.
#[derive(Debug)]
pub struct PgDatabase {
    /// `postgres://…/<name>`.
    pub url: String,
    admin: String,
    name: String,
}

impl PgDatabase {
    /// A fresh, empty database on the test server.
    pub fn create(hint: &str) -> Arc<PgDatabase> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let admin = postgres_server().expect("PostgreSQL tests run only with a test server");
        let hint: String = hint
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '_'
                }
            })
            .take(20)
            .collect();
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let name = format!(
            "kt_{hint}_{}_{}_{nanos}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        psql(&admin, &format!("CREATE DATABASE {name}"));
        Arc::new(PgDatabase {
            url: with_database(&admin, &name),
            admin,
            name,
        })
    }

    /// The database's name on the server.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `sql` in this database and returns what psql printed (unaligned, tuples only).
    pub fn query(&self, sql: &str) -> String {
        psql(&self.url, sql)
    }
}

impl Drop for PgDatabase {
    fn drop(&mut self) {
        // Best effort: the server is thrown away at the end of the run anyway.
        let _ = Command::new("psql")
            .arg(&self.admin)
            .args(["-qXc", &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name)])
            .output();
    }
}

/// `psql -AtX -v ON_ERROR_STOP=1 URL -c SQL`, failing the test if it fails.
pub fn psql(url: &str, sql: &str) -> String {
    let mut cmd = Command::new("psql");
    cmd.args(["-AtqX", "-v", "ON_ERROR_STOP=1"]).arg(url).args(["-c", sql]);
    let out = run_with_timeout(cmd, Duration::from_secs(60));
    out.assert_success(&format!("psql {sql:?}"));
    out.stdout.trim().to_owned()
}

fn with_database(admin: &str, name: &str) -> String {
    let (base, query) = admin.split_once('?').map_or((admin, None), |(b, q)| (b, Some(q)));
    let start = base.find("://").map_or(0, |i| i + 3);
    let base = base[start..].find('/').map_or(base, |slash| &base[..start + slash]);
    match query {
        Some(q) => format!("{base}/{name}?{q}"),
        None => format!("{base}/{name}"),
    }
}

impl Launch {
    /// keycast on `engine`, with local state in `data_dir`: SQLite there (the default), or a
    /// fresh database of its own on the test PostgreSQL server.
    pub fn on(engine: Engine, data_dir: &Path) -> Launch {
        match engine {
            Engine::Sqlite => Launch::new(data_dir),
            Engine::Postgres => Launch::new(data_dir).postgres(&PgDatabase::create("test")),
        }
    }

    /// keycast on an existing test database (several instances share one).
    pub fn postgres(mut self, database: &Arc<PgDatabase>) -> Launch {
        self.database = Some(database.clone());
        self.env("DATABASE_URL", &database.url)
    }
}

/// Runs each named test function (`fn name(engine: Engine)`) on both engines:
/// `on_both_engines!(a, b);` defines the tests `sqlite::a`, `postgres::a`, `sqlite::b`, …
#[macro_export]
macro_rules! on_both_engines {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[test]
                fn $name() {
                    super::$name($crate::harness::Engine::Sqlite)
                }
            )*
        }
        mod postgres {
            $(
                #[test]
                fn $name() {
                    if $crate::harness::engine::postgres_server().is_some() {
                        super::$name($crate::harness::Engine::Postgres)
                    }
                }
            )*
        }
    };
}
