//! Embedded migrations, run at start: `migrations/sqlite/` or `migrations/postgres/`, the
//! same versions with the same meaning.
//!
//! A database stamped with a migration this binary does not know was written by a newer
//! keycast. Whether this binary may still run on it is the schema's to say: the table
//! `keycast_schema` holds `oldest_reader`, the oldest binary version the schema still
//! serves. Migrations are expand-only unless they raise it (the expand/contract rule, see
//! docs/ARCHITECTURE.md), so during a rolling deploy the old instances keep running — and
//! new ones of the old revision still start — next to the new. Below `oldest_reader` (or
//! without the table) a newer schema is refused with an error naming both versions.
//!
//! On PostgreSQL several instances may start together: the check and the migrations run on
//! one connection holding a session advisory lock ([`MIGRATION_LOCK`]), so exactly one of
//! them migrates and the others find the work done.

use sqlx::migrate::Migrator;
use sqlx::Connection;

use crate::pool::Engine;
use crate::Db;

static SQLITE_MIGRATIONS: Migrator = sqlx::migrate!("./migrations/sqlite");
/// Without sqlx's own advisory lock: keycast serializes migrations under its own
/// ([`MIGRATION_LOCK`]), waiting in the open and naming the holder. sqlx's waits in a blocking
/// `pg_advisory_lock` with no time limit and no word, on a key any role that may connect can
/// hold (or another sqlx application migrating in the same database): a start then hung inside
/// keycast's lock, and every other starting instance blamed "another keycast's migrations".
static POSTGRES_MIGRATIONS: std::sync::LazyLock<Migrator> = std::sync::LazyLock::new(|| {
    let mut migrator = sqlx::migrate!("./migrations/postgres");
    migrator.set_locking(false);
    migrator
});

/// The advisory lock key that serializes keycast's migrations on a PostgreSQL server
/// (`pg_advisory_lock`): the ASCII of "keycast" as a number, unlikely to collide with
/// another application's key.
pub const MIGRATION_LOCK: i64 = 0x6b_6579_6361_7374;

/// Why migrations could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error(
        "the database schema is at version {database}, newer than this keycast binary knows \
         (version {binary}); it was written by a newer keycast, so run that version or newer \
         (keycast never downgrades a schema)"
    )]
    SchemaTooNew { database: i64, binary: i64 },
    #[error("database migration failed: {0}")]
    Failed(#[from] sqlx::migrate::MigrateError),
    #[error(
        "the database schema is at version {database} and no longer serves keycast binaries \
         older than version {oldest}; this binary is at version {binary}: run version {oldest} \
         or newer"
    )]
    Contracted { database: i64, oldest: i64, binary: i64 },
    #[error(
        "the database schema is at version {database}, older than this keycast binary (version {binary}); \
         a command that only reads does not migrate it: start the matching `keycast serve` (which migrates), \
         or use the keycast version the database was last served by"
    )]
    Behind { database: i64, binary: i64 },
    #[error(
        "roles other than keycast's may create objects where keycast's SQL finds its tables and \
         functions (a schema on its search path, or a new schema in its database): such a role \
         could plant a table or function that keycast would then run as its own role \
         (PostgreSQL 14 and older let every role create in `public`); close it with: {revokes}; \
         or leave that schema off keycast's search path (`ALTER ROLE <keycast's role> SET \
         search_path = …`), or give keycast a database of its own (see docs/POSTGRESQL.md)"
    )]
    SchemaOpen { revokes: String },
    #[error(
        "the schemas on keycast's search path hold objects of roles keycast's role is not a member \
         of: {objects}; keycast would run what such a role planted (a trigger on a table it writes, \
         a function its queries call) as its own role, so it does not start. Drop what is not \
         keycast's; if these are keycast's own tables, made under another role, make keycast's role \
         their owner (`REASSIGN OWNED BY <that role> TO <keycast's role>`); or give keycast a \
         database of its own (see docs/POSTGRESQL.md)"
    )]
    ForeignObjects { objects: String },
    #[error("cannot read the applied migrations: {0}{hint}", hint = crate::error::pooler_hint(.0))]
    Query(#[from] sqlx::Error),
}

