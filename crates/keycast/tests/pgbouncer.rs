//! keycast behind PgBouncer in transaction mode (issue 13, docs/POSTGRESQL.md): the way
//! many Cloud SQL deployments put a pooler between instances and the server. A real
//! PgBouncer (1.24, built by scripts/install-peers.sh) with fewer server connections than
//! keycast has clients, so statements prepared by one client's connection meet another
//! client's: the service must sign, and a revocation must still reach every instance (its
//! `LISTEN` goes over `KEYCAST_DATABASE_DIRECT_URL`). With prepared-statement tracking off
//! (what PgBouncer before 1.21 amounts to), keycast must refuse to start and say why.

mod harness;

use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use harness::api::*;
use harness::engine::psql;
use harness::flow::{access_token, register};
use harness::{free_port, reap, Keycast, Launch, PgDatabase, TEST_MASTER_KEY};
use serde_json::json;

/// A PgBouncer process in front of the test PostgreSQL server; killed when dropped.
struct PgBouncer {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl PgBouncer {
    /// Starts PgBouncer in transaction mode with two server connections per database and
    /// `max_prepared_statements` as given (0 turns the tracking off). `None` outside the
    /// suite when PgBouncer or PostgreSQL is not provided.
    fn start(max_prepared_statements: u32) -> Option<PgBouncer> {
        let binary = harness::peer("KEYCAST_TEST_PGBOUNCER")?;
        let server = harness::engine::postgres_server()?;
        let (host, port) = host_port(&server);
        let dir = tempfile::tempdir().unwrap();
        let listen = free_port();
        std::fs::write(dir.path().join("users.txt"), "\"postgres\" \"\"\n").unwrap();
        let config = format!(
            "[databases]\n\
             * = host={host} port={port}\n\
             [pgbouncer]\n\
             listen_addr = 127.0.0.1\n\
             listen_port = {listen}\n\
             unix_socket_dir =\n\
             auth_type = trust\n\
             auth_file = {users}\n\
             admin_users = postgres\n\
             pool_mode = transaction\n\
             default_pool_size = 2\n\
             max_client_conn = 200\n\
             max_prepared_statements = {max_prepared_statements}\n\
             ignore_startup_parameters = extra_float_digits\n",
            users = dir.path().join("users.txt").display(),
        );
        let ini = dir.path().join("pgbouncer.ini");
        std::fs::write(&ini, config).unwrap();
        let mut cmd = as_unprivileged(&binary, dir.path());
        cmd.arg(&ini)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let mut child = cmd.spawn().expect("cannot start pgbouncer");
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", listen)).is_err() {
            if Instant::now() > deadline || child.try_wait().unwrap().is_some() {
                reap(&mut child);
                panic!("pgbouncer did not listen on {listen} within 20 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Some(PgBouncer {
            child,
            port: listen,
            _dir: dir,
        })
    }

    /// `database`'s URL with the server's address replaced by PgBouncer's.
    fn url_for(&self, database: &PgDatabase) -> String {
        let (host, port) = host_port(&database.url);
        database
            .url
            .replacen(&format!("{host}:{port}"), &format!("127.0.0.1:{}", self.port), 1)
    }

    /// Transactions PgBouncer has carried for `database` (its `SHOW STATS`).
    fn transactions(&self, database: &str) -> u64 {
        let admin = format!("postgres://postgres@127.0.0.1:{}/pgbouncer", self.port);
        let mut cmd = Command::new("psql");
        cmd.args(["-AtX", "-F", "|", &admin, "-c", "SHOW STATS"]);
        let out = harness::run_with_timeout(cmd, Duration::from_secs(30));
        out.assert_success("psql SHOW STATS");
        out.stdout
            .lines()
            .map(|l| l.split('|').collect::<Vec<_>>())
            .find(|f| f.first() == Some(&database))
            .map_or(0, |f| f[1].parse().unwrap())
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        reap(&mut self.child);
    }
}

/// PgBouncer refuses to run as root: under root (CI) it runs as the `postgres` user that
/// scripts/postgres.sh also runs the server as, with `dir` handed over to it.
fn as_unprivileged(binary: &str, dir: &Path) -> Command {
    // SAFETY: geteuid(2) has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Command::new(binary);
    }
    let chown = Command::new("chown")
        .args(["-R", "postgres:postgres"])
        .arg(dir)
        .status();
    assert!(chown.is_ok_and(|s| s.success()), "chown {}", dir.display());
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid=postgres", "--regid=postgres", "--init-groups", "--", binary]);
    cmd
}

