//! How the relay pool opens its WebSocket connections (nostr-sdk's `WebSocketTransport`):
//! keycast resolves the relay's host itself, judges every address, and connects to exactly
//! the addresses it judged — at every connect and every reconnect (issue 12 item 7).
//!
//! A `nostrconnect://` URI is checked when it is accepted
//! ([`keycast_core::nostrconnect::NostrConnectUri::refuse_internal_relays`]), but a name that
//! resolved to a public address then may resolve to `10.0.0.1` or `169.254.169.254` an hour
//! later, or between a check and a connect of its own (DNS rebinding). nostr-sdk's default
//! transport resolves the name again when it connects, so a check before it proves nothing.
//! Here the lookup whose answer is judged is the lookup whose answer is dialled.
//!
//! The operator's relays (`BUNKER_RELAYS`, or the embedded relay) are trusted: they may be
//! on loopback or a private network. Every other relay is judged unless
//! `KEYCAST_NOSTRCONNECT_INTERNAL_RELAYS` allows internal addresses (a development
//! instance). A refused connection fails like an unreachable relay; the reconnect
//! supervisor tries again later, and the name is judged again then.
//!
//! Incoming WebSocket messages are limited in size ([`MAX_MESSAGE_BYTES`], and
//! [`MAX_OPERATOR_MESSAGE_BYTES`] from the operator's relays): a relay cannot make keycast
//! buffer a 64 MiB message (tungstenite's default) before nostr-sdk's own limits look at it.
//! A larger message ends the connection, so the operator's relays get a limit above what
//! common relays accept: one oversized event published there by anyone must not cut keycast
//! off a relay every user's bunker is on (keycast drops it instead, as a stranger's request it
//! cannot open). Messages from relays named by apps are also read at a bounded rate
//! ([`RelayTransport::throttle_app_relays`], issue 12 item 6); the operator's are not.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use async_wsocket::futures_util::{Sink, SinkExt};
use async_wsocket::{ConnectionMode, Message, WebSocket};
use nostr_sdk::pool::transport::error::TransportError;
use nostr_sdk::pool::transport::websocket::{WebSocketSink, WebSocketStream, WebSocketTransport};
use nostr_sdk::util::BoxedFuture;
use nostr_sdk::{RelayUrl, Url};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::throttle::{Rate, Throttled};

/// Largest WebSocket message accepted from a relay. A NIP-44 payload is at most 64 KiB of
/// plaintext (about 87 KiB as an event), so this leaves room for NIP-04 and relay notices.
pub const MAX_MESSAGE_BYTES: usize = 256 * 1024;
/// Largest WebSocket message accepted from the operator's relays: more than any relay's
/// default limit on events (khatru's is 500 KB, nostr-rs-relay's and strfry's smaller).
pub const MAX_OPERATOR_MESSAGE_BYTES: usize = 1024 * 1024;
/// Shortest time given to one address when a name resolves to several.
const MIN_ATTEMPT: Duration = Duration::from_secs(2);

/// The relay pool's transport; see the module documentation.
#[derive(Debug, Clone)]
pub struct RelayTransport {
    /// The operator's relays: connected to wherever they resolve.
    trusted: HashSet<RelayUrl>,
    /// `KEYCAST_NOSTRCONNECT_INTERNAL_RELAYS`: every relay may be internal.
    allow_internal: bool,
    /// Incoming messages from relays named by apps are read at this rate at most.
    app_rate: Option<Rate>,
    /// When each refused relay was last logged at WARN: a relay stays refused on every
    /// reconnect (each 30 s at most, for up to 200 app relays), which is counted, not logged.
    warned: std::sync::Arc<std::sync::Mutex<HashMap<String, std::time::Instant>>>,
}

/// How often a relay that stays refused is logged at WARN.
const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(3600);

/// Why a connection was not opened.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("relay {relay} {reason}; this keycast only connects to public relays (KEYCAST_NOSTRCONNECT_INTERNAL_RELAYS=true allows internal ones)")]
    Refused { relay: String, reason: String },
    #[error("relay {relay} does not resolve: {reason}")]
    Resolve { relay: String, reason: String },
    #[error("cannot reach relay {relay}: {source}")]
    Io { relay: String, source: std::io::Error },
    #[error("relay {relay}: {source}")]
    Handshake {
        relay: String,
        source: tokio_tungstenite::tungstenite::Error,
    },
    #[error("relay {relay}: no connection within {timeout:?}")]
    Timeout { relay: String, timeout: Duration },
}

impl RelayTransport {
    /// A transport that trusts `trusted` (the operator's relays) and judges every other
    /// relay's addresses unless `allow_internal`.
    pub fn new(trusted: impl IntoIterator<Item = RelayUrl>, allow_internal: bool) -> RelayTransport {
        RelayTransport {
            trusted: trusted.into_iter().collect(),
            allow_internal,
            app_rate: None,
            warned: std::sync::Arc::default(),
        }
    }

