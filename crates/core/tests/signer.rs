//! The signing path end to end through the public API, against a real SQLite database:
//! tokens and bunkers resolve, requests are executed or refused, revocation is seen on
//! the very next request with warm caches, and signing never commits to the database.

use std::sync::Arc;

use keycast_core::authz::{create_grant, issue_access_token, NewGrant, DEFAULT_TOKEN_TTL_SECS};
use keycast_core::nostr::{Event, EventBuilder, Keys, Kind, PublicKey, UnsignedEvent};
use keycast_core::terms::{GrantTerms, Limits};
use keycast_core::{
    keys, AuthError, Authorization, Grant, KeyManager, MasterKey, MasterKeyManager, Request, Response, Revocation,
    SignError, Signer, SignerOptions, Transport,
};
use keycast_db::users::{self, NewUser};
use keycast_db::{now_unix, policies, Db, DbOptions, UserId};
use keycast_replica::CommitSignal;

struct Harness {
    _dir: tempfile::TempDir,
    db: Db,
    km: Arc<dyn KeyManager>,
    signer: Signer,
    commits: Arc<CommitSignal>,
    user: UserId,
    user_pubkey: PublicKey,
}

async fn harness() -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let commits = CommitSignal::new();
    let options = DbOptions {
        commit_signal: Some(commits.clone()),
        ..DbOptions::new(dir.path().join("k.db"))
    };
    let db = Db::open_sqlite(&options).await.unwrap();
    let km: Arc<dyn KeyManager> = Arc::new(MasterKeyManager::new(MasterKey::generate()));
    let new = NewUser {
        email: "alice@example.com",
        password_hash: "$argon2id$stub",
        username: None,
    };
    let user = users::insert(&db, &new, now_unix()).await.unwrap().id;
    let key = keys::generate_user_key(&db, km.as_ref(), &user, now_unix())
        .await
        .unwrap();
    let signer = Signer::new(db.clone(), km.clone(), SignerOptions::default());
    Harness {
        _dir: dir,
        db,
        km,
        signer,
        commits,
        user,
        user_pubkey: key.pubkey,
    }
}

impl Harness {
    async fn grant(&self, slug: &str) -> Grant {
        self.grant_with(slug, GrantTerms::default()).await
    }

    async fn grant_with(&self, slug: &str, terms: GrantTerms) -> Grant {
        let policy = policies::find_by_slug(&self.db, slug).await.unwrap().unwrap();
        let relays = vec!["ws://127.0.0.1:7777".to_owned()];
        let new = NewGrant {
            user_id: &self.user,
            policy: &policy,
            client_id: "app",
            redirect_origin: "https://app.example",
            relays: &relays,
            token_ttl_secs: DEFAULT_TOKEN_TTL_SECS,
            terms,
            max_live: keycast_core::authz::DEFAULT_MAX_LIVE_GRANTS,
            session: None,
        };
        create_grant(&self.db, self.km.as_ref(), &new, now_unix())
            .await
            .unwrap()
    }

    async fn sign(&self, authz: &Authorization, kind: u16, transport: Transport) -> Result<Response, SignError> {
        let template = note(self.user_pubkey, kind, "hello");
        self.signer
            .execute(authz, Request::SignEvent(template), transport)
            .await
    }

    async fn activity_rows(&self) -> i64 {
        sqlx::query_scalar("SELECT COUNT(*) FROM activity")
            .fetch_one(self.db.as_sqlite().unwrap())
            .await
            .unwrap()
    }
}

fn note(pubkey: PublicKey, kind: u16, content: &str) -> UnsignedEvent {
    EventBuilder::new(Kind::from(kind), content).build(pubkey)
}

fn signed(response: Response) -> Event {
    match response {
        Response::Event(event) => *event,
        other => panic!("expected an event, got {other:?}"),
    }
}

#[tokio::test]
async fn token_signs_an_event_as_the_user() {
    let h = harness().await;
    let grant = h.grant("social").await;
    let authz = h.signer.authorize_token(grant.access_token.expose()).await.unwrap();
    assert_eq!(authz.expires_at, Some(grant.access_token_expires_at));
    let foreign = note(Keys::generate().public_key(), 1, "hi");
    let event = signed(
        h.signer
            .execute(&authz, Request::SignEvent(foreign), Transport::Http)
            .await
            .unwrap(),
    );
    assert_eq!(
        event.pubkey, h.user_pubkey,
        "signed as the user whatever the template said"
    );
    event.verify().unwrap();
    let pk = h
        .signer
        .execute(&authz, Request::GetPublicKey, Transport::Http)
        .await
        .unwrap();
    assert_eq!(pk, Response::PublicKey(h.user_pubkey));
}

