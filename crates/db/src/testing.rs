//! Fixtures for this crate's unit tests: a temporary database and minimal rows.

use sqlx::SqlitePool;

use crate::authz::{self, AuthorizationRow, NewAuthorization};
use crate::users::{self, NewUser};
use crate::{AuthorizationId, Db, DbOptions, PolicyId, TokenHash, UserId};

/// A freshly migrated database in a temporary directory (kept alive by the guard).
pub(crate) async fn temp_db() -> (tempfile::TempDir, Db) {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open_sqlite(&DbOptions::new(dir.path().join("k.db"))).await.unwrap();
    (dir, db)
}

/// A user with this email.
pub(crate) async fn test_user(pool: &SqlitePool, email: &str) -> UserId {
    let new = NewUser {
        email,
        password_hash: "$argon2id$stub",
        username: None,
    };
    users::insert(pool, &new, 1).await.unwrap().id
}

/// A `social` authorization of `user` whose bunker pubkey is `bunker`.
pub(crate) async fn test_authorization(pool: &SqlitePool, user: &UserId, bunker: &str) -> AuthorizationRow {
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
    };
    authz::insert(pool, &new, 2).await.unwrap()
}