/// The newest schema version this binary carries.
pub fn latest_version() -> i64 {
    SQLITE_MIGRATIONS.iter().map(|m| m.version).max().unwrap_or(0)
}

/// The highest applied migration, or `None` on a fresh database (`$conn`: a `&mut`
/// connection of either engine; `$table`: the query that finds sqlx's bookkeeping table).
macro_rules! applied_version {
    ($conn:expr, $table:expr) => {
        async {
            let table: Option<String> = sqlx::query_scalar($table).fetch_optional(&mut *$conn).await?;
            match table {
                None => Ok::<Option<i64>, sqlx::Error>(None),
                Some(_) => {
                    sqlx::query_scalar("SELECT MAX(version) FROM _sqlx_migrations")
                        .fetch_one(&mut *$conn)
                        .await
                }
            }
        }
    };
}

/// `keycast_schema.oldest_reader`, or `None` before migration 0004 made the table (read
/// only when the schema is newer than the binary, which implies the table exists if the
/// writer followed the rule).
macro_rules! oldest_reader {
    ($conn:expr) => {
        async {
            // A failed read (no such table) is "no promise made".
            Ok::<Option<i64>, sqlx::Error>(
                sqlx::query_scalar("SELECT oldest_reader FROM keycast_schema WHERE id = 1")
                    .fetch_optional(&mut *$conn)
                    .await
                    .ok()
                    .flatten(),
            )
        }
    };
}

/// Checks, changing nothing, that this binary may read the database as it is: its schema is
/// this binary's, or newer and still serving it. For commands that only read: a newer
/// keycast used to run `keycast clients list` against production migrated it (before the
/// revision serving it was deployed, and under it).
///
/// # Errors
/// [`MigrateError::Behind`] (an older schema, or none), [`MigrateError::SchemaTooNew`],
/// [`MigrateError::Contracted`].
pub async fn check_readable(db: &Db) -> Result<(), MigrateError> {
    let (applied, oldest) = match db.engine() {
        Engine::Sqlite(pool) => {
            let mut conn = pool.acquire().await?;
            let applied = applied_version!(conn, SQLITE_TABLE).await?;
            (applied, oldest_reader!(conn).await?)
        }
        Engine::Postgres(pool) => {
            let mut conn = pool.acquire().await?;
            check_schemas_are_keycasts(&mut conn).await?;
            let applied = applied_version!(conn, POSTGRES_TABLE).await?;
            (applied, oldest_reader!(conn).await?)
        }
    };
    let binary = latest_version();
    match applied {
        Some(database) if database < binary => Err(MigrateError::Behind { database, binary }),
        None => Err(MigrateError::Behind { database: 0, binary }),
        _ => serves(binary, applied, oldest).map(|_| ()),
    }
}

