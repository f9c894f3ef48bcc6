//! The ONE signing path. HTTP RPC and NIP-46 both resolve a credential to an
//! [`Authorization`] ([`Signer::authorize_token`], [`Signer::authorize_bunker`],
//! [`Signer::connect`]) and then call [`Signer::execute`]; neither holds a rule of its own.
//!
//! `execute` checks the authorization is still live, loads the user's key from a cache,
//! asks [`policy::evaluate`], performs the operation with the `nostr` crate, and appends
//! an activity record to an in-memory buffer. **It never writes to the database**: the
//! binary calls [`Signer::flush`] about once a second and at shutdown.
//!
//! Caches (authorizations, token → authorization, bunker → authorization, decrypted user
//! and bunker keys, policies) are invalidated explicitly: [`Signer::revoke`] makes a
//! revocation refuse the very next request on every transport, including callers that
//! still hold an `Authorization` from before. See [`crate::cache`] for why a load that
//! races a revocation cannot re-cache the old state.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use keycast_db::activity::{self as activity_repo, NewActivity, Transport};
use keycast_db::authz::{self as authz_repo, AuthorizationRow};
use keycast_db::Db;
use keycast_db::{now_unix, oauth as oauth_repo, policies, AuthorizationId, PolicyId, RepoError, TokenHash, UserId};
use nostr::nips::{nip04, nip44};
use nostr::{Keys, PublicKey};
use tokio::sync::{broadcast, mpsc, watch};

use crate::activity::{ActivityBuffer, RecordBound, DEFAULT_ACTIVITY_CAPACITY, DEFAULT_KEPT_PER_GRANT};
use crate::approval::{self, ApprovalOptions, Permit};
use crate::authz::{insert_authorization, Authorization, GrantError, NewGrant, DEFAULT_MAX_LIVE_GRANTS};
use crate::cache::EpochMap;
use crate::error::{AuthError, InternalError, SignError};
use crate::key_manager::{KeyManager, KeyOwner};
use crate::keys;
use crate::nostrconnect::NostrConnectUri;
use crate::policy::{self, Policy, PolicyError};
use crate::request::{Request, Response};
use crate::secret::{ct_eq, hash_token};
use crate::terms::{GrantTerms, UsageMeter};

/// How long a cached entry is trusted without asking the database (bounds staleness of
/// changes made by another instance; this instance's own changes invalidate at once).
pub const DEFAULT_CACHE_TTL: Duration = Duration::from_secs(30);
/// Entries per cache before it is cleared.
pub const DEFAULT_CACHE_CAPACITY: usize = 100_000;

/// Tuning for [`Signer`].
#[derive(Debug, Clone)]
pub struct SignerOptions {
    /// Trust cached entries this long. Default [`DEFAULT_CACHE_TTL`].
    pub cache_ttl: Duration,
    /// Entries per cache. Default [`DEFAULT_CACHE_CAPACITY`].
    pub cache_capacity: usize,
    /// Activity records buffered between flushes. Default [`DEFAULT_ACTIVITY_CAPACITY`].
    pub activity_capacity: usize,
    /// Activity records kept per grant (see [`crate::activity`]). Default
    /// [`DEFAULT_KEPT_PER_GRANT`].
    pub activity_kept_per_grant: u32,
    /// Live grants an account may have. Default [`DEFAULT_MAX_LIVE_GRANTS`].
    pub max_live_grants: u32,
    /// Pending approvals ([`crate::approval`]): their life and the URL they live under.
    pub approvals: ApprovalOptions,
}

impl Default for SignerOptions {
    fn default() -> Self {
        SignerOptions {
            cache_ttl: DEFAULT_CACHE_TTL,
            cache_capacity: DEFAULT_CACHE_CAPACITY,
            activity_capacity: DEFAULT_ACTIVITY_CAPACITY,
            activity_kept_per_grant: DEFAULT_KEPT_PER_GRANT,
            max_live_grants: DEFAULT_MAX_LIVE_GRANTS,
            approvals: ApprovalOptions::default(),
        }
    }
}

/// Fault injection: a revocation's statement committed and its answer was lost (fail point
/// `revoke-answer-lost`).
fn answer_lost() -> bool {
    fail::fail_point!("revoke-answer-lost", |_| true);
    false
}

/// The error a statement whose answer was lost gives (fault injection).
pub(crate) fn lost_answer() -> RepoError {
    RepoError::Database(sqlx::Error::Io(std::io::Error::new(
        std::io::ErrorKind::ConnectionReset,
        "fail point: the answer was lost",
    )))
}

/// What [`Signer::revoke`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Revocation {
    /// This call revoked it.
    Revoked,
    /// It was revoked already (perhaps by a first try whose answer was lost).
    AlreadyRevoked,
    /// Not the user's, or unknown.
    NotFound,
}

/// What the NIP-46 transport must hear about; see [`Signer::subscribe`].
#[derive(Debug, Clone)]
pub enum Change {
    /// An authorization was created or revoked: re-read the bunkers to listen for.
    Authorizations,
    /// A `nostrconnect://` authorization was created: send the client the `connect`
    /// response carrying its secret, from the bunker, on the client's relays.
    NostrConnect {
        bunker: PublicKey,
        client: PublicKey,
        relays: Vec<String>,
        secret: crate::Secret<String>,
    },
    /// The owner decided a pending NIP-46 approval ([`crate::approval`]): send `client` the
    /// reply to its request `request_id` from `bunker` (`Ok`: the result; `Err`: the error),
    /// NIP-04 encrypted if the request was.
    Nip46Reply {
        bunker: PublicKey,
        client: PublicKey,
        request_id: String,
        nip04: bool,
        result: Result<String, String>,
    },
}

/// How far ahead of now an event to sign may be dated.
pub const MAX_DATED_AHEAD_SECS: i64 = 600;

/// Ended grants of one account whose bunkers are still listened for (see
/// [`Signer::bunkers_to_serve`]): a live grant is capped per account, and so must this be.
pub const ENDED_BUNKERS_PER_ACCOUNT: usize = 20;

/// Refuses an event dated more than [`MAX_DATED_AHEAD_SECS`] ahead, or after the grant ends.
/// A signature outlives its grant: an app with an hour's grant, or one about to be revoked,
/// could sign notes dated weeks ahead and publish each when its date comes (relays take
/// them: the signature stays valid), or date a profile or relay list far ahead so that it
/// outranks every later one. Revoking the grant would stop none of it.
fn check_date(request: &Request, now: i64, grant_ends: Option<i64>) -> Result<(), SignError> {
    let Request::SignEvent(event) = request else {
        return Ok(());
    };
    let dated = i64::try_from(event.created_at.as_secs()).unwrap_or(i64::MAX);
    if dated > now.saturating_add(MAX_DATED_AHEAD_SECS) {
        return Err(SignError::BadRequest {
            reason: format!(
                "the event is dated {} s ahead; keycast signs events dated at most {MAX_DATED_AHEAD_SECS} s ahead, \
                 so that no signature outlives the grant that made it (leave created_at out to date it now)",
                dated - now
            ),
        });
    }
    if let Some(ends) = grant_ends.filter(|ends| dated > *ends) {
        return Err(SignError::BadRequest {
            reason: format!("the event is dated after this grant ends (at {ends}); it cannot be signed under it"),
        });
    }
    Ok(())
}

