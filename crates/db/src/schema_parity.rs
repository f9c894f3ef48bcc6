//! The two migration folders must build the same schema: this test migrates a SQLite file
//! and a real PostgreSQL database and compares them table by table — each column's type,
//! nullability and default, primary keys, unique constraints, foreign keys (with their
//! `ON DELETE`), CHECK constraints and indexes — in one engine-neutral description.
//!
//! Types are compared through the pairs keycast uses (`TEXT`/`text`, `BIGINT`/`bigint`,
//! `BLOB`/`bytea`); any other type fails the test until it is added here on purpose.
//! A CHECK constraint is compared by its column and the literals it allows, since each
//! engine prints the expression its own way.

use std::collections::BTreeSet;

use sqlx::Row;

use crate::testing::temp_dbs;
use crate::Db;

/// One table, engine-neutral.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Table {
    name: String,
    /// (name, type, not null, default)
    columns: Vec<(String, &'static str, bool, Option<String>)>,
    primary_key: Vec<String>,
    unique: BTreeSet<Vec<String>>,
    /// (columns, referenced table, referenced columns, on delete)
    foreign_keys: BTreeSet<(Vec<String>, String, Vec<String>, String)>,
    /// (column, allowed literals)
    checks: BTreeSet<(String, Vec<String>)>,
    /// (name, columns, unique) of indexes made by CREATE INDEX
    indexes: BTreeSet<(String, Vec<String>, bool)>,
}

fn neutral_type(declared: &str) -> &'static str {
    match declared.to_ascii_lowercase().as_str() {
        "text" => "text",
        "bigint" => "bigint",
        "blob" | "bytea" => "bytes",
        other => panic!("column type {other:?} has no counterpart declared in schema_parity.rs"),
    }
}

/// The quoted literals of a CHECK expression, sorted: `purpose IN ('a', 'b')` and
/// `purpose = ANY (ARRAY['a'::text, 'b'::text])` both give `[a, b]`.
fn literals(expression: &str) -> Vec<String> {
    let mut out: Vec<String> = expression.split('\'').skip(1).step_by(2).map(str::to_owned).collect();
    out.sort();
    out
}

/// `CHECK (<column> …)` clauses of a CREATE TABLE statement, per column definition line.
fn sqlite_checks(create: &str) -> BTreeSet<(String, Vec<String>)> {
    create
        .lines()
        .filter_map(|part| {
            let at = part.find("CHECK")?;
            let column = part[at..].trim_start_matches("CHECK").trim().trim_start_matches('(');
            let column = column.split_whitespace().next()?.to_owned();
            Some((column, literals(&part[at..])))
        })
        .collect()
}

