//! keycast's HTTP accept loop: axum's router served by hyper with a **header-read timeout**
//! (issue 12, item 10). `axum::serve` gives hyper no timer, and without one hyper never
//! times out a client that sends its request headers a byte at a time (slowloris): each
//! such connection would hold a socket and a task for as long as the client likes.
//!
//! Each connection gets `ConnectInfo<SocketAddr>` (what `into_make_service_with_connect_info`
//! gave), `TCP_NODELAY`, and is watched for graceful shutdown: when `shutdown` completes,
//! the listener closes, idle keep-alive connections close, and [`serve`] returns once the
//! in-flight requests have finished.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tower::ServiceExt;

/// Default time a client has to send a request's headers, seconds.
pub const DEFAULT_HEADER_READ_TIMEOUT_SECS: u64 = 10;

/// Serves `router` on `listener` until `shutdown` completes, then drains.
///
/// # Errors
/// None today (accept errors are logged and retried); the `Result` keeps the shape of
/// `axum::serve`.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    header_read_timeout: Duration,
    shutdown: impl Future<Output = ()> + Send,
) -> std::io::Result<()> {
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout);
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
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
                let connection = builder
                    .serve_connection_with_upgrades(TokioIo::new(stream), TowerToHyperService::new(service))
                    .into_owned();
                let connection = graceful.watch(connection);
                tokio::spawn(async move {
                    if let Err(err) = connection.await {
                        tracing::trace!(error = %err, "connection ended with an error");
                    }
                });
            }
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}