/// Changes buffered per subscriber; a subscriber that lags re-reads everything.
const CHANGES_CAPACITY: usize = 1024;

/// The longest one activity batch's write may take (a healthy one takes milliseconds; the
/// busy timeout is 5 s) before it is given up and the batch put back.
const ACTIVITY_WRITE_WITHIN: Duration = Duration::from_secs(30);

/// Resolves credentials and executes requests. One per process, shared (`Arc`).
#[derive(Debug)]
pub struct Signer {
    db: Db,
    /// The activity flush's own connection (PostgreSQL; the same pool on SQLite): a slow
    /// flush must not hold connections that signing and the heartbeat need.
    activity_db: Db,
    km: Arc<dyn KeyManager>,
    /// Live (unrevoked) authorizations, with `expires_at: None`.
    authorizations: EpochMap<AuthorizationId, Arc<Authorization>>,
    /// Bearer token hash → (authorization, token expiry).
    tokens: EpochMap<TokenHash, (AuthorizationId, i64)>,
    /// Bunker pubkey → authorization.
    bunkers: EpochMap<PublicKey, AuthorizationId>,
    user_keys: EpochMap<UserId, Arc<Keys>>,
    bunker_keys: EpochMap<AuthorizationId, Arc<Keys>>,
    policies: EpochMap<PolicyId, Arc<Policy>>,
    /// Kinds the owner allowed an authorization from now on ([`crate::approval`]).
    allowances: EpochMap<AuthorizationId, Arc<BTreeSet<u16>>>,
    approvals: ApprovalOptions,
    activity: ActivityBuffer,
    /// Which grants' stored records are due for pruning.
    record_bound: RecordBound,
    /// Live grants an account may have ([`SignerOptions::max_live_grants`]).
    max_live_grants: u32,
    /// How long a cached entry lives ([`SignerOptions::cache_ttl`]).
    cache_ttl: Duration,
    /// Signatures per limited grant ([`crate::terms`]).
    usage: UsageMeter,
    changes: broadcast::Sender<Change>,
    /// Until when the caches may be used, in microseconds since `trust_epoch`: `u64::MAX`
    /// for good (one instance), 0 not at all (the cluster's listener is down). Otherwise
    /// only a little past the last moment this instance knows it had heard every change
    /// made elsewhere (see [`crate::cluster`]); then every lookup reads the database.
    trusted_until: AtomicU64,
    trust_epoch: std::time::Instant,
    /// Where changes are announced to other instances (PostgreSQL), and how many were.
    announcer: OnceLock<mpsc::UnboundedSender<Announcement>>,
    announced: AtomicU64,
    /// Bumped by every change of the bunker set; the NIP-46 transport reports the
    /// generation it has re-read up to.
    bunker_generation: AtomicU64,
    bunkers_synced: watch::Sender<u64>,
    /// Requests under way in the transports ([`Signer::request`]).
    in_flight: Arc<crate::in_flight::InFlight>,
}

/// A change other instances' caches must hear about (see [`crate::cluster`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Announcement {
    /// This authorization's row changed (revoked, client bound or unbound).
    Authorization(AuthorizationId),
    /// This user's key (and so their authorizations' signing key) changed.
    User(UserId),
    /// The set of bunkers to listen for changed (a grant, a revocation).
    Bunkers,
    /// This access token was revoked alone (RFC 7009).
    Token(TokenHash),
}

impl Signer {
    /// A signer over `db`, decrypting keys with `km`.
    pub fn new(db: Db, km: Arc<dyn KeyManager>, options: SignerOptions) -> Signer {
        let (ttl, cap) = (options.cache_ttl, options.cache_capacity);
        Signer {
            activity_db: db.dedicated(1),
            db,
            km,
            authorizations: EpochMap::new(ttl, cap),
            tokens: EpochMap::new(ttl, cap),
            bunkers: EpochMap::new(ttl, cap),
            user_keys: EpochMap::new(ttl, cap),
            bunker_keys: EpochMap::new(ttl, cap),
            policies: EpochMap::new(ttl, cap),
            allowances: EpochMap::new(ttl, cap),
            approvals: options.approvals,
            activity: ActivityBuffer::new(options.activity_capacity),
            record_bound: RecordBound::new(options.activity_kept_per_grant),
            max_live_grants: options.max_live_grants,
            cache_ttl: ttl,
            usage: UsageMeter::default(),
            changes: broadcast::channel(CHANGES_CAPACITY).0,
            trusted_until: AtomicU64::new(u64::MAX),
            trust_epoch: std::time::Instant::now(),
            announcer: OnceLock::new(),
            announced: AtomicU64::new(0),
            bunker_generation: AtomicU64::new(0),
            bunkers_synced: watch::channel(0).0,
            in_flight: Default::default(),
        }
    }

    /// Counts a transport's request from before its writer check until it has answered (the
    /// guard's drop): see [`crate::in_flight`].
    pub fn request(&self) -> crate::in_flight::Guard {
        self.in_flight.enter()
    }

    /// Waits, at most `limit`, until no request counted by [`Signer::request`] is under way;
    /// then writing the buffered activity ([`Signer::flush`]) leaves none of theirs behind.
    pub async fn drain(&self, limit: std::time::Duration) -> bool {
        self.in_flight.drain(limit).await
    }

    /// The database the signer reads and writes (for the rest of core).
    pub(crate) fn db(&self) -> &Db {
        &self.db
    }

    /// The key manager the signer opens keys with (for the rest of core).
    pub(crate) fn key_manager(&self) -> &dyn KeyManager {
        self.km.as_ref()
    }

    /// How approvals are made ([`crate::approval`]).
    pub(crate) fn approval_options(&self) -> &ApprovalOptions {
        &self.approvals
    }

    /// Hands a decided NIP-46 approval's reply to the NIP-46 transport of this instance.
    pub(crate) fn send_nip46_reply(&self, reply: Change) {
        if self.changes.send(reply).is_err() {
            tracing::warn!("approval: no NIP-46 transport on this instance to send the reply (KEYCAST_NIP46=false)");
        }
    }

