//! A relay the test scripts: a WebSocket server on loopback that speaks just enough NIP-01
//! to be one of keycast's relays, and records what keycast tells it — every connection, every
//! `REQ` (so a test sees which bunkers a relay learns about), every event keycast publishes.
//! On demand it turns hostile and pushes a stream of events at every subscription, as fast
//! as keycast reads them (issue 12 item 6).
//!
//! It does not forward events between clients: where a test needs a working relay it uses
//! a real one ([`super::nostr::Relay`]).

use std::collections::BTreeSet;
use std::io::ErrorKind;
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tungstenite::{Message, WebSocket};

/// What the relay has seen so far.
#[derive(Debug, Default, Clone)]
pub struct RelayLog {
    /// WebSocket connections accepted.
    pub connections: usize,
    /// The filters of every `REQ`, in arrival order.
    pub reqs: Vec<Vec<Value>>,
    /// Every event published to the relay (`["EVENT", event]`).
    pub events: Vec<Value>,
}

#[derive(Default)]
struct Shared {
    log: Mutex<RelayLog>,
    stop: AtomicBool,
    /// Events (JSON text) to push at subscribers once [`ScriptedRelay::flood`] is called.
    flood: Mutex<Option<Arc<Vec<String>>>>,
    /// The next event of the flood to push (shared by every connection).
    next: AtomicUsize,
    /// `REQ`s still to be answered with `CLOSED` instead of `EOSE` (a relay restarting its
    /// subscriptions, or refusing one over a limit).
    close_next: AtomicUsize,
    /// `REQ`s still to be refused with this `NOTICE` (nostr-rs-relay's way: no `CLOSED`).
    notice_next: Mutex<(usize, String)>,
}

/// A scripted relay on `ws://127.0.0.1:PORT`. Stops accepting when dropped.
pub struct ScriptedRelay {
    port: u16,
    shared: Arc<Shared>,
}

impl ScriptedRelay {
    /// Starts a relay that records and answers `EOSE` to a `REQ` and `OK` to an `EVENT`.
    pub fn start() -> ScriptedRelay {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let shared: Arc<Shared> = Arc::default();
        let accepting = shared.clone();
        std::thread::spawn(move || {
            while !accepting.stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let shared = accepting.clone();
                        std::thread::spawn(move || serve(stream, &shared));
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(10)),
                    Err(_) => return,
                }
            }
        });
        ScriptedRelay { port, shared }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `ws://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("ws://127.0.0.1:{}", self.port)
    }

    pub fn log(&self) -> RelayLog {
        self.shared.log.lock().unwrap().clone()
    }

    pub fn connections(&self) -> usize {
        self.shared.log.lock().unwrap().connections
    }

    /// Every `#p` value of every `REQ` so far: the bunkers this relay learnt about.
    pub fn requested_pubkeys(&self) -> BTreeSet<String> {
        pubkeys(self.shared.log.lock().unwrap().reqs.iter().flatten())
            .into_iter()
            .collect()
    }

    /// The `#p` values of the last `REQ`: the bunkers keycast listens for here now.
    pub fn last_requested_pubkeys(&self) -> Vec<String> {
        pubkeys(self.shared.log.lock().unwrap().reqs.last().into_iter().flatten())
    }

    /// From now on, pushes `events` (event JSON texts), each once, at every subscription
    /// of every connection, as fast as the connection takes them.
    pub fn flood(&self, events: Vec<String>) {
        *self.shared.flood.lock().unwrap() = Some(Arc::new(events));
    }

    /// Answers the next `n` subscriptions with `CLOSED` (as a relay that dropped them).
    pub fn close_next_subscriptions(&self, n: usize) {
        self.shared.close_next.store(n, Ordering::SeqCst);
    }

    /// Refuses the next `n` subscriptions with a `NOTICE` saying `text`, as nostr-rs-relay
    /// refuses a message too large or a subscription past its cap.
    pub fn notice_next_subscriptions(&self, n: usize, text: &str) {
        *self.shared.notice_next.lock().unwrap() = (n, text.to_owned());
    }

    /// How many events of the flood were written to a connection so far.
    pub fn flooded(&self) -> usize {
        let total = self.shared.flood.lock().unwrap().as_ref().map_or(0, |f| f.len());
        self.shared.next.load(Ordering::Relaxed).min(total)
    }
}

