//! The embedded relay: a small NIP-46 rendezvous on loopback, so the whole flow runs on
//! one machine with no internet (the default when `BUNKER_RELAYS` is unset). It carries
//! only kind 24133 and stores nothing; production points bunkers at public relays.

use std::net::SocketAddr;

use keycast_core::nostr::{Event, Kind};
use nostr_relay_builder::builder::{PolicyResult, RateLimit, WritePolicy};
use nostr_relay_builder::prelude::{BoxedFuture, MemoryDatabase, MemoryDatabaseOptions};
use nostr_relay_builder::{LocalRelay, RelayBuilder};

/// A running embedded relay; stops when dropped.
pub struct EmbeddedRelay {
    relay: LocalRelay,
    url: String,
}

/// Refuses every event that is not NIP-46, so the relay cannot be used for anything else.
#[derive(Debug)]
struct OnlyNostrConnect;

impl WritePolicy for OnlyNostrConnect {
    fn admit_event<'a>(&'a self, event: &'a Event, _addr: &'a SocketAddr) -> BoxedFuture<'a, PolicyResult> {
        Box::pin(async move {
            if event.kind == Kind::NostrConnect {
                PolicyResult::Accept
            } else {
                PolicyResult::Reject("this relay only carries NIP-46 (kind 24133)".into())
            }
        })
    }
}

impl EmbeddedRelay {
    /// Listens on `addr` (port 0 picks a free one).
    ///
    /// # Errors
    /// The address cannot be bound.
    pub async fn start(addr: SocketAddr) -> Result<EmbeddedRelay, String> {
        let database = MemoryDatabase::with_opts(MemoryDatabaseOptions {
            events: false,
            max_events: None,
        });
        let mut builder = RelayBuilder::default()
            .addr(addr.ip())
            .database(database)
            // One keycast connection carries every reply: the per-connection default
            // (60 events a minute) would throttle it.
            .rate_limit(RateLimit {
                max_reqs: 500,
                notes_per_minute: u32::MAX,
            })
            .write_policy(OnlyNostrConnect);
        let port = if addr.port() == 0 {
            std::net::TcpListener::bind(addr)
                .and_then(|l| l.local_addr())
                .map_err(|e| format!("cannot bind the embedded relay on {addr}: {e}"))?
                .port()
        } else {
            addr.port()
        };
        builder = builder.port(port);
        let relay = LocalRelay::new(builder);
        relay
            .run()
            .await
            .map_err(|e| format!("cannot bind the embedded relay on {addr}: {e}"))?;
        let url = relay.url().await.to_string();
        Ok(EmbeddedRelay { relay, url })
    }

    /// `ws://127.0.0.1:PORT`
    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn shutdown(&self) {
        self.relay.shutdown();
    }
}
