//! NIP-46 round trip for `sign_event`: client → relay → keycast → relay → client, measured by
//! a client with native crypto (the `nostr` crate), so the figure is the relays' and
//! keycast's time, not a JavaScript client's.
//!
//! In the same run, through the same relay, the **relay echo** is measured: an event a
//! second connection publishes and the client receives through its subscription (a relay
//! hop; relays do not send a connection its own events back).
//! A NIP-46 round trip is two such hops plus keycast's work, so `round trip ÷ (2 × echo)`
//! shows how much keycast adds on top of the relay.
//!
//! Requests are sequential (one in flight), as an app signing interactively sends them.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args as ClapArgs;
use nostr::nips::nip44;
use nostr::{Event, EventBuilder, Filter, Keys, Kind, PublicKey, RelayUrl, Tag, Timestamp};
use nostr_sdk::pool::{RelayOptions, RelayPool, RelayPoolNotification};
use nostr_sdk::{ClientMessage, RelayMessage, SubscribeOptions};
use serde_json::{json, Value};
use tokio::sync::broadcast;

use crate::stats::summary_ms;
use crate::{emit, note};

#[derive(ClapArgs)]
pub struct Args {
    /// The `bunker://` URL to sign through (from an OAuth flow).
    #[arg(long)]
    bunker: String,
    /// Measured requests of each kind.
    #[arg(long, default_value_t = 500)]
    n: usize,
    /// Unmeasured requests first.
    #[arg(long, default_value_t = 50)]
    warmup: usize,
}

const WAIT: Duration = Duration::from_secs(10);

pub async fn run(args: Args) -> anyhow::Result<()> {
    let (bunker, relay, secret) = parse_bunker(&args.bunker)?;
    let client = Keys::generate();
    let pool = RelayPool::new();
    pool.add_relay(relay.clone(), RelayOptions::new()).await?;
    pool.connect().await;
    pool.wait_for_connection(WAIT).await;
    let echo_pool = RelayPool::new();
    echo_pool.add_relay(relay.clone(), RelayOptions::new()).await?;
    echo_pool.connect().await;
    echo_pool.wait_for_connection(WAIT).await;
    let mut messages = pool.notifications();
    let filter = Filter::new()
        .kind(Kind::NostrConnect)
        .pubkey(client.public_key())
        .since(Timestamp::now() - 10);
    pool.subscribe(filter, SubscribeOptions::default()).await?;
    tokio::time::sleep(Duration::from_millis(200)).await;

    let session = Session {
        pool: &pool,
        echo_pool: &echo_pool,
        relay: &relay,
        client: &client,
        bunker,
        next_id: std::cell::Cell::new(0),
    };
    let connected = session
        .call(&mut messages, "connect", json!([bunker.to_hex(), secret]))
        .await?;
    if connected.1 != "ack" {
        bail!("connect was refused: {}", connected.1);
    }
    note!(
        "connected to {bunker} on {relay}; {} warm-up + {} measured",
        args.warmup,
        args.n
    );

    let mut round_trips = Vec::with_capacity(args.n);
    let mut echoes = Vec::with_capacity(args.n);
    for i in 0..args.warmup + args.n {
        let template =
            json!({"kind": 1, "content": format!("bench {i}"), "tags": [], "created_at": Timestamp::now().as_secs()});
        let (ms, result) = session
            .call(&mut messages, "sign_event", json!([template.to_string()]))
            .await?;
        let event: Event = serde_json::from_str(&result).context("sign_event result")?;
        event.verify().context("the signed event verifies")?;
        let echo = session.echo(&mut messages).await?;
        if i >= args.warmup {
            round_trips.push(ms);
            echoes.push(echo);
        }
    }
    pool.shutdown().await;
    echo_pool.shutdown().await;
    let rt = summary_ms(&round_trips);
    let echo = summary_ms(&echoes);
    let ratio = match (rt["p50"].as_f64(), echo["p50"].as_f64()) {
        (Some(a), Some(b)) if b > 0.0 => Some(((a / (2.0 * b)) * 100.0).round() / 100.0),
        _ => None,
    };
    emit(&json!({
        "bench": "nip46",
        "relay": relay.to_string(),
        "sign_event_round_trip_ms": rt,
        "relay_echo_ms": echo,
        "p50_ratio_to_two_relay_hops": ratio,
    }));
    Ok(())
}

