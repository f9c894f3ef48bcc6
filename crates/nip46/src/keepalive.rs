//! Noticing a relay connection that went silent.
//!
//! A connection can die without a word: a NAT that forgot an idle connection, a relay host
//! that vanished, a proxy whose backend is gone. Nothing keycast does on it then fails, so
//! nothing tells it; it just never hears another request. nostr-sdk pings every 55 s and
//! gives up only at the next ping, so NIP-46 could go unanswered for up to two minutes.
//!
//! Each connection is therefore run by a task of its own that pings the relay
//! [`PING_EVERY`] after its last answer (a payload nostr-sdk's pongs cannot have, and which
//! never reach it) and ends the connection with an error when a ping goes unanswered for
//! [`PONG_WITHIN`]; the relay pool then sees it drop, and `crate::reconnect` brings it
//! back: within 20 s of the silence.

use std::time::Duration;

use async_wsocket::futures_util::{SinkExt, StreamExt};
use async_wsocket::{Message, WebSocket};
use futures::channel::mpsc;
use nostr_sdk::pool::transport::error::TransportError;
use tokio::time::Instant;

/// How often keycast pings each relay.
pub const PING_EVERY: Duration = Duration::from_secs(10);
/// How long a ping may go unanswered before the connection is taken for dead.
pub const PONG_WITHIN: Duration = Duration::from_secs(10);
/// The payload of keycast's pings. nostr-sdk's are 8 bytes, so a pong of this length is
/// ours and is kept from nostr-sdk, which would take it for a wrong answer to its own.
const MARK: &[u8] = b"keycast-keepalive";
/// Messages queued each way between the pool and the connection's task.
const QUEUE: usize = 64;

/// Why a connection was ended.
#[derive(Debug, thiserror::Error)]
#[error("the relay did not answer a ping within {0:?}: taking the connection for dead")]
pub struct Silent(Duration);

/// Runs `socket` on a task of its own, pinging as described in the module documentation.
/// Returns what the relay pool writes to and reads from.
pub fn watch(
    socket: WebSocket,
    every: Duration,
    within: Duration,
) -> (mpsc::Sender<Message>, mpsc::Receiver<Result<Message, TransportError>>) {
    let (to_relay, outgoing) = mpsc::channel(QUEUE);
    let (incoming, from_relay) = mpsc::channel(QUEUE);
    tokio::spawn(run(socket, outgoing, incoming, every, within));
    (to_relay, from_relay)
}

async fn run(
    socket: WebSocket,
    mut outgoing: mpsc::Receiver<Message>,
    mut incoming: mpsc::Sender<Result<Message, TransportError>>,
    every: Duration,
    within: Duration,
) {
    let (mut sink, mut stream) = socket.split();
    let (ping, mut pings) = mpsc::channel::<()>(1);
    // Writes what the pool sends, and the pings; ends when the pool lets go of its half or
    // the relay cannot be written to.
    let writer = async move {
        loop {
            let message = tokio::select! {
                message = outgoing.next() => match message {
                    Some(message) => message,
                    None => {
                        let _ = sink.close().await;
                        return;
                    }
                },
                Some(()) = pings.next() => Message::Ping(MARK.to_vec()),
            };
            if sink.send(message).await.is_err() {
                return;
            }
        }
    };
    // Hands the pool what the relay sends (keycast's own pongs aside) and asks for a ping
    // `every` after the last answer; ends with an error once one goes unanswered for
    // `within`. A silent connection is therefore noticed within `every + within`.
    let reader = async move {
        let mut next_ping = Instant::now() + every;
        let mut answer_by: Option<Instant> = None;
        let mut ping = ping;
        loop {
            tokio::select! {
                // What has arrived is read before a ping is judged late.
                biased;
                frame = stream.next() => match frame {
                    Some(Ok(Message::Pong(payload))) if payload == MARK => {
                        answer_by = None;
                        next_ping = Instant::now() + every;
                    }
                    Some(Ok(message)) => {
                        if incoming.send(Ok(message)).await.is_err() {
                            return;
                        }
                    }
                    Some(Err(e)) => {
                        let _ = incoming.send(Err(TransportError::backend(e))).await;
                        return;
                    }
                    None => return,
                },
                () = tokio::time::sleep_until(answer_by.unwrap_or(next_ping)) => {
                    if answer_by.is_some() {
                        metrics::counter!("keycast_nip46_relay_silent_total").increment(1);
                        tracing::warn!(within_ms = within.as_millis() as u64, "nip46: a relay did not answer a ping; reconnecting");
                        let _ = incoming.send(Err(TransportError::backend(Silent(within)))).await;
                        return;
                    }
                    answer_by = Some(Instant::now() + within);
                    let _ = ping.try_send(());
                }
            }
        }
    };
    // Either half ending ends the connection: dropping the other closes the socket.
    tokio::select! {
        () = writer => {}
        () = reader => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;
    use tokio_tungstenite::tungstenite::Message as Frame;

    /// A WebSocket server on loopback that answers pings (tungstenite does by itself) while
    /// `answer` is set, and otherwise reads nothing at all.
    async fn server(answer: bool) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("ws://{}", listener.local_addr().unwrap());
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut ws = tokio_tungstenite::accept_async(tcp).await.unwrap();
            ws.send(Frame::text("hello")).await.unwrap();
            if answer {
                while let Some(Ok(_)) = ws.next().await {}
            } else {
                std::future::pending::<()>().await;
            }
        });
        url
    }

    async fn connect(url: &str) -> WebSocket {
        let url = url::Url::parse(url).unwrap();
        let (ws, _) = tokio_tungstenite::connect_async(url.as_str()).await.unwrap();
        WebSocket::Tokio(ws)
    }

    #[tokio::test]
    async fn a_relay_that_answers_pings_is_kept_and_its_pongs_stay_ours() {
        let ws = connect(&server(true).await).await;
        let (_to, mut from) = watch(ws, Duration::from_millis(50), Duration::from_millis(200));
        let first = from.next().await.unwrap().unwrap();
        assert_eq!(first, Message::Text("hello".into()));
        // Ten pings answered: nothing reaches the pool, and the connection stays.
        let quiet = tokio::time::timeout(Duration::from_millis(600), from.next()).await;
        assert!(quiet.is_err(), "the pool got {quiet:?}");
    }

    #[tokio::test]
    async fn a_relay_that_stops_answering_is_given_up_with_an_error() {
        let ws = connect(&server(false).await).await;
        let (_to, mut from) = watch(ws, Duration::from_millis(50), Duration::from_millis(200));
        assert_eq!(from.next().await.unwrap().unwrap(), Message::Text("hello".into()));
        let ended = tokio::time::timeout(Duration::from_secs(5), from.next())
            .await
            .expect("the silent connection was noticed");
        let err = ended.expect("an error, not a quiet end").unwrap_err();
        assert!(err.to_string().contains("did not answer a ping"), "{err}");
        assert!(from.next().await.is_none(), "and then the stream ends");
    }
}
