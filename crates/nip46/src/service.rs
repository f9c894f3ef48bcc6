//! The remote signer over relays: one relay pool (nostr-sdk), one subscription for kind
//! 24133 addressed (`#p`) to every bunker keycast serves, kept in step with the
//! authorizations, and a bounded set of tasks that answer requests.
//!
//! Relays that drop are reconnected with backoff ([`crate::reconnect`]); the pool re-sends
//! the subscription on every new connection.
//! Replies are handed to the relays without waiting for `OK`: some relays (nostr-rs-relay)
//! never send one for ephemeral kinds, and the client's answer does not depend on it.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use keycast_core::nostr::{Event, Filter, Kind, PublicKey, RelayUrl, Timestamp};
use keycast_core::{Change, Durability, Signer};
use nostr_sdk::pool::{RelayOptions, RelayPool, RelayPoolNotification};
use nostr_sdk::{ClientMessage, SubscribeOptions, SubscriptionId};
use tokio::sync::{broadcast, Semaphore};
use tokio::task::JoinHandle;

use crate::handler::{self, Outcome};
use crate::wire::{self, Cipher, RpcReply};

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
}

impl Default for Nip46Options {
    fn default() -> Self {
        Nip46Options {
            relays: Vec::new(),
            max_in_flight: 256,
            resync_interval: Duration::from_secs(30),
            revoked_answer_window: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

/// Busy replies sent at once when every in-flight slot is taken; beyond both, requests
/// are dropped and counted (`keycast_nip46_dropped_total`).
const MAX_BUSY_REPLIES: usize = 64;
/// Requests dated further than this from now, either way, are not answered (issue 12 item
/// 8): a relay replaying stored events after a restart or reconnect, or a captured request
/// sent again later, must not make keycast sign what the client gave up on long ago. A
/// minute either way still serves a phone whose clock is a little off.
const REQUEST_WINDOW_SECS: u64 = 60;
/// `#p` values per filter; relays limit filter sizes.
const PUBKEYS_PER_FILTER: usize = 500;
/// How long a (client, request id) pair is remembered to drop duplicates: at least as long
/// as a request can be accepted at all (`2 × REQUEST_WINDOW_SECS`, from a minute before its
/// date to a minute after), so no replay inside the window gets through.
const DEDUP_WINDOW: Duration = Duration::from_secs(2 * REQUEST_WINDOW_SECS);
const SUBSCRIPTION: &str = "keycast-nip46";

/// The running NIP-46 signer. Dropping it does not stop it; call [`Nip46Service::shutdown`].
pub struct Nip46Service {
    shared: Arc<Shared>,
    tasks: Vec<JoinHandle<()>>,
}

struct Shared {
    signer: Arc<Signer>,
    durability: Option<Arc<dyn Durability>>,
    pool: RelayPool,
    options: Nip46Options,
    configured: Vec<RelayUrl>,
    /// Bunkers served and the relays each names (besides the configured ones).
    bunkers: RwLock<HashMap<PublicKey, Vec<RelayUrl>>>,
    in_flight: Arc<Semaphore>,
    busy: Arc<Semaphore>,
    seen: Mutex<Seen>,
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
        options: Nip46Options,
    ) -> Result<Nip46Service, StartError> {
        let configured = options
            .relays
            .iter()
            .map(|url| RelayUrl::parse(url).map_err(|_| StartError::BadRelay { url: url.clone() }))
            .collect::<Result<Vec<_>, _>>()?;
        if configured.is_empty() {
            return Err(StartError::NoRelays);
        }
        let pool = RelayPool::new();
        for url in &configured {
            pool.add_relay(url.clone(), relay_options())
                .await
                .map_err(|e| StartError::Pool(e.to_string()))?;
        }
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
            options,
            configured,
            bunkers: RwLock::new(HashMap::new()),
            seen: Mutex::new(Seen::default()),
        });
        if let Err(err) = shared.sync().await {
            tracing::warn!(error = %err, "nip46: could not read the bunkers yet; will retry");
        }
        let tasks = vec![
            tokio::spawn(shared.clone().receive(notifications)),
            tokio::spawn(shared.clone().follow(changes)),
            tokio::spawn(crate::reconnect::supervise(shared.pool.clone())),
        ];
        tracing::info!(relays = ?shared.options.relays, "nip46 signer listening");
        Ok(Nip46Service { shared, tasks })
    }

    /// Stops answering and closes the relay connections.
    pub async fn shutdown(self) {
        for task in &self.tasks {
            task.abort();
        }
        self.shared.pool.shutdown().await;
    }
}

fn relay_options() -> RelayOptions {
    // A drop leaves the relay `Terminated`; `reconnect::supervise` brings it back with its
    // own backoff (see there for why not nostr-sdk's).
    RelayOptions::new().reconnect(false)
}

