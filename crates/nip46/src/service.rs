//! The remote signer over relays: one relay pool (nostr-sdk), a kind-24133 subscription
//! on each relay naming the bunkers served there, kept in step with the authorizations, and
//! a bounded set of tasks that answer requests.
//!
//! Relays are untrusted (issue 12 item 6). The operator's relays (`BUNKER_RELAYS`, or the
//! embedded relay) carry every bunker; a relay named by an app (`nostrconnect://`) hears only
//! of the bunkers whose authorizations name it ([`crate::roster`]), at most
//! [`Nip46Options::max_app_relays`] of them are connected, their messages are read at a
//! bounded rate, and connections to them are judged at every connect
//! ([`crate::transport`]). A request from a client that is not the one bound to the bunker
//! (a stranger) is admitted by token buckets per relay and per (relay, bunker) before any
//! cryptography is done for it (past its bunker's bucket, only a `connect` that binds is
//! answered), and answered only on the relay it came on
//! ([`crate::throttle`]). Nothing on the receive path waits on a lock held for more than
//! O(1) work.
//!
//! Relays that drop are reconnected with backoff ([`crate::reconnect`]); each relay re-sends
//! its own subscription on every new connection.
//! Replies are handed to the relays without waiting for `OK`: some relays (nostr-rs-relay)
//! never send one for ephemeral kinds, and the client's answer does not depend on it.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use keycast_core::cluster::Cluster;
use keycast_core::nostr::{Event, Filter, Kind, PublicKey, RelayUrl, Timestamp};
use keycast_core::vital::Vitals;
use keycast_core::{Change, Durability, Signer};
use nostr_sdk::pool::{RelayOptions, RelayPool, RelayPoolNotification};
use nostr_sdk::{ClientMessage, RelayMessage, SubscribeOptions, SubscriptionId};
use tokio::sync::{broadcast, Semaphore};
use tokio::task::AbortHandle;

use crate::dedup::Seen;
use crate::handler::{self, Outcome};
use crate::roster::{Bindings, Roster, Row};
use crate::subscriptions;
use crate::throttle::{Admission, Rate, Strangers};
use crate::transport::RelayTransport;
use crate::wire::{self, Cipher, RpcReply};

/// Default for [`Nip46Options::app_relay_messages_per_sec`].
pub const DEFAULT_APP_RELAY_MESSAGES_PER_SEC: u32 = 100;
/// Default for [`Nip46Options::unbound_requests_per_sec`].
pub const DEFAULT_UNBOUND_REQUESTS_PER_SEC: u32 = 20;

/// Tuning for [`Nip46Service`].
#[derive(Debug, Clone)]
pub struct Nip46Options {
    /// Relays every bunker listens on: `BUNKER_RELAYS`, or the embedded relay.
    pub relays: Vec<String>,
    /// Requests answered at once; beyond it a request is answered "busy".
    pub max_in_flight: usize,
    /// How often the bunker set is re-read even without a change notice (changes made by
    /// another instance, or a missed notice).
    pub resync_interval: Duration,
    /// How long a revoked bunker still answers "revoked" instead of going silent.
    pub revoked_answer_window: Duration,
    /// Connect to relays other than [`Nip46Options::relays`] even on internal addresses
    /// (`KEYCAST_NOSTRCONNECT_INTERNAL_RELAYS`). Off: each is resolved and judged at every
    /// connection ([`crate::transport`]).
    pub allow_internal_relays: bool,
    /// Relays named by apps connected at most (`KEYCAST_NOSTRCONNECT_MAX_RELAYS`); the
    /// oldest live authorizations' first. Default
    /// [`keycast_core::nostrconnect::DEFAULT_MAX_RELAYS`].
    pub max_app_relays: usize,
    /// Messages a second read from one relay named by an app, with a burst of twice that
    /// (`KEYCAST_NOSTRCONNECT_RELAY_MESSAGES_PER_SEC`). Default
    /// [`DEFAULT_APP_RELAY_MESSAGES_PER_SEC`].
    pub app_relay_messages_per_sec: u32,
    /// Requests a second from clients not bound to the bunker they address, per relay, with
    /// a burst of twice that (`KEYCAST_NIP46_UNBOUND_REQUESTS_PER_SEC`); each (relay,
    /// bunker) pair also gets [`crate::throttle::PER_BUNKER`]. Default
    /// [`DEFAULT_UNBOUND_REQUESTS_PER_SEC`].
    pub unbound_requests_per_sec: u32,
    /// With several instances on PostgreSQL: answer only this instance's share of the
    /// bunkers, and only requests this instance claimed (each answered exactly once).
    /// `None` (SQLite, one instance): answer everything.
    pub cluster: Option<Arc<Cluster>>,
    /// Where the listener's tasks report an unexpected end (see [`keycast_core::vital`]).
    pub vitals: Vitals,
    /// Requests the previous instance saw (client, request id), handed over with the
    /// database (see [`Nip46Service::seen`]): dropped as seen, so that a relay that replays
    /// the last minute's requests to a new subscription gets no second answer.
    pub seen_before: Vec<(PublicKey, String)>,
}

