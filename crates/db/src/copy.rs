//! Moving a keycast database from SQLite to PostgreSQL (`keycast migrate --to`): every
//! table, row for row, in one PostgreSQL transaction, verified before it commits.
//!
//! - **All or nothing.** The copy and its verification run in one transaction on the
//!   target: a failure anywhere (a lost connection, a refused row, a checksum that does
//!   not match) rolls it all back, so the target is as empty as before and the command can
//!   simply be run again.
//! - **Verified.** Per table, the row count and a checksum of every row's values (SHA-256
//!   per row, summed, so neither engine's sort order matters) are computed on both sides;
//!   the transaction commits only if every table matches.
//! - **Refuses a non-empty target.** Only the rows the migrations seed themselves
//!   (`policies`, `keycast_schema`) may be there; they are replaced by the source's.
//!
//! Both schemas are at the same version (the caller migrated both) and the same column by
//! column (`schema_parity`), with three column types: text, bigint and bytes.

use std::collections::{BTreeMap, BTreeSet};

use sha2::{Digest, Sha256};
use sqlx::{Postgres, Row, Transaction};

use crate::pool::Engine;
use crate::{Db, RepoError};

/// Rows the migrations insert themselves: replaced by the source's, not a sign of use.
const SEEDED: &[&str] = &["policies", "keycast_schema"];
/// Bound parameters per INSERT (PostgreSQL allows 65535).
const MAX_PARAMS: usize = 30_000;

/// A column's storage class, the same on both engines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Text,
    Int,
    Bytes,
}

#[derive(Debug, Clone)]
struct Table {
    name: String,
    columns: Vec<(String, Kind)>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Value {
    Null,
    Text(String),
    Int(i64),
    Bytes(Vec<u8>),
}

/// What was copied, per table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableReport {
    pub table: String,
    pub rows: u64,
    /// Hex; the same on both sides.
    pub checksum: String,
}

/// Why the copy did not happen.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error("the source must be SQLite and the target PostgreSQL")]
    Engines,
    #[error("the target database is not empty: table {table} has {rows} rows; keycast copies only into an empty database (a fresh one, or one a failed copy left empty)")]
    NotEmpty { table: String, rows: i64 },
    #[error("verification failed, nothing was kept: table {table} has {source_rows} rows (checksum {source_sum}) in SQLite but {target_rows} (checksum {target_sum}) in PostgreSQL")]
    Mismatch {
        table: String,
        source_rows: u64,
        source_sum: String,
        target_rows: u64,
        target_sum: String,
    },
    #[error(
        "{table}.{column} holds text with a NUL character in {rows} row(s), which PostgreSQL cannot store; \
         nothing was kept. Find them with the sqlite3 shell (SELECT rowid FROM {table} WHERE instr({column}, char(0)) > 0) \
         and edit or delete them, then run the copy again"
    )]
    Nul { table: String, column: String, rows: usize },
    #[error("column {table}.{column} has type {declared:?}, which the copy does not know")]
    UnknownType {
        table: String,
        column: String,
        declared: String,
    },
    #[error(transparent)]
    Repo(#[from] RepoError),
}

impl From<sqlx::Error> for CopyError {
    fn from(err: sqlx::Error) -> Self {
        CopyError::Repo(err.into())
    }
}

/// Copies every table of `source` (SQLite) into `target` (PostgreSQL, migrated to the same
/// version, empty), verifies, and commits; returns what was copied, in copy order.
///
/// # Errors
/// [`CopyError`]; on any error nothing is kept in the target.
pub async fn sqlite_to_postgres(source: &Db, target: &Db) -> Result<Vec<TableReport>, CopyError> {
    let (Engine::Sqlite(lite), Engine::Postgres(pg)) = (source.engine(), target.engine()) else {
        return Err(CopyError::Engines);
    };
    // One read transaction for every table: a copy taken while keycast still writes would
    // otherwise read each table at another moment (a grant revoked between two tables' reads)
    // and still check out, since the checksums compare what was read with what was written.
    let mut source = lite.begin().await?;
    let tables = tables(&mut source).await?;
    let mut tx = pg.begin().await?;
    for table in &tables {
        let sql = format!("SELECT COUNT(*) FROM {}", quote(&table.name));
        let rows: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(sql)).fetch_one(&mut *tx).await?;
        if rows > 0 && !SEEDED.contains(&table.name.as_str()) {
            return Err(CopyError::NotEmpty {
                table: table.name.clone(),
                rows,
            });
        }
    }
    // Children first, so no foreign key is left dangling.
    for table in tables.iter().rev() {
        let sql = format!("DELETE FROM {}", quote(&table.name));
        sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&mut *tx).await?;
    }
    let mut reports = Vec::with_capacity(tables.len());
    for table in &tables {
        let rows = read_sqlite(&mut source, table).await?;
        refuse_nul(table, &rows)?;
        insert(&mut tx, table, &rows).await?;
        let (source_rows, source_sum) = summarize(&rows);
        let (target_rows, target_sum) = summarize(&read_postgres(&mut tx, table).await?);
        if (source_rows, &source_sum) != (target_rows, &target_sum) {
            return Err(CopyError::Mismatch {
                table: table.name.clone(),
                source_rows,
                source_sum,
                target_rows,
                target_sum,
            });
        }
        reports.push(TableReport {
            table: table.name.clone(),
            rows: source_rows,
            checksum: source_sum,
        });
    }
    tx.commit().await?;
    Ok(reports)
}