/// Applies pending migrations; idempotent.
///
/// # Errors
/// [`MigrateError::SchemaTooNew`] if the database has a migration newer than the binary.
pub async fn run(db: &Db) -> Result<(), MigrateError> {
    match db.engine() {
        Engine::Sqlite(pool) => {
            let mut conn = pool.acquire().await?;
            let applied = applied_version!(conn, SQLITE_TABLE).await?;
            if newer_but_compatible(applied, oldest_reader!(conn).await?)? {
                return Ok(());
            }
            SQLITE_MIGRATIONS.run(&mut *conn).await?;
        }
        Engine::Postgres(pool) => {
            // One connection throughout: the advisory lock belongs to the session. Tried, not
            // waited for in one statement: a statement waiting holds a snapshot, and a
            // migration building an index CONCURRENTLY waits for every snapshot older than
            // it — which would be this one, waiting for that migration's lock (a deadlock
            // the server breaks by failing one of them).
            let mut conn = pool.acquire().await?;
            let waiting_since = std::time::Instant::now();
            let mut said = std::time::Duration::ZERO;
            while !sqlx::query_scalar::<_, bool>("SELECT pg_try_advisory_lock($1)")
                .bind(MIGRATION_LOCK)
                .fetch_one(&mut *conn)
                .await?
            {
                // Waiting is normal for a moment (instances starting together); for long, it
                // is a holder stuck (a migration waiting on an old transaction, a session a
                // dead client left): said, with who holds it, instead of a silent start.
                if waiting_since.elapsed() >= said + LOCK_WAIT_SAID_EVERY {
                    said = waiting_since.elapsed();
                    let holder = lock_holder(&mut conn).await.unwrap_or_default();
                    tracing::warn!(
                        waited_secs = said.as_secs(),
                        holder,
                        "waiting for another keycast's migrations (the advisory lock {MIGRATION_LOCK}); if nothing \
                         is migrating, end the holder's session (SELECT pg_terminate_backend(pid))"
                    );
                }
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            let outcome = async {
                check_schemas_are_keycasts(&mut conn).await?;
                let applied = applied_version!(conn, POSTGRES_TABLE).await?;
                if !newer_but_compatible(applied, oldest_reader!(conn).await?)? {
                    POSTGRES_MIGRATIONS.run(&mut *conn).await?;
                }
                Ok::<(), MigrateError>(())
            }
            .await;
            let unlocked = sqlx::query("SELECT pg_advisory_unlock($1)")
                .bind(MIGRATION_LOCK)
                .execute(&mut *conn)
                .await;
            if unlocked.is_err() {
                // A connection whose unlock failed must not go back to the pool holding it.
                let _ = conn.detach().close().await;
            }
            outcome?;
        }
    }
    Ok(())
}

/// Whether the schema is newer than this binary yet still serves it (then nothing is
/// migrated); false when there is something to migrate or nothing newer.
///
/// # Errors
/// [`MigrateError::SchemaTooNew`] (a newer schema that promises nothing) or
/// [`MigrateError::Contracted`] (one that no longer serves this binary).
fn newer_but_compatible(database: Option<i64>, oldest_reader: Option<i64>) -> Result<bool, MigrateError> {
    serves(latest_version(), database, oldest_reader)
}

/// [`newer_but_compatible`] for a binary at version `binary`.
fn serves(binary: i64, database: Option<i64>, oldest_reader: Option<i64>) -> Result<bool, MigrateError> {
    match (database, oldest_reader) {
        (Some(database), _) if database <= binary => Ok(false),
        (None, _) => Ok(false),
        (Some(database), None) => Err(MigrateError::SchemaTooNew { database, binary }),
        (Some(database), Some(oldest)) if oldest > binary => Err(MigrateError::Contracted {
            database,
            oldest,
            binary,
        }),
        (Some(database), Some(_)) => {
            tracing::warn!(
                database,
                binary,
                "the database schema is newer than this keycast (a rolling deploy in progress?); it still serves this version, so running without migrating"
            );
            Ok(true)
        }
    }
}

/// Applies the migrations up to `version` only (tests that walk the history).
#[cfg(test)]
pub(crate) async fn run_to(db: &Db, version: i64) {
    match db.engine() {
        Engine::Sqlite(pool) => SQLITE_MIGRATIONS.run_to(version, pool).await.unwrap(),
        Engine::Postgres(pool) => POSTGRES_MIGRATIONS.run_to(version, pool).await.unwrap(),
    }
}

/// Refuses to run where another role could have planted what keycast would run as its own
/// role. A trigger runs as whoever fires it and a function as whoever calls it: a table sqlx
/// would find already there (it creates `_sqlx_migrations` only if missing), or an overload
/// of a function keycast's SQL calls (resolved across every schema on the search path), runs
/// its owner's code with keycast's rights over every table keycast owns.
///
/// So, in the schemas on keycast's search path, every table, function and operator must be
/// a trusted role's, and only trusted roles may create there; nor may every role (PUBLIC)
/// create a schema in the database (one named after keycast's role would come first on the
/// default search path). Trusted ([`TRUSTED`]): keycast's role and the roles it is a member
/// of (its group roles are its own: on Cloud SQL every built-in user belongs to
/// `cloudsqlsuperuser`, see POSTGRESQL.md), superusers, and the owners of the database and of
/// those schemas — the operator, who could do all of this anyway. An object added to an
/// extension stays its owner's: an extension's own objects belong to the superuser who
/// installed it, or to the bootstrap superuser for a trusted extension.
async fn check_schemas_are_keycasts(conn: &mut sqlx::PgConnection) -> Result<(), MigrateError> {
    let foreign: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "WITH {TRUSTED}, \
         objects (kind, name, namespace, owner) AS ( \
           SELECT 'relation', CAST(relname AS TEXT), relnamespace, relowner FROM pg_class \
           UNION ALL SELECT 'function', CAST(proname AS TEXT), pronamespace, proowner FROM pg_proc \
           UNION ALL SELECT 'operator', CAST(oprname AS TEXT), oprnamespace, oprowner FROM pg_operator) \
         SELECT format('%s %s.%s (owner %s)', o.kind, n.nspname, o.name, r.rolname) \
         FROM objects o JOIN pg_namespace n ON n.oid = o.namespace JOIN pg_roles r ON r.oid = o.owner \
         WHERE n.nspname = ANY (current_schemas(false)) AND o.owner NOT IN (SELECT oid FROM trusted) \
         ORDER BY 1 LIMIT 20"
    )))
    .fetch_all(&mut *conn)
    .await?;
    if !foreign.is_empty() {
        return Err(MigrateError::ForeignObjects {
            objects: foreign.join(", "),
        });
    }
    let open: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "WITH {TRUSTED}, \
         grants (what, grantee) AS ( \
           SELECT format('SCHEMA %I', n.nspname), a.grantee FROM pg_namespace n, \
                  aclexplode(COALESCE(n.nspacl, acldefault('n', n.nspowner))) AS a \
           WHERE n.nspname = ANY (current_schemas(false)) AND a.privilege_type = 'CREATE' \
             AND a.grantee NOT IN (SELECT oid FROM trusted) \
           UNION ALL \
           SELECT format('DATABASE %I', d.datname), a.grantee FROM pg_database d, \
                  aclexplode(COALESCE(d.datacl, acldefault('d', d.datdba))) AS a \
           WHERE d.datname = current_database() AND a.privilege_type = 'CREATE' AND a.grantee = 0) \
         SELECT format('REVOKE CREATE ON %s FROM %s', g.what, \
                       CASE WHEN g.grantee = 0 THEN 'PUBLIC' ELSE quote_ident(pg_get_userbyid(g.grantee)) END) \
         FROM grants g ORDER BY 1"
    )))
    .fetch_all(&mut *conn)
    .await?;
    if !open.is_empty() {
        return Err(MigrateError::SchemaOpen {
            revokes: open.join("; "),
        });
    }
    Ok(())
}