impl Default for Nip46Options {
    fn default() -> Self {
        Nip46Options {
            relays: Vec::new(),
            max_in_flight: 256,
            resync_interval: Duration::from_secs(30),
            revoked_answer_window: Duration::from_secs(7 * 24 * 3600),
            allow_internal_relays: false,
            max_app_relays: keycast_core::nostrconnect::DEFAULT_MAX_RELAYS,
            app_relay_messages_per_sec: DEFAULT_APP_RELAY_MESSAGES_PER_SEC,
            unbound_requests_per_sec: DEFAULT_UNBOUND_REQUESTS_PER_SEC,
            cluster: None,
            vitals: Vitals::default(),
            seen_before: Vec::new(),
        }
    }
}

/// Busy replies sent at once when every in-flight slot is taken; beyond both, requests
/// are dropped and counted (`keycast_nip46_dropped_total`).
const MAX_BUSY_REPLIES: usize = 64;

/// The longest one request is worked on before it is given up, its in-flight place freed:
/// past every wait a request may legitimately have (the durable wait, the other instances'
/// acknowledgements), so only one stuck on a database connection the network dropped
/// without a word is cut off. Without it such requests held their places for good, and
/// once they filled them every request was answered "busy".
const HANDLE_WITHIN: Duration = Duration::from_secs(60);
/// Requests dated further than this from now, either way, are not answered (issue 12 item
/// 8): a relay replaying stored events after a restart or reconnect, or a captured request
/// sent again later, must not make keycast sign what the client gave up on long ago. A
/// minute either way still serves a phone whose clock is a little off.
const REQUEST_WINDOW_SECS: u64 = 60;
/// How long a (client, request id) pair is remembered to drop duplicates: at least as long
/// as a request can be accepted at all (`2 × REQUEST_WINDOW_SECS`, from a minute before its
/// date to a minute after), so no replay inside the window gets through.
pub const DEDUP_WINDOW: Duration = Duration::from_secs(2 * REQUEST_WINDOW_SECS);
/// How long after a relay closed the subscription it is sent again.
const SUBSCRIBE_AGAIN_AFTER: Duration = Duration::from_secs(2);
/// How often an instance among several checks whether it can answer (its share of the
/// bunkers follows within this and a heartbeat).
const ANSWERING_CHECK: Duration = Duration::from_millis(500);

/// The running NIP-46 signer. Dropping it does not stop it; call [`Nip46Service::shutdown`].
pub struct Nip46Service {
    shared: Arc<Shared>,
    tasks: Vec<AbortHandle>,
}

struct Shared {
    signer: Arc<Signer>,
    durability: Option<Arc<dyn Durability>>,
    pool: RelayPool,
    options: Nip46Options,
    /// The operator's relays, in configured order (replies go to all of them).
    configured: Vec<RelayUrl>,
    operator: HashSet<RelayUrl>,
    /// Bunkers served, where, and their bound clients; swapped whole by [`Shared::sync`].
    roster: RwLock<Arc<Roster>>,
    bindings: Bindings,
    strangers: Strangers,
    in_flight: Arc<Semaphore>,
    busy: Arc<Semaphore>,
    seen: Arc<Mutex<Seen>>,
    /// The bunkers each of a relay's subscriptions names (by index, see
    /// [`crate::subscriptions`]), as last sent successfully; an empty one is not on the relay.
    subscribed: tokio::sync::Mutex<HashMap<RelayUrl, Vec<Vec<PublicKey>>>>,
    /// App relays left out by the cap at the last sync (logged when it changes).
    left_out: AtomicUsize,
    /// Whether the bunkers have been read once (before, no request can be addressed).
    synced_once: AtomicBool,
}

/// One request as it came in, before anything is decrypted.
struct Incoming {
    relay: RelayUrl,
    bunker: PublicKey,
    event: Event,
    /// From the client bound to the bunker (not a stranger).
    bound: bool,
    /// A stranger admitted only to bind with a `connect` ([`Admission::ConnectOnly`]):
    /// anything else it sends is dropped unanswered.
    connect_only: bool,
}

/// Why the service could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("relay {url:?} is not a ws:// or wss:// URL")]
    BadRelay { url: String },
    #[error("NIP-46 needs at least one relay (BUNKER_RELAYS or the embedded relay)")]
    NoRelays,
    #[error("relay pool: {0}")]
    Pool(String),
}

