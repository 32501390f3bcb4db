//! A small Kafka-protocol proxy in front of librdkafka's mock cluster.
//!
//! The mock answers `ApiVersions` only up to v2, and answers a newer
//! request (Java clients ≥ 3.x send v3/v4) in a malformed mix of formats, so
//! those clients misread it (e.g. as a throttle of several minutes). Kafka's
//! rule (KIP-511) is that a broker answers an unsupported `ApiVersions`
//! version with a v0 response carrying `UNSUPPORTED_VERSION` and its
//! supported range, and the client retries with a version both know. This
//! proxy does exactly that for `ApiVersions` requests newer than v2 and
//! passes every other byte through unchanged, so every Kafka client — not
//! only librdkafka-based ones — can produce to `waymark dev`. The mock
//! advertises the proxy's address in its metadata, so clients never talk to
//! the mock directly.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use tracing::debug;

/// `ApiVersions` API key.
const API_VERSIONS: i16 = 18;
/// Newest `ApiVersions` version the mock answers correctly.
const MOCK_MAX_API_VERSIONS: i16 = 2;
/// Kafka error code `UNSUPPORTED_VERSION`.
const UNSUPPORTED_VERSION: i16 = 35;
/// Largest request frame accepted (the door takes records up to a few MiB).
const MAX_FRAME: usize = 64 * 1024 * 1024;

/// A running proxy; dropping it stops accepting connections.
pub(crate) struct Proxy {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<()>>,
}

impl Proxy {
    /// Listens on an ephemeral loopback port and forwards to `upstream`.
    pub(crate) fn start(upstream: SocketAddr) -> io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let acceptor = std::thread::Builder::new()
            .name("waymark-frontdoor-proxy".into())
            .spawn(move || {
                while !flag.load(Ordering::Acquire) {
                    match listener.accept() {
                        Ok((client, _)) => {
                            if let Err(e) = serve(client, upstream) {
                                debug!(error = %e, "front door connection not proxied");
                            }
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(20));
                        }
                        Err(e) => debug!(error = %e, "front door accept failed"),
                    }
                }
            })?;
        Ok(Self {
            addr,
            stop,
            acceptor: Some(acceptor),
        })
    }

    /// The address clients connect to.
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.acceptor.take() {
            let _ = t.join();
        }
    }
}

/// Starts the two pumps of one client connection.
fn serve(client: TcpStream, upstream: SocketAddr) -> io::Result<()> {
    client.set_nonblocking(false)?;
    client.set_nodelay(true)?;
    let server = TcpStream::connect(upstream)?;
    server.set_nodelay(true)?;
    let to_client = Arc::new(Mutex::new(client.try_clone()?));
    // Responses: mock → client, byte for byte.
    let (mut from_server, writer) = (server.try_clone()?, to_client.clone());
    std::thread::Builder::new()
        .name("waymark-frontdoor-down".into())
        .spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match from_server.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        let Ok(mut c) = writer.lock() else { break };
                        if c.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                }
            }
            if let Ok(c) = writer.lock() {
                let _ = c.shutdown(Shutdown::Both);
            }
        })?;
    // Requests: client → mock, frame by frame.
    let (mut from_client, mut to_server) = (client, server);
    std::thread::Builder::new()
        .name("waymark-frontdoor-up".into())
        .spawn(move || {
            let _ = pump_requests(&mut from_client, &mut to_server, &to_client);
            let _ = to_server.shutdown(Shutdown::Both);
        })?;
    Ok(())
}

fn pump_requests(
    client: &mut TcpStream,
    server: &mut TcpStream,
    to_client: &Mutex<TcpStream>,
) -> io::Result<()> {
    let mut len = [0u8; 4];
    loop {
        client.read_exact(&mut len)?;
        let size = i32::from_be_bytes(len);
        let size = usize::try_from(size)
            .ok()
            .filter(|s| (8..=MAX_FRAME).contains(s))
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "bad kafka frame size"))?;
        let mut frame = vec![0u8; size];
        client.read_exact(&mut frame)?;
        let api_key = i16::from_be_bytes([frame[0], frame[1]]);
        let api_version = i16::from_be_bytes([frame[2], frame[3]]);
        if api_key == API_VERSIONS && api_version > MOCK_MAX_API_VERSIONS {
            let correlation = [frame[4], frame[5], frame[6], frame[7]];
            let answer = unsupported_api_versions(correlation);
            let mut c = to_client
                .lock()
                .map_err(|_| io::Error::other("poisoned client writer"))?;
            c.write_all(&answer)?;
            continue;
        }
        server.write_all(&len)?;
        server.write_all(&frame)?;
    }
}

/// An `ApiVersions` v0 response: `UNSUPPORTED_VERSION`, and the versions of
/// `ApiVersions` the mock supports, so the client retries with one of them.
fn unsupported_api_versions(correlation: [u8; 4]) -> Vec<u8> {
    let mut body = Vec::with_capacity(16);
    body.extend_from_slice(&correlation);
    body.extend_from_slice(&UNSUPPORTED_VERSION.to_be_bytes());
    body.extend_from_slice(&1i32.to_be_bytes()); // one api key
    body.extend_from_slice(&API_VERSIONS.to_be_bytes());
    body.extend_from_slice(&0i16.to_be_bytes());
    body.extend_from_slice(&MOCK_MAX_API_VERSIONS.to_be_bytes());
    let mut frame = (body.len() as i32).to_be_bytes().to_vec();
    frame.extend_from_slice(&body);
    frame
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_unsupported_answer_is_a_v0_response() {
        let f = unsupported_api_versions([0, 0, 0, 7]);
        assert_eq!(&f[..4], &16i32.to_be_bytes());
        assert_eq!(&f[4..8], &[0, 0, 0, 7]);
        assert_eq!(i16::from_be_bytes([f[8], f[9]]), 35);
        assert_eq!(i32::from_be_bytes([f[10], f[11], f[12], f[13]]), 1);
        assert_eq!(i16::from_be_bytes([f[14], f[15]]), 18);
        assert_eq!(i16::from_be_bytes([f[18], f[19]]), 2);
    }
}
