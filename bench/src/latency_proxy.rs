//! A TCP proxy that adds a fixed delay to every HTTP request: in front of a local S3 server
//! (moto) it makes loopback look like a cloud store, one round trip per request.
//!
//! Requests on one connection are sequential (HTTP/1.1 without pipelining, as object_store
//! sends them), so a new request is the first bytes from the client after the server has
//! answered: those are held for the delay before they are forwarded. Bytes of a request that
//! arrive in several pieces (a body after its headers) are not delayed again.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Starts the proxy on an ephemeral loopback port; it serves until the process ends.
/// Returns its address.
pub async fn start(upstream: SocketAddr, delay: Duration) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            tokio::spawn(async move {
                if let Ok(server) = TcpStream::connect(upstream).await {
                    let _ = serve(client, server, delay).await;
                }
            });
        }
    });
    Ok(addr)
}

async fn serve(client: TcpStream, server: TcpStream, delay: Duration) -> std::io::Result<()> {
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    // Set when the server has sent anything since the client's last bytes: the client's
    // next bytes start a new request.
    let answered = Arc::new(AtomicBool::new(true));
    let requests = {
        let answered = answered.clone();
        async move {
            let mut buf = vec![0u8; 64 << 10];
            loop {
                let n = client_read.read(&mut buf).await?;
                if n == 0 {
                    return server_write.shutdown().await;
                }
                if answered.swap(false, Ordering::SeqCst) {
                    tokio::time::sleep(delay).await;
                }
                server_write.write_all(&buf[..n]).await?;
            }
        }
    };
    let answers = async move {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = server_read.read(&mut buf).await?;
            if n == 0 {
                return client_write.shutdown().await;
            }
            answered.store(true, Ordering::SeqCst);
            client_write.write_all(&buf[..n]).await?;
        }
    };
    let (a, b): (std::io::Result<()>, std::io::Result<()>) = tokio::join!(requests, answers);
    a.and(b)
}
