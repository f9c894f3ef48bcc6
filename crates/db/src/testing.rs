//! Fixtures for this crate's unit tests: temporary databases on every engine, and minimal rows.

use crate::authz::{self, AuthorizationRow, NewAuthorization};
use crate::users::{self, NewUser};
use crate::{AuthorizationId, Db, DbOptions, PgOptions, PolicyId, TokenHash, UserId};

/// Keeps a temporary database alive: the SQLite file's directory, or the PostgreSQL
/// scratch database (dropped with the guard).
#[allow(dead_code)] // held for its Drop only
pub(crate) enum Guard {
    Sqlite(tempfile::TempDir),
    Postgres(crate::scratch::ScratchDatabase),
}

/// A freshly migrated SQLite database in a temporary directory (kept alive by the guard).
pub(crate) async fn temp_db() -> (tempfile::TempDir, Db) {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open_sqlite(&DbOptions::new(dir.path().join("k.db"))).await.unwrap();
    (dir, db)
}

/// A freshly migrated database on every engine the tests can reach: SQLite always, and a
/// scratch database on the test PostgreSQL server (see [`crate::scratch::test_server`]).
pub(crate) async fn temp_dbs() -> Vec<(Guard, Db)> {
    let (dir, sqlite) = temp_db().await;
    let mut dbs = vec![(Guard::Sqlite(dir), sqlite)];
    if let Some(server) = crate::scratch::test_server() {
        let scratch = crate::scratch::create_database(&server, "db_unit").await.unwrap();
        let db = Db::open_postgres(&PgOptions::new(&scratch.url)).await.unwrap();
        dbs.push((Guard::Postgres(scratch), db));
    }
    dbs
}
/// The password hash of [`test_user`]'s users.
pub(crate) const STUB_HASH: &str = "$argon2id$stub";

/// A user with this email.
pub(crate) async fn test_user(db: &Db, email: &str) -> UserId {
    let new = NewUser {
        email,
        password_hash: STUB_HASH,
        username: None,
    };
    users::insert(db, &new, 1).await.unwrap().id
}

/// A `social` authorization of `user` whose bunker pubkey is `bunker`.
pub(crate) async fn test_authorization(db: &Db, user: &UserId, bunker: &str) -> AuthorizationRow {
    insert_capped(db, user, bunker, None, 1_000, 2).await.unwrap()
}

/// A `social` authorization of `user` on `bunker` with `terms`, inserted at `at` while `user`
/// has fewer than `max_live` live grants.
pub(crate) async fn insert_capped(
    db: &Db,
    user: &UserId,
    bunker: &str,
    terms: Option<&str>,
    max_live: u32,
    at: i64,
) -> Result<AuthorizationRow, crate::RepoError> {
    let new = NewAuthorization {
        id: &AuthorizationId::generate(),
        user_id: user,
        policy_id: &PolicyId::new("pol_social"),
        client_id: "app",
        redirect_origin: "https://app.example",
        bunker_pubkey: bunker,
        bunker_secret_encrypted: b"ciphertext",
        connect_secret_hash: &TokenHash::of(b"connect"),
        relays: "[\"ws://127.0.0.1:7777\"]",
        terms,
        max_live,
        session: None,
    };
    authz::insert(db, &new, at).await
}