async fn sqlite_schema(db: &Db) -> BTreeSet<Table> {
    let pool = db.as_sqlite().unwrap();
    let tables: Vec<(String, String)> = sqlx::query_as(
        "SELECT name, sql FROM sqlite_master WHERE type = 'table' \
         AND name NOT LIKE 'sqlite_%' AND name <> '_sqlx_migrations'",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    let mut schema = BTreeSet::new();
    for (name, create) in tables {
        let info =
            sqlx::query("SELECT name, type, \"notnull\", dflt_value, pk FROM pragma_table_info($1) ORDER BY cid")
                .bind(&name)
                .fetch_all(pool)
                .await
                .unwrap();
        let mut primary: Vec<(i64, String)> = Vec::new();
        let mut columns = Vec::new();
        for row in &info {
            let column: String = row.get("name");
            let pk: i64 = row.get("pk");
            if pk > 0 {
                primary.push((pk, column.clone()));
            }
            // SQLite lets a non-INTEGER primary key hold NULL; keycast treats it (as
            // PostgreSQL does) as NOT NULL, and never stores one.
            let not_null = row.get::<i64, _>("notnull") == 1 || pk > 0;
            let declared: String = row.get("type");
            columns.push((column, neutral_type(&declared), not_null, row.get("dflt_value")));
        }
        primary.sort();
        let mut table = Table {
            name: name.clone(),
            columns,
            primary_key: primary.into_iter().map(|(_, c)| c).collect(),
            unique: BTreeSet::new(),
            foreign_keys: BTreeSet::new(),
            checks: sqlite_checks(&create),
            indexes: BTreeSet::new(),
        };
        let indexes = sqlx::query("SELECT name, \"unique\", origin FROM pragma_index_list($1)")
            .bind(&name)
            .fetch_all(pool)
            .await
            .unwrap();
        for index in indexes {
            let index_name: String = index.get("name");
            let cols: Vec<String> = sqlx::query_scalar("SELECT name FROM pragma_index_info($1) ORDER BY seqno")
                .bind(&index_name)
                .fetch_all(pool)
                .await
                .unwrap();
            match index.get::<String, _>("origin").as_str() {
                "u" => {
                    table.unique.insert(cols);
                }
                "c" => {
                    table
                        .indexes
                        .insert((index_name, cols, index.get::<i64, _>("unique") == 1));
                }
                _ => {}
            }
        }
        let fks = sqlx::query(
            "SELECT id, \"table\", \"from\", \"to\", on_delete FROM pragma_foreign_key_list($1) ORDER BY id, seq",
        )
        .bind(&name)
        .fetch_all(pool)
        .await
        .unwrap();
        for fk in fks {
            let on_delete: String = fk.get("on_delete");
            table.foreign_keys.insert((
                vec![fk.get("from")],
                fk.get("table"),
                vec![fk.get("to")],
                on_delete.to_ascii_lowercase(),
            ));
        }
        schema.insert(table);
    }
    schema
}

async fn postgres_schema(db: &Db) -> BTreeSet<Table> {
    let pool = db.as_postgres().unwrap();
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT CAST(table_name AS TEXT) FROM information_schema.tables \
         WHERE table_schema = current_schema() AND table_name <> '_sqlx_migrations'",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    let mut schema = BTreeSet::new();
    for name in tables {
        let info = sqlx::query(
            "SELECT CAST(column_name AS TEXT) AS name, CAST(data_type AS TEXT) AS type, \
             is_nullable = 'NO' AS not_null, CAST(column_default AS TEXT) AS dflt \
             FROM information_schema.columns WHERE table_schema = current_schema() AND table_name = $1 \
             ORDER BY ordinal_position",
        )
        .bind(&name)
        .fetch_all(pool)
        .await
        .unwrap();
        let columns = info
            .iter()
            .map(|row| {
                let declared: String = row.get("type");
                (
                    row.get("name"),
                    neutral_type(&declared),
                    row.get("not_null"),
                    row.get("dflt"),
                )
            })
            .collect();
        let mut table = Table {
            name: name.clone(),
            columns,
            primary_key: Vec::new(),
            unique: BTreeSet::new(),
            foreign_keys: BTreeSet::new(),
            checks: BTreeSet::new(),
            indexes: BTreeSet::new(),
        };
        // Column names of a constraint's keys, in key order.
        let constraints = sqlx::query(
            "SELECT CAST(c.contype AS TEXT) AS kind, pg_get_constraintdef(c.oid) AS def, \
               ARRAY(SELECT CAST(a.attname AS TEXT) FROM unnest(c.conkey) WITH ORDINALITY k(n, i) \
                     JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.n ORDER BY k.i) AS cols, \
               CAST(f.relname AS TEXT) AS ref_table, \
               ARRAY(SELECT CAST(a.attname AS TEXT) FROM unnest(c.confkey) WITH ORDINALITY k(n, i) \
                     JOIN pg_attribute a ON a.attrelid = c.confrelid AND a.attnum = k.n ORDER BY k.i) AS ref_cols, \
               CAST(c.confdeltype AS TEXT) AS on_delete \
             FROM pg_constraint c JOIN pg_class t ON t.oid = c.conrelid \
             LEFT JOIN pg_class f ON f.oid = c.confrelid \
             WHERE t.relname = $1 AND t.relnamespace = current_schema()::regnamespace",
        )
        .bind(&name)
        .fetch_all(pool)
        .await
        .unwrap();
        for c in constraints {
            let cols: Vec<String> = c.get("cols");
            match c.get::<String, _>("kind").as_str() {
                "p" => table.primary_key = cols,
                "u" => {
                    table.unique.insert(cols);
                }
                "f" => {
                    let on_delete = match c.get::<String, _>("on_delete").as_str() {
                        "c" => "cascade",
                        "a" => "no action",
                        "r" => "restrict",
                        "n" => "set null",
                        other => panic!("unexpected ON DELETE {other}"),
                    };
                    table
                        .foreign_keys
                        .insert((cols, c.get("ref_table"), c.get("ref_cols"), on_delete.to_owned()));
                }
                "c" => {
                    let def: String = c.get("def");
                    table.checks.insert((cols[0].clone(), literals(&def)));
                }
                other => panic!("unexpected constraint kind {other}"),
            }
        }
        let indexes = sqlx::query(
            "SELECT CAST(i.relname AS TEXT) AS name, x.indisunique AS is_unique, \
               ARRAY(SELECT CAST(a.attname AS TEXT) FROM unnest(x.indkey) WITH ORDINALITY k(n, o) \
                     JOIN pg_attribute a ON a.attrelid = x.indrelid AND a.attnum = k.n ORDER BY k.o) AS cols \
             FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid JOIN pg_class t ON t.oid = x.indrelid \
             WHERE t.relname = $1 AND t.relnamespace = current_schema()::regnamespace \
               AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = x.indexrelid)",
        )
        .bind(&name)
        .fetch_all(pool)
        .await
        .unwrap();
        for index in indexes {
            table
                .indexes
                .insert((index.get("name"), index.get("cols"), index.get("is_unique")));
        }
        schema.insert(table);
    }
    schema
}

#[tokio::test]
async fn both_engines_build_the_same_schema_column_by_column() {
    let dbs = temp_dbs().await;
    let Some((_, postgres)) = dbs.iter().find(|(_, db)| db.kind() == crate::EngineKind::Postgres) else {
        return; // no test server: temp_dbs said so loudly (and fails under scripts/test.sh)
    };
    let sqlite = sqlite_schema(&dbs[0].1).await;
    let postgres = postgres_schema(postgres).await;
    let names = |s: &BTreeSet<Table>| s.iter().map(|t| t.name.clone()).collect::<Vec<_>>();
    assert_eq!(names(&sqlite), names(&postgres), "the same tables");
    for (lite, pg) in sqlite.iter().zip(&postgres) {
        assert_eq!(lite, pg, "table {} differs between the engines", lite.name);
    }
    let users = sqlite.iter().find(|t| t.name == "users").unwrap();
    assert!(
        users.unique.contains(&vec!["email".to_owned()]),
        "the description sees constraints"
    );
    let tokens = sqlite.iter().find(|t| t.name == "user_tokens").unwrap();
    assert_eq!(
        tokens.checks.iter().next().unwrap().1,
        ["reset_password", "verify_email"],
        "and CHECKs"
    );
}

#[test]
fn check_literals_read_the_same_from_both_engines() {
    assert_eq!(
        literals("CHECK ((purpose = ANY (ARRAY['verify_email'::text, 'reset_password'::text])))"),
        literals("CHECK (purpose IN ('verify_email', 'reset_password'))")
    );
    let checks = sqlite_checks("CREATE TABLE t (\n a TEXT NOT NULL CHECK (a IN ('x', 'y')),\n b TEXT\n)");
    assert_eq!(
        checks.into_iter().collect::<Vec<_>>(),
        [("a".to_owned(), vec!["x".to_owned(), "y".to_owned()])]
    );
}

/// The expand/contract rule, checked on the history: each migration keeps every table and
/// every column (type, nullability, default) of the schema before it — so the keycast
/// before it still runs on it during a rolling deploy — unless it raises
/// `keycast_schema.oldest_reader` to its own version (a declared contract step).
#[tokio::test]
async fn each_migration_only_expands_unless_it_says_it_contracts() {
    let versions: Vec<i64> = (1..=crate::migrate::latest_version()).collect();
    let dir = tempfile::tempdir().unwrap();
    let mut dbs = vec![Db::open_sqlite_unmigrated(&crate::DbOptions::new(dir.path().join("walk.db"))).await];
    let mut _scratch = None;
    if let Some(server) = crate::scratch::test_server() {
        let scratch = crate::scratch::create_database(&server, "walk").await.unwrap();
        dbs.push(
            Db::connect_postgres(&crate::PgOptions::new(&scratch.url))
                .await
                .unwrap(),
        );
        _scratch = Some(scratch);
    }
    for db in &dbs {
        let mut before: Option<BTreeSet<Table>> = None;
        for version in &versions {
            crate::migrate::run_to(db, *version).await;
            let schema = match db.kind() {
                crate::EngineKind::Sqlite => sqlite_schema(db).await,
                crate::EngineKind::Postgres => postgres_schema(db).await,
            };
            let oldest: Option<i64> = crate::pool::on_engine!(db, |pool| {
                sqlx::query_scalar("SELECT oldest_reader FROM keycast_schema")
                    .fetch_optional(pool)
                    .await
                    .unwrap_or(None)
            });
            if let Some(before) = &before {
                if oldest.is_some_and(|oldest| oldest >= *version) {
                    continue; // a declared contract step
                }
                for old in before {
                    let new = schema
                        .iter()
                        .find(|t| t.name == old.name)
                        .unwrap_or_else(|| panic!("{:?}: migration {version} drops table {}", db.kind(), old.name));
                    for column in &old.columns {
                        assert!(
                            new.columns.contains(column),
                            "{:?}: migration {version} drops or changes {}.{} ({column:?}) without raising keycast_schema.oldest_reader",
                            db.kind(),
                            old.name,
                            column.0
                        );
                    }
                }
            }
            before = Some(schema);
        }
    }
}
