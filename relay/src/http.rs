//! The relay's front door: the HTTP request that opens every connection on its port, read and
//! answered here rather than inside the WebSocket library, so that a plain HTTP request gets a
//! short, correct answer (`/healthz`, 404, 426) instead of a hang or a reset, and so that a
//! trusted reverse proxy's `Forwarded`/`X-Forwarded-For` can name the real client.
//!
//! [`parse`] is plain data in, a decision out; [`read_head`] only moves bytes.

use std::net::IpAddr;

use ipnet::IpNet;
use tokio::io::{AsyncRead, AsyncReadExt};

/// The longest request head read before answering 431.
pub const MAX_HEAD_BYTES: usize = 8 * 1024;
const MAX_HEADERS: usize = 32;

/// What a request asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Request {
    /// A WebSocket upgrade: answer 101 with this `Sec-WebSocket-Accept`.
    Upgrade {
        accept_key: String,
        /// The client's address as a trusted proxy gave it (`None`: not from one, or it
        /// named none).
        forwarded_for: Option<IpAddr>,
    },
    Health,
    Metrics,
    /// Anything else: answer with this status and close.
    Refuse(Status),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Ok,
    BadRequest,
    NotFound,
    MethodNotAllowed,
    UpgradeRequired,
    HeadersTooLarge,
    ServiceUnavailable,
}

impl Status {
    fn line(self) -> &'static str {
        match self {
            Status::Ok => "200 OK",
            Status::BadRequest => "400 Bad Request",
            Status::NotFound => "404 Not Found",
            Status::MethodNotAllowed => "405 Method Not Allowed",
            Status::UpgradeRequired => "426 Upgrade Required",
            Status::HeadersTooLarge => "431 Request Header Fields Too Large",
            Status::ServiceUnavailable => "503 Service Unavailable",
        }
    }

    fn body(self) -> &'static str {
        match self {
            Status::Ok => "ok\n",
            Status::BadRequest => "malformed HTTP request\n",
            Status::NotFound => "not found; the relay speaks WebSocket on /\n",
            Status::MethodNotAllowed => "only GET is served here\n",
            Status::UpgradeRequired => "this is a Parley relay: connect with a WebSocket client\n",
            Status::HeadersTooLarge => "request head too large\n",
            Status::ServiceUnavailable => "draining: the relay is shutting down\n",
        }
    }
}

/// A complete plain response (`Connection: close`), `body` or the status's own text.
pub fn response(status: Status, content_type: &str, body: Option<&str>) -> Vec<u8> {
    let body = body.unwrap_or(status.body());
    let extra = if status == Status::UpgradeRequired {
        "Upgrade: websocket\r\n"
    } else {
        ""
    };
    format!(
        "HTTP/1.1 {}\r\n{extra}Content-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\nCache-Control: no-store\r\n\r\n{body}",
        status.line(),
        body.len()
    )
    .into_bytes()
}

pub fn upgrade_response(accept_key: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept_key}\r\n\r\n"
    )
    .into_bytes()
}

/// Reads until the end of the request head (`\r\n\r\n`). Returns everything read and the
/// head's length (bytes after it belong to the WebSocket stream); `None` if the peer closed
/// first or the head is longer than [`MAX_HEAD_BYTES`] (then the length read so far).
pub async fn read_head<S: AsyncRead + Unpin>(
    stream: &mut S,
) -> std::io::Result<(Vec<u8>, Option<usize>)> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok((buf, None));
        }
        let from = buf.len().saturating_sub(3);
        buf.extend_from_slice(chunk.get(..n).unwrap_or_default());
        if let Some(end) = find_end(buf.get(from..).unwrap_or_default()) {
            return Ok((buf, Some(from + end)));
        }
        if buf.len() > MAX_HEAD_BYTES {
            return Ok((buf, None));
        }
    }
}

fn find_end(bytes: &[u8]) -> Option<usize> {
    bytes
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| i + 4)
}

/// Decides what a request head asks for. `peer` is the connection's own address; only when it
/// is in `trusted_proxies` are forwarding headers read. `metrics` says whether this port
/// serves `/metrics` (the metrics port) or WebSocket (the relay's).
pub fn parse(head: &[u8], peer: IpAddr, trusted_proxies: &[IpNet], metrics_port: bool) -> Request {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        _ => return Request::Refuse(Status::BadRequest),
    }
    let path = req.path.unwrap_or("/");
    let path = path.split('?').next().unwrap_or(path);
    if req.method != Some("GET") {
        return Request::Refuse(Status::MethodNotAllowed);
    }
    let header = |name: &'static str| {
        req.headers
            .iter()
            .filter(move |h| h.name.eq_ignore_ascii_case(name))
            .filter_map(|h| std::str::from_utf8(h.value).ok())
    };
    match (path, metrics_port) {
        ("/healthz", _) => return Request::Health,
        ("/metrics", true) => return Request::Metrics,
        ("/", false) => {}
        _ => return Request::Refuse(Status::NotFound),
    }
    let has_token = |name: &'static str, token: &str| {
        header(name).any(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    };
    if !has_token("upgrade", "websocket") || !has_token("connection", "upgrade") {
        return Request::Refuse(Status::UpgradeRequired);
    }
    if req.version != Some(1) || !header("sec-websocket-version").any(|v| v.trim() == "13") {
        return Request::Refuse(Status::BadRequest);
    }
    let Some(key) = header("sec-websocket-key").next() else {
        return Request::Refuse(Status::BadRequest);
    };
    let accept_key =
        tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.trim().as_bytes());
    let forwarded_for = if trusted_proxies.iter().any(|net| net.contains(&peer)) {
        forwarded_client(
            header("forwarded"),
            header("x-forwarded-for"),
            trusted_proxies,
        )
    } else {
        None
    };
    Request::Upgrade {
        accept_key,
        forwarded_for,
    }
}