impl Nip46Service {
    /// Connects to the relays, subscribes for every bunker keycast serves, and answers
    /// requests until [`Nip46Service::shutdown`]. Does not wait for relays to connect.
    ///
    /// # Errors
    /// [`StartError`] for an unusable relay list.
    pub async fn start(
        signer: Arc<Signer>,
        durability: Option<Arc<dyn Durability>>,
        mut options: Nip46Options,
    ) -> Result<Nip46Service, StartError> {
        let configured = options
            .relays
            .iter()
            .map(|url| RelayUrl::parse(url).map_err(|_| StartError::BadRelay { url: url.clone() }))
            .collect::<Result<Vec<_>, _>>()?;
        if configured.is_empty() {
            return Err(StartError::NoRelays);
        }
        let transport = RelayTransport::new(configured.iter().cloned(), options.allow_internal_relays)
            .throttle_app_relays(Rate::per_sec(options.app_relay_messages_per_sec));
        let pool = RelayPool::builder().websocket_transport(transport).build();
        for url in &configured {
            pool.add_relay(url.clone(), relay_options())
                .await
                .map_err(|e| StartError::Pool(e.to_string()))?;
        }
        let mut seen = Seen::new(DEDUP_WINDOW);
        seen.remember(std::mem::take(&mut options.seen_before));
        // Take the receivers before anything can happen, so nothing is missed.
        let notifications = pool.notifications();
        let changes = signer.subscribe();
        pool.connect().await;
        let shared = Arc::new(Shared {
            signer,
            durability,
            pool,
            in_flight: Arc::new(Semaphore::new(options.max_in_flight)),
            busy: Arc::new(Semaphore::new(MAX_BUSY_REPLIES)),
            strangers: Strangers::new(Rate::per_sec(options.unbound_requests_per_sec)),
            options,
            operator: configured.iter().cloned().collect(),
            configured,
            roster: RwLock::default(),
            bindings: Bindings::default(),
            seen: Arc::new(Mutex::new(seen)),
            subscribed: tokio::sync::Mutex::default(),
            left_out: AtomicUsize::new(0),
            synced_once: AtomicBool::new(false),
        });
        if let Err(err) = shared.sync().await {
            tracing::warn!(error = %err, "nip46: could not read the bunkers yet; will retry");
        }
        let vitals = &shared.options.vitals;
        let mut tasks = vec![
            vitals.spawn("the NIP-46 listener", shared.clone().receive(notifications)),
            vitals.spawn("the NIP-46 bunker follower", shared.clone().follow(changes)),
            vitals.spawn(
                "the NIP-46 relay reconnector",
                crate::reconnect::supervise(shared.pool.clone()),
            ),
        ];
        if let Some(cluster) = shared.options.cluster.clone() {
            tasks.push(vitals.spawn("the NIP-46 share reporter", shared.clone().report_answering(cluster)));
        }
        tracing::info!(relays = ?shared.options.relays, "nip46 signer listening");
        Ok(Nip46Service { shared, tasks })
    }

    /// The requests this instance has seen lately, to hand to the next instance with the
    /// database (SQLite hand-over; on PostgreSQL every instance shares the claims instead).
    pub fn seen(&self) -> SeenRequests {
        SeenRequests(self.shared.seen.clone())
    }

    /// Stops taking requests; those already under way go on, and can still reply until
    /// [`Nip46Service::shutdown`] (wait for them with `Signer::drain`).
    pub fn stop_listening(&self) {
        for task in &self.tasks {
            task.abort();
        }
        if let Some(cluster) = &self.shared.options.cluster {
            cluster.set_answers_nip46(false);
        }
    }

    /// Stops answering and closes the relay connections.
    pub async fn shutdown(self) {
        self.stop_listening();
        self.shared.pool.shutdown().await;
    }
}

/// See [`Nip46Service::seen`].
#[derive(Clone)]
pub struct SeenRequests(Arc<Mutex<Seen>>);

impl SeenRequests {
    /// (client, request id) of every request seen within the dedup window (at least).
    pub fn entries(&self) -> Vec<(PublicKey, String)> {
        self.0.lock().map(|seen| seen.entries()).unwrap_or_default()
    }
}

fn relay_options() -> RelayOptions {
    // A drop leaves the relay `Terminated`; `reconnect::supervise` brings it back with its
    // own backoff (see there for why not nostr-sdk's). An event that matches none of the
    // relay's own filters (a bunker not served there, another kind) is dropped by nostr-sdk
    // before its signature is checked.
    RelayOptions::new().reconnect(false).verify_subscriptions(true)
}

impl Shared {
    /// The current roster (an `Arc` clone: readers never wait for a rebuild).
    fn roster(&self) -> Arc<Roster> {
        self.roster.read().map(|r| r.clone()).unwrap_or_default()
    }

