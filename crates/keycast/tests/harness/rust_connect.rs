//! rust-nostr's NIP-46 client (`nostr-connect` 0.44, the line keycast's own nostr crates are
//! on), behind the same JSON ops as the JavaScript drivers (`tests/js/*-client.mjs`), so one
//! scenario runs against every client: see [`App`].
//!
//! `NostrConnect` offers `connect` (on first use), `get_public_key`, `sign_event` and the four
//! encrypt/decrypt methods; it has no `ping`, `switch_relays` or `logout`, so those ops answer
//! `{ok: false, error: "unsupported"}` and the scenario skips them for this client. A
//! request the owner must approve is driven as with the JavaScript drivers: `start_sign_event`,
//! then `auth_url` (from the client's `auth_url` handler), then `finish_sign_event`.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use nostr_connect::prelude::{
    AuthUrlHandler, BoxedFuture, Event, EventBuilder, Keys, Kind, NostrConnect, NostrConnectMetadata, NostrConnectURI,
    NostrSigner, PublicKey, RelayUrl, Tag, Timestamp, Url,
};
use serde_json::{json, Value};

use super::nostr::BunkerClient;

/// A NIP-46 client driven by JSON ops (`{"op": …}` → `{ok, ms, …}`), whatever its library.
pub trait App {
    /// The library's name, for assertion messages.
    fn name(&self) -> &'static str;
    /// Runs one op; see `tests/js/bunker-client.mjs` for the ops and reply fields.
    fn call(&mut self, cmd: Value) -> Value;
    /// Whether the library can send `ping`, `switch_relays` and `logout`.
    fn has_session_methods(&self) -> bool {
        true
    }

    /// [`App::call`], failing the test unless the reply is `ok`.
    fn call_ok(&mut self, cmd: Value) -> Value {
        let reply = self.call(cmd.clone());
        assert_eq!(reply["ok"], true, "{}: {cmd} failed: {reply}", self.name());
        reply
    }
}

/// nostr-tools' or NDK's driver process.
pub struct JsApp {
    pub name: &'static str,
    pub client: BunkerClient,
}

impl JsApp {
    /// nostr-tools' `BunkerSigner`; `None` when the peer is not installed (see
    /// [`BunkerClient::spawn`]).
    pub fn nostr_tools() -> Option<JsApp> {
        Some(JsApp {
            name: "nostr-tools BunkerSigner",
            client: BunkerClient::spawn()?,
        })
    }

    /// NDK's `NDKNip46Signer`; `None` when the peer is not installed.
    pub fn ndk() -> Option<JsApp> {
        Some(JsApp {
            name: "NDK NDKNip46Signer",
            client: BunkerClient::spawn_ndk()?,
        })
    }
}

impl App for JsApp {
    fn name(&self) -> &'static str {
        self.name
    }
    fn call(&mut self, cmd: Value) -> Value {
        self.client.call(cmd)
    }
}

/// How long the rust-nostr client waits for each answer. The approval tests hold a request
/// open while they approve it through the web pages, which took over 5 s on a loaded 2-core
/// machine; a refusal's own speed is asserted separately (`REFUSAL_WITHIN_MS`).
const TIMEOUT: Duration = Duration::from_secs(20);

/// rust-nostr's `NostrConnect` on its own runtime.
pub struct RustApp {
    runtime: tokio::runtime::Runtime,
    client: Option<NostrConnect>,
    /// A `nostrconnect://` session waiting for the signer's answer.
    pending: Option<tokio::task::JoinHandle<Result<(NostrConnect, PublicKey), String>>>,
    /// A sign_event started and not yet finished (`start_sign_event`).
    pending_sign: Option<tokio::task::JoinHandle<Result<Event, String>>>,
    /// The `auth_url`s the signer sent, as the client's handler received them.
    auth_urls: mpsc::Receiver<String>,
    auth_url_sender: mpsc::Sender<String>,
}

/// The client's `auth_url` handler: where an app would open a browser, the test collects the
/// URL (`auth_url` op).
#[derive(Debug)]
struct CollectAuthUrls(mpsc::Sender<String>);

