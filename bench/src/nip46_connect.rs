//! NIP-46 `sign_event` round trip as rust-nostr's own client sees it: `NostrConnect`
//! (nostr-connect 0.44) signing sequentially through a bunker URL, its `connect` and
//! `get_public_key` done before the measured requests. Beside `nip46` (the bare protocol
//! with native crypto) it shows what an app built on rust-nostr gets.

use std::time::{Duration, Instant};

use clap::Args as ClapArgs;
use nostr_connect::prelude::{EventBuilder, Keys, NostrConnect, NostrConnectURI, NostrSigner};
use serde_json::json;

use crate::emit;
use crate::stats::summary_ms;

#[derive(ClapArgs)]
pub struct Args {
    /// The `bunker://` URL to sign through.
    #[arg(long)]
    bunker: String,
    /// Measured requests.
    #[arg(long, default_value_t = 500)]
    n: usize,
    /// Unmeasured requests first.
    #[arg(long, default_value_t = 20)]
    warmup: usize,
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let uri = NostrConnectURI::parse(&args.bunker)?;
    let client = NostrConnect::new(uri, Keys::generate(), Duration::from_secs(10), None)?;
    let user = client.get_public_key().await?;
    let mut round_trips = Vec::with_capacity(args.n);
    for i in 0..args.warmup + args.n {
        let unsigned = EventBuilder::text_note(format!("bench {i}")).build(user);
        let started = Instant::now();
        let event = client.sign_event(unsigned).await?;
        if i >= args.warmup {
            round_trips.push(started.elapsed().as_secs_f64() * 1000.0);
        }
        anyhow::ensure!(event.pubkey == user, "signed by another key");
    }
    client.shutdown().await;
    emit(&json!({
        "bench": "nip46",
        "client": "rust-nostr",
        "sign_event_round_trip_ms": summary_ms(&round_trips),
    }));
    Ok(())
}