    /// Hands each incoming request to a task; never does signing work itself.
    async fn receive(self: Arc<Self>, mut notifications: broadcast::Receiver<RelayPoolNotification>) {
        loop {
            fail::fail_point!("nip46-listener", |_| ());
            match notifications.recv().await {
                Ok(RelayPoolNotification::Event { relay_url, event, .. }) => self.clone().dispatch(relay_url, *event),
                Ok(RelayPoolNotification::Shutdown) => return,
                Ok(RelayPoolNotification::Message {
                    relay_url,
                    message:
                        RelayMessage::Closed {
                            subscription_id,
                            message,
                        },
                }) if subscriptions::index(&subscription_id).is_some() => {
                    let me = self.clone();
                    let (id, reason) = (subscription_id.into_owned(), message.into_owned());
                    tokio::spawn(async move { me.subscribe_again(relay_url, id, reason).await });
                }
                Ok(RelayPoolNotification::Message {
                    relay_url,
                    message: RelayMessage::Notice(notice),
                }) if self.operator.contains(&relay_url) => {
                    // Where an operator relay says it refused something ("message too large",
                    // "Subscription error: …"): nostr-sdk reports it nowhere else. An app's relay
                    // is not heard, so it cannot fill the log.
                    metrics::counter!("keycast_nip46_operator_relay_notices_total").increment(1);
                    tracing::warn!(relay = %relay_url, notice = ?notice.chars().take(200).collect::<String>(), "nip46: an operator relay sent a notice");
                }
                Ok(RelayPoolNotification::Message { .. }) => {}
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    metrics::counter!("keycast_nip46_dropped_total").increment(missed);
                    tracing::warn!(missed, "nip46: fell behind the relays; requests were dropped");
                }
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    }

    /// O(1) checks, then a task: the kind, the time window, the addressee, and for a
    /// stranger the token buckets — before any decryption.
    fn dispatch(self: Arc<Self>, relay: RelayUrl, event: Event) {
        if event.kind != Kind::NostrConnect {
            return;
        }
        // nostr-sdk verifies a signature once per id and trusts a cache of verified ids after
        // that: an event whose other fields a relay changed under a genuine id reaches us
        // unverified unless its id is the hash of its fields (then they are what was signed).
        if !event.verify_id() {
            metrics::counter!("keycast_nip46_forged_total").increment(1);
            tracing::debug!(id = %event.id, relay = %relay, "nip46: ignoring an event whose id does not match its content");
            return;
        }
        if !within_window(event.created_at, Timestamp::now()) {
            metrics::counter!("keycast_nip46_out_of_window_total").increment(1);
            tracing::debug!(id = %event.id, "nip46: ignoring a request dated outside the window");
            return;
        }
        let roster = self.roster();
        let Some((bunker, entry)) = roster.addressee(&event, &relay, self.operator.contains(&relay)) else {
            return;
        };
        if let Some(cluster) = &self.options.cluster {
            if !cluster.owns(&bunker.to_hex()) {
                return; // another live instance answers this bunker
            }
        }
        let client = entry.client(self.bindings.get(&bunker));
        let bound = client == Some(event.pubkey);
        drop(roster);
        let admission = match bound {
            true => Admission::Full,
            false => self.strangers.admit(&relay, &bunker, Instant::now()),
        };
        if admission == Admission::Refused {
            metrics::counter!("keycast_nip46_unbound_dropped_total").increment(1);
            return;
        }
        let incoming = Incoming {
            relay,
            bunker,
            event,
            bound,
            connect_only: admission == Admission::ConnectOnly,
        };
        if let Ok(permit) = self.in_flight.clone().try_acquire_owned() {
            // Counted before the task starts, so a hand-over or shutdown that waits for the
            // requests under way cannot miss one spawned but not yet running.
            let request = self.signer.request();
            tokio::spawn(async move {
                if tokio::time::timeout(HANDLE_WITHIN, self.handle(incoming))
                    .await
                    .is_err()
                {
                    tracing::warn!(
                        within_secs = HANDLE_WITHIN.as_secs(),
                        "nip46: a request did not finish in time (a database connection that stopped answering?); given up"
                    );
                }
                drop((permit, request));
            });
        } else if let Ok(permit) = self.busy.clone().try_acquire_owned() {
            tokio::spawn(async move {
                self.answer_busy(incoming).await;
                drop(permit);
            });
        } else {
            metrics::counter!("keycast_nip46_dropped_total").increment(1);
            tracing::warn!("nip46: overloaded; a request was dropped");
        }
    }

    /// Whether this instance answers at all: on SQLite only the one that writes the replica
    /// does (see [`Durability::is_writer`]); a deploy's old instance, once it has handed
    /// over, knows nothing of what changed since.
    async fn answers(&self) -> bool {
        let Some(durability) = &self.durability else {
            return true;
        };
        let writer = durability.is_writer().await;
        if !writer {
            metrics::counter!("keycast_nip46_not_writer_total").increment(1);
        }
        writer
    }

    /// Answers one request; the caller counts it as under way (`Signer::request`) from
    /// before the writer check here until it returns.
    async fn handle(&self, incoming: Incoming) {
        if !self.answers().await {
            return;
        }
        let started = Instant::now();
        let (bunker, client) = (incoming.bunker, incoming.event.pubkey);
        // Opened first (a cached key unwrap and a decryption), then claimed by what it asks:
        // the client and its request id, not the event. A client that sends a request again
        // in a new event (re-encrypted) while its bunker changes hands (an instance paused,
        // then back) was answered by both instances, and signed twice, when claims were per
        // event; per request, only the first claimant answers, as one instance's dedup does.
        let opened = self.open(&bunker, &incoming.event).await;
        let Some((keys, request, cipher)) = opened else {
            return;
        };
        if incoming.connect_only && request.method != "connect" {
            // Nothing but a `connect` goes further: no claim row, no dedup entry, for the rest.
            metrics::counter!("keycast_nip46_unbound_dropped_total").increment(1);
            return;
        }
        if !self.claim(&format!("r:{}:{}", client.to_hex(), request.id)).await {
            return;
        }
        if !self.first_time(&client, &request.id) {
            tracing::debug!(id = ?request.id, "nip46: duplicate request ignored");
            return;
        }
        let (reply, outcome) = handler::answer(
            &self.signer,
            self.durability.as_ref(),
            &bunker,
            &client,
            &request,
            cipher,
        )
        .await;
        let method = method_label(&request.method);
        if incoming.connect_only && outcome != Outcome::Ok {
            // A stranger past its bunker's bucket learns nothing, not even that it was heard.
            metrics::counter!("keycast_nip46_unbound_dropped_total").increment(1);
            return;
        }
        metrics::counter!("keycast_nip46_requests_total", "method" => method, "outcome" => outcome.label())
            .increment(1);
        metrics::histogram!("keycast_nip46_request_seconds", "method" => method).record(started.elapsed());
        // An `auth_url` reply carries the approval's secret id: not logged. Anyone who sees a
        // bunker's key on a public relay can send it requests that are refused as unauthorized
        // or malformed, twenty a second a relay: counted (above), logged at debug only, so
        // they cannot fill the log; a bound app's denial or a failure is the operator's business.
        let reason = reply.error.as_deref().unwrap_or("");
        match outcome {
            Outcome::Ok | Outcome::AuthUrl => {}
            Outcome::Unauthorized | Outcome::BadRequest => {
                tracing::debug!(method, outcome = outcome.label(), reason, "nip46 request refused");
            }
            Outcome::PolicyDenied | Outcome::Internal => {
                tracing::info!(method, outcome = outcome.label(), reason, "nip46 request refused");
            }
        }
        // Known before the reply leaves, so the client's next request is not a stranger's.
        let bound_now = match (method, outcome) {
            ("connect", Outcome::Ok) => {
                self.bindings.set(bunker, Some(client));
                true
            }
            ("logout", Outcome::Ok) => {
                self.bindings.set(bunker, None);
                incoming.bound
            }
            _ => incoming.bound,
        };
        self.reply(&keys, &incoming, bound_now, cipher, &reply).await;
        if outcome == Outcome::AuthUrl {
            // The client waits for a second reply: if the owner never decides, it gets an
            // error when the approval expires (from this instance; see ARCHITECTURE.md).
            let (signer, url, ttl) = (
                self.signer.clone(),
                reply.error.clone().unwrap_or_default(),
                self.signer.approval_ttl(),
            );
            tokio::spawn(async move {
                tokio::time::sleep(ttl + Duration::from_secs(1)).await;
                signer.close_if_undecided(&url).await;
            });
        }
    }

    async fn answer_busy(&self, incoming: Incoming) {
        // Claimed by event: a busy answer must leave the request itself unclaimed, so that
        // the client may send it again.
        if incoming.connect_only || !self.answers().await || !self.claim(&incoming.event.id.to_hex()).await {
            return;
        }
        if let Some((keys, request, cipher)) = self.open(&incoming.bunker, &incoming.event).await {
            metrics::counter!("keycast_nip46_requests_total", "method" => method_label(&request.method), "outcome" => "busy")
                .increment(1);
            let reply = RpcReply::error(&request.id, "busy: keycast is at capacity; retry in a moment");
            self.reply(&keys, &incoming, incoming.bound, cipher, &reply).await;
        }
    }

    /// The bunker's keys and the decrypted request, or `None` when it cannot be answered
    /// (not for a bunker we hold, or not decryptable — there is no id to reply to).
    async fn open(
        &self,
        bunker: &PublicKey,
        event: &Event,
    ) -> Option<(Arc<keycast_core::nostr::Keys>, wire::RpcRequest, Cipher)> {
        let keys = match self.signer.bunker_secret(bunker).await {
            Ok(keys) => keys,
            Err(err) => {
                tracing::debug!(error = %err, "nip46: request for a bunker without keys");
                return None;
            }
        };
        match wire::open(&keys, event) {
            Ok((request, cipher)) => Some((keys, request, cipher)),
            Err(err) => {
                metrics::counter!("keycast_nip46_undecryptable_total").increment(1);
                tracing::debug!(error = %err, "nip46: cannot open a request");
                None
            }
        }
    }

    /// With several instances: whether this one claimed `key` (a request, or an event it
    /// answers busy); the instance that owns a bunker claims its requests, and a claim is
    /// unique even while instances disagree for a moment about who is alive.
    async fn claim(&self, key: &str) -> bool {
        match &self.options.cluster {
            Some(cluster) => cluster.claim(key).await,
            None => true,
        }
    }

    fn first_time(&self, client: &PublicKey, id: &str) -> bool {
        let Ok(mut seen) = self.seen.lock() else {
            return true;
        };
        let (first, expired) = seen.insert(*client, id.to_owned(), Instant::now());
        drop(seen);
        // Freed after the lock is released: the lock is only ever held for O(1) work.
        drop(expired);
        first
    }

    /// Seals and sends `reply`. To the bound client: on the relay it came on, every
    /// operator relay and the bunker's app relays (it listens on at least one). To a
    /// stranger: only on the relay it came on, so a flood arriving on one relay is not
    /// echoed to the others.
    async fn reply(
        &self,
        keys: &keycast_core::nostr::Keys,
        to: &Incoming,
        bound: bool,
        cipher: Cipher,
        reply: &RpcReply,
    ) {
        let event = match wire::seal(keys, &to.event.pubkey, cipher, reply) {
            Ok(event) => event,
            Err(err) => {
                tracing::error!(error = %err, "nip46: cannot seal a reply");
                return;
            }
        };
        let mut targets: HashSet<RelayUrl> = HashSet::from([to.relay.clone()]);
        if bound {
            targets.extend(self.configured.iter().cloned());
            if let Some(entry) = self.roster().entry(&to.bunker) {
                targets.extend(entry.relays.iter().cloned());
            }
        }
        let sent = self.pool.send_msg_to(targets, ClientMessage::event(event)).await;
        match sent {
            Ok(output) if output.success.is_empty() => {
                tracing::warn!(failed = ?output.failed, "nip46: no relay took the reply");
            }
            Ok(_) => {}
            Err(err) => tracing::warn!(error = %err, "nip46: cannot send the reply"),
        }
    }

    /// Follows authorization changes (and re-reads periodically).
    async fn follow(self: Arc<Self>, mut changes: broadcast::Receiver<Change>) {
        let mut tick = tokio::time::interval(self.options.resync_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await; // the first tick is immediate; start() just synced
        loop {
            let change = tokio::select! {
                change = changes.recv() => change,
                _ = tick.tick() => Ok(Change::Authorizations),
            };
            match change {
                Ok(Change::NostrConnect {
                    bunker,
                    client,
                    relays,
                    secret,
                    ..
                }) => {
                    if let Err(err) = self.sync().await {
                        tracing::warn!(error = %err, "nip46: cannot read the bunkers");
                    }
                    let me = self.clone();
                    tokio::spawn(async move { me.acknowledge(bunker, client, relays, secret).await });
                }
                Ok(Change::Nip46Reply {
                    bunker,
                    client,
                    request_id,
                    nip04,
                    result,
                }) => {
                    let me = self.clone();
                    tokio::spawn(async move { me.send_decided(bunker, client, request_id, nip04, result).await });
                }
                Ok(Change::Authorizations) | Err(broadcast::error::RecvError::Lagged(_)) => {
                    if let Err(err) = self.sync().await {
                        tracing::warn!(error = %err, "nip46: cannot read the bunkers; will retry");
                    }
                }
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    }

    /// Re-reads the bunkers to serve, connects to the app relays they name (up to the
    /// cap) and drops those no longer named, and renews each relay's subscription whose
    /// bunkers changed.
    async fn sync(&self) -> Result<(), String> {
        // Reported once the subscription covers what was read (other instances wait for it).
        let generation = self.signer.bunker_generation();
        self.bindings.rotate();
        let window = i64::try_from(self.options.revoked_answer_window.as_secs()).unwrap_or(i64::MAX);
        let since = keycast_db::now_unix().saturating_sub(window);
        let rows = self.signer.bunkers_to_serve(since).await.map_err(|e| e.to_string())?;
        let rows: Vec<Row> = rows.iter().filter_map(row).collect();
        let roster = Arc::new(Roster::build(rows, &self.operator, self.options.max_app_relays));
        let left_out = roster.left_out();
        if self.left_out.swap(left_out, Ordering::Relaxed) != left_out && left_out > 0 {
            tracing::warn!(
                left_out,
                cap = self.options.max_app_relays,
                "nip46: not connecting to {left_out} relays named by apps: over the cap (KEYCAST_NOSTRCONNECT_MAX_RELAYS)"
            );
        }
        let previous = match self.roster.write() {
            Ok(mut current) => Some(std::mem::replace(&mut *current, roster.clone())),
            Err(_) => None,
        };
        // Freed outside the lock.
        drop(previous);
        let wanted: HashSet<RelayUrl> = self.configured.iter().chain(roster.app_relays()).cloned().collect();
        let present: HashSet<RelayUrl> = self.pool.relays().await.into_keys().collect();
        for url in wanted.difference(&present) {
            if let Err(err) = self.pool.add_relay(url.clone(), relay_options()).await {
                tracing::warn!(relay = %url, error = %err, "nip46: cannot add relay");
                continue;
            }
            let _ = self.pool.connect_relay(url.clone()).await;
        }
        for url in present.difference(&wanted) {
            let _ = self.pool.remove_relay(url.clone()).await;
        }
        self.subscribe(&roster, &wanted).await;
        metrics::gauge!("keycast_nip46_bunkers").set(roster.len() as f64);
        metrics::gauge!("keycast_nip46_app_relays").set((wanted.len() - self.configured.len()) as f64);
        self.signer.bunkers_synced(generation);
        self.synced_once.store(true, Ordering::SeqCst);
        Ok(())
    }

    /// Whether this instance can answer requests now: its bunkers read, and an operator
    /// relay (which carries every bunker) connected.
    async fn can_answer(&self) -> bool {
        if !self.synced_once.load(Ordering::SeqCst) {
            return false;
        }
        for url in &self.configured {
            if self.pool.relay(url).await.is_ok_and(|relay| relay.is_connected()) {
                return true;
            }
        }
        false
    }

    /// With several instances: keeps the cluster told whether this one can answer, so the
    /// bunkers are shared out among those that can (one still connecting, or cut off from
    /// every operator relay, owns none).
    async fn report_answering(self: Arc<Self>, cluster: Arc<Cluster>) {
        loop {
            cluster.set_answers_nip46(self.can_answer().await);
            tokio::time::sleep(ANSWERING_CHECK).await;
        }
    }

    /// Brings each relay in `wanted` to subscriptions naming the bunkers served there,
    /// spread as [`crate::subscriptions`] says; only a subscription that changed is sent. A
    /// relay that cannot take one now (not connected) is tried again at the next sync;
    /// meanwhile it keeps its last one, which names no bunker it was not told of before.
    async fn subscribe(&self, roster: &Roster, wanted: &HashSet<RelayUrl>) {
        let mut subscribed = self.subscribed.lock().await;
        subscribed.retain(|url, _| wanted.contains(url));
        for url in wanted {
            let sent = subscribed.entry(url.clone()).or_default();
            let planned = subscriptions::plan(sent, roster.bunkers_on(url, self.operator.contains(url)));
            if planned == *sent {
                continue;
            }
            if planned.len() > subscriptions::COMMONLY_ACCEPTED && sent.len() <= subscriptions::COMMONLY_ACCEPTED {
                tracing::warn!(
                    relay = %url,
                    subscriptions = planned.len(),
                    "nip46: this relay now needs more subscriptions than relays commonly accept on one connection ({}, strfry's default); bunkers past them may go unanswered there",
                    subscriptions::COMMONLY_ACCEPTED
                );
            }
            let Ok(relay) = self.pool.relay(url).await else {
                continue;
            };
            sent.resize(sent.len().max(planned.len()), Vec::new());
            for (index, was) in sent.iter_mut().enumerate() {
                let bunkers = planned.get(index).map_or(&[][..], Vec::as_slice);
                if was.as_slice() == bunkers {
                    continue;
                }
                if bunkers.is_empty() {
                    // An empty `#p` would match nothing on some relays and everything on others.
                    let _ = relay.unsubscribe(&subscriptions::id(index)).await;
                    was.clear();
                    continue;
                }
                match relay
                    .subscribe_with_id(subscriptions::id(index), filter(bunkers), SubscribeOptions::default())
                    .await
                {
                    Ok(()) => *was = bunkers.to_vec(),
                    Err(err) => tracing::debug!(relay = %url, error = %err, "nip46: cannot subscribe yet; will retry"),
                }
            }
            while sent.last().is_some_and(Vec::is_empty) {
                sent.pop();
            }
        }
    }

    /// A relay ended the subscription (`CLOSED`: restarting, a limit, an error). nostr-sdk
    /// does not send it again, and `sync` would not until the bunkers on that relay change:
    /// every bunker there went deaf, with no error, until then. Sent again after a pause
    /// (a relay that keeps closing it is asked once per pause).
    async fn subscribe_again(self: Arc<Self>, relay: RelayUrl, id: SubscriptionId, reason: String) {
        metrics::counter!("keycast_nip46_subscriptions_closed_total").increment(1);
        let reason: String = reason.chars().take(200).collect();
        if self.operator.contains(&relay) {
            tracing::warn!(relay = %relay, subscription = %id, reason, "nip46: a relay closed a subscription; subscribing again shortly");
        } else {
            // An app's relay: not allowed to fill the log.
            tracing::debug!(relay = %relay, subscription = %id, reason, "nip46: a relay closed a subscription; subscribing again shortly");
        }
        tokio::time::sleep(SUBSCRIBE_AGAIN_AFTER).await;
        // Held throughout, as `subscribe` holds it: never an older list over a newer one.
        let mut subscribed = self.subscribed.lock().await;
        let Some(index) = subscriptions::index(&id) else {
            return;
        };
        let Some(sent) = subscribed
            .get_mut(&relay)
            .and_then(|sent| sent.get_mut(index))
            .filter(|b| !b.is_empty())
        else {
            return;
        };
        let Ok(handle) = self.pool.relay(&relay).await else {
            return;
        };
        if let Err(err) = handle
            .subscribe_with_id(subscriptions::id(index), filter(sent), SubscribeOptions::default())
            .await
        {
            // Forgotten, so the next sync sends it.
            sent.clear();
            tracing::debug!(relay = %relay, error = %err, "nip46: cannot subscribe again yet");
        }
    }

    /// The reply to a NIP-46 request whose approval the owner just decided (on this
    /// instance): from the bunker to `client`, with the request's id, on every operator
    /// relay and the bunker's app relays — the instance that received the request may be
    /// another one, so the relay it came on is not known here.
    async fn send_decided(
        &self,
        bunker: PublicKey,
        client: PublicKey,
        request_id: String,
        nip04: bool,
        result: Result<String, String>,
    ) {
        let keys = match self.signer.bunker_secret(&bunker).await {
            Ok(keys) => keys,
            Err(err) => {
                tracing::warn!(error = %err, "nip46: cannot answer an approved request");
                return;
            }
        };
        let reply = match result {
            Ok(result) => RpcReply::ok(&request_id, result),
            Err(error) => RpcReply::error(&request_id, error),
        };
        let cipher = if nip04 { Cipher::Nip04 } else { Cipher::Nip44 };
        let event = match wire::seal(&keys, &client, cipher, &reply) {
            Ok(event) => event,
            Err(err) => {
                tracing::error!(error = %err, "nip46: cannot seal the reply to an approved request");
                return;
            }
        };
        let mut targets: HashSet<RelayUrl> = self.configured.iter().cloned().collect();
        if let Some(entry) = self.roster().entry(&bunker) {
            targets.extend(entry.relays.iter().cloned());
        }
        match self.pool.send_msg_to(targets, ClientMessage::event(event)).await {
            Ok(output) if !output.success.is_empty() => {
                metrics::counter!("keycast_nip46_approval_replies_total").increment(1);
            }
            Ok(output) => {
                tracing::warn!(failed = ?output.failed, "nip46: no relay took the reply to an approved request")
            }
            Err(err) => tracing::warn!(error = %err, "nip46: cannot send the reply to an approved request"),
        }
    }

    /// `nostrconnect://`: tells the client which bunker accepted it by sending a
    /// `connect` response carrying its secret, from the bunker, on the client's relays
    /// (those connected: the operator's, and app relays admitted under the cap).
    async fn acknowledge(
        &self,
        bunker: PublicKey,
        client: PublicKey,
        relays: Vec<String>,
        secret: keycast_core::Secret<String>,
    ) {
        let keys = match self.signer.bunker_secret(&bunker).await {
            Ok(keys) => keys,
            Err(err) => {
                tracing::warn!(error = %err, "nip46: cannot answer a nostrconnect client");
                return;
            }
        };
        let reply = RpcReply::ok(&random_id(), secret.expose().clone());
        let event = match wire::seal(&keys, &client, Cipher::Nip44, &reply) {
            Ok(event) => event,
            Err(err) => {
                tracing::error!(error = %err, "nip46: cannot seal the nostrconnect answer");
                return;
            }
        };
        let roster = self.roster();
        let admitted = roster.entry(&bunker).map(|e| e.relays.as_slice()).unwrap_or_default();
        let relays: Vec<RelayUrl> = relays
            .iter()
            .filter_map(|r| RelayUrl::parse(r).ok())
            .filter(|r| self.operator.contains(r) || admitted.contains(r))
            .collect();
        if relays.is_empty() {
            tracing::warn!(
                "nip46: none of the nostrconnect client's relays is connected (KEYCAST_NOSTRCONNECT_MAX_RELAYS)"
            );
            return;
        }
        // The relays were just added; give them a moment to connect.
        for relay in &relays {
            if let Ok(r) = self.pool.relay(relay.clone()).await {
                r.try_connect(Duration::from_secs(5)).await.ok();
            }
        }
        match self.pool.send_msg_to(relays, ClientMessage::event(event)).await {
            Ok(output) if !output.success.is_empty() => tracing::info!("nip46: answered a nostrconnect client"),
            Ok(output) => tracing::warn!(failed = ?output.failed, "nip46: no relay took the nostrconnect answer"),
            Err(err) => tracing::warn!(error = %err, "nip46: cannot send the nostrconnect answer"),
        }
    }
}

/// A stored authorization as the roster needs it; `None` (logged) for a bad bunker key.
fn row(stored: &keycast_db::authz::LiveBunker) -> Option<Row> {
    let Ok(bunker) = PublicKey::from_hex(&stored.bunker_pubkey) else {
        tracing::warn!(bunker = stored.bunker_pubkey, "nip46: skipping a bunker with a bad key");
        return None;
    };
    let relays: Vec<String> = serde_json::from_str(&stored.relays).unwrap_or_default();
    Some(Row {
        bunker,
        relays: relays.iter().filter_map(|r| RelayUrl::parse(r).ok()).collect(),
        client: stored
            .connected_client_pubkey
            .as_deref()
            .and_then(|pk| PublicKey::from_hex(pk).ok()),
        live: stored.revoked_at.is_none(),
    })
}

/// A subscription's filter for `bunkers`. `since` keeps relays that store ephemeral events
/// from replaying old requests.
fn filter(bunkers: &[PublicKey]) -> Filter {
    let since = Timestamp::from(Timestamp::now().as_secs().saturating_sub(REQUEST_WINDOW_SECS));
    Filter::new()
        .kind(Kind::NostrConnect)
        .pubkeys(bunkers.iter().copied())
        .since(since)
}

fn random_id() -> String {
    keycast_core::secret::random_token().expose()[..16].to_owned()
}

/// Bounded metric label: known methods by name, anything else as "unknown".
fn method_label(method: &str) -> &'static str {
    const OWN: &[&str] = &["connect", "ping", "switch_relays", "logout"];
    OWN.iter()
        .chain(keycast_core::request::METHODS)
        .find(|m| **m == method)
        .copied()
        .unwrap_or("unknown")
}

/// Whether a request dated `created_at` may be answered at `now`.
fn within_window(created_at: Timestamp, now: Timestamp) -> bool {
    created_at.as_secs().abs_diff(now.as_secs()) <= REQUEST_WINDOW_SECS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_answered_only_within_a_minute_of_their_date_either_way() {
        let now = Timestamp::from(1_800_000_000);
        for (offset, ok) in [
            (0i64, true),
            (-60, true),
            (60, true),
            (-61, false),
            (61, false),
            (300, false),
        ] {
            let at = Timestamp::from(now.as_secs().saturating_add_signed(offset));
            assert_eq!(within_window(at, now), ok, "offset {offset}");
        }
    }

    #[test]
    fn unknown_methods_share_one_metric_label() {
        assert_eq!(method_label("sign_event"), "sign_event");
        assert_eq!(method_label("frobnicate"), "unknown");
    }
}