#[tokio::test]
async fn revoked_authorization_is_refused_on_the_next_request_despite_warm_caches() {
    let h = harness().await;
    let grant = h.grant("social").await;
    let authz = h.signer.authorize_token(grant.access_token.expose()).await.unwrap();
    h.sign(&authz, 1, Transport::Http).await.unwrap();
    h.signer.authorize_token(grant.access_token.expose()).await.unwrap();

    assert_eq!(h.signer.revoke(&authz.id, &h.user).await.unwrap(), Revocation::Revoked);

    let by_token = h.signer.authorize_token(grant.access_token.expose()).await.unwrap_err();
    assert!(matches!(by_token, AuthError::Revoked), "{by_token:?}");
    let held = h.sign(&authz, 1, Transport::Http).await.unwrap_err();
    assert!(
        matches!(held, SignError::Revoked),
        "an Authorization held from before must not sign: {held:?}"
    );
    let nip46 = h.sign(&authz, 1, Transport::Nip46).await.unwrap_err();
    assert!(matches!(nip46, SignError::Revoked), "{nip46:?}");
    assert_eq!(
        h.signer.revoke(&authz.id, &h.user).await.unwrap(),
        Revocation::AlreadyRevoked,
        "second revoke changes nothing"
    );
}

#[tokio::test]
async fn revoking_someone_elses_authorization_changes_nothing() {
    let h = harness().await;
    let grant = h.grant("social").await;
    let authz = h.signer.authorize_token(grant.access_token.expose()).await.unwrap();
    assert_eq!(
        h.signer.revoke(&authz.id, &UserId::generate()).await.unwrap(),
        Revocation::NotFound
    );
    h.sign(&authz, 1, Transport::Http).await.unwrap();
}

#[tokio::test]
async fn unknown_and_expired_tokens_are_refused() {
    let h = harness().await;
    let unknown = h.signer.authorize_token("not-a-token").await.unwrap_err();
    assert!(matches!(unknown, AuthError::UnknownToken), "{unknown:?}");
    let grant = h.grant("social").await;
    let (old, _) = issue_access_token(&h.db, &grant.authorization.id, -1, now_unix())
        .await
        .unwrap();
    let expired = h.signer.authorize_token(old.expose()).await.unwrap_err();
    assert!(matches!(expired, AuthError::Expired), "{expired:?}");
    let mut stale = grant.authorization.clone();
    stale.expires_at = Some(now_unix() - 1);
    assert!(matches!(
        h.sign(&stale, 1, Transport::Http).await,
        Err(SignError::Expired)
    ));
}

#[tokio::test]
async fn policy_denial_carries_the_reason_on_both_transports() {
    let h = harness().await;
    let grant = h.grant("social").await;
    let authz = h.signer.authorize_token(grant.access_token.expose()).await.unwrap();
    for transport in [Transport::Http, Transport::Nip46] {
        match h.sign(&authz, 30023, transport).await {
            Err(SignError::PolicyDenied { reason }) => assert_eq!(reason, "kind 30023 is not allowed by policy social"),
            other => panic!("{transport:?}: {other:?}"),
        }
    }
}

#[tokio::test]
async fn readonly_policy_refuses_encryption_but_decrypts() {
    let h = harness().await;
    let peer = Keys::generate();
    let ciphertext = keycast_core::nostr::nips::nip44::encrypt(
        peer.secret_key(),
        &h.user_pubkey,
        "secret note",
        keycast_core::nostr::nips::nip44::Version::V2,
    )
    .unwrap();
    let authz = h.grant("readonly").await.authorization;
    let encrypt = Request::Nip44Encrypt {
        peer: peer.public_key(),
        plaintext: "hi".into(),
    };
    let denied = h.signer.execute(&authz, encrypt, Transport::Http).await.unwrap_err();
    assert!(matches!(denied, SignError::PolicyDenied { .. }), "{denied:?}");
    let decrypt = Request::Nip44Decrypt {
        peer: peer.public_key(),
        ciphertext,
    };
    let plain = h.signer.execute(&authz, decrypt, Transport::Http).await.unwrap();
    assert_eq!(plain, Response::Text("secret note".into()));
}

