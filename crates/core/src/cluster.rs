//! Many instances on one PostgreSQL database: what each must hear from the others, and
//! which of them answers a NIP-46 request.
//!
//! # Cache invalidation across instances
//! Every change that an instance's caches must not outlive (a revocation, a binding, a
//! replaced key, a new authorization) is *announced* by the [`Signer`] that made it. On
//! PostgreSQL the cluster sends each announcement as a `NOTIFY` with a sequence number;
//! every other instance's listener drops the named entries from its caches and answers
//! with an acknowledgement `NOTIFY`. A change that decides who may sign is answered only
//! once every live instance has acknowledged everything its instance announced so far
//! ([`Cluster::wait_synced`], the [`crate::Durability`] of PostgreSQL): so a revocation
//! made on one instance is refused by every other on the very next request.
//!
//! Fallbacks, so that no instance acts on stale state for long:
//! - an instance whose listener loses its connection stops trusting its caches (every
//!   request reads the database) until it listens again, then starts with empty caches;
//! - every cached entry also expires after `KEYCAST_CACHE_TTL_SECS` (5 s by default here);
//! - an instance that does not acknowledge within [`ClusterOptions::sync_timeout`] (hung,
//!   or died a moment ago) does not hold the change up: it is answered, and counted
//!   (`keycast_cluster_sync_timeouts_total`); the two rules above bound what that instance
//!   may still serve from cache.
//!
//! # NIP-46: each request answered once
//! Every instance hears every relay. Instances heartbeat into `keycast_instances`
//! (every fifth of `KEYCAST_INSTANCE_TTL_SECS`) and read back the live set; each bunker
//! belongs to one live instance by rendezvous hashing ([`owner`]: the highest
//! SHA-256(instance ‖ bunker) wins), so adding or removing an instance moves only its
//! share. The owner then *claims* the request's event id in `nip46_claims`; only the
//! claimant answers. Claims make the answer unique even while two instances briefly
//! disagree about the live set (one joining or leaving). An instance that stops cleanly
//! leaves the set at once and says so; one that dies is dropped once its heartbeat is
//! older than the TTL, and its bunkers are answered by the others from then on — within
//! TTL + one heartbeat of its death (6 s by default).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use keycast_db::notify::{Heard, Listener};
use keycast_db::{cluster as cluster_repo, within, AuthorizationId, Db, PgOptions, TokenHash, UserId};
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, watch, Notify};
use tokio::task::AbortHandle;

use crate::durability::{BoxFuture, Durability};
use crate::signer::{Announcement, Signer};
use crate::vital::Vitals;

/// Default: an instance silent this long is dead.
pub const DEFAULT_INSTANCE_TTL: Duration = Duration::from_secs(5);
/// Default: how long a change waits for the other instances' acknowledgements.
pub const DEFAULT_SYNC_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a claim, a dead instance's row and a rate-limit bucket are kept.
const PURGE_AFTER: Duration = Duration::from_secs(3600);

/// Acknowledgements kept from instances this one does not (yet) know to be live.
const ACKERS_KEPT: usize = 256;

/// Tuning for [`Cluster`].
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// An instance whose heartbeat is older is dead. Heartbeats go every fifth of it.
    /// Default [`DEFAULT_INSTANCE_TTL`].
    pub instance_ttl: Duration,
    /// How long [`Cluster::wait_synced`] waits for acknowledgements. Default
    /// [`DEFAULT_SYNC_TIMEOUT`].
    pub sync_timeout: Duration,
    /// How long a NIP-46 follower may take to re-read the bunkers after another
    /// instance's change before this instance acknowledges it anyway. Default 2 s.
    pub resync_timeout: Duration,
    /// Where the heartbeat and the change notices report an unexpected end.
    pub vitals: Vitals,
    /// The ids of the master keys this instance opens, comma-separated, published with each
    /// heartbeat: `keycast master-key rotate` refuses a key some live instance lacks.
    pub master_key_ids: String,
}

impl ClusterOptions {
    /// How often an instance heartbeats: five times per TTL, and three times per sync
    /// timeout, since its caches are trusted only that long after its last beat it heard
    /// (see `Cluster::receive`). A second by default.
    fn beat_every(&self) -> Duration {
        (self.instance_ttl / 5)
            .min(self.sync_timeout / 3)
            .max(Duration::from_millis(100))
    }

