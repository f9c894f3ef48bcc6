//! The embedded relay: a small NIP-46 rendezvous on loopback, so the whole flow runs on
//! one machine with no internet (the default when `BUNKER_RELAYS` is unset). It carries
//! only kind 24133 and stores nothing; production points bunkers at public relays.
//!
//! The relay itself is nostr-relay-builder's `LocalRelay`, but keycast accepts the TCP
//! connections: `LocalRelay`'s own listener leaves Nagle's algorithm on, and a relay that
//! writes `OK` and then the next request to the signer's connection waits for a delayed
//! ACK — about 40 ms on every NIP-46 round trip (measured: 43 ms p50, 7 ms with the
//! external relay). Here each socket gets `TCP_NODELAY`, the WebSocket upgrade is answered,
//! and the stream is handed to the relay.
//!
//! An operator may bind it beyond loopback, so a connection flood must not take the
//! descriptors HTTP needs ([`RelayLimits`]): an upgrade gets the HTTP header timeout (a
//! client that never finishes it is cut off), and past the connection cap a connection is
//! closed as soon as it is accepted (which also keeps the kernel's backlog draining). Nor
//! may one connection take the process: a client's messages are held to 256 KiB and to
//! NIP-01's own ([`crate::frames`]), and its subscriptions to NIP-46's shape
//! ([`OnlyNostrConnectQueries`]: no full-text search, whose matching costs the event's
//! length times the query's on every event; no subscription to everything).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use keycast_core::nostr::{Alphabet, Filter, SingleLetterTag};
use keycast_core::nostr::{Event, JsonUtil, Kind};
use keycast_core::vital::Vitals;
use nostr_relay_builder::builder::{PolicyResult, QueryPolicy, RateLimit, WritePolicy};
use nostr_relay_builder::prelude::{BoxedFuture, MemoryDatabase, MemoryDatabaseOptions};
use nostr_relay_builder::{LocalRelay, RelayBuilder};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::AbortHandle;

/// The longest upgrade request accepted.
const MAX_REQUEST_BYTES: usize = 8 * 1024;

/// How much of keycast the relay's clients may hold at once.
#[derive(Debug, Clone, Copy)]
pub struct RelayLimits {
    /// Time to send the whole upgrade request (keycast's HTTP header timeout).
    pub upgrade_timeout: Duration,
    /// Connections held at once, upgrading or upgraded.
    pub max_connections: usize,
}

impl Default for RelayLimits {
    fn default() -> Self {
        RelayLimits {
            upgrade_timeout: Duration::from_secs(10),
            max_connections: DEFAULT_MAX_CONNECTIONS,
        }
    }
}

/// Default of [`RelayLimits::max_connections`].
pub const DEFAULT_MAX_CONNECTIONS: usize = 256;

/// Connections only peers on this machine may take (half the cap, if that is less): keycast's
/// own connection to its relay comes from loopback, or from the address the relay is bound
/// to. With the relay bound beyond loopback, a flood of idle connections from elsewhere took
/// every one, and keycast, connecting after a restart (or again after a drop), was refused:
/// no bunker answered while every probe passed.
pub const LOOPBACK_RESERVED: usize = 4;

/// Subscriptions one connection may hold: keycast's own (500 bunkers each: 32,000 bunkers)
/// and far more than an app needs, while bounding what one client keeps in memory (each
/// subscription is one message of at most [`crate::frames::MAX_MESSAGE_BYTES`]).
pub const MAX_SUBSCRIPTIONS: usize = 64;

/// A running embedded relay; stops when dropped.
pub struct EmbeddedRelay {
    url: String,
    accept: AbortHandle,
}

/// The largest event the relay carries: half of the least keycast reads from a relay in one
/// message (`transport::MAX_MESSAGE_BYTES`; a larger message ends its connection), and more
/// than any NIP-46 request (a NIP-44 payload is at most about 87 KiB as an event).
pub const MAX_EVENT_BYTES: usize = crate::transport::MAX_MESSAGE_BYTES / 2;

/// Refuses every event that is not NIP-46, so the relay cannot be used for anything else, and
/// any larger than [`MAX_EVENT_BYTES`]: forwarded to keycast, it would cut keycast off.
#[derive(Debug)]
struct OnlyNostrConnect;

impl WritePolicy for OnlyNostrConnect {
    fn admit_event<'a>(&'a self, event: &'a Event, _addr: &'a SocketAddr) -> BoxedFuture<'a, PolicyResult> {
        Box::pin(async move {
            if event.kind != Kind::NostrConnect {
                return PolicyResult::Reject("this relay only carries NIP-46 (kind 24133)".into());
            }
            if event.as_json().len() > MAX_EVENT_BYTES {
                return PolicyResult::Reject(format!("events are limited to {MAX_EVENT_BYTES} bytes"));
            }
            PolicyResult::Accept
        })
    }
}

