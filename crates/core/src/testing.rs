//! Fixtures for this crate's unit tests.

use std::sync::Arc;

use keycast_db::policies::{self, PolicyRow};
use keycast_db::users::{self, NewUser};
use keycast_db::{Db, DbOptions, UserId};
use nostr::PublicKey;

use crate::authz::{NewGrant, DEFAULT_TOKEN_TTL_SECS};
use crate::key_manager::{KeyManager, MasterKey, MasterKeyManager};
use crate::password::{PasswordHasher, PasswordParams};

/// A migrated temp database, a key manager, and one user with a generated key.
pub(crate) struct Fixture {
    pub dir: tempfile::TempDir,
    pub db: Db,
    pub km: Arc<dyn KeyManager>,
    pub user: UserId,
    pub user_pubkey: PublicKey,
    pub relays: Vec<String>,
}

impl Fixture {
    pub fn pool(&self) -> &Db {
        &self.db
    }

    /// A grant request for the fixture's user under `policy`.
    pub fn new_grant<'a>(&'a self, policy: &'a PolicyRow) -> NewGrant<'a> {
        NewGrant {
            user_id: &self.user,
            policy,
            client_id: "app",
            redirect_origin: "https://app.example",
            relays: &self.relays,
            token_ttl_secs: DEFAULT_TOKEN_TTL_SECS,
            terms: Default::default(),
            max_live: crate::authz::DEFAULT_MAX_LIVE_GRANTS,
            session: None,
        }
    }
}

/// A live session of `user` (a consent's code is written only while one is).
pub(crate) async fn session(db: &Db, user: &UserId) -> keycast_db::TokenHash {
    let hash = crate::secret::hash_token(crate::secret::random_token().expose());
    assert!(keycast_db::sessions::insert(db, &hash, user, None, 1, i64::MAX, 10)
        .await
        .unwrap());
    hash
}

pub(crate) async fn fixture() -> Fixture {
    fixture_with(|o| o).await
}

/// As [`fixture`], with the database options adjusted (e.g. a commit signal).
pub(crate) async fn fixture_with(adjust: impl FnOnce(DbOptions) -> DbOptions) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open_sqlite(&adjust(DbOptions::new(dir.path().join("k.db"))))
        .await
        .unwrap();
    let km: Arc<dyn KeyManager> = Arc::new(MasterKeyManager::new(MasterKey::generate()));
    let user = test_user(&db, "alice@example.com").await;
    let key = crate::keys::generate_user_key(&db, km.as_ref(), &user, 1)
        .await
        .unwrap();
    Fixture {
        dir,
        db,
        km,
        user,
        user_pubkey: key.pubkey,
        relays: vec!["ws://127.0.0.1:7777".into()],
    }
}

pub(crate) async fn test_user(db: &Db, email: &str) -> UserId {
    let new = NewUser {
        email,
        password_hash: "$argon2id$stub",
        username: None,
    };
    users::insert(db, &new, 1).await.unwrap().id
}

pub(crate) async fn policy(fx: &Fixture, slug: &str) -> PolicyRow {
    policies::find_by_slug(fx.pool(), slug).await.unwrap().unwrap()
}

pub(crate) async fn social_policy(fx: &Fixture) -> PolicyRow {
    policy(fx, "social").await
}

/// argon2id with tiny costs, so tests run fast; never for production.
pub(crate) fn fast_hasher() -> PasswordHasher {
    PasswordHasher::new(PasswordParams {
        memory_kib: 1024,
        iterations: 1,
        parallelism: 1,
    })
    .unwrap()
}