/// Names the first column of `table` whose text holds a NUL in some of `rows`: PostgreSQL
/// would refuse the insert with an error that names neither.
fn refuse_nul(table: &Table, rows: &[Vec<Value>]) -> Result<(), CopyError> {
    for (i, (column, _)) in table.columns.iter().enumerate() {
        let with_nul = rows
            .iter()
            .filter(|row| matches!(row.get(i), Some(Value::Text(text)) if text.contains('\0')))
            .count();
        if with_nul > 0 {
            return Err(CopyError::Nul {
                table: table.name.clone(),
                column: column.clone(),
                rows: with_nul,
            });
        }
    }
    Ok(())
}

/// Tables of `target` (PostgreSQL, its current schema) that `source` (SQLite) does not have:
/// in a database keycast did not make, another application's, sorted. Read before anything is
/// created in the target.
///
/// # Errors
/// [`CopyError::Engines`]; database errors.
pub async fn foreign_tables(source: &Db, target: &Db) -> Result<Vec<String>, CopyError> {
    let (Engine::Sqlite(lite), Engine::Postgres(pg)) = (source.engine(), target.engine()) else {
        return Err(CopyError::Engines);
    };
    let ours: BTreeSet<String> = sqlx::query_scalar("SELECT name FROM sqlite_master WHERE type = 'table'")
        .fetch_all(lite)
        .await?
        .into_iter()
        .collect();
    let theirs: Vec<String> = sqlx::query_scalar(
        "SELECT CAST(table_name AS TEXT) FROM information_schema.tables \
         WHERE table_schema = current_schema() AND table_type = 'BASE TABLE' ORDER BY 1",
    )
    .fetch_all(pg)
    .await?;
    Ok(theirs.into_iter().filter(|t| !ours.contains(t)).collect())
}

fn quote(identifier: &str) -> String {
    format!("\"{}\"", identifier.replace('"', "\"\""))
}

