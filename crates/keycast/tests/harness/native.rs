//! A NIP-46 client with native crypto (the `nostr` crate over a nostr-sdk relay connection),
//! for what nostr-tools' `BunkerSigner` cannot do: speak NIP-04 on the wire, or fire many
//! requests at once.

use std::time::{Duration, Instant};

use nostr::nips::{nip04, nip44};
use nostr::{Event, EventBuilder, Filter, Keys, Kind, PublicKey, Tag, Timestamp};
use nostr_sdk::pool::{RelayOptions, RelayPool, RelayPoolNotification};
use nostr_sdk::SubscribeOptions;
use serde_json::{json, Value};
use tokio::sync::broadcast;

/// How a request is encrypted on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cipher {
    Nip44,
    Nip04,
}

/// A reply: its JSON and the cipher it came in.
pub struct Reply {
    pub json: Value,
    pub cipher: Cipher,
}

pub struct NativeClient {
    runtime: tokio::runtime::Runtime,
    pool: RelayPool,
    notifications: broadcast::Receiver<RelayPoolNotification>,
    keys: Keys,
    bunker: PublicKey,
    /// The events of the last `send`, for [`NativeClient::send_again`].
    last: Vec<Event>,
}

impl NativeClient {
    /// Connects to `relay` and subscribes to replies for a fresh client key.
    pub fn connect(relay: &str, bunker: PublicKey) -> NativeClient {
        NativeClient::connect_as(relay, bunker, Keys::generate())
    }

    /// As [`NativeClient::connect`], as the client with `keys` (e.g. the one a
    /// `nostrconnect://` URI named).
    pub fn connect_as(relay: &str, bunker: PublicKey, keys: Keys) -> NativeClient {
        NativeClient::connect_to(&[relay], bunker, keys)
    }

    /// As [`NativeClient::connect_as`], on several relays: each request goes to all of them
    /// (as apps publish), each reply is collected once.
    pub fn connect_to(relays: &[&str], bunker: PublicKey, keys: Keys) -> NativeClient {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let (pool, notifications) = runtime.block_on(async {
            let pool = RelayPool::new();
            for relay in relays {
                pool.add_relay(*relay, RelayOptions::new()).await.unwrap();
            }
            pool.connect().await;
            pool.wait_for_connection(Duration::from_secs(5)).await;
            let notifications = pool.notifications();
            let filter = Filter::new()
                .kind(Kind::NostrConnect)
                .pubkey(keys.public_key())
                .since(Timestamp::now() - 10);
            pool.subscribe(filter, SubscribeOptions::default()).await.unwrap();
            (pool, notifications)
        });
        NativeClient {
            runtime,
            pool,
            notifications,
            keys,
            bunker,
            last: Vec::new(),
        }
    }

    /// Sends requests `(id, method, params)` back to back, without waiting for replies.
    pub fn send(&mut self, requests: &[(String, &str, Value)], cipher: Cipher) {
        self.send_dated(requests, cipher, Timestamp::now());
    }

    /// As [`NativeClient::send`], with the request events dated `created_at` (e.g. in the
    /// past, as a relay replaying stored events delivers them).
    pub fn send_dated(&mut self, requests: &[(String, &str, Value)], cipher: Cipher, created_at: Timestamp) {
        let events: Vec<Event> = requests
            .iter()
            .map(|(id, method, params)| {
                let body = json!({"id": id, "method": method, "params": params}).to_string();
                let content = match cipher {
                    Cipher::Nip44 => {
                        nip44::encrypt(self.keys.secret_key(), &self.bunker, body, nip44::Version::V2).unwrap()
                    }
                    Cipher::Nip04 => nip04::encrypt(self.keys.secret_key(), &self.bunker, body).unwrap(),
                };
                EventBuilder::new(Kind::NostrConnect, content)
                    .tag(Tag::public_key(self.bunker))
                    .custom_created_at(created_at)
                    .sign_with_keys(&self.keys)
                    .unwrap()
            })
            .collect();
        self.last = events;
        self.send_again();
    }

    /// Publishes the last `send`'s events again, byte for byte: what whoever captured them
    /// can do (or a relay that replays what it kept).
    pub fn send_again(&mut self) {
        self.runtime.block_on(async {
            for event in &self.last {
                self.pool.send_event(event).await.unwrap();
            }
        });
    }

    /// Collects `n` replies from the bunker, or fewer if `timeout` passes first.
    pub fn replies(&mut self, n: usize, timeout: Duration) -> Vec<Reply> {
        let deadline = Instant::now() + timeout;
        let (keys, bunker) = (self.keys.clone(), self.bunker);
        let notifications = &mut self.notifications;
        self.runtime.block_on(async {
            let mut out = Vec::new();
            while out.len() < n {
                let left = deadline.saturating_duration_since(Instant::now());
                let Ok(Ok(notification)) = tokio::time::timeout(left, notifications.recv()).await else {
                    break;
                };
                let RelayPoolNotification::Event { event, .. } = notification else {
                    continue;
                };
                if event.pubkey != bunker {
                    continue;
                }
                let (text, cipher) = if event.content.contains("?iv=") {
                    (
                        nip04::decrypt(keys.secret_key(), &bunker, &event.content).ok(),
                        Cipher::Nip04,
                    )
                } else {
                    (
                        nip44::decrypt(keys.secret_key(), &bunker, &event.content).ok(),
                        Cipher::Nip44,
                    )
                };
                let text = text.expect("the reply decrypts with the client key");
                out.push(Reply {
                    json: serde_json::from_str(&text).unwrap(),
                    cipher,
                });
            }
            out
        })
    }
}

impl Drop for NativeClient {
    fn drop(&mut self) {
        self.runtime.block_on(self.pool.shutdown());
    }
}