    /// The longest one statement of the cluster's own (a heartbeat, a notice, a claim) may
    /// take, connecting included, before it is given up and retried: a connection the
    /// network dropped without a word never answers and never fails, and an instance whose
    /// heartbeat or notices waited on one for good dropped out of the live set, or announced
    /// nothing again, while every probe said it was well. As long as the pool waits for a
    /// connection (a slow connect on a loaded server is no dead connection), and at least a
    /// TTL: a beat given up costs the instance a moment out of the live set, not its place.
    fn statement_within(&self) -> Duration {
        self.instance_ttl
            .max(Duration::from_millis(keycast_db::pool::DEFAULT_ACQUIRE_TIMEOUT_MS))
    }
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            instance_ttl: DEFAULT_INSTANCE_TTL,
            sync_timeout: DEFAULT_SYNC_TIMEOUT,
            resync_timeout: Duration::from_secs(2),
            vitals: Vitals::default(),
            master_key_ids: String::new(),
        }
    }
}

/// This instance's membership of the cluster. One per process on PostgreSQL; none on
/// SQLite.
pub struct Cluster {
    id: String,
    db: Db,
    /// The heartbeat's own connection: a pool that requests or a slow activity flush have
    /// run dry must not make this instance miss heartbeats and drop out of the live set.
    beat_db: Db,
    /// The publisher's own connection, for the same reason: a change is answered only
    /// `sync_timeout` after its notice went out (see [`Cluster::wait_synced`]). The listener's
    /// acknowledgements go out on it too.
    publish_db: Db,
    signer: Arc<Signer>,
    options: ClusterOptions,
    /// The live instances (sorted ids, this one included), as of the last heartbeat.
    live: RwLock<Arc<Vec<String>>>,
    /// Those of them that answer NIP-46 requests (sorted ids): the bunkers are theirs.
    answering: RwLock<Arc<Vec<String>>>,
    /// Whether this instance answers NIP-46 requests now ([`Cluster::set_answers_nip46`]).
    answers_nip46: AtomicBool,
    /// How many of this instance's announcements have been sent.
    sent: watch::Sender<u64>,
    /// The highest sequence number of ours each other instance acknowledged.
    acks: watch::Sender<HashMap<String, u64>>,
    /// Wakes the heartbeat loop early (an instance joined or left).
    membership: Notify,
    listening: AtomicBool,
    /// What this instance's beats are dated from.
    epoch: Instant,
    /// Listener, publisher, heartbeat.
    tasks: Mutex<Vec<AbortHandle>>,
    /// Set by [`Cluster::leave`]: this instance's caches are not trusted again.
    left: AtomicBool,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("id", &self.id)
            .field("live", &self.live_instances())
            .finish_non_exhaustive()
    }
}

/// What one instance says to the others, as `NOTIFY` payloads (space-separated words).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Message {
    /// `inv <origin> <seq> a <authorization>` / `u <user>` / `b` (the bunker set).
    Changed {
        origin: String,
        seq: u64,
        what: Announcement,
    },
    /// `ack <acker> <origin> <seq>`: acker applied everything of origin up to seq.
    Ack { acker: String, origin: String, seq: u64 },
    /// `up <id>` / `down <id>`: membership changed; re-read it now.
    Membership,
    /// `beat <origin> <sent>`: a heartbeat, sent `sent` microseconds after the origin's
    /// cluster started (meaningful to the origin only).
    Beat { origin: String, sent_us: u64 },
}

impl Message {
    fn encode(&self) -> String {
        match self {
            Message::Changed { origin, seq, what } => match what {
                Announcement::Authorization(id) => format!("inv {origin} {seq} a {id}"),
                Announcement::User(id) => format!("inv {origin} {seq} u {id}"),
                Announcement::Bunkers => format!("inv {origin} {seq} b"),
                Announcement::Token(hash) => format!("inv {origin} {seq} t {}", hash.as_str()),
            },
            Message::Ack { acker, origin, seq } => format!("ack {acker} {origin} {seq}"),
            Message::Membership => "members".to_owned(),
            Message::Beat { origin, sent_us } => format!("beat {origin} {sent_us}"),
        }
    }