impl Shared {
    /// Hands each incoming request to a task; never does signing work itself.
    async fn receive(self: Arc<Self>, mut notifications: broadcast::Receiver<RelayPoolNotification>) {
        loop {
            match notifications.recv().await {
                Ok(RelayPoolNotification::Event { relay_url, event, .. }) => self.clone().dispatch(relay_url, *event),
                Ok(RelayPoolNotification::Shutdown) => return,
                Ok(RelayPoolNotification::Message { .. }) => {}
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    metrics::counter!("keycast_nip46_dropped_total").increment(missed);
                    tracing::warn!(missed, "nip46: fell behind the relays; requests were dropped");
                }
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    }

    fn dispatch(self: Arc<Self>, relay: RelayUrl, event: Event) {
        if event.kind != Kind::NostrConnect {
            return;
        }
        if !within_window(event.created_at, Timestamp::now()) {
            metrics::counter!("keycast_nip46_out_of_window_total").increment(1);
            tracing::debug!(id = %event.id, "nip46: ignoring a request dated outside the window");
            return;
        }
        let Some(bunker) = self.addressee(&event) else {
            return;
        };
        if let Ok(permit) = self.in_flight.clone().try_acquire_owned() {
            tokio::spawn(async move {
                self.handle(relay, bunker, event).await;
                drop(permit);
            });
        } else if let Ok(permit) = self.busy.clone().try_acquire_owned() {
            tokio::spawn(async move {
                self.answer_busy(relay, bunker, event).await;
                drop(permit);
            });
        } else {
            metrics::counter!("keycast_nip46_dropped_total").increment(1);
            tracing::warn!("nip46: overloaded; a request was dropped");
        }
    }

    /// The bunker a request is for: the first `p` tag naming one keycast serves.
    fn addressee(&self, event: &Event) -> Option<PublicKey> {
        let bunkers = self.bunkers.read().ok()?;
        event.tags.public_keys().find(|pk| bunkers.contains_key(pk)).copied()
    }

    async fn handle(&self, relay: RelayUrl, bunker: PublicKey, event: Event) {
        let started = Instant::now();
        let Some((keys, request, cipher)) = self.open(&bunker, &event).await else {
            return;
        };
        if !self.first_time(&event.pubkey, &request.id) {
            tracing::debug!(id = %request.id, "nip46: duplicate request ignored");
            return;
        }
        let (reply, outcome) =
            handler::answer(&self.signer, self.durability.as_ref(), &bunker, &event.pubkey, &request).await;
        let method = method_label(&request.method);
        metrics::counter!("keycast_nip46_requests_total", "method" => method, "outcome" => outcome.label())
            .increment(1);
        metrics::histogram!("keycast_nip46_request_seconds", "method" => method).record(started.elapsed());
        if outcome != Outcome::Ok {
            tracing::info!(
                method,
                outcome = outcome.label(),
                reason = reply.error.as_deref().unwrap_or(""),
                "nip46 request refused"
            );
        }
        self.reply(&keys, &relay, &bunker, &event.pubkey, cipher, &reply).await;
    }

    async fn answer_busy(&self, relay: RelayUrl, bunker: PublicKey, event: Event) {
        if let Some((keys, request, cipher)) = self.open(&bunker, &event).await {
            metrics::counter!("keycast_nip46_requests_total", "method" => method_label(&request.method), "outcome" => "busy")
                .increment(1);
            let reply = RpcReply::error(&request.id, "busy: keycast is at capacity; retry in a moment");
            self.reply(&keys, &relay, &bunker, &event.pubkey, cipher, &reply).await;
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

    async fn reply(
        &self,
        keys: &keycast_core::nostr::Keys,
        relay: &RelayUrl,
        bunker: &PublicKey,
        client: &PublicKey,
        cipher: Cipher,
        reply: &RpcReply,
    ) {
        let event = match wire::seal(keys, client, cipher, reply) {
            Ok(event) => event,
            Err(err) => {
                tracing::error!(error = %err, "nip46: cannot seal a reply");
                return;
            }
        };
        // The relay it came on, plus every relay the bunker names: the client listens on
        // at least one of them.
        let mut targets: HashSet<RelayUrl> = self.configured.iter().cloned().collect();
        if let Ok(bunkers) = self.bunkers.read() {
            targets.extend(bunkers.get(bunker).into_iter().flatten().cloned());
        }
        targets.insert(relay.clone());
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
                Ok(Change::Authorizations) | Err(broadcast::error::RecvError::Lagged(_)) => {
                    if let Err(err) = self.sync().await {
                        tracing::warn!(error = %err, "nip46: cannot read the bunkers; will retry");
                    }
                }
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    }

    /// Re-reads the bunkers to serve, connects to any new relay they name, and renews
    /// the subscription when the set changed.
    async fn sync(&self) -> Result<(), String> {
        let window = i64::try_from(self.options.revoked_answer_window.as_secs()).unwrap_or(i64::MAX);
        let since = keycast_db::now_unix().saturating_sub(window);
        let rows = self.signer.bunkers_to_serve(since).await.map_err(|e| e.to_string())?;
        let mut bunkers = HashMap::with_capacity(rows.len());
        for row in rows {
            let Ok(bunker) = PublicKey::from_hex(&row.bunker_pubkey) else {
                tracing::warn!(bunker = row.bunker_pubkey, "nip46: skipping a bunker with a bad key");
                continue;
            };
            let relays: Vec<String> = serde_json::from_str(&row.relays).unwrap_or_default();
            let relays = relays.iter().filter_map(|r| RelayUrl::parse(r).ok()).collect();
            bunkers.insert(bunker, relays);
        }
        let wanted: HashSet<RelayUrl> = self
            .configured
            .iter()
            .cloned()
            .chain(bunkers.values().flatten().cloned())
            .collect();
        let unchanged = self
            .bunkers
            .read()
            .map(|old| old.len() == bunkers.len() && old.keys().all(|k| bunkers.contains_key(k)))
            .unwrap_or(false);
        let keys: Vec<PublicKey> = bunkers.keys().copied().collect();
        if let Ok(mut current) = self.bunkers.write() {
            *current = bunkers;
        }
        let present: HashSet<RelayUrl> = self.pool.relays().await.into_keys().collect();
        if !unchanged {
            self.subscribe(&keys).await;
        }
        // New relays inherit the pool's subscription when added.
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
        metrics::gauge!("keycast_nip46_bunkers").set(keys.len() as f64);
        Ok(())
    }

    async fn subscribe(&self, bunkers: &[PublicKey]) {
        let id = SubscriptionId::new(SUBSCRIPTION);
        if bunkers.is_empty() {
            // An empty `#p` would match nothing on some relays and everything on others.
            self.pool.unsubscribe(&id).await;
            return;
        }
        // `since` keeps relays that store ephemeral events from replaying old requests.
        let since = Timestamp::from(Timestamp::now().as_secs().saturating_sub(REQUEST_WINDOW_SECS));
        let filters: Vec<Filter> = bunkers
            .chunks(PUBKEYS_PER_FILTER)
            .map(|chunk| {
                Filter::new()
                    .kind(Kind::NostrConnect)
                    .pubkeys(chunk.iter().copied())
                    .since(since)
            })
            .collect();
        if let Err(err) = self
            .pool
            .subscribe_with_id(id, filters, SubscribeOptions::default())
            .await
        {
            tracing::warn!(error = %err, "nip46: cannot subscribe");
        }
    }

    /// `nostrconnect://`: tells the client which bunker accepted it by sending a
    /// `connect` response carrying its secret, from the bunker, on the client's relays.
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
        let relays: Vec<RelayUrl> = relays.iter().filter_map(|r| RelayUrl::parse(r).ok()).collect();
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

/// (client, request id) pairs seen within the last [`DEDUP_WINDOW`] (at least; at most
/// twice that): two generations, the older dropped whole when the newer is a window old, so
/// every operation is O(1) — no scan of the entries, ever (issue 12 item 6).
struct Seen {
    current: HashSet<(PublicKey, String)>,
    previous: HashSet<(PublicKey, String)>,
    rotated_at: Instant,
}

impl Default for Seen {
    fn default() -> Self {
        Seen {
            current: HashSet::new(),
            previous: HashSet::new(),
            rotated_at: Instant::now(),
        }
    }
}

impl Seen {
    /// Records the pair: true if it was not seen before. Also hands back the generation
    /// that expired, if one did, for the caller to free outside its lock.
    fn insert(&mut self, client: PublicKey, id: String, now: Instant) -> (bool, Option<HashSet<(PublicKey, String)>>) {
        let mut expired = None;
        if now.saturating_duration_since(self.rotated_at) >= DEDUP_WINDOW {
            let current = std::mem::take(&mut self.current);
            expired = Some(std::mem::replace(&mut self.previous, current));
            self.rotated_at = now;
        }
        let key = (client, id);
        let first = !self.previous.contains(&key) && self.current.insert(key);
        (first, expired)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_id_is_answered_once_per_client() {
        let mut seen = Seen::default();
        let (a, b) = (
            keycast_core::nostr::Keys::generate().public_key(),
            keycast_core::nostr::Keys::generate().public_key(),
        );
        let now = Instant::now();
        assert!(seen.insert(a, "1".into(), now).0);
        assert!(!seen.insert(a, "1".into(), now).0, "the same request again");
        assert!(seen.insert(b, "1".into(), now).0, "another client may use the same id");
        assert!(seen.insert(a, "2".into(), now).0);
    }

    #[test]
    fn a_request_id_is_remembered_for_at_least_the_dedup_window() {
        let mut seen = Seen::default();
        let a = keycast_core::nostr::Keys::generate().public_key();
        let start = Instant::now();
        assert!(seen.insert(a, "1".into(), start).0);
        // Just before and just after one rotation: still known.
        let almost = start + DEDUP_WINDOW - Duration::from_millis(1);
        assert!(!seen.insert(a, "1".into(), almost).0);
        assert!(!seen.insert(a, "1".into(), start + DEDUP_WINDOW).0);
        // Two rotations later it has expired with its generation.
        assert!(seen.insert(a, "1".into(), start + 3 * DEDUP_WINDOW).0);
    }

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