#[tokio::test]
async fn nip04_and_nip44_round_trip_with_a_peer() {
    let h = harness().await;
    let authz = h.grant("full").await.authorization;
    let peer = Keys::generate();
    let text = |r: Response| match r {
        Response::Text(t) => t,
        other => panic!("{other:?}"),
    };
    let pk = peer.public_key();
    let c44 = text(
        h.signer
            .execute(
                &authz,
                Request::Nip44Encrypt {
                    peer: pk,
                    plaintext: "a".into(),
                },
                Transport::Http,
            )
            .await
            .unwrap(),
    );
    let from_peer = keycast_core::nostr::nips::nip44::decrypt(peer.secret_key(), &h.user_pubkey, &c44).unwrap();
    assert_eq!(from_peer, "a");
    let c04 = text(
        h.signer
            .execute(
                &authz,
                Request::Nip04Encrypt {
                    peer: pk,
                    plaintext: "b".into(),
                },
                Transport::Http,
            )
            .await
            .unwrap(),
    );
    let back = h
        .signer
        .execute(
            &authz,
            Request::Nip04Decrypt {
                peer: pk,
                ciphertext: c04,
            },
            Transport::Http,
        )
        .await;
    assert_eq!(text(back.unwrap()), "b");
    let garbage = Request::Nip44Decrypt {
        peer: pk,
        ciphertext: "AAAA".into(),
    };
    let err = h.signer.execute(&authz, garbage, Transport::Http).await.unwrap_err();
    assert!(matches!(err, SignError::BadRequest { .. }), "{err:?}");
}

#[tokio::test]
async fn signing_commits_nothing_until_flush_writes_one_batch() {
    let h = harness().await;
    let grant = h.grant("social").await;
    let authz = h.signer.authorize_token(grant.access_token.expose()).await.unwrap();
    h.sign(&authz, 1, Transport::Http).await.unwrap();
    let before = h.commits.commits();
    for i in 0..20 {
        let transport = if i % 2 == 0 { Transport::Http } else { Transport::Nip46 };
        h.sign(&authz, 7, transport).await.unwrap();
    }
    assert_eq!(h.commits.commits(), before, "the hot path must not commit");
    assert_eq!(h.signer.pending_activity(), 21);
    assert_eq!(h.signer.flush().await.unwrap(), 21);
    assert_eq!(h.commits.commits(), before + 1, "one commit per flush");
    assert_eq!(h.activity_rows().await, 21);
    assert_eq!(h.signer.flush().await.unwrap(), 0, "nothing left, nothing written");
    assert_eq!(h.commits.commits(), before + 1);
}

#[tokio::test]
async fn failed_flush_keeps_the_records_for_the_next_one() {
    let h = harness().await;
    let authz = h.grant("social").await.authorization;
    h.sign(&authz, 1, Transport::Http).await.unwrap();
    h.db.close().await;
    assert!(matches!(h.signer.flush().await, Err(SignError::Internal(_))));
    assert_eq!(h.signer.pending_activity(), 1);
}

/// A flush cut off while it writes (shutdown aborting the flusher, a hand-over's time limit)
/// must not lose the batch it took from the buffer. Before, the batch was gone with the
/// cancelled write: signatures made and counted nowhere, a grant's limits short of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flush_cut_off_while_it_writes_loses_no_record() {
    let h = Arc::new(harness().await);
    let authz = h.grant("social").await.authorization;
    for _ in 0..5 {
        h.sign(&authz, 1, Transport::Http).await.unwrap();
    }
    // Another connection holds the write lock: the flush waits for it.
    let mut blocker =
        <sqlx::SqliteConnection as sqlx::Connection>::connect_with(&h.db.as_sqlite().unwrap().connect_options())
            .await
            .unwrap();
    sqlx::query("BEGIN IMMEDIATE").execute(&mut blocker).await.unwrap();
    let flushing = tokio::spawn({
        let h = h.clone();
        async move { h.signer.flush().await }
    });
    // Cut off once the flush has taken the batch from the buffer and waits on the lock.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while h.signer.pending_activity() > 0 {
        assert!(std::time::Instant::now() < deadline, "the flush never took the batch");
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    flushing.abort();
    let _ = flushing.await;
    sqlx::query("COMMIT").execute(&mut blocker).await.unwrap();
    h.signer.flush().await.unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while h.activity_rows().await < 5 && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(
        h.activity_rows().await,
        5,
        "every record of the cut-off flush is written"
    );
}