    /// The bunkers the NIP-46 transport listens for: every live authorization's, and those
    /// that ended (revoked, or past their terms' expiry, whose `revoked_at` is then that
    /// time) at or after `ended_since` (unix seconds), so their clients hear why instead of
    /// nothing — the [`ENDED_BUNKERS_PER_ACCOUNT`] of each account that ended last.
    ///
    /// Every bunker goes to the operator's relays, in subscriptions each relay caps in number
    /// (see `keycast_nip46::subscriptions`): ended grants kept for good, or an account
    /// granting and revoking a grant a minute for a week, would fill them with bunkers no
    /// client uses.
    ///
    /// # Errors
    /// Storage errors.
    pub async fn bunkers_to_serve(&self, ended_since: i64) -> Result<Vec<authz_repo::LiveBunker>, InternalError> {
        let now = keycast_db::now_unix();
        let mut ended_per_account: HashMap<String, usize> = HashMap::new();
        let mut bunkers = authz_repo::list_bunkers_to_serve(&self.db, ended_since).await?;
        for bunker in &mut bunkers {
            // Unreadable terms refuse every request anyway: the grant is served, and says so.
            let expired = GrantTerms::from_json(bunker.terms.as_deref())
                .ok()
                .and_then(|terms| terms.expires_at)
                .filter(|at| *at <= now);
            bunker.revoked_at = bunker.revoked_at.or(expired);
        }
        // Each account's most recently ended ones: a grant revoked a moment ago has a client
        // still asking, whatever its age. The roster keeps the database's order.
        let mut ended: Vec<(i64, usize)> = bunkers
            .iter()
            .enumerate()
            .filter_map(|(i, bunker)| bunker.revoked_at.filter(|at| *at >= ended_since).map(|at| (at, i)))
            .collect();
        ended.sort_unstable_by(|a, b| b.cmp(a));
        let mut kept = vec![false; bunkers.len()];
        for (_, i) in ended {
            let count = ended_per_account.entry(bunkers[i].user_id.clone()).or_default();
            *count += 1;
            kept[i] = *count <= ENDED_BUNKERS_PER_ACCOUNT;
        }
        Ok(bunkers
            .into_iter()
            .zip(kept)
            .filter(|(bunker, kept)| bunker.revoked_at.is_none() || *kept)
            .map(|(bunker, _)| bunker)
            .collect())
    }

    /// Changes to the set of bunkers, for the NIP-46 transport. A receiver that lags
    /// (`RecvError::Lagged`) should re-read all bunkers.
    pub fn subscribe(&self) -> broadcast::Receiver<Change> {
        self.changes.subscribe()
    }

    /// Tells subscribers (and the other instances) an authorization was created (by a
    /// grant) or changed.
    pub fn authorizations_changed(&self) {
        self.bunker_generation.fetch_add(1, Ordering::SeqCst);
        // No subscriber (NIP-46 disabled) is not an error.
        let _ = self.changes.send(Change::Authorizations);
        self.announce(Announcement::Bunkers);
    }

    /// Another instance changed the bunker set: tells the local NIP-46 transport to re-read
    /// it, and returns the generation to wait for with [`Signer::wait_bunkers_synced`].
    pub fn bunkers_changed_elsewhere(&self) -> u64 {
        let generation = self.bunker_generation.fetch_add(1, Ordering::SeqCst) + 1;
        let _ = self.changes.send(Change::Authorizations);
        generation
    }

    /// The bunker-set generation now: the NIP-46 transport reads it before it re-reads
    /// the bunkers and reports it with [`Signer::bunkers_synced`] once it listens for them.
    pub fn bunker_generation(&self) -> u64 {
        self.bunker_generation.load(Ordering::SeqCst)
    }

    /// The NIP-46 transport listens for every bunker known at `generation`.
    pub fn bunkers_synced(&self, generation: u64) {
        self.bunkers_synced.send_if_modified(|synced| {
            let newer = generation > *synced;
            if newer {
                *synced = generation;
            }
            newer
        });
    }

    /// Waits (at most `timeout`) until the NIP-46 transport listens for the bunkers of
    /// `generation`; at once when no NIP-46 transport follows this signer.
    pub async fn wait_bunkers_synced(&self, generation: u64, timeout: Duration) {
        if self.changes.receiver_count() == 0 {
            return;
        }
        let mut synced = self.bunkers_synced.subscribe();
        let _ = tokio::time::timeout(timeout, synced.wait_for(|s| *s >= generation)).await;
    }

    /// Sends every later change to `announcer` (the cluster of instances on PostgreSQL).
    /// Set once; later calls are ignored.
    pub fn announce_to(&self, announcer: mpsc::UnboundedSender<Announcement>) {
        let _ = self.announcer.set(announcer);
    }

    /// How many changes were announced so far.
    pub fn announced(&self) -> u64 {
        self.announced.load(Ordering::SeqCst)
    }

    fn announce(&self, what: Announcement) {
        if let Some(announcer) = self.announcer.get() {
            // Counted before it is queued, so a waiter that reads the count waits for it.
            self.announced.fetch_add(1, Ordering::SeqCst);
            let _ = announcer.send(what);
        }
    }

    /// Lookups read the database, not the caches, until [`Signer::trust_caches_until`]
    /// says otherwise: changes made elsewhere may be going unheard.
    pub fn distrust_caches(&self) {
        self.trusted_until.store(0, Ordering::SeqCst);
    }

    /// Lookups may use the caches until `until`, and read the database from then on unless
    /// told again.
    pub fn trust_caches_until(&self, until: std::time::Instant) {
        let micros = until.saturating_duration_since(self.trust_epoch).as_micros();
        self.trusted_until
            .store(u64::try_from(micros).unwrap_or(u64::MAX - 1).max(1), Ordering::SeqCst);
    }

    /// Whether the caches may be used now.
    fn caches_trusted(&self) -> bool {
        match self.trusted_until.load(Ordering::Relaxed) {
            u64::MAX => true,
            0 => false,
            until => u64::try_from(self.trust_epoch.elapsed().as_micros()).is_ok_and(|now| now < until),
        }
    }

    fn cached<K: Eq + std::hash::Hash, V: Clone>(&self, map: &EpochMap<K, V>, key: &K) -> Option<V> {
        if self.caches_trusted() {
            map.get(key)
        } else {
            None
        }
    }