/// The `trusted (oid)` CTE of [`check_schemas_are_keycasts`]: superusers, keycast's role and
/// its group roles, the database's owner, the owners of the schemas on the search path, and
/// `pg_database_owner` (PostgreSQL 15's owner of `public`, standing for the database's owner).
/// PUBLIC (oid 0) never is.
const TRUSTED: &str = "db AS (SELECT datdba FROM pg_database WHERE datname = current_database()), \
     trusted (oid) AS ( \
       SELECT oid FROM pg_roles \
       WHERE rolsuper OR pg_has_role(current_user, oid, 'USAGE') OR rolname = 'pg_database_owner' \
       UNION SELECT datdba FROM db \
       UNION SELECT nspowner FROM pg_namespace WHERE nspname = ANY (current_schemas(false)))";

/// How often a start waiting for the migration lock says so.
const LOCK_WAIT_SAID_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// Who holds the migration lock: `pid …, application …, state …, in its transaction for … s`.
async fn lock_holder(conn: &mut sqlx::PgConnection) -> Result<String, sqlx::Error> {
    // A bigint advisory key is held as (classid, objid) = its high and low 32 bits, objsubid 1.
    let holder: Option<(i32, String, String, i64)> = sqlx::query_as(
        "SELECT a.pid, COALESCE(a.application_name, ''), COALESCE(a.state, ''), \
                COALESCE(CAST(EXTRACT(EPOCH FROM now() - a.xact_start) AS BIGINT), 0) \
         FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
         WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 \
           AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
           AND l.classid = CAST($1 >> 32 AS oid) AND l.objid = CAST($1 & 4294967295 AS oid)",
    )
    .bind(MIGRATION_LOCK)
    .fetch_optional(conn)
    .await?;
    Ok(match holder {
        Some((pid, application, state, secs)) => {
            format!("pid {pid}, application {application:?}, state {state:?}, in its transaction for {secs} s")
        }
        None => "unknown".to_owned(),
    })
}

