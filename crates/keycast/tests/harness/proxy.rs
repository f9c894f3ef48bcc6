//! A small HTTP/1.1 proxy in front of a real object store that drops chosen request
//! headers: a store that ignores conditional writes (`If-None-Match`, `If-Match`), made
//! from one that honours them. One request per connection (it answers with the upstream's
//! `Connection: close`), which every HTTP client handles by reconnecting.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::time::Duration;

/// A running proxy; it serves until the test process ends.
pub struct HeaderStrippingProxy {
    /// `http://127.0.0.1:PORT`
    pub url: String,
}

impl HeaderStrippingProxy {
    /// Proxies to `upstream` (`http://host:port`), dropping the request headers named in
    /// `strip` (case-insensitive).
    pub fn start(upstream: &str, strip: &[&str]) -> HeaderStrippingProxy {
        HeaderStrippingProxy::start_when(upstream, strip, "")
    }

    /// As [`HeaderStrippingProxy::start`], only on requests whose request line contains
    /// `request_line` (e.g. `uploadId=`: the completion of a multipart upload).
    pub fn start_when(upstream: &str, strip: &[&str], request_line: &str) -> HeaderStrippingProxy {
        let upstream = upstream.trim_start_matches("http://").trim_end_matches('/').to_string();
        let strip: Vec<String> = strip.iter().map(|h| h.to_ascii_lowercase()).collect();
        let request_line = request_line.to_owned();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        std::thread::spawn(move || {
            for client in listener.incoming().map_while(Result::ok) {
                let (upstream, strip, request_line) = (upstream.clone(), strip.clone(), request_line.clone());
                std::thread::spawn(move || {
                    let _ = relay(client, &upstream, &strip, &request_line);
                });
            }
        });
        HeaderStrippingProxy { url }
    }
}

/// Forwards one request from `client` (minus the `strip` headers) and the whole response
/// back.
fn relay(mut client: TcpStream, upstream: &str, strip: &[String], request_line: &str) -> std::io::Result<()> {
    client.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut reader = BufReader::new(client.try_clone()?);
    let mut head = String::new();
    let mut content_length = 0usize;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(()); // the client closed an idle connection
        }
        if line == "\r\n" {
            break;
        }
        let name = line.split(':').next().unwrap_or("").trim().to_ascii_lowercase();
        if name == "content-length" {
            content_length = line.split(':').nth(1).unwrap_or("0").trim().parse().unwrap_or(0);
        }
        let stripping = head.lines().next().is_some_and(|first| first.contains(request_line));
        if (stripping && strip.contains(&name)) || name == "connection" {
            continue;
        }
        head.push_str(&line);
    }
    let mut body = vec![0u8; content_length];
    reader.read_exact(&mut body)?;
    let mut server = TcpStream::connect(upstream)?;
    server.set_read_timeout(Some(Duration::from_secs(30)))?;
    server.write_all(head.as_bytes())?;
    server.write_all(b"Connection: close\r\n\r\n")?;
    server.write_all(&body)?;
    let mut response = Vec::new();
    server.read_to_end(&mut response)?;
    client.write_all(&response)?;
    client.shutdown(Shutdown::Both)
}