fn host_port(url: &str) -> (String, u16) {
    let authority = url.split("://").nth(1).unwrap().split('/').next().unwrap();
    let hostport = authority.rsplit('@').next().unwrap();
    let (host, port) = hostport.rsplit_once(':').unwrap();
    (host.to_owned(), port.parse().unwrap())
}

/// keycast with its queries through `bouncer` and its sessions (`LISTEN`, the migration
/// lock) direct to the server.
fn behind(bouncer: &PgBouncer, database: &Arc<PgDatabase>, dir: &Path) -> Launch {
    Launch::new(dir)
        .postgres(database)
        .env("DATABASE_URL", &bouncer.url_for(database))
        .env("KEYCAST_DATABASE_DIRECT_URL", &database.url)
        .env("KEYCAST_MASTER_KEY", TEST_MASTER_KEY)
        .env("KEYCAST_CACHE_TTL_SECS", "3600")
}

#[test]
fn two_instances_sign_and_revoke_through_pgbouncer_in_transaction_mode() {
    let Some(bouncer) = PgBouncer::start(200) else {
        return;
    };
    let database = PgDatabase::create("pgbouncer");
    let dir = tempfile::tempdir().unwrap();
    let servers: Vec<Keycast> = (0..2)
        .map(|i| behind(&bouncer, &database, &dir.path().join(format!("data{i}"))).start())
        .collect();
    let (cookie, _) = register(&servers[0], "alice@example.com", None);
    let token = access_token(&servers[1], &cookie);

    // Eight clients at once over two instances (10 pooled connections each) through two
    // server connections: every statement sqlx prepared on one client connection is run
    // again on server connections other clients prepared theirs on.
    std::thread::scope(|s| {
        for t in 0..8 {
            let (server, token) = (&servers[t % 2], &token);
            s.spawn(move || {
                for i in 0..10 {
                    let r = rpc(
                        server,
                        token,
                        "sign_event",
                        json!([{ "kind": 1, "content": format!("hello {t}/{i}") }]),
                    );
                    assert_eq!(r.status, 200, "client {t}, signature {i}: {}", r.body);
                    let event: nostr::Event = serde_json::from_value(r.json()["result"].clone()).unwrap();
                    event.verify().expect("a valid signature");
                }
            });
        }
    });
    let carried = bouncer.transactions(database.name());
    assert!(
        carried >= 80,
        "PgBouncer carried {carried} transactions: keycast went around it"
    );

    // The revocation is made on one instance and told to the other over LISTEN, which needs
    // a session of its own (the direct URL): the other refuses the very next request.
    let list = get(&servers[0], "/api/user/authorizations", Some(&cookie)).json();
    let id = list["authorizations"][0]["id"].as_str().unwrap().to_owned();
    let revoked = delete(&servers[0], &format!("/api/user/authorizations/{id}"), &cookie);
    assert_eq!(revoked.status, 204, "{}", revoked.body);
    let r = rpc(
        &servers[1],
        &token,
        "sign_event",
        json!([{ "kind": 1, "content": "late" }]),
    );
    assert_eq!(r.status, 401, "signed after the revocation: {}", r.body);

    // Nothing went around PgBouncer but the sessions: two LISTEN connections.
    let direct = psql(
        &database.url,
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
         AND application_name = 'keycast' AND query ILIKE 'LISTEN%'",
    );
    assert_eq!(direct, "2", "one LISTEN session per instance, direct to the server");
}

#[test]
fn a_pooler_that_mixes_prepared_statements_is_refused_at_start_with_the_fix() {
    // PgBouncer with `max_prepared_statements = 0` behaves as every PgBouncer before 1.21:
    // one server connection serves statements sqlx prepared for several clients.
    let Some(bouncer) = PgBouncer::start(0) else {
        return;
    };
    let database = PgDatabase::create("pgbouncer_old");
    let dir = tempfile::tempdir().unwrap();
    let finished = behind(&bouncer, &database, dir.path()).run_to_exit(Duration::from_secs(60));
    assert!(
        !finished.status.success(),
        "keycast served through a pooler that breaks its queries"
    );
    let log = format!("{}{}", finished.stdout, finished.stderr);
    assert!(log.contains("sqlx_s_"), "the server's own words are kept: {log}");
    assert!(
        log.contains("max_prepared_statements") && log.contains("POSTGRESQL.md"),
        "the refusal says what to change: {log}"
    );
}
