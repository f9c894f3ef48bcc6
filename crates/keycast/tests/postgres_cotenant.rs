//! keycast on a PostgreSQL database that other roles can reach: what a co-tenant may plant
//! in keycast's schema before keycast starts must not run as keycast's role.
//!
//! keycast runs as a role of its own that owns its database (as POSTGRESQL.md sets it up),
//! not as a superuser: a superuser is every role at once, and these checks are about roles.

mod harness;

use harness::flow::register;
use harness::{Launch, PgDatabase, TEST_MASTER_KEY};

/// Two roles made for one test: keycast's own (owning the database) and a co-tenant's.
struct Roles {
    keycast: String,
    mallory: String,
}

fn roles(database: &PgDatabase) -> Roles {
    let roles = Roles {
        keycast: format!("{}_kc", database.name()),
        mallory: format!("{}_mal", database.name()),
    };
    database.query(&format!(
        "CREATE ROLE {kc} LOGIN; CREATE ROLE {mal} LOGIN; ALTER DATABASE {db} OWNER TO {kc}; \
         GRANT CONNECT ON DATABASE {db} TO {mal}",
        kc = roles.keycast,
        mal = roles.mallory,
        db = database.name()
    ));
    roles
}

/// `database`'s URL, logging in as `role` (the test server trusts every local role).
fn as_role(database: &PgDatabase, role: &str) -> String {
    let url = database
        .url
        .replacen("postgres://postgres@", &format!("postgres://{role}@"), 1);
    assert_ne!(
        url, database.url,
        "the test server's URL names its admin: {}",
        database.url
    );
    url
}

fn keycast_as(dir: &std::path::Path, database: &std::sync::Arc<PgDatabase>, role: &str) -> Launch {
    Launch::new(dir)
        .postgres(database)
        .env("DATABASE_URL", &as_role(database, role))
        .env("KEYCAST_MASTER_KEY", TEST_MASTER_KEY)
}

/// The attack: on a schema where another role may create tables (PostgreSQL 14's default for
/// `public`, or a grant), that role creates sqlx's bookkeeping table before keycast's first
/// start, with a trigger. sqlx creates the table only if it is missing and then inserts a row
/// per migration, so the trigger runs as keycast's role, which owns every table it just made,
/// and grants the co-tenant every one of them: accounts, sessions, sealed keys.
#[test]
fn a_table_a_co_tenant_planted_in_keycasts_schema_is_refused_before_it_can_run_as_keycast() {
    if harness::engine::postgres_server().is_none() {
        return;
    }
    let database = PgDatabase::create("planted");
    let roles = roles(&database);
    database.query(&format!("GRANT CREATE ON SCHEMA public TO {}", roles.mallory));
    harness::engine::psql(
        &as_role(&database, &roles.mallory),
        &format!(
            "CREATE TABLE _sqlx_migrations (version BIGINT PRIMARY KEY, description TEXT NOT NULL, \
               installed_on TIMESTAMPTZ NOT NULL DEFAULT now(), success BOOLEAN NOT NULL, \
               checksum BYTEA NOT NULL, execution_time BIGINT NOT NULL); \
             GRANT ALL ON _sqlx_migrations TO PUBLIC; \
             CREATE FUNCTION share_everything() RETURNS trigger LANGUAGE plpgsql AS $$ \
             DECLARE t text; BEGIN \
               FOR t IN SELECT tablename FROM pg_tables WHERE schemaname = 'public' AND tableowner = current_user LOOP \
                 EXECUTE format('GRANT SELECT ON %I TO {mal}', t); \
               END LOOP; RETURN NEW; END $$; \
             CREATE TRIGGER share_everything AFTER INSERT ON _sqlx_migrations \
               FOR EACH ROW EXECUTE FUNCTION share_everything()",
            mal = roles.mallory
        ),
    );
    let dir = tempfile::tempdir().unwrap();
    let outcome = keycast_as(dir.path(), &database, &roles.keycast).start_or_exit();
    if let Ok(server) = &outcome {
        register(server, "victim@example.com", None);
    }
    // What the co-tenant can read now: nothing of keycast's, whatever keycast did.
    let mut stolen = std::process::Command::new("psql");
    stolen
        .args(["-AtqX", "-v", "ON_ERROR_STOP=1"])
        .arg(as_role(&database, &roles.mallory))
        .args(["-c", "SELECT email FROM users"]);
    let stolen = harness::run_with_timeout(stolen, std::time::Duration::from_secs(60));
    assert!(
        !stolen.status.success(),
        "the co-tenant reads keycast's accounts: {:?}",
        stolen.stdout
    );
    let refused = outcome
        .err()
        .expect("keycast refuses to start on a schema holding a co-tenant's table");
    assert!(!refused.status.success());
    for needed in ["_sqlx_migrations", &roles.mallory, "public"] {
        assert!(
            refused.stderr.contains(needed),
            "the refusal names the table, its owner and the schema ({needed}): {}",
            refused.stderr
        );
    }
}