struct Session<'a> {
    pool: &'a RelayPool,
    /// A second connection that publishes the echo events.
    echo_pool: &'a RelayPool,
    relay: &'a RelayUrl,
    client: &'a Keys,
    bunker: PublicKey,
    /// Request ids: unique within the session is all NIP-46 asks.
    next_id: std::cell::Cell<u64>,
}

impl Session<'_> {
    /// Sends one request and waits for its reply: (milliseconds, result). A reply with an
    /// error fails the benchmark.
    async fn call(
        &self,
        messages: &mut broadcast::Receiver<RelayPoolNotification>,
        method: &str,
        params: Value,
    ) -> anyhow::Result<(f64, String)> {
        let id = self.next_id.get().to_string();
        self.next_id.set(self.next_id.get() + 1);
        let body = json!({"id": id, "method": method, "params": params}).to_string();
        let content = nip44::encrypt(self.client.secret_key(), &self.bunker, body, nip44::Version::V2)?;
        let request = EventBuilder::new(Kind::NostrConnect, content)
            .tag(Tag::public_key(self.bunker))
            .sign_with_keys(self.client)?;
        let started = Instant::now();
        self.pool
            .send_msg_to([self.relay.clone()], ClientMessage::event(request))
            .await?;
        let deadline = started + WAIT;
        loop {
            let event = next_event(messages, deadline).await?;
            if event.pubkey != self.bunker {
                continue;
            }
            let Ok(text) = nip44::decrypt(self.client.secret_key(), &self.bunker, &event.content) else {
                continue;
            };
            let reply: Value = serde_json::from_str(&text)?;
            if reply["id"] != id.as_str() {
                continue;
            }
            let ms = started.elapsed().as_secs_f64() * 1000.0;
            if let Some(error) = reply["error"].as_str().filter(|e| !e.is_empty()) {
                bail!("{method} was refused: {error}");
            }
            return Ok((ms, reply["result"].as_str().unwrap_or_default().to_owned()));
        }
    }

    /// One relay hop: the second connection publishes an event addressed to the client,
    /// which waits for it.
    async fn echo(&self, messages: &mut broadcast::Receiver<RelayPoolNotification>) -> anyhow::Result<f64> {
        let sender = Keys::generate();
        let content = nip44::encrypt(
            sender.secret_key(),
            &self.client.public_key(),
            "echo",
            nip44::Version::V2,
        )?;
        let event = EventBuilder::new(Kind::NostrConnect, content)
            .tag(Tag::public_key(self.client.public_key()))
            .sign_with_keys(&sender)?;
        let id = event.id;
        let started = Instant::now();
        self.echo_pool
            .send_msg_to([self.relay.clone()], ClientMessage::event(event))
            .await?;
        let deadline = started + WAIT;
        loop {
            if next_event(messages, deadline).await?.id == id {
                return Ok(started.elapsed().as_secs_f64() * 1000.0);
            }
        }
    }
}

/// The next event any relay sends on a subscription (every copy, including our own).
async fn next_event(
    messages: &mut broadcast::Receiver<RelayPoolNotification>,
    deadline: Instant,
) -> anyhow::Result<Event> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let message = tokio::time::timeout(left, messages.recv())
            .await
            .context("no reply within 10 s")??;
        if let RelayPoolNotification::Message {
            message: RelayMessage::Event { event, .. },
            ..
        } = message
        {
            return Ok(event.into_owned());
        }
    }
}

/// `bunker://<pubkey>?relay=…&secret=…` → (bunker, first relay, secret).
fn parse_bunker(url: &str) -> anyhow::Result<(PublicKey, RelayUrl, String)> {
    let rest = url.strip_prefix("bunker://").context("not a bunker:// URL")?;
    let (key, query) = rest.split_once('?').context("the bunker URL has no relay")?;
    let bunker = PublicKey::from_hex(key)?;
    let (mut relay, mut secret) = (None, String::new());
    for (k, v) in url::form_urlencoded::parse(query.as_bytes()) {
        match k.as_ref() {
            "relay" if relay.is_none() => relay = Some(RelayUrl::parse(&v)?),
            "secret" => secret = v.into_owned(),
            _ => {}
        }
    }
    Ok((bunker, relay.context("the bunker URL has no relay")?, secret))
}