/// The source's tables with their columns, parents before children (foreign keys).
async fn tables(conn: &mut sqlx::SqliteConnection) -> Result<Vec<Table>, CopyError> {
    let names: Vec<String> = sqlx::query_scalar(
        "SELECT name FROM sqlite_master WHERE type = 'table' \
         AND name NOT LIKE 'sqlite_%' AND name <> '_sqlx_migrations' ORDER BY name",
    )
    .fetch_all(&mut *conn)
    .await?;
    let mut found = BTreeMap::new();
    let mut parents: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for name in &names {
        let columns = sqlx::query("SELECT name, type FROM pragma_table_info(?) ORDER BY cid")
            .bind(name)
            .fetch_all(&mut *conn)
            .await?
            .iter()
            .map(|row| {
                let column: String = row.get("name");
                let declared: String = row.get("type");
                let kind = match declared.to_ascii_lowercase().as_str() {
                    "text" => Kind::Text,
                    "bigint" | "integer" => Kind::Int,
                    "blob" => Kind::Bytes,
                    _ => {
                        return Err(CopyError::UnknownType {
                            table: name.clone(),
                            column,
                            declared,
                        })
                    }
                };
                Ok((column, kind))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let referenced: Vec<String> = sqlx::query_scalar("SELECT \"table\" FROM pragma_foreign_key_list(?)")
            .bind(name)
            .fetch_all(&mut *conn)
            .await?;
        parents.insert(
            name.clone(),
            referenced.into_iter().filter(|parent| parent != name).collect(),
        );
        found.insert(
            name.clone(),
            Table {
                name: name.clone(),
                columns,
            },
        );
    }
    // Kahn's algorithm, alphabetical among equals so the order is stable.
    let mut ordered = Vec::with_capacity(found.len());
    let mut placed = BTreeSet::new();
    while placed.len() < names.len() {
        let ready: Vec<String> = names
            .iter()
            .filter(|n| !placed.contains(*n))
            .filter(|n| parents[*n].iter().all(|p| placed.contains(p) || !found.contains_key(p)))
            .cloned()
            .collect();
        if ready.is_empty() {
            // A cycle of foreign keys: keycast's schema has none; copy the rest in name order.
            ordered.extend(names.iter().filter(|n| !placed.contains(*n)).map(|n| found[n].clone()));
            break;
        }
        for name in ready {
            ordered.push(found[&name].clone());
            placed.insert(name);
        }
    }
    Ok(ordered)
}

fn select(table: &Table) -> String {
    let columns: Vec<String> = table.columns.iter().map(|(c, _)| quote(c)).collect();
    format!("SELECT {} FROM {}", columns.join(", "), quote(&table.name))
}

fn decode<R>(row: &R, table: &Table) -> Result<Vec<Value>, sqlx::Error>
where
    R: Row,
    usize: sqlx::ColumnIndex<R>,
    for<'r> Option<String>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> Option<i64>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> Option<Vec<u8>>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    table
        .columns
        .iter()
        .enumerate()
        .map(|(i, (_, kind))| {
            Ok(match kind {
                Kind::Text => row.try_get::<Option<String>, _>(i)?.map_or(Value::Null, Value::Text),
                Kind::Int => row.try_get::<Option<i64>, _>(i)?.map_or(Value::Null, Value::Int),
                Kind::Bytes => row.try_get::<Option<Vec<u8>>, _>(i)?.map_or(Value::Null, Value::Bytes),
            })
        })
        .collect()
}

async fn read_sqlite(conn: &mut sqlx::SqliteConnection, table: &Table) -> Result<Vec<Vec<Value>>, CopyError> {
    let rows = sqlx::query(sqlx::AssertSqlSafe(select(table)))
        .fetch_all(&mut *conn)
        .await?;
    Ok(rows.iter().map(|r| decode(r, table)).collect::<Result<_, _>>()?)
}

async fn read_postgres(tx: &mut Transaction<'_, Postgres>, table: &Table) -> Result<Vec<Vec<Value>>, CopyError> {
    let rows = sqlx::query(sqlx::AssertSqlSafe(select(table)))
        .fetch_all(&mut **tx)
        .await?;
    Ok(rows.iter().map(|r| decode(r, table)).collect::<Result<_, _>>()?)
}

/// Multi-row INSERTs of at most [`MAX_PARAMS`] values each.
async fn insert(tx: &mut Transaction<'_, Postgres>, table: &Table, rows: &[Vec<Value>]) -> Result<(), CopyError> {
    let width = table.columns.len().max(1);
    let columns: Vec<String> = table.columns.iter().map(|(c, _)| quote(c)).collect();
    for chunk in rows.chunks((MAX_PARAMS / width).max(1)) {
        let mut n = 0;
        let tuples: Vec<String> = chunk
            .iter()
            .map(|_| {
                let params: Vec<String> = (0..width)
                    .map(|_| {
                        n += 1;
                        format!("${n}")
                    })
                    .collect();
                format!("({})", params.join(", "))
            })
            .collect();
        let sql = format!(
            "INSERT INTO {} ({}) VALUES {}",
            quote(&table.name),
            columns.join(", "),
            tuples.join(", ")
        );
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
        for row in chunk {
            for (value, (_, kind)) in row.iter().zip(&table.columns) {
                query = match (value, kind) {
                    (Value::Text(s), _) => query.bind(s.clone()),
                    (Value::Int(i), _) => query.bind(*i),
                    (Value::Bytes(b), _) => query.bind(b.clone()),
                    (Value::Null, Kind::Text) => query.bind(None::<String>),
                    (Value::Null, Kind::Int) => query.bind(None::<i64>),
                    (Value::Null, Kind::Bytes) => query.bind(None::<Vec<u8>>),
                };
            }
        }
        query.execute(&mut **tx).await?;
    }
    Ok(())
}

/// (rows, checksum): the wrapping sum of each row's SHA-256 (first 16 bytes), so the
/// order rows come back in does not matter.
fn summarize(rows: &[Vec<Value>]) -> (u64, String) {
    let mut sum: u128 = 0;
    for row in rows {
        let mut hash = Sha256::new();
        for value in row {
            match value {
                Value::Null => hash.update([0u8]),
                Value::Text(s) => {
                    hash.update([1u8]);
                    hash.update((s.len() as u64).to_be_bytes());
                    hash.update(s.as_bytes());
                }
                Value::Int(i) => {
                    hash.update([2u8]);
                    hash.update(i.to_be_bytes());
                }
                Value::Bytes(b) => {
                    hash.update([3u8]);
                    hash.update((b.len() as u64).to_be_bytes());
                    hash.update(b);
                }
            }
        }
        let digest = hash.finalize();
        sum = sum.wrapping_add(u128::from_be_bytes(digest[..16].try_into().expect("16 bytes")));
    }
    (rows.len() as u64, format!("{sum:032x}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{temp_db, test_authorization, test_user};

    #[tokio::test]
    async fn every_row_arrives_verified_and_a_second_copy_is_refused() {
        let Some(server) = crate::scratch::test_server() else {
            return;
        };
        let (_dir, source) = temp_db().await;
        let user = test_user(&source, "a@example.com").await;
        test_authorization(&source, &user, &"b".repeat(64)).await;
        let scratch = crate::scratch::create_database(&server, "copy").await.unwrap();
        let target = Db::open_postgres(&crate::PgOptions::new(&scratch.url)).await.unwrap();
        let reports = sqlite_to_postgres(&source, &target).await.unwrap();
        let users = reports.iter().find(|r| r.table == "users").unwrap();
        assert_eq!(users.rows, 1);
        let order: Vec<&str> = reports.iter().map(|r| r.table.as_str()).collect();
        let position = |t: &str| order.iter().position(|o| *o == t).unwrap();
        assert!(position("users") < position("authorizations"), "{order:?}");
        assert!(crate::users::find_by_email(&target, "a@example.com")
            .await
            .unwrap()
            .is_some());
        assert!(matches!(
            sqlite_to_postgres(&source, &target).await,
            Err(CopyError::NotEmpty { .. })
        ));
    }

    /// A NUL in a text column (SQLite stores it; PostgreSQL refuses it): the copy names the
    /// table and column and keeps nothing, where PostgreSQL's own error named neither.
    #[tokio::test]
    async fn text_with_a_nul_is_refused_by_table_and_column() {
        let Some(server) = crate::scratch::test_server() else {
            return;
        };
        let (_dir, source) = temp_db().await;
        test_user(&source, "a@example.com").await;
        sqlx::query("UPDATE users SET username = 'a' || char(0) || 'b'")
            .execute(source.as_sqlite().unwrap())
            .await
            .unwrap();
        let scratch = crate::scratch::create_database(&server, "copy_nul").await.unwrap();
        let target = Db::open_postgres(&crate::PgOptions::new(&scratch.url)).await.unwrap();
        let err = sqlite_to_postgres(&source, &target).await.unwrap_err();
        assert!(
            matches!(&err, CopyError::Nul { table, column, rows: 1 } if table == "users" && column == "username"),
            "{err}"
        );
        assert!(err.to_string().contains("users.username"), "{err}");
        assert!(crate::users::find_by_email(&target, "a@example.com")
            .await
            .unwrap()
            .is_none());
    }

    #[test]
    fn the_checksum_sees_every_value_but_not_the_order() {
        let a = vec![Value::Text("x".into()), Value::Int(1), Value::Null];
        let b = vec![Value::Bytes(vec![1]), Value::Int(2), Value::Text(String::new())];
        assert_eq!(summarize(&[a.clone(), b.clone()]), summarize(&[b.clone(), a.clone()]));
        let changed = vec![Value::Text("x".into()), Value::Int(2), Value::Null];
        assert_ne!(summarize(&[a.clone(), b.clone()]).1, summarize(&[changed, b.clone()]).1);
        let null_vs_empty = vec![Value::Text(String::new()), Value::Int(1), Value::Null];
        assert_ne!(summarize(&[a]).1, summarize(&[null_vs_empty]).1);
    }
}
