//! The PROXY protocol (HAProxy's, v1 text and v2 binary), parsed and
//! written by the `ppp` crate.
//!
//! - Toward backends (`proxy_protocol = "v1" | "v2"` on a pool): each TCP
//!   connection to a backend starts with a header naming the client and the
//!   address it reached, so the backend sees the real client.
//! - From an upstream load balancer (`accept_proxy = true` on a frontend):
//!   each connection must start with a v1 or v2 header within
//!   `proxy_header_timeout` and [`MAX_HEADER`] bytes; its source is the
//!   flow's client (balancing, hairpin, flow log, the header passed on).
//!   A connection whose header is malformed, too big or too slow is reset
//!   and counted (`proxy_headers_refused`). A v2 `LOCAL` header (the
//!   upstream's own health check) or v1 `UNKNOWN` keeps the connection's
//!   own addresses.

use std::net::SocketAddr;
use std::time::Duration;

use ppp::v2::{self, Command};
use ppp::{HeaderResult, PartialResult, v1};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use crate::config::ProxyProtocol;

/// Longest header accepted: v1 is at most 107 bytes; v2 is 16 bytes plus
/// addresses and TLVs, which upstreams keep short.
pub const MAX_HEADER: usize = 4096;
/// How a v1 header starts, and its longest line (the spec's 107 bytes).
const V1_PREFIX: &[u8] = b"PROXY ";
const V1_MAX: usize = 107;

/// What the bytes so far hold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Parsed {
    /// A header may still come: read more.
    Incomplete,
    /// Not a valid header, whatever follows.
    Invalid(String),
    /// A whole header of `len` bytes; its addresses (`None`: v1 `UNKNOWN`,
    /// v2 `LOCAL` or a family without IP addresses).
    Header { len: usize, addresses: Option<(SocketAddr, SocketAddr)> },
}

/// Parses the start of a connection (pure: the fuzz target's entry).
pub fn parse(bytes: &[u8]) -> Parsed {
    // A v1 line is judged once it has ended: the crate takes a line cut
    // short (after a space, inside a port) for a malformed one.
    let v2 = bytes.starts_with(v2::PROTOCOL_PREFIX) || v2::PROTOCOL_PREFIX.starts_with(bytes);
    let v1_start = bytes.starts_with(V1_PREFIX) || V1_PREFIX.starts_with(bytes);
    if !v2 && v1_start && bytes.len() < V1_MAX && !bytes.contains(&b'\n') {
        return Parsed::Incomplete;
    }
    let parsed = HeaderResult::parse(bytes);
    if parsed.is_incomplete() {
        // A v1 line that has ended and still lacks a part never completes
        // (the crate calls it partial: it cannot know the line is over).
        if !v2 && bytes.contains(&b'\n') {
            return Parsed::Invalid("PROXY v1: the header line lacks a part".to_owned());
        }
        return if bytes.len() >= MAX_HEADER {
            Parsed::Invalid(format!("no complete header in {MAX_HEADER} bytes"))
        } else {
            Parsed::Incomplete
        };
    }
    match parsed {
        HeaderResult::V1(Ok(header)) => {
            let addresses = match header.addresses {
                v1::Addresses::Tcp4(a) => Some((
                    SocketAddr::from((a.source_address, a.source_port)),
                    SocketAddr::from((a.destination_address, a.destination_port)),
                )),
                v1::Addresses::Tcp6(a) => Some((
                    SocketAddr::from((a.source_address, a.source_port)),
                    SocketAddr::from((a.destination_address, a.destination_port)),
                )),
                v1::Addresses::Unknown => None,
            };
            Parsed::Header { len: header.header.len(), addresses }
        }
        HeaderResult::V2(Ok(header)) => {
            let addresses = match (header.command, header.addresses) {
                (Command::Local, _) => None,
                (Command::Proxy, v2::Addresses::IPv4(a)) => Some((
                    SocketAddr::from((a.source_address, a.source_port)),
                    SocketAddr::from((a.destination_address, a.destination_port)),
                )),
                (Command::Proxy, v2::Addresses::IPv6(a)) => Some((
                    SocketAddr::from((a.source_address, a.source_port)),
                    SocketAddr::from((a.destination_address, a.destination_port)),
                )),
                (Command::Proxy, _) => None,
            };
            Parsed::Header { len: header.len(), addresses }
        }
        HeaderResult::V1(Err(e)) => Parsed::Invalid(format!("PROXY v1: {e}")),
        HeaderResult::V2(Err(e)) => Parsed::Invalid(format!("PROXY v2: {e}")),
    }
}

