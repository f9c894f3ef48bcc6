//! keycast's NIP-46 transport: the remote signer over relays.
//!
//! - [`service`]: the relay pool, subscriptions on each relay, dispatch with a bounded number
//!   of requests in flight.
//! - [`roster`]: which bunkers are served on which relay, under the cap on relays named by
//!   apps, and which client each has bound.
//! - [`subscriptions`]: a relay's bunkers spread over subscriptions of 500, each bunker
//!   keeping its place, so no relay's cap on a message's size is reached.
//! - [`throttle`]: token buckets for strangers' requests and for what app relays send.
//! - [`dedup`]: a request seen before is not answered again.
//! - [`handler`]: what each method means; signing goes through
//!   [`keycast_core::Signer::execute`], the path HTTP RPC uses too.
//! - [`reconnect`]: bringing dropped relays back, with a backoff that resets.
//! - [`keepalive`]: pinging each relay, so a connection that went silent is dropped (and
//!   brought back) within seconds.
//! - [`transport`]: how relay connections are opened: the host resolved and judged by
//!   keycast at every connect, and only the judged addresses dialled.
//! - [`wire`]: kind 24133 envelopes, NIP-44 (and NIP-04) on the wire.
//! - [`embedded`]: the loopback relay used when no relays are configured.
//! - [`frames`]: the embedded relay's bound on what one client may send it.
//!
//! `nostrconnect://` authorizations are created in core
//! ([`keycast_core::Signer::accept_nostrconnect`]); this crate answers the client.

pub mod dedup;
pub mod embedded;
pub mod frames;
pub mod handler;
pub mod keepalive;
pub mod reconnect;
pub mod roster;
pub mod service;
pub mod subscriptions;
pub mod throttle;
pub mod transport;
pub mod wire;

pub use embedded::{EmbeddedRelay, RelayLimits};
pub use service::{Nip46Options, Nip46Service, SeenRequests, StartError, DEDUP_WINDOW};