    /// Reads what each relay named by an app sends at `rate` at most
    /// ([`crate::throttle::Throttled`]); the operator's relays are not limited.
    pub fn throttle_app_relays(mut self, rate: Rate) -> RelayTransport {
        self.app_rate = Some(rate);
        self
    }

    fn is_trusted(&self, url: &Url) -> bool {
        RelayUrl::parse(url.as_str()).is_ok_and(|relay| self.trusted.contains(&relay))
    }

    /// The addresses to dial for `url`: judged, unless the relay is trusted or internal
    /// relays are allowed.
    async fn addresses(&self, url: &Url) -> Result<Vec<SocketAddr>, ConnectError> {
        let relay = url.as_str().to_owned();
        if self.allow_internal || self.is_trusted(url) {
            return resolve(url).await;
        }
        keycast_core::nostrconnect::check_relay(url.as_str())
            .await
            .map_err(|reason| {
                metrics::counter!("keycast_nip46_relays_refused_total").increment(1);
                if self.first_refusal_in_a_while(&relay) {
                    tracing::warn!(relay, reason, "nip46: refusing to connect to a relay");
                } else {
                    tracing::debug!(relay, reason, "nip46: refusing to connect to a relay");
                }
                ConnectError::Refused { relay, reason }
            })
    }

    /// Whether `relay`'s refusal is the first in [`REFUSAL_LOG_INTERVAL`] (and so logged at WARN).
    fn first_refusal_in_a_while(&self, relay: &str) -> bool {
        let now = std::time::Instant::now();
        let mut warned = self.warned.lock().expect("refusal log lock");
        if warned.len() > 4096 {
            warned.retain(|_, at| now.duration_since(*at) < REFUSAL_LOG_INTERVAL);
        }
        match warned.get(relay) {
            Some(at) if now.duration_since(*at) < REFUSAL_LOG_INTERVAL => false,
            _ => {
                warned.insert(relay.to_owned(), now);
                true
            }
        }
    }

    /// Resolves, judges, dials and upgrades, all within `timeout`.
    async fn open(&self, url: &Url, timeout: Duration) -> Result<WebSocket, ConnectError> {
        let relay = url.as_str().to_owned();
        let attempt = async {
            let addrs = self.addresses(url).await?;
            let tcp = dial(&relay, &addrs, timeout).await?;
            let limit = if self.is_trusted(url) {
                MAX_OPERATOR_MESSAGE_BYTES
            } else {
                MAX_MESSAGE_BYTES
            };
            let config = WebSocketConfig::default()
                .max_message_size(Some(limit))
                .max_frame_size(Some(limit));
            // The URL's host name is what TLS verifies and `Host` names; the TCP
            // connection is to the address judged above.
            let (ws, _) = tokio_tungstenite::client_async_tls_with_config(url.as_str(), tcp, Some(config), None)
                .await
                .map_err(|source| ConnectError::Handshake {
                    relay: relay.clone(),
                    source,
                })?;
            Ok(WebSocket::Tokio(ws))
        };
        tokio::time::timeout(timeout, attempt)
            .await
            .map_err(|_| ConnectError::Timeout { relay, timeout })?
    }
}

impl WebSocketTransport for RelayTransport {
    fn support_ping(&self) -> bool {
        true
    }

    /// Ignores `mode`: keycast never asks for a proxy or Tor, and a proxy would resolve
    /// the name itself, out of this transport's sight.
    fn connect<'a>(
        &'a self,
        url: &'a Url,
        _mode: &'a ConnectionMode,
        timeout: Duration,
    ) -> BoxedFuture<'a, Result<(WebSocketSink, WebSocketStream), TransportError>> {
        Box::pin(async move {
            let socket = self.open(url, timeout).await.map_err(TransportError::backend)?;
            let (tx, rx) = crate::keepalive::watch(socket, crate::keepalive::PING_EVERY, crate::keepalive::PONG_WITHIN);
            // As nostr-sdk's own transport: not `sink_map_err`, which may panic
            // (rust-nostr/nostr#984).
            let sink: WebSocketSink = Box::new(TransportSink(tx));
            let stream = rx;
            let stream: WebSocketStream = match self.app_rate {
                Some(rate) if !self.is_trusted(url) => Box::pin(Throttled::new(stream, rate)),
                _ => Box::pin(stream),
            };
            Ok((sink, stream))
        })
    }
}