impl AuthUrlHandler for CollectAuthUrls {
    fn on_auth_url(&self, auth_url: Url) -> BoxedFuture<'_, nostr_connect::prelude::Result<()>> {
        let sent = self.0.send(auth_url.to_string());
        Box::pin(async move { sent.map_err(|e| e.into()) })
    }
}

impl Default for RustApp {
    fn default() -> Self {
        let (auth_url_sender, auth_urls) = mpsc::channel();
        RustApp {
            runtime: tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap(),
            client: None,
            pending: None,
            pending_sign: None,
            auth_urls,
            auth_url_sender,
        }
    }
}

impl App for RustApp {
    fn name(&self) -> &'static str {
        "rust-nostr nostr-connect"
    }
    fn has_session_methods(&self) -> bool {
        false
    }
    fn call(&mut self, cmd: Value) -> Value {
        let started = Instant::now();
        let mut reply = match self.run(&cmd) {
            Ok(Value::Object(fields)) => {
                let mut reply = json!({"ok": true});
                reply.as_object_mut().unwrap().extend(fields);
                reply
            }
            Ok(other) => json!({"ok": true, "result": other}),
            Err(error) => json!({"ok": false, "error": error}),
        };
        reply["ms"] = json!(started.elapsed().as_secs_f64() * 1000.0);
        reply
    }
}

/// Signs `template` (`{kind, content, tags, created_at}`) through the bunker.
async fn sign_event(signer: NostrConnect, template: Value) -> Result<Event, String> {
    let pubkey = signer.get_public_key().await.map_err(|e| e.to_string())?;
    let kind = Kind::from(template["kind"].as_u64().unwrap_or(1) as u16);
    let mut builder = EventBuilder::new(kind, template["content"].as_str().unwrap_or_default());
    for tag in template["tags"].as_array().into_iter().flatten() {
        let parts: Vec<String> = serde_json::from_value(tag.clone()).map_err(|e| e.to_string())?;
        builder = builder.tag(Tag::parse(parts).map_err(|e| e.to_string())?);
    }
    if let Some(at) = template["created_at"].as_u64() {
        builder = builder.custom_created_at(Timestamp::from(at));
    }
    signer
        .sign_event(builder.build(pubkey))
        .await
        .map_err(|e| e.to_string())
}

/// The reply to a signed event. The client verified it already
/// (`ResponseResult::to_sign_event`); the nostr crate says so as well.
fn signed(event: Event) -> Result<Value, String> {
    let verified = event.verify().is_ok();
    Ok(json!({"event": event, "verified": verified}))
}

fn text(cmd: &Value, field: &str) -> String {
    cmd[field].as_str().unwrap_or_default().to_owned()
}

fn keys_of(cmd: &Value) -> Keys {
    cmd["client_sk"]
        .as_str()
        .map(|sk| Keys::parse(sk).unwrap())
        .unwrap_or_else(Keys::generate)
}

impl RustApp {
    fn signer(&self) -> Result<&NostrConnect, String> {
        self.client
            .as_ref()
            .ok_or_else(|| "not connected: send connect first".to_owned())
    }

