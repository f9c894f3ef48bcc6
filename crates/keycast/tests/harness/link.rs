//! TCP links that can go silent: once told to, a connection carries no more bytes either
//! way and sends no close and no reset, as when a NAT forgets an idle connection or a
//! partition falls between two hosts. Nothing written to it ever fails; only a peer that
//! expects an answer can tell.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Longest a read blocks before the silence flag is looked at again.
const POLL: Duration = Duration::from_millis(50);

/// Copies `from` to `to` until either closes (then closes both), or forever without
/// copying once `silenced` is set.
pub fn copy_until_silenced(mut from: TcpStream, mut to: TcpStream, silenced: &AtomicBool) {
    from.set_read_timeout(Some(POLL)).unwrap();
    let mut buf = [0u8; 16 * 1024];
    loop {
        if silenced.load(Ordering::SeqCst) {
            std::thread::sleep(POLL);
            continue;
        }
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(_) => break,
        }
    }
    let _ = to.shutdown(Shutdown::Both);
    let _ = from.shutdown(Shutdown::Both);
}

/// Both directions of one connection, as [`copy_until_silenced`].
pub fn pipe_until_silenced(client: TcpStream, server: TcpStream, silenced: Arc<AtomicBool>) {
    let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
    let quiet = silenced.clone();
    let up = std::thread::spawn(move || copy_until_silenced(client, server, &quiet));
    copy_until_silenced(s2, c2, &silenced);
    let _ = up.join();
}

/// Sets `flags` and waits until no read that began before can still carry bytes across.
pub fn silence(flags: &[Arc<AtomicBool>]) {
    for flag in flags {
        flag.store(true, Ordering::SeqCst);
    }
    std::thread::sleep(POLL * 4);
}

/// A loopback TCP relay to one upstream address, all of whose connections go silent at
/// once ([`SilentLink::freeze`]), new ones included; or only those made so far
/// ([`SilentLink::forget`], as a NAT or proxy that lost its state).
pub struct SilentLink {
    pub port: u16,
    frozen: Arc<AtomicBool>,
    connections: Arc<Mutex<Vec<Arc<AtomicBool>>>>,
}

impl SilentLink {
    /// Relays `127.0.0.1:PORT` to `upstream` (`host:port`).
    pub fn start(upstream: String) -> SilentLink {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let frozen = Arc::new(AtomicBool::new(false));
        let connections = Arc::new(Mutex::new(Vec::new()));
        let (link, registry) = (frozen.clone(), connections.clone());
        std::thread::spawn(move || {
            for client in listener.incoming().map_while(Result::ok) {
                let Ok(server) = TcpStream::connect(&upstream) else {
                    continue;
                };
                // Read and registered under the lock, so a freeze cannot fall between.
                let silenced = {
                    let mut all = registry.lock().unwrap();
                    all.push(Arc::new(AtomicBool::new(link.load(Ordering::SeqCst))));
                    all[all.len() - 1].clone()
                };
                std::thread::spawn(move || pipe_until_silenced(client, server, silenced));
            }
        });
        SilentLink {
            port,
            frozen,
            connections,
        }
    }

    /// Every connection, and every one made from now on, goes silent.
    pub fn freeze(&self) {
        self.frozen.store(true, Ordering::SeqCst);
        self.forget();
    }

    /// Every connection made so far goes silent; new ones carry bytes.
    pub fn forget(&self) {
        let connections = self.connections.lock().unwrap().clone();
        silence(&connections);
    }
}