/// PostgreSQL 14 and older let every role create in `public`. A check at start cannot see what
/// is planted after it, so such a schema is refused, naming the statement that closes it.
#[test]
fn a_schema_every_role_may_create_in_is_refused_naming_the_fix() {
    if harness::engine::postgres_server().is_none() {
        return;
    }
    let database = PgDatabase::create("opencreate");
    let roles = roles(&database);
    database.query("GRANT CREATE ON SCHEMA public TO PUBLIC");
    let dir = tempfile::tempdir().unwrap();
    let refused = match keycast_as(dir.path(), &database, &roles.keycast).start_or_exit() {
        Ok(_) => panic!("keycast started on a schema every role may create in"),
        Err(refused) => refused,
    };
    assert!(
        refused.stderr.contains("REVOKE CREATE ON SCHEMA public FROM PUBLIC"),
        "{}",
        refused.stderr
    );
    // A grant to one other role, with nothing planted yet, is as open: it could plant after
    // the check. So is CREATE on the database for every role, which lets any role make a
    // schema named after keycast's role, found first on the default search path.
    database.query("REVOKE CREATE ON SCHEMA public FROM PUBLIC");
    for (grant, revoke) in [
        (
            format!("GRANT CREATE ON SCHEMA public TO {}", roles.mallory),
            format!("REVOKE CREATE ON SCHEMA public FROM {}", roles.mallory),
        ),
        (
            format!("GRANT CREATE ON DATABASE {} TO PUBLIC", database.name()),
            format!("REVOKE CREATE ON DATABASE {} FROM PUBLIC", database.name()),
        ),
    ] {
        database.query(&grant);
        let refused = match keycast_as(dir.path(), &database, &roles.keycast).start_or_exit() {
            Ok(_) => panic!("keycast started although {grant}"),
            Err(refused) => refused,
        };
        assert!(refused.stderr.contains(&revoke), "{revoke}: {}", refused.stderr);
        database.query(&revoke);
    }
    // Once closed, the same database serves.
    let server = keycast_as(dir.path(), &database, &roles.keycast).start();
    register(&server, "someone@example.com", None);
}

/// An extension's objects are the operator's, but only when its owner is trusted: the owner
/// of an extension may add any object of its own to it (`ALTER EXTENSION … ADD`), and a
/// co-tenant that owns one could hide a planted table that way.
#[test]
fn a_table_hidden_in_a_co_tenants_extension_is_still_refused() {
    if harness::engine::postgres_server().is_none() {
        return;
    }
    let database = PgDatabase::create("laundered");
    let roles = roles(&database);
    // A trusted extension (pg_trgm is one) may be created by any role that may create in the
    // database, and is then that role's. The grants are taken back once it has planted.
    let (mal, db) = (&roles.mallory, database.name());
    database.query(&format!(
        "GRANT CREATE ON SCHEMA public TO {mal}; GRANT CREATE ON DATABASE {db} TO {mal}"
    ));
    harness::engine::psql(
        &as_role(&database, mal),
        "CREATE EXTENSION pg_trgm; CREATE TABLE _sqlx_migrations (version BIGINT); \
         ALTER EXTENSION pg_trgm ADD TABLE _sqlx_migrations",
    );
    database.query(&format!(
        "REVOKE CREATE ON SCHEMA public FROM {mal}; REVOKE CREATE ON DATABASE {db} FROM {mal}"
    ));
    let dir = tempfile::tempdir().unwrap();
    let refused = match keycast_as(dir.path(), &database, &roles.keycast).start_or_exit() {
        Ok(_) => panic!("keycast started beside a table hidden in a co-tenant's extension"),
        Err(refused) => refused,
    };
    assert!(
        refused.stderr.contains(&format!("(owner {mal})")),
        "the refusal names the co-tenant: {}",
        refused.stderr
    );
}

/// The usual set-up by hand: an administrator (here the superuser) creates the database and
/// grants keycast's role the use of `public`. The database's and the schema's owners are the
/// operator, trusted: keycast starts and serves.
#[test]
fn a_database_an_administrator_owns_with_keycast_granted_public_serves() {
    if harness::engine::postgres_server().is_none() {
        return;
    }
    let database = PgDatabase::create("granted");
    let keycast = format!("{}_kc", database.name());
    database.query(&format!(
        "CREATE ROLE {keycast} LOGIN; GRANT CONNECT ON DATABASE {db} TO {keycast}; \
         GRANT USAGE, CREATE ON SCHEMA public TO {keycast}",
        db = database.name()
    ));
    let dir = tempfile::tempdir().unwrap();
    let server = keycast_as(dir.path(), &database, &keycast).start();
    register(&server, "granted@example.com", None);
}

/// What an operator puts beside keycast is no co-tenant's plant: an extension, and objects of
/// a superuser (who could do anything anyway). keycast starts and serves beside them, and
/// once running as its own role, a restart finds its own tables and starts again.
#[test]
fn an_extension_and_a_superusers_objects_beside_keycast_do_not_stop_it() {
    if harness::engine::postgres_server().is_none() {
        return;
    }
    let database = PgDatabase::create("besides");
    let roles = roles(&database);
    database.query(
        "CREATE EXTENSION pgcrypto; CREATE TABLE operators_notes (note TEXT); \
         CREATE FUNCTION operators_helper() RETURNS int LANGUAGE sql AS 'SELECT 1'",
    );
    let dir = tempfile::tempdir().unwrap();
    let server = keycast_as(dir.path(), &database, &roles.keycast).start();
    register(&server, "first@example.com", None);
    server.stop();
    let server = keycast_as(dir.path(), &database, &roles.keycast).start();
    register(&server, "second@example.com", None);
}
