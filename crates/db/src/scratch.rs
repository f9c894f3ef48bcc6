//! Scratch databases on a PostgreSQL server, for tests and benchmarks: each test gets a
//! database of its own (`CREATE DATABASE`, about 50 ms with fsync off) on one shared
//! server, instead of a server of its own (seconds).

use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};

use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection};

/// The variable naming the test server's admin URL (set by `scripts/test.sh`).
pub const TEST_SERVER_VAR: &str = "KEYCAST_TEST_POSTGRES_URL";

/// A scratch database; dropped (`DROP DATABASE … WITH (FORCE)`, through `psql`) when
/// this guard is, so a long test run does not fill the disk with copies of `template1`.
#[derive(Debug)]
pub struct ScratchDatabase {
    /// The URL of the scratch database.
    pub url: String,
    admin_url: String,
    name: String,
}

impl Drop for ScratchDatabase {
    fn drop(&mut self) {
        // Best effort: the test server is thrown away whole at the end of the run anyway.
        let _ = std::process::Command::new("psql")
            .arg(&self.admin_url)
            .args(["-qXc", &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name)])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    }
}

/// Creates an empty database with a fresh name (`keycast_<hint>_<pid>_<n>_<random>`) on
/// the server at `admin_url`; it lives as long as the returned guard.
///
/// # Errors
/// The server refused the connection or the `CREATE DATABASE`.
pub async fn create_database(admin_url: &str, hint: &str) -> Result<ScratchDatabase, sqlx::Error> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let hint: String = hint
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .take(24)
        .collect();
    let name = format!(
        "keycast_{hint}_{}_{}_{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed),
        &crate::ids::UserId::generate().as_str()[..8]
    );
    let options = PgConnectOptions::from_str(admin_url)?;
    let mut conn = options.connect().await?;
    // The name is made above from [a-z0-9_] only; identifiers cannot be bound.
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut conn)
        .await?;
    conn.close().await?;
    Ok(ScratchDatabase {
        url: database_url(admin_url, &name),
        admin_url: admin_url.to_owned(),
        name,
    })
}

/// `admin_url` with its database replaced by `name` (query parameters kept).
pub fn database_url(admin_url: &str, name: &str) -> String {
    let (base, query) = match admin_url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (admin_url, None),
    };
    let authority_start = base.find("://").map(|i| i + 3).unwrap_or(0);
    let base = match base[authority_start..].find('/') {
        Some(slash) => &base[..authority_start + slash],
        None => base,
    };
    match query {
        Some(query) => format!("{base}/{name}?{query}"),
        None => format!("{base}/{name}"),
    }
}

/// The test server's admin URL from [`TEST_SERVER_VAR`]: `None` (with a loud message) when
/// it is unset outside the suite; a panic when the suite requires peers
/// (`KEYCAST_REQUIRE_PEERS=1`), so CI never skips the PostgreSQL half silently.
pub fn test_server() -> Option<String> {
    match std::env::var(TEST_SERVER_VAR) {
        Ok(url) if !url.is_empty() => Some(url),
        _ if std::env::var("KEYCAST_REQUIRE_PEERS").as_deref() == Ok("1") => {
            panic!("{TEST_SERVER_VAR} is not set: run the suite through scripts/test.sh, which starts PostgreSQL")
        }
        _ => {
            eprintln!("SKIPPED on PostgreSQL: {TEST_SERVER_VAR} is not set (scripts/test.sh starts a server)");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::database_url;

    #[test]
    fn database_urls_keep_credentials_host_and_parameters() {
        assert_eq!(
            database_url("postgres://u:p@h:5/postgres?sslmode=disable", "x"),
            "postgres://u:p@h:5/x?sslmode=disable"
        );
        assert_eq!(database_url("postgres://u@h:5", "x"), "postgres://u@h:5/x");
    }
}