    fn decode(text: &str) -> Option<Message> {
        let words: Vec<&str> = text.split(' ').collect();
        match words.as_slice() {
            ["inv", origin, seq, kind, rest @ ..] => {
                let what = match (*kind, rest) {
                    ("a", [id]) => Announcement::Authorization(AuthorizationId::new(*id)),
                    ("u", [id]) => Announcement::User(UserId::new(*id)),
                    ("b", []) => Announcement::Bunkers,
                    ("t", [hash]) => Announcement::Token(TokenHash::from_hex(hash)?),
                    _ => return None,
                };
                Some(Message::Changed {
                    origin: (*origin).to_owned(),
                    seq: seq.parse().ok()?,
                    what,
                })
            }
            ["ack", acker, origin, seq] => Some(Message::Ack {
                acker: (*acker).to_owned(),
                origin: (*origin).to_owned(),
                seq: seq.parse().ok()?,
            }),
            ["members"] => Some(Message::Membership),
            ["beat", origin, sent] => Some(Message::Beat {
                origin: (*origin).to_owned(),
                sent_us: sent.parse().ok()?,
            }),
            _ => None,
        }
    }
}

/// 64 random bits, hex: a process's name among the instances (host names and PIDs repeat
/// in containers).
fn instance_id() -> String {
    use rand::RngCore;
    let mut bytes = [0u8; 8];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    hex::encode(bytes)
}

/// Unix milliseconds.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// The live instance that answers `bunker` (rendezvous hashing); `None` for an empty set.
pub fn owner<'a>(bunker: &str, live: &'a [String]) -> Option<&'a str> {
    live.iter()
        .max_by_key(|instance| {
            let digest = Sha256::new()
                .chain_update(instance.as_bytes())
                .chain_update(b"\0")
                .chain_update(bunker.as_bytes())
                .finalize();
            u64::from_be_bytes(digest[..8].try_into().expect("8 bytes"))
        })
        .map(String::as_str)
}

impl Cluster {
    /// Joins the cluster: listens for the other instances' notices (on `session`, a
    /// direct connection), registers this instance with a first heartbeat, and starts
    /// announcing the signer's changes. Returns once this instance listens and is
    /// registered, so nothing it caches from now on can miss a notice.
    ///
    /// # Errors
    /// The database cannot be reached, or is not PostgreSQL.
    pub async fn start(
        db: Db,
        session: &PgOptions,
        signer: Arc<Signer>,
        options: ClusterOptions,
    ) -> Result<Arc<Cluster>, keycast_db::RepoError> {
        let id = instance_id();
        // Ten heartbeats missed in a row is a dead session.
        let listener = Listener::connect(session, options.beat_every() * 10).await?;
        let cluster = Arc::new(Cluster {
            id,
            beat_db: db.dedicated(1),
            publish_db: db.dedicated(1),
            db,
            signer: signer.clone(),
            options,
            live: RwLock::new(Arc::new(Vec::new())),
            answering: RwLock::new(Arc::new(Vec::new())),
            answers_nip46: AtomicBool::new(false),
            sent: watch::channel(0).0,
            acks: watch::channel(HashMap::new()).0,
            membership: Notify::new(),
            listening: AtomicBool::new(true),
            epoch: Instant::now(),
            tasks: Mutex::new(Vec::new()),
            left: AtomicBool::new(false),
        });
        // Trusted from this instance's first beat heard on (see `receive`).
        signer.distrust_caches();
        cluster.beat().await?;
        let (tx, rx) = mpsc::unbounded_channel();
        signer.announce_to(tx);
        let vitals = &cluster.options.vitals;
        let tasks = vec![
            vitals.spawn("the change-notice listener", cluster.clone().listen(listener)),
            vitals.spawn("the change-notice publisher", cluster.clone().publish(rx)),
            vitals.spawn("the instance heartbeat", cluster.clone().heartbeat()),
        ];
        *cluster.tasks.lock().unwrap_or_else(PoisonError::into_inner) = tasks;
        let _ = keycast_db::notify::notify(&cluster.db, &Message::Membership.encode()).await;
        tracing::info!(instance = cluster.id, live = ?cluster.live_instances(), "joined the instances sharing this database");
        Ok(cluster)
    }