    /// After a miss: waits for the turn to load `key` (so concurrent misses cost one query,
    /// see [`EpochMap::load_turn`]), with what another caller loaded meanwhile. Untrusted
    /// caches take no turn: every lookup reads the database then.
    async fn load_turn<'a, K: Eq + std::hash::Hash, V: Clone>(
        &self,
        map: &'a EpochMap<K, V>,
        key: &K,
    ) -> (Option<tokio::sync::MutexGuard<'a, ()>>, Option<V>) {
        if !self.caches_trusted() {
            return (None, None);
        }
        let (turn, loaded) = map.load_turn(key).await;
        (Some(turn), loaded)
    }

    /// Creates an authorization for a client that started with `nostrconnect://`: its
    /// bunker listens on the client's relays and the client is bound at once, if `session`
    /// (the owner's, which asked) is still live. Commits: the caller waits for durability,
    /// then calls [`Signer::announce_nostrconnect`].
    ///
    /// # Errors
    /// Policy, key and storage errors ([`keycast_db::RepoError::SessionEnded`] once `session` ended).
    pub async fn accept_nostrconnect(
        &self,
        user: &UserId,
        policy: &keycast_db::policies::PolicyRow,
        uri: &NostrConnectUri,
        session: &keycast_db::TokenHash,
    ) -> Result<Authorization, GrantError> {
        let now = now_unix();
        let new = NewGrant {
            user_id: user,
            policy,
            // A name in the form of a registered app's id would pass for that app where keycast
            // names it (the approval page): such an app is "nostrconnect", as one without a name.
            client_id: uri
                .name
                .as_deref()
                .filter(|name| !crate::clients::is_registered_form(name))
                .unwrap_or("nostrconnect"),
            redirect_origin: &uri.display_origin(),
            relays: &uri.relays,
            token_ttl_secs: 0,
            terms: Default::default(),
            max_live: self.max_live_grants,
            session: Some(session),
        };
        // The authorization's own connect secret is never shown: the client is bound
        // here, so nobody else can use it.
        let (authz, _unused_secret) = insert_authorization(&self.db, self.km.as_ref(), &new, now).await?;
        authz_repo::bind_client(&self.db, &authz.id, &uri.client.to_hex(), now).await?;
        // Other instances must listen for the new bunker too (this one hears of it from
        // `announce_nostrconnect`).
        self.announce(Announcement::Bunkers);
        Ok(Authorization {
            connected_client_pubkey: Some(uri.client),
            ..authz
        })
    }

    /// Tells the NIP-46 transport to answer the `nostrconnect://` client of `authz` (made
    /// by [`Signer::accept_nostrconnect`]) with its secret. Call once the authorization
    /// is durable: the answer tells the app it may sign.
    pub fn announce_nostrconnect(&self, authz: &Authorization, uri: &NostrConnectUri) {
        let _ = self.changes.send(Change::NostrConnect {
            bunker: authz.bunker_pubkey,
            client: uri.client,
            relays: uri.relays.clone(),
            secret: uri.secret.clone(),
        });
    }

    /// NIP-46: the keypair of `bunker`, live **or revoked**, so the transport can open a
    /// request and answer it — a revoked bunker answers "revoked" rather than nothing.
    /// Never sign anything but replies with it; never log it.
    ///
    /// # Errors
    /// [`AuthError::UnknownToken`] (no such bunker), [`AuthError::Internal`].
    pub async fn bunker_secret(&self, bunker: &PublicKey) -> Result<Arc<Keys>, AuthError> {
        let cached_id = self.cached(&self.bunkers, bunker);
        if let Some(id) = &cached_id {
            if let Some(keys) = self.cached(&self.bunker_keys, id) {
                return Ok(keys);
            }
        }
        let _turn = match &cached_id {
            Some(id) => match self.load_turn(&self.bunker_keys, id).await {
                (_, Some(keys)) => return Ok(keys),
                (turn, None) => turn,
            },
            None => None,
        };
        let epoch = self.bunker_keys.epoch();
        let row = authz_repo::find_by_bunker_pubkey(&self.db, &bunker.to_hex())
            .await?
            .ok_or(AuthError::UnknownToken)?;
        let keys = Arc::new(keys::open(
            self.km.as_ref(),
            &row.bunker_secret_encrypted,
            KeyOwner::Bunker(&row.id),
        )?);
        if row.revoked_at.is_none() {
            self.bunker_keys.insert_if_current(epoch, row.id, keys.clone());
        }
        Ok(keys)
    }

    /// Where the token cache stands: taken before [`Signer::authorize_token`], and given to
    /// [`Signer::ensure_token_live`] once the request's result is ready.
    pub fn token_checkpoint(&self) -> u64 {
        self.tokens.epoch()
    }

    /// Before a result goes out: if any token was dropped from the cache since `checkpoint`
    /// (a revocation, RFC 7009, answered while the request was under way), `token` is looked
    /// up again; revoked, the result is not handed out.
    ///
    /// # Errors
    /// As [`Signer::authorize_token`].
    pub async fn ensure_token_live(&self, token: &str, checkpoint: u64) -> Result<(), AuthError> {
        if self.tokens.epoch() == checkpoint && self.caches_trusted() {
            return Ok(());
        }
        self.authorize_token(token).await.map(|_| ())
    }

    /// Resolves a bearer token (HTTP RPC) to its live authorization, whose `expires_at`
    /// is the token's expiry. Served from cache when warm; a miss reads the database.
    ///
    /// # Errors
    /// [`AuthError::UnknownToken`], [`AuthError::Revoked`], [`AuthError::Expired`];
    /// [`AuthError::Internal`].
    pub async fn authorize_token(&self, token: &str) -> Result<Authorization, AuthError> {
        let hash = hash_token(token);
        if let Some((id, expires_at)) = self.cached(&self.tokens, &hash) {
            if let Some(authz) = self.cached(&self.authorizations, &id) {
                return with_expiry(&authz, expires_at);
            }
        }
        let (_turn, loaded) = self.load_turn(&self.tokens, &hash).await;
        if let Some((id, expires_at)) = loaded {
            if let Some(authz) = self.cached(&self.authorizations, &id) {
                return with_expiry(&authz, expires_at);
            }
        }
        // Both epochs before the query: a token revoked after it (RFC 7009) must not be cached
        // from what it read.
        let (epoch, token_epoch) = (self.authorizations.epoch(), self.tokens.epoch());
        let grant = oauth_repo::find_token_grant(&self.db, &hash)
            .await?
            .ok_or(AuthError::UnknownToken)?;
        if let Some(ms) = held_after_token_read() {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        let authz = self.cache_row(epoch, &grant.authorization).await?;
        self.tokens
            .insert_if_current(token_epoch, hash, (authz.id.clone(), grant.token_expires_at));
        with_expiry(&authz, grant.token_expires_at)
    }

    /// Resolves a NIP-46 request to `bunker` from `client`: the authorization must be
    /// live and `client` the one bound by [`Signer::connect`].
    ///
    /// # Errors
    /// [`AuthError::UnknownToken`] (no such bunker), [`AuthError::Revoked`],
    /// [`AuthError::ClientNotBound`], [`AuthError::Internal`].
    pub async fn authorize_bunker(&self, bunker: &PublicKey, client: &PublicKey) -> Result<Authorization, AuthError> {
        let authz = self.by_bunker(bunker).await?;
        match authz.connected_client_pubkey {
            Some(bound) if bound == *client => Ok((*authz).clone()),
            _ => Err(AuthError::ClientNotBound),
        }
    }

    /// The live authorization of `bunker`, whoever asks (NIP-46 `ping`, `switch_relays`).
    ///
    /// # Errors
    /// [`AuthError::UnknownToken`] (no such bunker), [`AuthError::Revoked`], [`AuthError::Internal`].
    pub async fn bunker_authorization(&self, bunker: &PublicKey) -> Result<Authorization, AuthError> {
        Ok((*self.by_bunker(bunker).await?).clone())
    }

    /// NIP-46 `connect`: binds `client` to the bunker if `secret` is its connect secret
    /// (compared in constant time) and no other client is bound. The bound client may
    /// reconnect without the secret. Commits (the binding), so the caller may wait for
    /// durability.
    ///
    /// # Errors
    /// [`AuthError::UnknownToken`] (no such bunker), [`AuthError::Revoked`],
    /// [`AuthError::BadConnectSecret`], [`AuthError::AlreadyBound`], [`AuthError::Internal`].
    pub async fn connect(
        &self,
        bunker: &PublicKey,
        client: &PublicKey,
        secret: Option<&str>,
    ) -> Result<Authorization, AuthError> {
        let row = authz_repo::find_by_bunker_pubkey(&self.db, &bunker.to_hex())
            .await?
            .ok_or(AuthError::UnknownToken)?;
        if row.revoked_at.is_some() {
            return Err(AuthError::Revoked);
        }
        let client_hex = client.to_hex();
        let secret_ok = secret.is_some_and(|s| {
            ct_eq(
                hash_token(s).as_str().as_bytes(),
                row.connect_secret_hash.as_str().as_bytes(),
            )
        });
        let reconnect = row.connected_client_pubkey.as_deref() == Some(client_hex.as_str());
        if !secret_ok && !reconnect {
            return Err(AuthError::BadConnectSecret);
        }
        if !authz_repo::bind_client(&self.db, &row.id, &client_hex, now_unix()).await? {
            return Err(AuthError::AlreadyBound);
        }
        self.invalidate_authorization(&row.id);
        self.authorize_bunker(bunker, client).await
    }

    /// NIP-46 `logout` from the bound `client`: ends its binding, so that the app may
    /// `connect` again later (with the connect secret, perhaps from a new client key). The
    /// grant itself stays until the owner revokes it. Commits; the caller may wait for
    /// durability.
    ///
    /// # Errors
    /// As [`Signer::authorize_bunker`].
    pub async fn logout(&self, bunker: &PublicKey, client: &PublicKey) -> Result<(), AuthError> {
        let authz = self.authorize_bunker(bunker, client).await?;
        authz_repo::unbind_client(&self.db, &authz.id, &client.to_hex()).await?;
        self.invalidate_authorization(&authz.id);
        Ok(())
    }

    /// Executes `request` for `authz` — the one path for every transport: liveness,
    /// key, [`policy::evaluate`], the operation, an activity record (buffered).
    ///
    /// # Errors
    /// [`SignError::GrantRefused`] when the grant's own terms refuse it (expired, its
    /// signatures used up, a rate reached: [`crate::terms`]);
    /// [`SignError::Revoked`] / [`SignError::Expired`] when the authorization is no
    /// longer live (checked against the caches, so a revocation is seen at once),
    /// [`SignError::PolicyDenied`], [`SignError::BadRequest`] (e.g. undecryptable
    /// ciphertext), [`SignError::NoKey`], [`SignError::Internal`].
    pub async fn execute(
        &self,
        authz: &Authorization,
        request: Request,
        transport: Transport,
    ) -> Result<Response, SignError> {
        self.execute_with(authz, request, transport, Permit::Policy).await
    }

    /// [`Signer::execute`] where the policy (widened by the kinds the owner allowed from
    /// now on) may be overridden by `permit`, an approval of the owner ([`crate::approval`]).
    pub(crate) async fn execute_with(
        &self,
        authz: &Authorization,
        request: Request,
        transport: Transport,
        permit: Permit,
    ) -> Result<Response, SignError> {
        // Before anything is looked at: see the check after the operation.
        let checked_at = self.authorizations.epoch();
        // The grant as it is now, not as the caller resolved it: an owner's edit (policy,
        // permissions, terms) applies to the very next request, like a revocation.
        let current = self.ensure_live(authz).await?;
        let now = now_unix();
        let (method, kind) = (request.method(), request.kind());
        // What the owner's dashboard lists: done, or refused and why.
        let record = |result: Option<&'static str>| {
            self.activity.record(NewActivity {
                id: keycast_db::ActivityId::generate(),
                authorization_id: authz.id.clone(),
                method,
                kind: kind.map(i64::from),
                transport,
                created_at: now,
                result,
            });
        };
        let refused = |err: SignError| {
            if let SignError::GrantRefused { code, .. } = &err {
                record(Some(*code));
            }
            err
        };
        current.terms.check_expiry(now).map_err(&refused)?;
        check_date(&request, now, current.terms.expires_at)?;
        let keys = self.user_keys(&authz.user_id).await?;
        let user = keys.public_key();
        let kinds = self.allowed_kinds(&authz.id).await?;
        let policy = approval::with_kinds(&current.policy, &kinds);
        if let Err(denial) = policy::evaluate(&policy, &request, &user) {
            // A signature the grant's terms refuse anyway (used up, rate reached) is refused
            // for that: no approval is asked for, no "allow once" spent on it.
            if method == "sign_event" {
                self.usage
                    .would_admit(&self.db, &authz.id, &current.terms.limits, now)
                    .await
                    .map_err(&refused)?;
            }
            if !self.permitted(authz, &policy, &request, &user, &permit).await? {
                record(Some("policy_denied"));
                return Err(SignError::PolicyDenied { reason: denial.reason });
            }
        }
        // Counted before signing: a refused signature is never made.
        if method == "sign_event" {
            self.usage
                .admit(&self.db, &authz.id, &current.terms.limits, now)
                .await
                .map_err(&refused)?;
        }
        let response = perform(&keys, request)?;
        if let Some(ms) = held_before_record() {
            tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
        }
        // A revocation answered while this request was under way (waiting for the grant's
        // count, say) dropped the grant from the caches here before it was answered — on
        // PostgreSQL before this instance acknowledged it. Anything dropped since the start
        // means the grant is read again: revoked, the result is not handed out. So does a
        // cache this instance cannot trust now (PostgreSQL: not hearing the others' notices,
        // while the instance that revoked answers once its wait for them runs out).
        if self.authorizations.epoch() != checked_at || !self.caches_trusted() {
            self.ensure_live(authz).await?;
        }
        record(None);
        Ok(response)
    }

    /// The bunker keypair of a live authorization, for the NIP-46 transport to open
    /// requests and sign replies. Cached; never log it.
    ///
    /// # Errors
    /// As the liveness part of [`Signer::execute`]; [`SignError::Internal`].
    pub async fn bunker_keys(&self, authz: &Authorization) -> Result<Arc<Keys>, SignError> {
        self.ensure_live(authz).await?;
        if let Some(keys) = self.cached(&self.bunker_keys, &authz.id) {
            return Ok(keys);
        }
        let epoch = self.bunker_keys.epoch();
        let row = authz_repo::find_by_id(&self.db, &authz.id)
            .await?
            .ok_or(SignError::Revoked)?;
        let keys = keys::open(
            self.km.as_ref(),
            &row.bunker_secret_encrypted,
            KeyOwner::Bunker(&row.id),
        )?;
        let keys = Arc::new(keys);
        self.bunker_keys.insert_if_current(epoch, row.id, keys.clone());
        Ok(keys)
    }

    /// Revokes `user`'s authorization `id` and drops it from every cache, so the next
    /// request with its token or bunker is refused; says whether this call revoked it, it
    /// was revoked already (perhaps by a first try whose answer was lost), or it is not
    /// theirs. Caches are dropped, and the others told, in every case. Commits: the caller
    /// should wait for durability (and the other instances) before answering.
    ///
    /// # Errors
    /// [`SignError::Internal`] on storage failure: the revocation may or may not have been
    /// made (a lost answer); a retry says which.
    pub async fn revoke(&self, id: &AuthorizationId, user: &UserId) -> Result<Revocation, SignError> {
        if self.revoke_authorization(id, user).await? {
            return Ok(Revocation::Revoked);
        }
        Ok(match authz_repo::find_by_id(&self.db, id).await? {
            Some(row) if row.user_id == *user && row.revoked_at.is_some() => Revocation::AlreadyRevoked,
            _ => Revocation::NotFound,
        })
    }

    /// [`Signer::revoke`] with the storage error as it is, for the rest of core.
    pub(crate) async fn revoke_authorization(&self, id: &AuthorizationId, user: &UserId) -> Result<bool, RepoError> {
        let revoked = authz_repo::revoke(&self.db, id, user, now_unix()).await;
        let revoked = match revoked {
            Ok(_) if answer_lost() => Err(lost_answer()),
            answered => answered,
        };
        // Dropped here and announced to the others whatever the answer: a statement whose
        // answer was lost may have committed, and a notice never sent would leave the
        // others signing from their caches after the owner's retry was told "revoked".
        self.invalidate_authorization(id);
        match revoked {
            Ok(true) => {
                self.usage.revoked(id);
                self.authorizations_changed();
                Ok(true)
            }
            Ok(false) => Ok(false),
            Err(err) => {
                self.authorizations_changed();
                Err(err)
            }
        }
    }

    /// Changes `user`'s live authorization `id` to `policy` and `terms` (the owner edits an
    /// app's grant) and drops it from every cache here and on every other instance, so the
    /// very next request on either transport is judged by the new grant. Returns whether
    /// it changed (false: not theirs, not live). The caller checks `user` may use `policy`.
    /// Commits: the caller should wait for durability before answering.
    ///
    /// # Errors
    /// Storage errors (then nothing changed).
    pub async fn edit_grant(
        &self,
        id: &AuthorizationId,
        user: &UserId,
        policy: &PolicyId,
        terms: &crate::terms::GrantTerms,
    ) -> Result<bool, RepoError> {
        let edited = authz_repo::update_grant(&self.db, id, user, policy, terms.to_json().as_deref()).await?;
        self.invalidate_authorization(id);
        // The meter may count again from what is stored (a grant without limits was not
        // metered): what this instance still buffers is written first, so none is missed.
        if let Err(err) = self.flush().await {
            tracing::warn!(error = %err, "could not write signing activity before a grant's edit; its count may miss the latest");
        }
        self.usage.terms_changed(&self.db, id, &terms.limits).await?;
        Ok(edited)
    }

    /// A custom policy's permissions changed (already stored): every live authorization
    /// under it is dropped from every cache, here and on every other instance.
    ///
    /// # Errors
    /// Storage errors.
    pub async fn policy_changed(&self, policy: &PolicyId) -> Result<(), RepoError> {
        self.policies.invalidate(policy);
        for id in authz_repo::list_live_ids_for_policy(&self.db, policy).await? {
            self.invalidate_authorization(&id);
        }
        Ok(())
    }

    /// Drops one bearer token from the cache after it was deleted (RFC 7009 revocation of
    /// an access token), here and on every other instance, so its next use is refused
    /// everywhere at once.
    pub fn invalidate_token(&self, hash: &TokenHash) {
        self.forget_token(hash);
        self.announce(Announcement::Token(hash.clone()));
    }

    /// Drops one bearer token from this instance's cache only (another instance announced
    /// its revocation).
    pub fn forget_token(&self, hash: &TokenHash) {
        self.tokens.invalidate(hash);
    }

    /// Revokes every live authorization of `user` (a take-over of the account, a new key)
    /// and drops each from every cache. Returns how many it revoked. Commits: the caller
    /// should wait for durability before answering.
    ///
    /// # Errors
    /// Storage errors (then nothing was revoked).
    pub async fn revoke_all(&self, user: &UserId) -> Result<usize, keycast_db::RepoError> {
        let revoked = authz_repo::revoke_all_for_user(&self.db, user, now_unix()).await?;
        for id in &revoked {
            self.invalidate_authorization(id);
            self.usage.revoked(id);
        }
        if !revoked.is_empty() {
            self.authorizations_changed();
        }
        Ok(revoked.len())
    }

    /// Drops one authorization from every cache, here and on every other instance (after
    /// any change to its row made outside [`Signer::revoke`]).
    pub fn invalidate_authorization(&self, id: &AuthorizationId) {
        self.forget_authorization(id);
        self.announce(Announcement::Authorization(id.clone()));
    }

    /// Drops a user's key and authorizations from every cache, here and on every other
    /// instance (account deleted, key replaced).
    pub fn invalidate_user(&self, user: &UserId) {
        self.forget_user(user);
        self.announce(Announcement::User(user.clone()));
    }

    /// Drops one authorization from this instance's caches only (another instance
    /// announced the change).
    pub fn forget_authorization(&self, id: &AuthorizationId) {
        self.authorizations.invalidate(id);
        self.allowances.invalidate(id);
        self.bunker_keys.invalidate(id);
        self.tokens.invalidate_where(|_, (authz, _)| authz == id);
        self.bunkers.invalidate_where(|_, authz| authz == id);
        // Its policy may have been edited too (a custom policy: every authorization under
        // it is announced). Policies are few and cheap to read again, so all of them go,
        // and no announcement needs to name a policy.
        self.policies.invalidate_where(|_, _| true);
    }

    /// Drops a user's key and authorizations from this instance's caches only.
    pub fn forget_user(&self, user: &UserId) {
        self.user_keys.invalidate(user);
        self.authorizations.invalidate_where(|_, authz| authz.user_id == *user);
    }

    /// Empties every cache of this instance (after changes may have gone unheard).
    pub fn forget_everything(&self) {
        self.authorizations.invalidate_where(|_, _| true);
        self.bunker_keys.invalidate_where(|_, _| true);
        self.tokens.invalidate_where(|_, _| true);
        self.bunkers.invalidate_where(|_, _| true);
        self.user_keys.invalidate_where(|_, _| true);
        self.allowances.invalidate_where(|_, _| true);
        self.policies.invalidate_where(|_, _| true);
    }

    /// First adds the signatures whose records a full buffer dropped to their grants'
    /// totals, so the grants' limits hold after a restart. Then writes buffered activity,
    /// oldest first, in transactions of at most
    /// [`activity_repo::MAX_BATCH_ROWS`] rows on a connection of its own, then prunes the
    /// stored record of each grant that wrote enough since its last pruning (see
    /// [`crate::activity`]). Call about once a second and at shutdown. Returns the rows
    /// written. On failure the batch that failed (and everything after it) stays buffered
    /// for the next call; batches already committed stay written. A pruning that fails is
    /// logged and tried again at the grant's next flush.
    ///
    /// # Errors
    /// [`SignError::Internal`] on storage failure.
    pub async fn flush(&self) -> Result<u64, SignError> {
        let unrecorded = self.activity.take_dropped_signatures();
        if !unrecorded.is_empty() {
            let counts: Vec<(AuthorizationId, i64)> = unrecorded
                .iter()
                .map(|(id, n)| (id.clone(), i64::try_from(*n).unwrap_or(i64::MAX)))
                .collect();
            if let Err(err) = activity_repo::add_unrecorded_signatures(&self.activity_db, &counts).await {
                self.activity.untake_dropped_signatures(unrecorded);
                return Err(err.into());
            }
        }
        let mut stored = 0;
        // Only what was buffered when the flush began: a flush under steady signing ends.
        let mut left = self.activity.len();
        while left > 0 {
            let batch = self.activity.take(left.min(activity_repo::MAX_BATCH_ROWS));
            if batch.is_empty() {
                break;
            }
            left = left.saturating_sub(batch.len());
            // The write runs in a task of its own: a flush cut off while it waits (shutdown
            // aborting the flusher, a hand-over's time limit) must not take the batch with it
            // — taken from the buffer, it exists nowhere else. The write goes on and lands.
            // Bounded all the same: on a connection the network dropped without a word it
            // would wait for good, and every later flush with it. A batch whose write timed
            // out goes back and is written again: its first write may have landed, its
            // answer lost, and the ids given at recording make the second store nothing.
            let db = self.activity_db.clone();
            let written = tokio::spawn(async move {
                let inserted =
                    keycast_db::within(ACTIVITY_WRITE_WITHIN, activity_repo::insert_batch(&db, &batch)).await;
                (inserted, batch)
            })
            .await;
            let batch = match written {
                Ok((Ok(rows), batch)) => {
                    stored += rows;
                    batch
                }
                Ok((Err(err), batch)) => {
                    self.activity.put_back(batch);
                    return Err(err.into());
                }
                Err(joined) if joined.is_panic() => std::panic::resume_unwind(joined.into_panic()),
                // The runtime is shutting down: nothing more can be written.
                Err(_) => return Ok(stored),
            };
            let due = self.record_bound.written(&batch);
            if !due.is_empty() {
                if let Err(err) = self.prune_records(&due).await {
                    tracing::warn!(grants = due.len(), error = %err, "could not prune grants' activity records; will retry");
                }
            }
        }
        Ok(stored)
    }

    /// Prunes the stored records of `due` grants to the newest kept, each keeping the
    /// signatures of its longest rate window (what that limit counts after a restart).
    async fn prune_records(&self, due: &[AuthorizationId]) -> Result<(), RepoError> {
        let now = now_unix();
        let mut grants = Vec::with_capacity(due.len());
        for id in due {
            let Some(row) = authz_repo::find_by_id(&self.activity_db, id).await? else {
                // Deleted with its account: its records went with it.
                self.record_bound.pruned(id);
                continue;
            };
            // Unreadable terms (refused at signing anyway): keep a day, the longest window.
            let window = crate::terms::GrantTerms::from_json(row.terms.as_deref())
                .map_or(Some(crate::terms::DAY), |terms| {
                    crate::terms::longest_window(&terms.limits)
                });
            grants.push(activity_repo::Prune {
                authorization_id: id.clone(),
                protect_since: window.map(|w| now - w),
            });
        }
        activity_repo::prune(&self.activity_db, self.record_bound.keep(), &grants).await?;
        for grant in &grants {
            self.record_bound.pruned(&grant.authorization_id);
        }
        Ok(())
    }

    /// Live grants an account may have (`KEYCAST_MAX_GRANTS_PER_ACCOUNT`).
    pub fn max_live_grants(&self) -> u32 {
        self.max_live_grants
    }

    /// How long an entry stays in the caches at most (on every instance alike).
    pub fn cache_ttl(&self) -> Duration {
        self.cache_ttl
    }

    /// Activity records waiting for [`Signer::flush`].
    pub fn pending_activity(&self) -> usize {
        self.activity.len()
    }

    /// Lets go of the usage counts of grants idle for a day (see
    /// [`crate::terms::UsageMeter::forget_idle`]) — only with no activity still buffered and
    /// none ever dropped (a full buffer while the database could not be written), so a count
    /// rebuilt from the stored activity misses no signature. Returns how many.
    pub fn forget_idle_usage(&self, now: i64) -> usize {
        if self.pending_activity() > 0 || self.dropped_activity() > 0 {
            return 0;
        }
        self.usage.forget_idle(now)
    }

    /// Activity records dropped because the buffer was full (database unwritable).
    pub fn dropped_activity(&self) -> u64 {
        self.activity.dropped()
    }

    /// The authorization as it stands now (cached, else read), if still live.
    async fn ensure_live(&self, authz: &Authorization) -> Result<Arc<Authorization>, SignError> {
        if authz.revoked_at.is_some() {
            return Err(SignError::Revoked);
        }
        if authz.expires_at.is_some_and(|at| now_unix() >= at) {
            return Err(SignError::Expired);
        }
        if let Some(current) = self.cached(&self.authorizations, &authz.id) {
            return Ok(current);
        }
        let (_turn, loaded) = self.load_turn(&self.authorizations, &authz.id).await;
        if let Some(current) = loaded {
            return Ok(current);
        }
        // Not cached: invalidated (perhaps revoked or edited) or aged out. Ask the database.
        let epoch = self.authorizations.epoch();
        let row = authz_repo::find_by_id(&self.db, &authz.id)
            .await?
            .ok_or(SignError::Revoked)?;
        Ok(self.cache_row(epoch, &row).await?)
    }

    /// Builds, checks and caches a row read after `epoch` was taken.
    async fn cache_row(&self, epoch: u64, row: &AuthorizationRow) -> Result<Arc<Authorization>, AuthError> {
        if row.revoked_at.is_some() {
            return Err(AuthError::Revoked);
        }
        let policy = self.policy(&row.policy_id).await?;
        let authz = Arc::new(Authorization::from_row(row, policy, None)?);
        self.authorizations
            .insert_if_current(epoch, row.id.clone(), authz.clone());
        Ok(authz)
    }

    async fn by_bunker(&self, bunker: &PublicKey) -> Result<Arc<Authorization>, AuthError> {
        if let Some(id) = self.cached(&self.bunkers, bunker) {
            if let Some(authz) = self.cached(&self.authorizations, &id) {
                return Ok(authz);
            }
        }
        let epoch = self.authorizations.epoch();
        let row = authz_repo::find_by_bunker_pubkey(&self.db, &bunker.to_hex())
            .await?
            .ok_or(AuthError::UnknownToken)?;
        let authz = self.cache_row(epoch, &row).await?;
        self.bunkers.insert_if_current(self.bunkers.epoch(), *bunker, row.id);
        Ok(authz)
    }

    async fn policy(&self, id: &PolicyId) -> Result<Arc<Policy>, AuthError> {
        if let Some(policy) = self.cached(&self.policies, id) {
            return Ok(policy);
        }
        let (_turn, loaded) = self.load_turn(&self.policies, id).await;
        if let Some(policy) = loaded {
            return Ok(policy);
        }
        let epoch = self.policies.epoch();
        let row = policies::find_by_id(&self.db, id).await?.ok_or_else(|| PolicyError {
            slug: id.to_string(),
            reason: "the policy does not exist".into(),
        })?;
        let policy = Arc::new(Policy::from_row(&row)?);
        self.policies.insert_if_current(epoch, id.clone(), policy.clone());
        Ok(policy)
    }

    /// The kinds the owner allowed `id` from now on (cached like the authorization).
    pub(crate) async fn allowed_kinds(&self, id: &AuthorizationId) -> Result<Arc<BTreeSet<u16>>, SignError> {
        if let Some(kinds) = self.cached(&self.allowances, id) {
            return Ok(kinds);
        }
        let (_turn, loaded) = self.load_turn(&self.allowances, id).await;
        if let Some(kinds) = loaded {
            return Ok(kinds);
        }
        let epoch = self.allowances.epoch();
        let kinds = Arc::new(self.allowed_kinds_uncached(id).await?);
        self.allowances.insert_if_current(epoch, id.clone(), kinds.clone());
        Ok(kinds)
    }

    /// The user's public key.
    pub(crate) async fn user_keys_of(&self, user: &UserId) -> Result<PublicKey, SignError> {
        Ok(self.user_keys(user).await?.public_key())
    }

    /// The live authorization `id` (for carrying out an approval).
    ///
    /// # Errors
    /// [`SignError::Revoked`] when it is revoked or gone; storage errors.
    pub(crate) async fn authorization_by_id(&self, id: &AuthorizationId) -> Result<Authorization, SignError> {
        if let Some(authz) = self.cached(&self.authorizations, id) {
            return Ok((*authz).clone());
        }
        let epoch = self.authorizations.epoch();
        let row = authz_repo::find_by_id(&self.db, id).await?.ok_or(SignError::Revoked)?;
        Ok((*self.cache_row(epoch, &row).await?).clone())
    }

    async fn user_keys(&self, user: &UserId) -> Result<Arc<Keys>, SignError> {
        if let Some(keys) = self.cached(&self.user_keys, user) {
            return Ok(keys);
        }
        let (_turn, loaded) = self.load_turn(&self.user_keys, user).await;
        if let Some(keys) = loaded {
            return Ok(keys);
        }
        let epoch = self.user_keys.epoch();
        let keys = Arc::new(keys::load_user_keys(&self.db, self.km.as_ref(), user).await?);
        self.user_keys.insert_if_current(epoch, user.clone(), keys.clone());
        Ok(keys)
    }
}