/// Admits only subscriptions shaped like NIP-46's: kind 24133 alone, for at most
/// [`crate::subscriptions::PER_SUBSCRIPTION`] named keys (`#p`, as every NIP-46 client and
/// keycast subscribe), without `search`. A `search` filter is matched against every event
/// by scanning its content for the query, on the relay's session task: a few of them with
/// long queries held the runtime's threads for minutes per event (HTTP, probes and the
/// lease's renewal with them). A filter naming no key saw every app's requests.
#[derive(Debug)]
struct OnlyNostrConnectQueries;

impl QueryPolicy for OnlyNostrConnectQueries {
    fn admit_query<'a>(&'a self, query: &'a Filter, _addr: &'a SocketAddr) -> BoxedFuture<'a, PolicyResult> {
        Box::pin(async move {
            match nip46_shaped(query) {
                Ok(()) => PolicyResult::Accept,
                Err(reason) => PolicyResult::Reject(reason.into()),
            }
        })
    }
}

fn nip46_shaped(filter: &Filter) -> Result<(), &'static str> {
    const MAX_KEYS: usize = crate::subscriptions::PER_SUBSCRIPTION;
    if filter.search.is_some() {
        return Err("this relay only carries NIP-46: no search");
    }
    if filter
        .kinds
        .as_ref()
        .is_none_or(|kinds| kinds.len() != 1 || !kinds.contains(&Kind::NostrConnect))
    {
        return Err("this relay only carries NIP-46: subscribe to kind 24133 alone");
    }
    let named = filter.generic_tags.get(&SingleLetterTag::lowercase(Alphabet::P));
    if named.is_none_or(|keys| keys.is_empty() || keys.len() > MAX_KEYS) {
        return Err("name the keys a subscription is for: #p with 1 to 500 keys");
    }
    let too_many = |n: Option<usize>| n.is_some_and(|n| n > MAX_KEYS);
    if too_many(filter.ids.as_ref().map(|s| s.len()))
        || too_many(filter.authors.as_ref().map(|s| s.len()))
        || filter.generic_tags.values().map(|values| values.len()).sum::<usize>() > 2 * MAX_KEYS
    {
        return Err("at most 500 ids, authors or tag values in a subscription");
    }
    Ok(())
}

impl EmbeddedRelay {
    /// Listens on `addr` (port 0 picks a free one); an end of its accept loop other than
    /// this value's drop is reported to `vitals`.
    ///
    /// # Errors
    /// The address cannot be bound.
    pub async fn start(addr: SocketAddr, limits: RelayLimits, vitals: &Vitals) -> Result<EmbeddedRelay, String> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|e| format!("cannot bind the embedded relay on {addr}: {e}"))?;
        let bound = listener
            .local_addr()
            .map_err(|e| format!("embedded relay address: {e}"))?;
        let database = MemoryDatabase::with_opts(MemoryDatabaseOptions {
            events: false,
            max_events: None,
        });
        let builder = RelayBuilder::default()
            .database(database)
            // One keycast connection carries every reply: the per-connection default
            // (60 events a minute) would throttle it.
            .rate_limit(RateLimit {
                max_reqs: MAX_SUBSCRIPTIONS,
                notes_per_minute: u32::MAX,
            })
            .write_policy(OnlyNostrConnect)
            .query_policy(OnlyNostrConnectQueries);
        let relay = LocalRelay::new(builder);
        let accept = vitals.spawn("the embedded relay", accept(listener, relay, limits));
        Ok(EmbeddedRelay {
            url: format!("ws://{bound}"),
            accept,
        })
    }

    /// `ws://127.0.0.1:PORT`
    pub fn url(&self) -> &str {
        &self.url
    }
}

impl Drop for EmbeddedRelay {
    fn drop(&mut self) {
        // The relay (and its connections) go with the task that owns it.
        self.accept.abort();
    }
}