    /// This instance's id (random, per process).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// How often instances heartbeat: within this of hearing that one left (or at once, on
    /// its notice), the others have taken its bunkers.
    pub fn beat_interval(&self) -> Duration {
        self.options.beat_every()
    }

    /// The live instances as of the last heartbeat, sorted, this one included.
    pub fn live_instances(&self) -> Arc<Vec<String>> {
        self.live.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Whether this instance answers NIP-46 requests to `bunker` (64 hex): the bunkers are
    /// shared out among the instances that answer NIP-46 (all of them answer while none
    /// says it does: a second answer is better than none, and claims keep it to one).
    pub fn owns(&self, bunker: &str) -> bool {
        let answering = self.answering.read().unwrap_or_else(PoisonError::into_inner).clone();
        owner(bunker, &answering).is_none_or(|o| o == self.id)
    }

    /// Says whether this instance answers NIP-46 requests now (the service runs, its
    /// bunkers are read, an operator relay is connected). A change is published at once and
    /// the others are told to beat, so bunkers move to or from this instance at once, not
    /// after a TTL.
    pub fn set_answers_nip46(&self, answers: bool) {
        if self.answers_nip46.swap(answers, Ordering::SeqCst) != answers {
            tracing::info!(
                instance = self.id,
                answers,
                "nip46: this instance's share of the bunkers changes"
            );
            self.membership.notify_one();
        }
    }

    /// Claims a NIP-46 request for this instance (`key`: the client and request id, or an
    /// event id): true if it is this instance's to answer. A database failure answers true:
    /// a second answer is better than none.
    pub async fn claim(&self, key: &str) -> bool {
        let started = Instant::now();
        let claimed = within(
            self.options.statement_within(),
            cluster_repo::claim(&self.db, key, &self.id),
        )
        .await;
        // The one database round trip of a NIP-46 request on PostgreSQL (BENCHMARKS.md).
        metrics::histogram!("keycast_nip46_claim_seconds").record(started.elapsed());
        match claimed {
            Ok(claimed) => claimed,
            Err(err) => {
                tracing::warn!(error = %err, "nip46: cannot claim a request; answering it anyway");
                true
            }
        }
    }

    /// Resolves once every other live instance has applied every change this instance
    /// announced before the call, or [`ClusterOptions::sync_timeout`] after the notice went
    /// out (logged and counted; see the module doc for why that is not an error). Timed from
    /// the notice, not the call: an instance that has not applied it trusts its caches at
    /// most `sync_timeout` past the last heartbeat of its own it heard, and a heartbeat sent
    /// after the notice is heard after it. A notice not yet sent tells nobody anything, and
    /// the others go on trusting their caches: the wait for it lasts as long as a cache
    /// entry lives (at least `sync_timeout`), after which none loaded before the change is
    /// left anywhere.
    pub async fn wait_synced(&self) {
        let target = self.signer.announced();
        if target == 0 {
            return;
        }
        let deadline = tokio::time::Instant::now() + self.options.sync_timeout.max(self.signer.cache_ttl());
        let mut sent = self.sent.subscribe();
        if tokio::time::timeout_at(deadline, sent.wait_for(|s| *s >= target))
            .await
            .is_err()
        {
            self.sync_timed_out("the change could not be announced", &[]);
            return;
        }
        let deadline = tokio::time::Instant::now() + self.options.sync_timeout;
        let peers: Vec<String> = self
            .live_instances()
            .iter()
            .filter(|i| **i != self.id)
            .cloned()
            .collect();
        let mut acks = self.acks.subscribe();
        let synced = |acks: &HashMap<String, u64>| peers.iter().all(|p| acks.get(p).is_some_and(|s| *s >= target));
        if tokio::time::timeout_at(deadline, acks.wait_for(synced)).await.is_err() {
            let acks = self.acks.borrow().clone();
            let missing: Vec<&str> = peers
                .iter()
                .filter(|p| acks.get(*p).is_none_or(|s| *s < target))
                .map(String::as_str)
                .collect();
            self.sync_timed_out("instances did not acknowledge a change", &missing);
        }
    }

    fn sync_timed_out(&self, what: &str, missing: &[&str]) {
        metrics::counter!("keycast_cluster_sync_timeouts_total").increment(1);
        tracing::warn!(
            ?missing,
            timeout_ms = self.options.sync_timeout.as_millis() as u64,
            "{what} in time; answering anyway (their caches expire within KEYCAST_CACHE_TTL_SECS)"
        );
    }

    /// Leaves the cluster (a clean stop): the others take this instance's bunkers at once,
    /// and no longer wait for its acknowledgements. The requests it is still finishing read
    /// the database from here on (its caches are not trusted again: a revocation made
    /// elsewhere is no longer acknowledged by it before it is answered), and the changes they
    /// make are still announced: the listener and the publisher run until
    /// [`Cluster::close`]. Only the heartbeat stops, so the registration stays gone.
    pub async fn leave(&self) {
        self.left.store(true, Ordering::SeqCst);
        self.signer.distrust_caches();
        if let Some(heartbeat) = self.tasks.lock().unwrap_or_else(PoisonError::into_inner).pop() {
            heartbeat.abort();
        }
        if let Err(err) = cluster_repo::leave(&self.db, &self.id).await {
            tracing::warn!(error = %err, "could not deregister this instance; the others notice when its heartbeat lapses");
            return;
        }
        let _ = keycast_db::notify::notify(&self.db, &Message::Membership.encode()).await;
        tracing::info!(instance = self.id, "left the instances sharing this database");
    }

    /// Stops listening and publishing: the last step of a clean stop, once nothing is left
    /// to announce.
    pub fn close(&self) {
        for task in self.tasks.lock().unwrap_or_else(PoisonError::into_inner).drain(..) {
            task.abort();
        }
    }

    async fn beat(&self) -> Result<(), keycast_db::RepoError> {
        let ttl = i64::try_from(self.options.instance_ttl.as_millis()).unwrap_or(i64::MAX);
        // Dated before it is sent, so never later than its commit (see `receive`).
        let beat = Message::Beat {
            origin: self.id.clone(),
            sent_us: u64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(u64::MAX),
        };
        let abilities = cluster_repo::Abilities {
            master_key_ids: &self.options.master_key_ids,
            answers_nip46: self.answers_nip46.load(Ordering::SeqCst),
        };
        let members = within(
            self.options.statement_within(),
            cluster_repo::heartbeat(&self.beat_db, &self.id, ttl, &beat.encode(), abilities),
        )
        .await?;
        let answering: Vec<String> = members
            .iter()
            .filter(|m| m.answers_nip46)
            .map(|m| m.id.clone())
            .collect();
        *self.answering.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(answering);
        let live: Vec<String> = members.into_iter().map(|m| m.id).collect();
        let changed = {
            let mut current = self.live.write().unwrap_or_else(PoisonError::into_inner);
            let changed = **current != live;
            *current = Arc::new(live);
            changed
        };
        if changed {
            let live = self.live_instances();
            metrics::gauge!("keycast_cluster_instances").set(live.len() as f64);
            tracing::info!(instance = self.id, ?live, "live instances changed");
        }
        Ok(())
    }

    /// Heartbeats every [`ClusterOptions::beat_every`] (or at once when told membership
    /// changed), and purges old rows now and then.
    async fn heartbeat(self: Arc<Self>) {
        let every = self.options.beat_every();
        let mut last_purge = Instant::now();
        let mut published_answers = false;
        loop {
            tokio::select! {
                () = tokio::time::sleep(every) => {}
                () = self.membership.notified() => {}
            }
            fail::fail_point!("cluster-heartbeat", |_| ());
            // An instance that cannot hear the others' changes does not count itself among
            // them: they stop waiting for acknowledgements it cannot send (it trusts no cache
            // meanwhile, so it needs none) and answer its bunkers.
            if !self.listening.load(Ordering::SeqCst) {
                continue;
            }
            let answers = self.answers_nip46.load(Ordering::SeqCst);
            match self.beat().await {
                Ok(()) if answers != published_answers => {
                    // The others beat at once on this notice, so the bunkers move now.
                    published_answers = answers;
                    let _ = within(
                        self.options.statement_within(),
                        keycast_db::notify::notify(&self.beat_db, &Message::Membership.encode()),
                    )
                    .await;
                }
                Ok(()) => {}
                Err(err) => tracing::warn!(error = %err, "heartbeat failed; keeping the last known instances"),
            }
            if last_purge.elapsed() > Duration::from_secs(60) {
                last_purge = Instant::now();
                let before = i64::try_from(PURGE_AFTER.as_millis()).unwrap_or(i64::MAX);
                // Beside the beats, not between them: a slow purge must not cost a beat.
                let (db, bound) = (self.db.clone(), self.options.statement_within());
                tokio::spawn(async move {
                    let _ = within(bound, cluster_repo::purge(&db, before)).await;
                    let _ = within(bound, keycast_db::limits::purge(&db, now_ms() - before)).await;
                });
            }
        }
    }

    /// Sends the signer's announcements in order, numbering them.
    async fn publish(self: Arc<Self>, mut announcements: mpsc::UnboundedReceiver<Announcement>) {
        let mut seq = 0;
        while let Some(what) = announcements.recv().await {
            seq += 1;
            let message = Message::Changed {
                origin: self.id.clone(),
                seq,
                what,
            }
            .encode();
            if let Some(ms) = held_before_publish() {
                tokio::time::sleep(Duration::from_millis(ms)).await;
            }
            let mut wait = Duration::from_millis(50);
            while let Err(err) = within(
                self.options.statement_within(),
                keycast_db::notify::notify(&self.publish_db, &message),
            )
            .await
            {
                tracing::warn!(error = %err, "cannot announce a change to the other instances; retrying");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(2));
            }
            self.sent.send_replace(seq);
        }
    }