/// A header read from a connection.
#[derive(Debug)]
pub struct Received {
    /// The client and the address it reached, as the upstream tells.
    pub addresses: Option<(SocketAddr, SocketAddr)>,
    /// Bytes the client sent after the header (read with it): the first
    /// bytes for the backend.
    pub early: Vec<u8>,
}

/// Reads a connection's PROXY header, within `timeout`.
pub async fn receive(stream: &mut TcpStream, timeout: Duration) -> Result<Received, String> {
    let read = async {
        let mut buf = Vec::with_capacity(256);
        loop {
            let mut chunk = [0u8; 512];
            // Never more than the bound, and never far past the header.
            let want = chunk.len().min(MAX_HEADER + 512 - buf.len());
            let n = stream.read(&mut chunk[..want]).await.map_err(|e| format!("read: {e}"))?;
            if n == 0 {
                return Err("closed before its PROXY header was complete".to_owned());
            }
            buf.extend_from_slice(&chunk[..n]);
            match parse(&buf) {
                Parsed::Incomplete => continue,
                Parsed::Invalid(why) => return Err(why),
                Parsed::Header { len, addresses } => {
                    let early = buf.split_off(len.min(buf.len()));
                    return Ok(Received { addresses, early });
                }
            }
        }
    };
    tokio::time::timeout(timeout, read)
        .await
        .unwrap_or_else(|_| Err(format!("no complete PROXY header within {}", humantime::format_duration(timeout))))
}

/// The header that tells a backend about `client`, who reached `destination`.
pub fn encode(version: ProxyProtocol, client: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    // An IPv4 client on a dual-stack socket shows as IPv4-mapped IPv6.
    let canonical = |a: SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port());
    let (client, destination) = (canonical(client), canonical(destination));
    let same_family = client.is_ipv4() == destination.is_ipv4();
    match version {
        ProxyProtocol::V1 => {
            let addresses = match (client, destination) {
                (SocketAddr::V4(c), SocketAddr::V4(d)) => v1::Addresses::new_tcp4(*c.ip(), *d.ip(), c.port(), d.port()),
                (SocketAddr::V6(c), SocketAddr::V6(d)) => v1::Addresses::new_tcp6(*c.ip(), *d.ip(), c.port(), d.port()),
                _ => v1::Addresses::Unknown,
            };
            addresses.to_string().into_bytes()
        }
        ProxyProtocol::V2 => {
            let (command, addresses) = if same_family {
                (Command::Proxy, v2::Addresses::from((client, destination)))
            } else {
                (Command::Local, v2::Addresses::Unspecified)
            };
            v2::Builder::with_addresses(v2::Version::Two | command, v2::Protocol::Stream, addresses)
                .build()
                .unwrap_or_default()
        }
    }
}