/// Every address `url`'s host resolves to (an IP literal is its own address).
async fn resolve(url: &Url) -> Result<Vec<SocketAddr>, ConnectError> {
    let relay = url.as_str().to_owned();
    let failed = |reason: String| ConnectError::Resolve {
        relay: relay.clone(),
        reason,
    };
    let port = url.port_or_known_default().ok_or_else(|| failed("no port".into()))?;
    let addrs: Vec<SocketAddr> = match url.host() {
        Some(url::Host::Ipv4(ip)) => vec![(ip, port).into()],
        Some(url::Host::Ipv6(ip)) => vec![(ip, port).into()],
        Some(url::Host::Domain(name)) => tokio::net::lookup_host((name, port))
            .await
            .map_err(|e| failed(e.to_string()))?
            .collect(),
        None => return Err(failed("no host".into())),
    };
    if addrs.is_empty() {
        return Err(failed("no address".into()));
    }
    Ok(addrs)
}

/// Connects to the first of `addrs` that answers, in order, giving each a fair share of
/// `timeout` (at least [`MIN_ATTEMPT`]) so one black-holed address does not use it all.
async fn dial(relay: &str, addrs: &[SocketAddr], timeout: Duration) -> Result<TcpStream, ConnectError> {
    let deadline = Instant::now() + timeout;
    let mut last = std::io::Error::new(std::io::ErrorKind::AddrNotAvailable, "no address");
    for (i, addr) in addrs.iter().enumerate() {
        let left = deadline.saturating_duration_since(Instant::now());
        let remaining = u32::try_from(addrs.len() - i).unwrap_or(u32::MAX);
        let share = (left / remaining).max(MIN_ATTEMPT).min(left);
        match tokio::time::timeout(share, TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => return Ok(stream),
            Ok(Err(e)) => last = e,
            Err(_) => last = std::io::Error::new(std::io::ErrorKind::TimedOut, format!("{addr} did not answer")),
        }
    }
    Err(ConnectError::Io {
        relay: relay.to_owned(),
        source: last,
    })
}

/// The write half (to the connection's task, see [`crate::keepalive`]), with its errors
/// wrapped as nostr-sdk's own transport does.
struct TransportSink(futures::channel::mpsc::Sender<Message>);

impl Sink<Message> for TransportSink {
    type Error = TransportError;

    fn poll_ready(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready_unpin(cx).map_err(TransportError::backend)
    }

    fn start_send(mut self: Pin<&mut Self>, item: Message) -> Result<(), Self::Error> {
        self.0.start_send_unpin(item).map_err(TransportError::backend)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_flush_unpin(cx).map_err(TransportError::backend)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_close_unpin(cx).map_err(TransportError::backend)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(text: &str) -> Url {
        Url::parse(text).unwrap()
    }

    #[tokio::test]
    async fn internal_addresses_are_refused_unless_trusted_or_allowed() {
        let trusted = RelayUrl::parse("ws://127.0.0.1:7447").unwrap();
        let transport = RelayTransport::new([trusted], false);
        for relay in [
            "ws://127.0.0.1:9",
            "ws://localhost:9",
            "wss://10.0.0.1",
            "wss://[::1]:9",
        ] {
            let err = transport.addresses(&url(relay)).await.unwrap_err();
            assert!(matches!(err, ConnectError::Refused { .. }), "{relay}: {err}");
            assert!(
                err.to_string().contains("KEYCAST_NOSTRCONNECT_INTERNAL_RELAYS"),
                "{err}"
            );
        }
        let addrs = transport.addresses(&url("ws://127.0.0.1:7447")).await.unwrap();
        assert_eq!(
            addrs,
            ["127.0.0.1:7447".parse::<SocketAddr>().unwrap()],
            "the operator's relay"
        );
        let public = transport.addresses(&url("wss://8.8.8.8")).await.unwrap();
        assert_eq!(public, ["8.8.8.8:443".parse::<SocketAddr>().unwrap()]);

        let development = RelayTransport::new([], true);
        assert!(development.addresses(&url("ws://127.0.0.1:9")).await.is_ok());
    }

    #[tokio::test]
    async fn a_refused_relay_is_never_dialled() {
        // A listener on loopback that would accept the connection: nothing reaches it.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let transport = RelayTransport::new([], false);
        let err = transport
            .open(&url(&format!("ws://127.0.0.1:{port}")), Duration::from_secs(5))
            .await
            .err()
            .expect("refused");
        assert!(matches!(err, ConnectError::Refused { .. }), "{err}");
        let accepted = tokio::time::timeout(Duration::from_millis(200), listener.accept()).await;
        assert!(accepted.is_err(), "no connection was made");
    }

    #[tokio::test]
    async fn dial_tries_the_next_address_when_one_fails() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let live = listener.local_addr().unwrap();
        // A port nothing listens on (bound, then closed).
        let dead = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap();
        let stream = dial("test", &[dead, live], Duration::from_secs(5)).await.unwrap();
        assert_eq!(stream.peer_addr().unwrap(), live);
    }
}