    /// Applies the other instances' changes and acknowledges them; collects their
    /// acknowledgements of ours.
    async fn listen(self: Arc<Self>, mut listener: Listener) {
        loop {
            match listener.next().await {
                // The tests' stand-in for a listener that fell behind (a paused or starved
                // process): notices heard but never applied.
                Heard::Notice(_) if fail_point_armed_behind() => {}
                Heard::Notice(text) => match Message::decode(&text) {
                    Some(message) => self.receive(message).await,
                    None => tracing::debug!(text, "ignoring an unknown notice"),
                },
                Heard::Lost => {
                    self.listening.store(false, Ordering::SeqCst);
                    self.signer.distrust_caches();
                    tracing::warn!(
                        "lost the connection that hears other instances' changes: not trusting caches until it is back"
                    );
                }
                Heard::Listening => {
                    // What was missed meanwhile is unknown: start from empty caches, trusted
                    // again once this instance hears its next beat (sent at once).
                    self.signer.forget_everything();
                    self.listening.store(true, Ordering::SeqCst);
                    self.membership.notify_one();
                    tracing::info!("listening for other instances' changes again");
                }
            }
        }
    }

    async fn receive(&self, message: Message) {
        match message {
            Message::Changed { origin, seq, what } if origin != self.id => {
                match &what {
                    Announcement::Authorization(id) => self.signer.forget_authorization(id),
                    Announcement::User(id) => self.signer.forget_user(id),
                    Announcement::Token(hash) => self.signer.forget_token(hash),
                    Announcement::Bunkers => {
                        // Acknowledge once this instance's NIP-46 listens for the new set.
                        let generation = self.signer.bunkers_changed_elsewhere();
                        self.signer
                            .wait_bunkers_synced(generation, self.options.resync_timeout)
                            .await;
                    }
                }
                let ack = Message::Ack {
                    acker: self.id.clone(),
                    origin,
                    seq,
                };
                // On the publisher's connection, not the requests' pool: this loop applies one
                // notice at a time, so an acknowledgement waiting for a pool that slow requests
                // have run dry held back every later notice, and every other instance's
                // changes waited out the sync timeout.
                if let Err(err) = within(
                    self.options.statement_within(),
                    keycast_db::notify::notify(&self.publish_db, &ack.encode()),
                )
                .await
                {
                    tracing::warn!(error = %err, "cannot acknowledge another instance's change");
                }
            }
            Message::Changed { .. } => {}
            Message::Ack { acker, origin, seq } if origin == self.id => {
                // Any role that may connect to the database may NOTIFY on this channel: an
                // acknowledgement from an instance not known to be live is kept only while
                // there is room, so made-up ackers (each up to 8 KB) cannot grow this map
                // until the process runs out of memory. The instances that stopped go too.
                let live = self.live_instances();
                self.acks.send_modify(|acks| {
                    if !acks.contains_key(&acker) && acks.len() >= ACKERS_KEPT {
                        acks.retain(|known, _| live.contains(known));
                        if acks.len() >= ACKERS_KEPT && !live.contains(&acker) {
                            return;
                        }
                    }
                    let entry = acks.entry(acker).or_default();
                    *entry = (*entry).max(seq);
                });
            }
            Message::Ack { .. } => {}
            Message::Membership => self.membership.notify_one(),
            // Notices arrive in commit order, and this loop applies each before reading the
            // next: hearing a beat of ours means every change committed before it was sent
            // is applied here. A change committed later is answered (by whoever made it) no
            // sooner than the sync timeout after, unless this instance acknowledged it first.
            // So the caches are trusted until the sync timeout after that beat was sent, and
            // a paused or lagging instance stops trusting them before it could serve what
            // someone was already told is revoked.
            Message::Beat { origin, sent_us } if origin == self.id && !self.left.load(Ordering::SeqCst) => self
                .signer
                .trust_caches_until(self.epoch + Duration::from_micros(sent_us) + self.options.sync_timeout),
            Message::Beat { .. } => {}
        }
    }
}