/// The `#p` values of `filters`.
fn pubkeys<'a>(filters: impl Iterator<Item = &'a Value>) -> Vec<String> {
    filters
        .filter_map(|filter| filter["#p"].as_array())
        .flatten()
        .filter_map(|p| p.as_str().map(str::to_owned))
        .collect()
}

impl Drop for ScriptedRelay {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
    }
}

/// One connection: answers and records what comes in; while a flood is on and the peer has
/// subscribed, writes flood events in batches between short reads.
fn serve(stream: TcpStream, shared: &Shared) {
    stream.set_nonblocking(false).unwrap();
    let Ok(mut ws) = tungstenite::accept(stream) else {
        return;
    };
    shared.log.lock().unwrap().connections += 1;
    let mut subscription: Option<String> = None;
    while !shared.stop.load(Ordering::Relaxed) {
        let flood = shared.flood.lock().unwrap().clone();
        let flooding = flood.is_some() && subscription.is_some();
        let wait = if flooding { 1 } else { 50 };
        ws.get_mut()
            .set_read_timeout(Some(Duration::from_millis(wait)))
            .unwrap();
        match ws.read() {
            Ok(Message::Text(text)) => {
                if let Some(sub) = answer(&mut ws, text.as_str(), shared) {
                    subscription = Some(sub);
                }
            }
            Ok(Message::Close(_)) => return,
            Ok(_) => {}
            Err(tungstenite::Error::Io(e)) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return,
        }
        if let (Some(events), Some(sub)) = (flood, &subscription) {
            if !push(&mut ws, &events, sub, shared) {
                return;
            }
        }
    }
}

/// Handles one client message; returns the subscription id of a `REQ`.
fn answer(ws: &mut WebSocket<TcpStream>, text: &str, shared: &Shared) -> Option<String> {
    let Ok(Value::Array(message)) = serde_json::from_str::<Value>(text) else {
        return None;
    };
    match message.first().and_then(Value::as_str) {
        Some("REQ") => {
            let sub = message.get(1)?.as_str()?.to_owned();
            shared.log.lock().unwrap().reqs.push(message[2..].to_vec());
            let close = shared
                .close_next
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok();
            if close {
                let _ = ws.send(Message::text(
                    serde_json::json!(["CLOSED", sub, "error: shutting down idle subscriptions"]).to_string(),
                ));
                return None;
            }
            let notice = {
                let mut next = shared.notice_next.lock().unwrap();
                next.0.checked_sub(1).map(|left| {
                    next.0 = left;
                    next.1.clone()
                })
            };
            if let Some(notice) = notice {
                let _ = ws.send(Message::text(serde_json::json!(["NOTICE", notice]).to_string()));
                return None;
            }
            let _ = ws.send(Message::text(serde_json::json!(["EOSE", sub]).to_string()));
            Some(sub)
        }
        Some("EVENT") => {
            let event = message.get(1)?.clone();
            let id = event["id"].as_str().unwrap_or_default().to_owned();
            shared.log.lock().unwrap().events.push(event);
            let _ = ws.send(Message::text(serde_json::json!(["OK", id, true, ""]).to_string()));
            None
        }
        _ => None,
    }
}

/// Writes the next batch of the flood; false once the connection is gone. Queues nothing
/// more while the peer does not read (TCP back pressure), which is what a relay pushing
/// faster than keycast reads looks like.
fn push(ws: &mut WebSocket<TcpStream>, events: &[String], sub: &str, shared: &Shared) -> bool {
    let busy = |e: &tungstenite::Error| matches!(e, tungstenite::Error::Io(io) if matches!(io.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut));
    ws.get_mut()
        .set_write_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    match ws.flush() {
        Err(e) if busy(&e) => return true,
        Err(_) => return false,
        Ok(()) => {}
    }
    for _ in 0..100 {
        let i = shared.next.fetch_add(1, Ordering::Relaxed);
        let Some(event) = events.get(i) else {
            break;
        };
        match ws.write(Message::text(format!(r#"["EVENT","{sub}",{event}]"#))) {
            Ok(()) => {}
            Err(e) if busy(&e) => break,
            Err(_) => return false,
        }
    }
    match ws.flush() {
        Err(e) => busy(&e),
        Ok(()) => true,
    }
}