/// The client a chain of trusted proxies names: the right-most address that is not itself a
/// trusted proxy (addresses to its left were written by the client and prove nothing).
/// `Forwarded` (RFC 7239) wins over `X-Forwarded-For` when both are present.
fn forwarded_client<'a>(
    forwarded: impl Iterator<Item = &'a str>,
    x_forwarded_for: impl Iterator<Item = &'a str>,
    trusted: &[IpNet],
) -> Option<IpAddr> {
    let from_forwarded: Vec<IpAddr> = forwarded
        .flat_map(|v| v.split(','))
        .filter_map(|element| {
            element.split(';').find_map(|pair| {
                let (k, v) = pair.split_once('=')?;
                k.trim()
                    .eq_ignore_ascii_case("for")
                    .then(|| parse_node(v.trim()))?
            })
        })
        .collect();
    let chain = if from_forwarded.is_empty() {
        x_forwarded_for
            .flat_map(|v| v.split(','))
            .filter_map(|a| parse_node(a.trim()))
            .collect()
    } else {
        from_forwarded
    };
    chain
        .into_iter()
        .rev()
        .find(|ip| !trusted.iter().any(|net| net.contains(ip)))
}

/// An address as proxies write it: `192.0.2.1`, `"[2001:db8::1]:4711"`, `192.0.2.1:80`.
fn parse_node(text: &str) -> Option<IpAddr> {
    let text = text.trim_matches('"');
    if let Ok(ip) = text.parse() {
        return Some(ip);
    }
    if let Some(rest) = text.strip_prefix('[') {
        return rest.split(']').next()?.parse().ok();
    }
    text.rsplit_once(':')?.0.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn upgrade(extra: &str) -> Vec<u8> {
        format!("GET / HTTP/1.1\r\nHost: relay\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{extra}\r\n").into_bytes()
    }

    #[test]
    fn a_websocket_upgrade_gets_the_rfc_6455_accept_key() {
        let got = parse(&upgrade(""), ip("127.0.0.1"), &[], false);
        assert_eq!(
            got,
            Request::Upgrade {
                accept_key: "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=".into(),
                forwarded_for: None
            }
        );
    }

    #[test]
    fn plain_requests_get_plain_answers() {
        let get = |path: &str| format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").into_bytes();
        let peer = ip("127.0.0.1");
        assert_eq!(parse(&get("/healthz"), peer, &[], false), Request::Health);
        assert_eq!(
            parse(&get("/healthz?x=1"), peer, &[], true),
            Request::Health
        );
        assert_eq!(parse(&get("/metrics"), peer, &[], true), Request::Metrics);
        assert_eq!(
            parse(&get("/metrics"), peer, &[], false),
            Request::Refuse(Status::NotFound),
            "no metrics on the public port"
        );
        assert_eq!(
            parse(&get("/"), peer, &[], false),
            Request::Refuse(Status::UpgradeRequired)
        );
        assert_eq!(
            parse(&get("/x"), peer, &[], false),
            Request::Refuse(Status::NotFound)
        );
        assert_eq!(
            parse(b"POST / HTTP/1.1\r\n\r\n", peer, &[], false),
            Request::Refuse(Status::MethodNotAllowed)
        );
        assert_eq!(
            parse(b"\x16\x03\x01\x02\x00garbage\r\n\r\n", peer, &[], false),
            Request::Refuse(Status::BadRequest)
        );
    }

    #[test]
    fn forwarding_headers_count_only_from_trusted_proxies() {
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let head = upgrade("X-Forwarded-For: 198.51.100.7, 203.0.113.9\r\n");
        let from = |peer: &str| match parse(&head, ip(peer), &trusted, false) {
            Request::Upgrade { forwarded_for, .. } => forwarded_for,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            from("10.1.2.3"),
            Some(ip("203.0.113.9")),
            "right-most untrusted"
        );
        assert_eq!(from("192.0.2.1"), None, "ignored from anyone else");

        // A chain through two trusted proxies; `Forwarded` preferred; ports and brackets.
        let head = upgrade(
            "Forwarded: for=192.0.2.60;proto=https, for=\"[2001:db8::17]:4711\", for=10.0.0.2\r\nX-Forwarded-For: 1.2.3.4\r\n",
        );
        match parse(&head, ip("10.0.0.1"), &trusted, false) {
            Request::Upgrade { forwarded_for, .. } => {
                assert_eq!(forwarded_for, Some(ip("2001:db8::17")))
            }
            other => panic!("{other:?}"),
        }
        // A proxy that names nobody (or only itself): the connection's own address is used.
        let head = upgrade("X-Forwarded-For: 10.9.9.9\r\n");
        match parse(&head, ip("10.0.0.1"), &trusted, false) {
            Request::Upgrade { forwarded_for, .. } => assert_eq!(forwarded_for, None),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn the_head_is_read_to_its_end_and_no_further_than_the_limit() {
        let mut input: &[u8] = b"GET / HTTP/1.1\r\nA: b\r\n\r\n\x81\x05hello";
        let (bytes, end) = read_head(&mut input).await.unwrap();
        let end = end.unwrap();
        assert_eq!(&bytes[end..], b"\x81\x05hello");
        let long = vec![b'a'; MAX_HEAD_BYTES + 2000];
        let (_, end) = read_head(&mut long.as_slice()).await.unwrap();
        assert_eq!(end, None);
    }
}