/// Milliseconds the tests hold each change notice before it goes out (fail point
/// `cluster-publish`, `return(<ms>)`: a publisher behind); always `None` without fault
/// injection.
fn held_before_publish() -> Option<u64> {
    fail::fail_point!("cluster-publish", |ms: Option<String>| ms
        .and_then(|ms| ms.parse().ok()));
    None
}

/// Whether the `cluster-listen-behind` failpoint is armed (never, in a build without the
/// `failpoints` feature).
fn fail_point_armed_behind() -> bool {
    fail::fail_point!("cluster-listen-behind", |_| true);
    false
}

/// PostgreSQL's answer to "is this write safe to acknowledge?": the commit is durable on
/// the server; what remains is that every other instance has dropped what it cached.
pub struct ClusterDurability(pub Arc<Cluster>);

impl Durability for ClusterDurability {
    fn wait_durable(&self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            self.0.wait_synced().await;
            Ok(())
        })
    }

    fn check_writable(&self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async { Ok(()) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip() {
        for message in [
            Message::Changed {
                origin: "i1".into(),
                seq: 7,
                what: Announcement::Authorization(AuthorizationId::new("a1")),
            },
            Message::Changed {
                origin: "i1".into(),
                seq: 8,
                what: Announcement::User(UserId::new("u1")),
            },
            Message::Changed {
                origin: "i1".into(),
                seq: 9,
                what: Announcement::Bunkers,
            },
            Message::Changed {
                origin: "i1".into(),
                seq: 10,
                what: Announcement::Token(TokenHash::of(b"an access token")),
            },
            Message::Ack {
                acker: "i2".into(),
                origin: "i1".into(),
                seq: 9,
            },
            Message::Membership,
        ] {
            assert_eq!(Message::decode(&message.encode()), Some(message));
        }
        assert_eq!(Message::decode("inv i1 x b"), None);
        assert_eq!(Message::decode("inv i1 3 t not-a-hash"), None);
        assert_eq!(Message::decode("something else"), None);
    }

    #[test]
    fn rendezvous_moves_only_the_share_of_an_instance_that_leaves() {
        let three: Vec<String> = ["a", "b", "c"].map(String::from).to_vec();
        let two: Vec<String> = ["a", "b"].map(String::from).to_vec();
        let bunkers: Vec<String> = (0..300).map(|i| format!("{i:064x}")).collect();
        let mut share = HashMap::new();
        for bunker in &bunkers {
            let before = owner(bunker, &three).unwrap();
            *share.entry(before).or_insert(0) += 1;
            let after = owner(bunker, &two).unwrap();
            if before != "c" {
                assert_eq!(before, after, "a bunker of a live instance stays put");
            }
        }
        for instance in ["a", "b", "c"] {
            assert!(share[instance] > 60, "each instance gets a fair share: {share:?}");
        }
        assert_eq!(owner("x", &[]), None);
    }
}