    fn run(&mut self, cmd: &Value) -> Result<Value, String> {
        let op = cmd["op"].as_str().unwrap_or_default();
        let peer = || PublicKey::parse(cmd["peer"].as_str().unwrap_or_default()).map_err(|e| e.to_string());
        match op {
            "connect" => {
                let uri = NostrConnectURI::parse(text(cmd, "bunker")).map_err(|e| e.to_string())?;
                let keys = keys_of(cmd);
                let client_pubkey = keys.public_key();
                let mut client = NostrConnect::new(uri, keys, TIMEOUT, None).map_err(|e| e.to_string())?;
                client.auth_url_handler(CollectAuthUrls(self.auth_url_sender.clone()));
                if let Some(old) = self.client.replace(client) {
                    self.runtime.block_on(old.shutdown());
                }
                // The client sends `connect` on its first request.
                let bunker = self
                    .runtime
                    .block_on(self.signer()?.bunker_uri())
                    .map_err(|e| e.to_string())?;
                let bunker_pubkey = bunker.remote_signer_public_key().map(|pk| pk.to_hex());
                Ok(json!({"client_pubkey": client_pubkey.to_hex(), "bunker_pubkey": bunker_pubkey}))
            }
            "get_public_key" => {
                // A new client each time would be a round trip; NostrConnect caches the key
                // after the first answer, which is what its apps see.
                let pk = self
                    .runtime
                    .block_on(self.signer()?.get_public_key())
                    .map_err(|e| e.to_string())?;
                Ok(json!({"pubkey": pk.to_hex()}))
            }
            "sign_event" => {
                let signing = sign_event(self.signer()?.clone(), cmd["event"].clone());
                signed(self.runtime.block_on(signing)?)
            }
            "start_sign_event" => {
                let signing = sign_event(self.signer()?.clone(), cmd["event"].clone());
                self.pending_sign = Some(self.runtime.spawn(signing));
                Ok(json!({}))
            }
            "auth_url" => {
                let wait = Duration::from_millis(cmd["timeout_ms"].as_u64().unwrap_or(5000));
                let url = self.auth_urls.recv_timeout(wait).map_err(|_| "timeout".to_owned())?;
                Ok(json!({ "url": url }))
            }
            "finish_sign_event" => {
                let pending = self.pending_sign.take().ok_or("no sign_event pending")?;
                signed(self.runtime.block_on(pending).map_err(|e| e.to_string())??)
            }
            "nip44_encrypt" | "nip44_decrypt" | "nip04_encrypt" | "nip04_decrypt" => {
                let (signer, peer, text) = (self.signer()?, peer()?, text(cmd, "text"));
                let result = self.runtime.block_on(async {
                    match op {
                        "nip44_encrypt" => signer.nip44_encrypt(&peer, &text).await,
                        "nip44_decrypt" => signer.nip44_decrypt(&peer, &text).await,
                        "nip04_encrypt" => signer.nip04_encrypt(&peer, &text).await,
                        _ => signer.nip04_decrypt(&peer, &text).await,
                    }
                });
                result.map(|r| json!({ "result": r })).map_err(|e| e.to_string())
            }
            "nostrconnect" => {
                // nostr-connect 0.44 writes the URI of its time: `metadata=<JSON>` and no
                // secret, and takes an `"ack"` as the signer's answer.
                let keys = keys_of(cmd);
                let relays: Vec<String> = serde_json::from_value(cmd["relays"].clone()).unwrap_or_default();
                let uri = NostrConnectURI::Client {
                    public_key: keys.public_key(),
                    relays: relays.iter().filter_map(|r| RelayUrl::parse(r).ok()).collect(),
                    metadata: NostrConnectMetadata::new("keycast-tests"),
                };
                let client = NostrConnect::new(uri.clone(), keys.clone(), Duration::from_secs(30), None)
                    .map_err(|e| e.to_string())?;
                self.pending = Some(self.runtime.spawn(async move {
                    let pk = client.get_public_key().await.map_err(|e| e.to_string())?;
                    Ok((client, pk))
                }));
                Ok(json!({"uri": uri.to_string(), "client_pubkey": keys.public_key().to_hex()}))
            }
            "nostrconnect_wait" => {
                let pending = self.pending.take().ok_or("no nostrconnect in progress")?;
                let (client, user) = self.runtime.block_on(pending).map_err(|e| e.to_string())??;
                let bunker = self.runtime.block_on(client.bunker_uri()).map_err(|e| e.to_string())?;
                let bunker_pubkey = bunker.remote_signer_public_key().map(|pk| pk.to_hex());
                self.client = Some(client);
                Ok(json!({"bunker_pubkey": bunker_pubkey, "user_pubkey": user.to_hex()}))
            }
            "ping" | "switch_relays" | "logout" | "raw" => Err("unsupported".into()),
            "close" => {
                if let Some(client) = self.client.take() {
                    self.runtime.block_on(client.shutdown());
                }
                Ok(json!({}))
            }
            other => Err(format!("unknown op: {other}")),
        }
    }
}

impl Drop for RustApp {
    fn drop(&mut self) {
        if let Some(client) = self.client.take() {
            self.runtime.block_on(client.shutdown());
        }
    }
}