fn with_expiry(authz: &Authorization, expires_at: i64) -> Result<Authorization, AuthError> {
    if now_unix() >= expires_at {
        return Err(AuthError::Expired);
    }
    Ok(Authorization {
        expires_at: Some(expires_at),
        ..authz.clone()
    })
}

/// Milliseconds the tests hold a token's lookup between its read and its caching (fail point
/// `signer-after-token-read`, `return(<ms>)`); always `None` without fault injection.
fn held_after_token_read() -> Option<u64> {
    fail::fail_point!("signer-after-token-read", |ms| crate::held_at_fail_point(
        "signer-after-token-read",
        ms
    ));
    None
}

/// Milliseconds the tests hold a request between its signature and its record (fail point
/// `signer-before-record`, `return(<ms>)`); always `None` in a build without fault injection.
fn held_before_record() -> Option<u64> {
    fail::fail_point!("signer-before-record", |ms| crate::held_at_fail_point(
        "signer-before-record",
        ms
    ));
    None
}

/// Performs an allowed request with the user's key. CPU work of tens of microseconds
/// (one Schnorr signature or one ECDH + symmetric cipher), fine on a runtime thread.
fn perform(keys: &Keys, request: Request) -> Result<Response, SignError> {
    let secret = keys.secret_key();
    match request {
        Request::GetPublicKey => Ok(Response::PublicKey(keys.public_key())),
        Request::SignEvent(mut template) => {
            template.pubkey = keys.public_key();
            template.id = None;
            let event = template
                .sign_with_keys(keys)
                .map_err(|e| InternalError::Crypto(e.to_string()))?;
            Ok(Response::Event(Box::new(event)))
        }
        Request::Nip04Encrypt { peer, plaintext } => nip04::encrypt(secret, &peer, plaintext)
            .map(Response::Text)
            .map_err(|e| bad_request(format!("nip04 encryption failed: {e}"))),
        Request::Nip04Decrypt { peer, ciphertext } => nip04::decrypt(secret, &peer, ciphertext)
            .map(Response::Text)
            .map_err(|_| bad_request("the nip04 ciphertext could not be decrypted with this peer".into())),
        Request::Nip44Encrypt { peer, plaintext } => nip44::encrypt(secret, &peer, plaintext, nip44::Version::V2)
            .map(Response::Text)
            .map_err(|e| bad_request(format!("nip44 encryption failed: {e}"))),
        Request::Nip44Decrypt { peer, ciphertext } => nip44::decrypt(secret, &peer, ciphertext)
            .map(Response::Text)
            .map_err(|_| bad_request("the nip44 ciphertext could not be decrypted with this peer".into())),
    }
}

fn bad_request(reason: String) -> SignError {
    SignError::BadRequest { reason }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event_dated(at: i64) -> Request {
        let event = nostr::EventBuilder::text_note("dated")
            .custom_created_at(nostr::Timestamp::from(u64::try_from(at).unwrap()))
            .build(Keys::generate().public_key());
        Request::SignEvent(event)
    }

    #[test]
    fn an_event_is_signed_dated_at_most_ten_minutes_ahead_and_never_after_its_grant() {
        let now = 1_700_000_000;
        let at = |ahead: i64| event_dated(now + ahead);
        assert!(check_date(&at(0), now, None).is_ok());
        assert!(check_date(&at(-86_400), now, None).is_ok(), "the past is not refused");
        assert!(check_date(&at(MAX_DATED_AHEAD_SECS), now, None).is_ok());
        assert!(check_date(&at(MAX_DATED_AHEAD_SECS + 1), now, None).is_err());
        // The last minutes of a grant: within ten minutes, but after it ends.
        assert!(check_date(&at(120), now, Some(now + 60)).is_err());
        assert!(check_date(&at(60), now, Some(now + 60)).is_ok());
        assert!(check_date(&Request::GetPublicKey, now, Some(now - 1)).is_ok());
    }
}