/// A grant's limit holds across a restart even when its records never reached the
/// database: a full buffer (the disk was full for long enough) drops the oldest records,
/// and their signatures must still count. Before, a grant of 5 signatures whose buffer kept
/// 2 of them signed 3 more after a restart.
#[tokio::test]
async fn signatures_a_full_buffer_dropped_still_count_after_a_restart() {
    let h = harness().await;
    let terms = GrantTerms {
        limits: Limits {
            max_signatures: Some(5),
            ..Limits::default()
        },
        ..GrantTerms::default()
    };
    let token = h.grant_with("social", terms).await.access_token;
    let small = SignerOptions {
        activity_capacity: 2,
        ..SignerOptions::default()
    };
    let signer = Signer::new(h.db.clone(), h.km.clone(), small);
    let authz = signer.authorize_token(token.expose()).await.unwrap();
    for n in 0..5 {
        let template = note(h.user_pubkey, 1, &format!("note {n}"));
        signer
            .execute(&authz, Request::SignEvent(template), Transport::Http)
            .await
            .unwrap();
    }
    assert_eq!(signer.dropped_activity(), 3);
    assert_eq!(signer.flush().await.unwrap(), 2);
    assert_eq!(h.activity_rows().await, 2, "three records were dropped");

    let restarted = Signer::new(h.db.clone(), h.km.clone(), SignerOptions::default());
    let authz = restarted.authorize_token(token.expose()).await.unwrap();
    let template = note(h.user_pubkey, 1, "one too many");
    let refused = restarted
        .execute(&authz, Request::SignEvent(template), Transport::Http)
        .await
        .unwrap_err();
    assert!(
        matches!(
            &refused,
            SignError::GrantRefused {
                code: "grant_exhausted",
                ..
            }
        ),
        "{refused:?}"
    );
}

#[tokio::test]
async fn nip46_client_must_connect_with_the_secret_and_is_then_bound() {
    let h = harness().await;
    let grant = h.grant("social").await;
    let bunker = grant.authorization.bunker_pubkey;
    let (client, intruder) = (Keys::generate().public_key(), Keys::generate().public_key());

    let early = h.signer.authorize_bunker(&bunker, &client).await.unwrap_err();
    assert!(matches!(early, AuthError::ClientNotBound), "{early:?}");
    let no_secret = h.signer.connect(&bunker, &client, None).await.unwrap_err();
    assert!(matches!(no_secret, AuthError::BadConnectSecret), "{no_secret:?}");
    let wrong = h.signer.connect(&bunker, &client, Some("guess")).await.unwrap_err();
    assert!(matches!(wrong, AuthError::BadConnectSecret), "{wrong:?}");

    let authz = h
        .signer
        .connect(&bunker, &client, Some(grant.connect_secret.expose()))
        .await
        .unwrap();
    assert_eq!(authz.connected_client_pubkey, Some(client));
    h.signer.authorize_bunker(&bunker, &client).await.unwrap();
    h.signer
        .connect(&bunker, &client, None)
        .await
        .expect("the bound client may reconnect");

    let stolen = h
        .signer
        .connect(&bunker, &intruder, Some(grant.connect_secret.expose()))
        .await
        .unwrap_err();
    assert!(matches!(stolen, AuthError::AlreadyBound), "{stolen:?}");
    let other = h.signer.authorize_bunker(&bunker, &intruder).await.unwrap_err();
    assert!(matches!(other, AuthError::ClientNotBound), "{other:?}");
}

#[tokio::test]
async fn nip46_revocation_is_seen_on_the_next_request() {
    let h = harness().await;
    let grant = h.grant("social").await;
    let bunker = grant.authorization.bunker_pubkey;
    let client = Keys::generate().public_key();
    let authz = h
        .signer
        .connect(&bunker, &client, Some(grant.connect_secret.expose()))
        .await
        .unwrap();
    h.sign(&authz, 1, Transport::Nip46).await.unwrap();
    let keys = h.signer.bunker_keys(&authz).await.unwrap();
    assert_eq!(keys.public_key(), bunker);

    h.signer.revoke(&authz.id, &h.user).await.unwrap();
    let again = h.signer.authorize_bunker(&bunker, &client).await.unwrap_err();
    assert!(matches!(again, AuthError::Revoked), "{again:?}");
    assert!(matches!(h.signer.bunker_keys(&authz).await, Err(SignError::Revoked)));
    let reconnect = h
        .signer
        .connect(&bunker, &client, Some(grant.connect_secret.expose()))
        .await;
    assert!(matches!(reconnect, Err(AuthError::Revoked)));
}

#[tokio::test]
async fn user_key_cache_is_dropped_by_invalidate_user() {
    let h = harness().await;
    let authz = h.grant("social").await.authorization;
    h.sign(&authz, 1, Transport::Http).await.unwrap();
    keycast_db::keys::delete_for_user(&h.db, &h.user).await.unwrap();
    h.sign(&authz, 1, Transport::Http)
        .await
        .expect("cached key still signs until invalidated");
    h.signer.invalidate_user(&h.user);
    assert!(matches!(
        h.sign(&authz, 1, Transport::Http).await,
        Err(SignError::NoKey)
    ));
}