const SQLITE_TABLE: &str = "SELECT name FROM sqlite_master WHERE type = 'table' AND name = '_sqlx_migrations'";
const POSTGRES_TABLE: &str = "SELECT CAST(table_name AS TEXT) FROM information_schema.tables \
                              WHERE table_schema = current_schema() AND table_name = '_sqlx_migrations'";

#[cfg(test)]
mod tests {
    use crate::{Db, DbOptions, OpenError};

    #[test]
    fn both_engines_carry_the_same_migration_versions() {
        let versions =
            |m: &sqlx::migrate::Migrator| m.iter().map(|m| (m.version, m.description.clone())).collect::<Vec<_>>();
        assert_eq!(
            versions(&super::SQLITE_MIGRATIONS),
            versions(&super::POSTGRES_MIGRATIONS)
        );
    }

    /// A database that applied a migration refuses every later start once that file changes
    /// (sqlx compares checksums): an edit to a released migration, even to a comment, would
    /// stop every deployment that applied it. `migrations/released.sum` pins each file.
    #[test]
    fn no_released_migration_has_changed() {
        let pinned = include_str!("../migrations/released.sum");
        for (engine, migrator) in [
            ("postgres", &*super::POSTGRES_MIGRATIONS),
            ("sqlite", &super::SQLITE_MIGRATIONS),
        ] {
            for migration in migrator.iter() {
                let sum: String = migration.checksum.iter().map(|b| format!("{b:02x}")).collect();
                let file = format!(
                    "{:04}_{}.sql",
                    migration.version,
                    migration.description.replace(' ', "_")
                );
                let line = format!("{engine} {file} {sum}");
                assert!(
                    pinned.lines().any(|l| l == line),
                    "{engine} migration {file} is not as released (or is new: append `{line}` to \
                     crates/db/migrations/released.sum); never edit a released migration, add one"
                );
            }
        }
    }

    /// The hourly sweep deletes by `expires_at` from each of these tables; without an index
    /// each delete read the whole table (on SQLite under the write lock). Asked of each
    /// engine's planner (PostgreSQL told to avoid a sequential scan where it can, since on
    /// an empty table it would choose one anyway).
    #[tokio::test]
    async fn the_sweep_finds_what_expired_by_an_index() {
        const SWEPT: [&str; 6] = [
            "sessions",
            "user_tokens",
            "oauth_codes",
            "access_tokens",
            "refresh_tokens",
            "approvals",
        ];
        for (_guard, db) in crate::testing::temp_dbs().await {
            for table in SWEPT {
                let sql = format!("DELETE FROM {table} WHERE expires_at <= 5");
                let plan = match (db.as_sqlite(), db.as_postgres()) {
                    (Some(pool), _) => {
                        let rows: Vec<(i64, i64, i64, String)> =
                            sqlx::query_as(sqlx::AssertSqlSafe(format!("EXPLAIN QUERY PLAN {sql}")))
                                .fetch_all(pool)
                                .await
                                .unwrap();
                        rows.into_iter().map(|r| r.3).collect::<Vec<_>>().join("; ")
                    }
                    (None, Some(pool)) => {
                        let mut conn = pool.acquire().await.unwrap();
                        sqlx::query("SET enable_seqscan = off")
                            .execute(&mut *conn)
                            .await
                            .unwrap();
                        let rows: Vec<(String,)> = sqlx::query_as(sqlx::AssertSqlSafe(format!("EXPLAIN {sql}")))
                            .fetch_all(&mut *conn)
                            .await
                            .unwrap();
                        sqlx::query("RESET enable_seqscan").execute(&mut *conn).await.unwrap();
                        rows.into_iter().map(|r| r.0).collect::<Vec<_>>().join("; ")
                    }
                    _ => unreachable!(),
                };
                assert!(
                    plan.contains(&format!("{table}_expires_at")),
                    "{:?}: {sql} reads the whole table: {plan}",
                    db.kind()
                );
            }
        }
    }