/// The parser's properties on any bytes, asserted (the fuzz target's body,
/// and its corpus's replay in the tests): it never panics, a header it
/// accepts is a prefix of the input that parses alone to the same, it never
/// waits past its bound, and the addresses it reads come back the same
/// through [`encode`] (v1 and v2).
#[doc(hidden)]
pub fn assert_properties(data: &[u8]) {
    match parse(data) {
        Parsed::Header { len, addresses } => {
            assert!(len > 0 && len <= data.len());
            assert_eq!(parse(&data[..len]), Parsed::Header { len, addresses });
            if let Some((client, destination)) = addresses {
                let canonical = |a: SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port());
                let (c, d) = (canonical(client), canonical(destination));
                let expected = (c.is_ipv4() == d.is_ipv4()).then_some((c, d));
                for version in [ProxyProtocol::V1, ProxyProtocol::V2] {
                    let written = encode(version, client, destination);
                    assert_eq!(parse(&written), Parsed::Header { len: written.len(), addresses: expected });
                }
            }
        }
        Parsed::Incomplete => assert!(data.len() < MAX_HEADER),
        Parsed::Invalid(why) => assert!(!why.is_empty()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap_or_else(|_| unreachable!())
    }

    #[test]
    fn what_is_written_reads_back_in_both_versions_and_families() {
        for (client, destination) in
            [(addr("192.0.2.7:40000"), addr("198.51.100.1:443")), (addr("[2001:db8::7]:40000"), addr("[::1]:80"))]
        {
            for version in [ProxyProtocol::V1, ProxyProtocol::V2] {
                let mut bytes = encode(version, client, destination);
                let len = bytes.len();
                bytes.extend_from_slice(b"GET / HTTP/1.1\r\n");
                assert_eq!(parse(&bytes), Parsed::Header { len, addresses: Some((client, destination)) });
                for cut in 0..len {
                    assert_eq!(parse(&bytes[..cut]), Parsed::Incomplete, "{version:?} cut at {cut}");
                }
            }
        }
        let v1 = encode(ProxyProtocol::V1, addr("10.0.0.1:1"), addr("10.0.0.2:2"));
        assert_eq!(v1, b"PROXY TCP4 10.0.0.1 10.0.0.2 1 2\r\n");
    }

    #[test]
    fn mixed_families_and_mapped_addresses() {
        let mapped = encode(ProxyProtocol::V1, addr("[::ffff:10.0.0.1]:5"), addr("10.0.0.2:6"));
        assert_eq!(mapped, b"PROXY TCP4 10.0.0.1 10.0.0.2 5 6\r\n");
        let mixed = encode(ProxyProtocol::V1, addr("10.0.0.1:5"), addr("[2001:db8::1]:6"));
        assert_eq!(mixed, b"PROXY UNKNOWN\r\n");
        assert_eq!(parse(&mixed), Parsed::Header { len: mixed.len(), addresses: None });
        let local = encode(ProxyProtocol::V2, addr("10.0.0.1:5"), addr("[2001:db8::1]:6"));
        assert_eq!(parse(&local), Parsed::Header { len: local.len(), addresses: None });
    }

    #[test]
    fn garbage_and_endless_headers_are_refused() {
        for bad in [
            &b"GET / HTTP/1.1\r\n\r\n"[..],
            b"PROXY TCP4 1.2.3.4\r\n",
            b"PROXY TCP9 a b c d\r\n",
            b"\r\n\r\n\0\r\nQUIT\n\x11\x11\x00\x0c",
        ] {
            assert!(matches!(parse(bad), Parsed::Invalid(_)), "{bad:?}");
        }
        let endless = [b"PROXY TCP4 ".as_slice(), &[b'1'; 200]].concat();
        assert!(matches!(parse(&endless), Parsed::Invalid(_)));
        // A v2 header announcing more than the bound never completes in it.
        let mut big = b"\r\n\r\n\0\r\nQUIT\n\x21\x11\xff\xff".to_vec();
        big.resize(MAX_HEADER, 0);
        assert!(matches!(parse(&big), Parsed::Invalid(_)));
    }

    /// The fuzz target's corpus (`fuzz/corpus/proxy_header`), replayed.
    #[test]
    fn the_fuzz_corpus_replays_cleanly() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/proxy_header");
        let mut replayed = 0;
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let bytes = std::fs::read(entry.map(|e| e.path()).unwrap_or_default()).unwrap_or_default();
            assert_properties(&bytes);
            replayed += 1;
        }
        assert!(replayed >= 8, "only {replayed} corpus entries in {}", dir.display());
    }
}