async fn accept(listener: TcpListener, relay: LocalRelay, limits: RelayLimits) {
    let bound = listener
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let mut full = false;
    loop {
        let (mut stream, peer) = match listener.accept().await {
            Ok(conn) => conn,
            Err(err) => {
                // Out of file descriptors and the like: back off instead of spinning a core.
                tracing::warn!(error = %err, "embedded relay: cannot accept a connection");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // (One task accepts: nothing takes a permit between the look and the take.)
        let reserved = LOOPBACK_RESERVED.min(limits.max_connections / 2);
        // From this machine: loopback, or the one address the relay is bound to (keycast
        // dials the address it bound; no other host connects from it).
        let peer_ip = peer.ip().to_canonical();
        let here = peer_ip.is_loopback() || (!bound.ip().is_unspecified() && peer_ip == bound.ip().to_canonical());
        let for_this_peer = match here {
            true => Some(()),
            false => (slots.available_permits() > reserved).then_some(()),
        };
        let Some(Ok(slot)) = for_this_peer.map(|()| slots.clone().try_acquire_owned()) else {
            metrics::counter!("keycast_embedded_relay_refused_total").increment(1);
            if !full {
                tracing::warn!(
                    max = limits.max_connections,
                    "embedded relay: at its connection cap (KEYCAST_EMBEDDED_RELAY_MAX_CONNECTIONS; the last few for this machine only); closing new connections until one ends"
                );
            }
            full = true;
            drop(stream);
            continue;
        };
        full = false;
        let relay = relay.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let _ = stream.set_nodelay(true);
            match tokio::time::timeout(limits.upgrade_timeout, upgrade(&mut stream)).await {
                Ok(Ok(())) => {}
                Ok(Err(err)) => {
                    tracing::debug!(%peer, error = %err, "embedded relay: not a WebSocket upgrade");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "embedded relay: no upgrade request within the header timeout");
                    return;
                }
            }
            if let Err(err) = relay.take_connection(crate::frames::Limited::new(stream), peer).await {
                tracing::debug!(%peer, error = %err, "embedded relay: connection ended");
            }
        });
    }
}

/// Answers the HTTP request that opens a WebSocket with `101 Switching Protocols`; any
/// other request gets `426 Upgrade Required`.
async fn upgrade(stream: &mut TcpStream) -> std::io::Result<()> {
    let mut request = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !request.ends_with(b"\r\n\r\n") {
        let n = stream.read(&mut chunk).await?;
        if n == 0 || request.len() + n > MAX_REQUEST_BYTES {
            return Err(std::io::Error::other("incomplete or oversized upgrade request"));
        }
        // A client sends nothing after its request until it has the answer.
        request.extend_from_slice(&chunk[..n]);
    }
    let text = String::from_utf8_lossy(&request);
    let key = text.lines().find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.trim()
            .eq_ignore_ascii_case("sec-websocket-key")
            .then(|| value.trim().to_owned())
    });
    let Some(key) = key else {
        let body = "this is keycast's embedded NIP-46 relay: connect with a WebSocket\n";
        let response = format!(
            "HTTP/1.1 426 Upgrade Required\r\nUpgrade: websocket\r\nConnection: close\r\n\
             Content-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(response.as_bytes()).await?;
        return Err(std::io::Error::other("no Sec-WebSocket-Key"));
    };
    let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
    let response = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {accept}\r\n\r\n"
    );
    stream.write_all(response.as_bytes()).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_plain_http_request_is_told_to_use_a_websocket() {
        let relay = EmbeddedRelay::start(
            "127.0.0.1:0".parse().unwrap(),
            RelayLimits::default(),
            &Vitals::default(),
        )
        .await
        .unwrap();
        let addr = relay.url().trim_start_matches("ws://").to_owned();
        let mut conn = TcpStream::connect(addr).await.unwrap();
        conn.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        let mut answer = String::new();
        conn.read_to_string(&mut answer).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 426"), "{answer}");
    }

    #[tokio::test]
    async fn it_carries_nip46_events_and_refuses_everything_else() {
        use keycast_core::nostr::{EventBuilder, Keys, Tag};
        use nostr_sdk::pool::{RelayOptions, RelayPool};

        let relay = EmbeddedRelay::start(
            "127.0.0.1:0".parse().unwrap(),
            RelayLimits::default(),
            &Vitals::default(),
        )
        .await
        .unwrap();
        let pool = RelayPool::new();
        pool.add_relay(relay.url(), RelayOptions::new()).await.unwrap();
        pool.connect().await;
        pool.wait_for_connection(std::time::Duration::from_secs(5)).await;
        let keys = Keys::generate();
        let nip46 = EventBuilder::new(Kind::NostrConnect, "x")
            .tag(Tag::public_key(Keys::generate().public_key()))
            .sign_with_keys(&keys)
            .unwrap();
        let note = EventBuilder::new(Kind::TextNote, "hello")
            .sign_with_keys(&keys)
            .unwrap();
        let accepted = pool.send_event(&nip46).await.unwrap();
        assert_eq!(accepted.success.len(), 1, "{:?}", accepted.failed);
        let refused = pool.send_event(&note).await.unwrap();
        assert!(refused.success.is_empty());
        let reason = refused.failed.values().next().unwrap();
        assert!(reason.contains("only carries NIP-46"), "{reason}");
        pool.shutdown().await;
    }
}