    #[tokio::test]
    async fn migrations_are_idempotent_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let opts = DbOptions::new(dir.path().join("k.db"));
        let db = Db::open_sqlite(&opts).await.unwrap();
        db.close().await;
        let db = Db::open_sqlite(&opts).await.unwrap();
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM policies")
            .fetch_one(db.as_sqlite().unwrap())
            .await
            .unwrap();
        assert_eq!(n, 4, "seeded policies exist exactly once");
    }

    /// Stamps a migration from a future keycast (version 9999) into the database.
    async fn stamp_future(db: &Db) {
        crate::pool::on_engine!(db, |pool| {
            sqlx::query(
                "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
                 VALUES (9999, 'from the future', TRUE, $1, 0)",
            )
            .bind(vec![0u8])
            .execute(pool)
            .await
            .unwrap();
        });
    }

    async fn set_oldest_reader(db: &Db, oldest: i64) {
        crate::pool::on_engine!(db, |pool| {
            sqlx::query("UPDATE keycast_schema SET oldest_reader = $1")
                .bind(oldest)
                .execute(pool)
                .await
                .unwrap();
        });
    }

    #[tokio::test]
    async fn a_newer_schema_that_still_serves_this_binary_runs_and_one_that_does_not_is_refused() {
        // The old half of a rolling deploy: the new keycast migrated (expand only), and an
        // instance of the old one starts.
        for (_guard, db) in crate::testing::temp_dbs().await {
            stamp_future(&db).await;
            super::run(&db)
                .await
                .expect("an expand-only newer schema still serves this binary");
            crate::users::find_by_email(&db, "nobody@example.com").await.unwrap();
            // A contract step: the schema no longer serves this binary.
            set_oldest_reader(&db, 9999).await;
            let err = super::run(&db).await.unwrap_err();
            assert!(
                matches!(
                    err,
                    super::MigrateError::Contracted {
                        database: 9999,
                        oldest: 9999,
                        ..
                    }
                ),
                "{err}"
            );
            assert!(err.to_string().contains("run version 9999 or newer"), "{err}");
        }
    }

    /// Binaries before 0014 ignore restrictions later migrations made binding (a grant's
    /// expiry and limits, signatures counted before pruning, a code used twice): rolled back
    /// to, one would sign for expired grants without end. Today's schema refuses them.
    #[tokio::test]
    async fn the_schema_refuses_binaries_that_would_ignore_a_grants_expiry_and_limits() {
        for (_guard, db) in crate::testing::temp_dbs().await {
            let oldest: i64 = crate::pool::on_engine!(&db, |pool| {
                sqlx::query_scalar("SELECT oldest_reader FROM keycast_schema WHERE id = 1")
                    .fetch_one(pool)
                    .await
                    .unwrap()
            });
            let at = Some(super::latest_version());
            for binary in [6, 12, 13] {
                let refused = super::serves(binary, at, Some(oldest));
                assert!(
                    matches!(refused, Err(super::MigrateError::Contracted { oldest: 14, .. })),
                    "{:?}: a binary at {binary} is not refused: {refused:?}",
                    db.kind()
                );
            }
            assert!(
                matches!(super::serves(14, at, Some(oldest)), Ok(true)),
                "{:?}",
                db.kind()
            );
        }
    }

    #[tokio::test]
    async fn schema_newer_than_binary_without_a_promise_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let opts = DbOptions::new(dir.path().join("k.db"));
        let db = Db::open_sqlite(&opts).await.unwrap();
        stamp_future(&db).await;
        sqlx::query("DROP TABLE keycast_schema")
            .execute(db.as_sqlite().unwrap())
            .await
            .unwrap();
        db.close().await;
        let err = Db::open_sqlite(&opts).await.unwrap_err();
        assert!(matches!(
            err,
            OpenError::Migrate(super::MigrateError::SchemaTooNew { database: 9999, .. })
        ));
        assert!(err.to_string().contains("newer than this keycast binary"), "{err}");
    }
}
