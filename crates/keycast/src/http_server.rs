//! keycast's HTTP accept loop: axum's router served by hyper with a **header-read timeout**
//! (issue 12, item 10) and a **cap on connections**. `axum::serve` gives hyper no timer, and
//! without one hyper never times out a client that sends its request headers a byte at a time
//! (slowloris): each such connection would hold a socket and a task for as long as the client
//! likes.
//!
//! HTTP/1.1 only, with hyper's own HTTP/1 connection: its header timer runs from the
//! connection's first read, so a client that connects and sends nothing is closed too. (The
//! version-sniffing builder, which would also speak plain-text HTTP/2 once a dependency turns
//! that feature on, waited for the first bytes with no timer at all; and HTTP/2 has no header
//! timeout, while a silent HTTP/2 connection held up every graceful shutdown for the whole
//! drain.) Cloud Run's port is named `http1` (deploy/), so its front end speaks HTTP/1.1.
//!
//! At most `max_connections` are open at once; past that the loop stops accepting (the kernel
//! queues new ones) until one ends, so a flood of connections cannot take the descriptors the
//! database and the relays need.
//!
//! Each connection gets `ConnectInfo<SocketAddr>` (what `into_make_service_with_connect_info`
//! gave), `TCP_NODELAY`, and is watched for graceful shutdown: when `shutdown` completes,
//! the listener closes, idle keep-alive connections close, and [`serve`] returns once the
//! in-flight requests have finished.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ConnectInfo;
use axum::Router;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tower::ServiceExt;

/// Default time a client has to send a request's headers, seconds.
pub const DEFAULT_HEADER_READ_TIMEOUT_SECS: u64 = 10;

/// Default most HTTP connections open at once: Cloud Run sends at most 250 requests at once
/// (`containerConcurrency`, deploy/), and this with the embedded relay's 256 stays well
/// inside the usual 1,024 descriptors.
pub const DEFAULT_MAX_CONNECTIONS: usize = 512;

/// How often reaching the connection cap is logged.
const CAP_LOG_INTERVAL: Duration = Duration::from_secs(60);

/// Serves `router` on `listener` until `shutdown` completes, then drains.
///
/// # Errors
/// None today (accept errors are logged and retried); the `Result` keeps the shape of
/// `axum::serve`.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    header_read_timeout: Duration,
    max_connections: usize,
    shutdown: impl Future<Output = ()> + Send,
) -> std::io::Result<()> {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout);
    let slots = Arc::new(Semaphore::new(max_connections));
    let mut cap_logged: Option<Instant> = None;
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        if slots.available_permits() == 0 {
            metrics::counter!("keycast_http_connection_cap_reached_total").increment(1);
            if cap_logged.is_none_or(|at| at.elapsed() >= CAP_LOG_INTERVAL) {
                cap_logged = Some(Instant::now());
                tracing::warn!(
                    max_connections,
                    "every HTTP connection slot is taken: new connections wait until one ends (KEYCAST_HTTP_MAX_CONNECTIONS)"
                );
            }
        }
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => slot.expect("the semaphore is never closed"),
            () = &mut shutdown => break,
        };
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(accepted) => accepted,
                    Err(err) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        tracing::warn!(error = %err, "accepting a connection failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let service = router.clone().map_request(move |mut request: hyper::Request<Incoming>| {
                    request.extensions_mut().insert(ConnectInfo::<SocketAddr>(peer));
                    request
                });
                let connection =
                    graceful.watch(builder.serve_connection(TokioIo::new(stream), TowerToHyperService::new(service)));
                tokio::spawn(async move {
                    if let Err(err) = connection.await {
                        tracing::trace!(error = %err, "connection ended with an error");
                    }
                    drop(slot);
                });
            }
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}
