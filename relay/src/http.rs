//! The relay's front door: the HTTP request that opens every connection on its port, read and
//! answered here rather than inside the WebSocket library, so that a plain HTTP request gets a
//! short, correct answer (`/healthz`, 404, 426) instead of a hang or a reset, and so that a
//! trusted reverse proxy can name the real client.
//!
//! [`parse`] is plain data in, a decision out; [`read_head`] only moves bytes.

use std::net::IpAddr;

use ipnet::IpNet;
use tokio::io::{AsyncRead, AsyncReadExt};

/// The longest request head read before answering 431.
pub const MAX_HEAD_BYTES: usize = 8 * 1024;
const MAX_HEADERS: usize = 32;

/// Which header a trusted proxy writes the client's address in. Only that one is read: a proxy
/// passes the other through from the client unchanged, and the client would choose its own
/// address.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ForwardedHeader {
    /// `X-Forwarded-For` (nginx with `proxy_set_header X-Forwarded-For`, Caddy, HAProxy).
    #[default]
    XForwardedFor,
    /// `Forwarded` (RFC 7239), its `for=` parameters.
    Forwarded,
}

/// Who may name the client of a connection, and in which header.
#[derive(Debug, Clone, Copy)]
pub struct Proxies<'a> {
    pub trusted: &'a [IpNet],
    pub header: ForwardedHeader,
}

/// Whether `ip` is in one of `networks` (an IPv4 peer on a dual-stack socket, seen as
/// `::ffff:a.b.c.d`, counts as its IPv4 address).
pub fn trusted(networks: &[IpNet], ip: IpAddr) -> bool {
    let ip = ip.to_canonical();
    networks.iter().any(|net| net.contains(&ip))
}

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
    /// `/healthz`; `HEAD` wants the status without a body.
    Health {
        head_only: bool,
    },
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
            Status::ServiceUnavailable => "unavailable: the relay is shutting down, or busy\n",
        }
    }
}

/// A complete plain response (`Connection: close`), `body` or the status's own text;
/// `head_only` leaves the body out (the answer to `HEAD`).
pub fn response(
    status: Status,
    content_type: &str,
    body: Option<&str>,
    head_only: bool,
) -> Vec<u8> {
    let body = body.unwrap_or(status.body());
    let length = body.len();
    let body = if head_only { "" } else { body };
    let extra = if status == Status::UpgradeRequired {
        "Upgrade: websocket\r\n"
    } else {
        ""
    };
    format!(
        "HTTP/1.1 {}\r\n{extra}Content-Type: {content_type}\r\nContent-Length: {length}\r\nConnection: close\r\nCache-Control: no-store\r\n\r\n{body}",
        status.line(),
    )
    .into_bytes()
}

pub fn upgrade_response(accept_key: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept_key}\r\n\r\n"
    )
    .into_bytes()
}

/// Reads until the end of the request head: an empty line, `\r\n\r\n` (or `\n\n`, which
/// HTTP/1.1 parsers also accept). Returns everything read and the head's length (bytes after it
/// belong to the WebSocket stream); `None` if the peer closed first, the head is longer than
/// [`MAX_HEAD_BYTES`], or the stream does not start like an HTTP request at all (a TLS
/// ClientHello on a plain port, say: closed at once rather than left to time out).
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
        // Every request line starts with a method: upper-case letters.
        if !buf.first().is_some_and(u8::is_ascii_uppercase) {
            return Ok((buf, None));
        }
        if let Some(end) = find_end(buf.get(from..).unwrap_or_default()) {
            let end = from.saturating_add(end);
            return Ok((buf, (end <= MAX_HEAD_BYTES).then_some(end)));
        }
        if buf.len() > MAX_HEAD_BYTES {
            return Ok((buf, None));
        }
    }
}

/// Where the first empty line ends: after `\n\n` or `\n\r\n`.
fn find_end(bytes: &[u8]) -> Option<usize> {
    (0..bytes.len()).find_map(|i| {
        let before = bytes.get(..=i)?;
        (before.ends_with(b"\n\n") || before.ends_with(b"\n\r\n")).then_some(i + 1)
    })
}

/// Decides what a request head asks for. `peer` is the connection's own address; only when it
/// is a trusted proxy is the forwarding header read. `metrics_port` says whether this port
/// serves `/metrics` (the metrics port) or WebSocket (the relay's).
pub fn parse(head: &[u8], peer: IpAddr, proxies: Proxies<'_>, metrics_port: bool) -> Request {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        Err(httparse::Error::TooManyHeaders) => return Request::Refuse(Status::HeadersTooLarge),
        _ => return Request::Refuse(Status::BadRequest),
    }
    let path = req.path.unwrap_or("/");
    let path = path.split('?').next().unwrap_or(path);
    // Load balancers probe health with GET, HEAD or OPTIONS.
    if path == "/healthz" && matches!(req.method, Some("GET" | "HEAD" | "OPTIONS")) {
        return Request::Health {
            head_only: req.method == Some("HEAD"),
        };
    }
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
    let forwarded_for = if trusted(proxies.trusted, peer) {
        let chain: Vec<&str> = match proxies.header {
            ForwardedHeader::XForwardedFor => header("x-forwarded-for")
                .flat_map(|v| v.split(','))
                .collect(),
            ForwardedHeader::Forwarded => header("forwarded")
                .flat_map(split_outside_quotes)
                .map(forwarded_for_parameter)
                .collect(),
        };
        forwarded_client(&chain, proxies.trusted)
    } else {
        None
    };
    Request::Upgrade {
        accept_key,
        forwarded_for,
    }
}

/// The client a chain of proxies names, walking it from the right (the entries the proxies
/// appended) past trusted proxies: the first other entry is the client, if it is an address.
/// Entries to its left were written by the client and prove nothing; an entry that is not an
/// address (`unknown`, an obfuscated name, an element without `for=`) ends the walk, and the
/// connection then counts as the proxy's own.
fn forwarded_client(chain: &[&str], trusted_networks: &[IpNet]) -> Option<IpAddr> {
    for entry in chain.iter().rev() {
        let ip = parse_node(entry.trim())?.to_canonical();
        if !trusted(trusted_networks, ip) {
            return Some(ip);
        }
    }
    None
}

/// The elements of a `Forwarded` value: split at commas that are not inside quotes.
fn split_outside_quotes(value: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut start, mut quoted) = (0, false);
    for (i, c) in value.char_indices() {
        match c {
            '"' => quoted = !quoted,
            ',' if !quoted => {
                parts.push(value.get(start..i).unwrap_or_default());
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(value.get(start..).unwrap_or_default());
    parts
}

/// The `for=` parameter of one `Forwarded` element ("" if it has none, which is no address).
fn forwarded_for_parameter(element: &str) -> &str {
    element
        .split(';')
        .find_map(|pair| {
            let (k, v) = pair.split_once('=')?;
            k.trim().eq_ignore_ascii_case("for").then_some(v.trim())
        })
        .unwrap_or("")
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

    const NOBODY: Proxies<'static> = Proxies {
        trusted: &[],
        header: ForwardedHeader::XForwardedFor,
    };

    fn upgrade(extra: &str) -> Vec<u8> {
        format!("GET / HTTP/1.1\r\nHost: relay\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{extra}\r\n").into_bytes()
    }

    fn client(head: &[u8], peer: &str, proxies: Proxies<'_>) -> Option<IpAddr> {
        match parse(head, ip(peer), proxies, false) {
            Request::Upgrade { forwarded_for, .. } => forwarded_for,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_websocket_upgrade_gets_the_rfc_6455_accept_key() {
        let got = parse(&upgrade(""), ip("127.0.0.1"), NOBODY, false);
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
        let req = |method: &str, path: &str| {
            format!("{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n").into_bytes()
        };
        let get = |path: &str| req("GET", path);
        let peer = ip("127.0.0.1");
        let health = |head_only| Request::Health { head_only };
        assert_eq!(parse(&get("/healthz"), peer, NOBODY, false), health(false));
        assert_eq!(
            parse(&get("/healthz?x=1"), peer, NOBODY, true),
            health(false)
        );
        assert_eq!(
            parse(&req("HEAD", "/healthz"), peer, NOBODY, false),
            health(true)
        );
        assert_eq!(
            parse(&req("OPTIONS", "/healthz"), peer, NOBODY, false),
            health(false)
        );
        assert_eq!(
            parse(&get("/metrics"), peer, NOBODY, true),
            Request::Metrics
        );
        assert_eq!(
            parse(&get("/metrics"), peer, NOBODY, false),
            Request::Refuse(Status::NotFound),
            "no metrics on the public port"
        );
        let refused = |head: &[u8], status| {
            assert_eq!(parse(head, peer, NOBODY, false), Request::Refuse(status));
        };
        refused(&get("/"), Status::UpgradeRequired);
        refused(&get("/x"), Status::NotFound);
        refused(b"POST / HTTP/1.1\r\n\r\n", Status::MethodNotAllowed);
        refused(b"\x16\x03\x01\x02\x00garbage\r\n\r\n", Status::BadRequest);
        let many: String = (0..40).map(|i| format!("X-{i}: y\r\n")).collect();
        refused(
            format!("GET / HTTP/1.1\r\n{many}\r\n").as_bytes(),
            Status::HeadersTooLarge,
        );
        // The body never reveals more than the status on a HEAD.
        let head = response(Status::Ok, "text/plain", None, true);
        assert!(String::from_utf8(head).unwrap().ends_with(
            "Content-Length: 3\r\nConnection: close\r\nCache-Control: no-store\r\n\r\n"
        ));
    }

    #[test]
    fn forwarding_headers_count_only_from_trusted_proxies() {
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let xff = Proxies {
            trusted: &trusted,
            header: ForwardedHeader::XForwardedFor,
        };
        let head = upgrade("X-Forwarded-For: 198.51.100.7, 203.0.113.9\r\n");
        assert_eq!(
            client(&head, "10.1.2.3", xff),
            Some(ip("203.0.113.9")),
            "right-most untrusted"
        );
        assert_eq!(
            client(&head, "192.0.2.1", xff),
            None,
            "ignored from anyone else"
        );
        // A proxy on a dual-stack socket is seen as ::ffff:10.1.2.3: still trusted.
        assert_eq!(
            client(&head, "::ffff:10.1.2.3", xff),
            Some(ip("203.0.113.9"))
        );
        // Two trusted proxies in the chain.
        let head = upgrade("X-Forwarded-For: 6.6.6.6, 198.51.100.1, 10.0.0.2\r\n");
        assert_eq!(client(&head, "10.0.0.1", xff), Some(ip("198.51.100.1")));
        // A proxy that names nobody (or only itself): the connection's own address is used.
        let head = upgrade("X-Forwarded-For: 10.9.9.9\r\n");
        assert_eq!(client(&head, "10.0.0.1", xff), None);
    }

    #[test]
    fn a_client_cannot_choose_its_address_through_the_header_the_proxy_does_not_write() {
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let xff = Proxies {
            trusted: &trusted,
            header: ForwardedHeader::XForwardedFor,
        };
        // The proxy writes X-Forwarded-For; the client's own Forwarded passes through it.
        let head = upgrade("Forwarded: for=198.51.100.66\r\nX-Forwarded-For: 203.0.113.7\r\n");
        assert_eq!(client(&head, "10.0.0.1", xff), Some(ip("203.0.113.7")));
        let rfc = Proxies {
            trusted: &trusted,
            header: ForwardedHeader::Forwarded,
        };
        assert_eq!(client(&head, "10.0.0.1", rfc), Some(ip("198.51.100.66")));
        let head = upgrade(
            "Forwarded: for=192.0.2.60;proto=https, for=\"[2001:db8::17]:4711\", for=10.0.0.2\r\n",
        );
        assert_eq!(client(&head, "10.0.0.1", rfc), Some(ip("2001:db8::17")));
        // A quoted comma does not split an element.
        let head = upgrade("Forwarded: for=\"[2001:db8::1]\";note=\"a,b\"\r\n");
        assert_eq!(client(&head, "10.0.0.1", rfc), Some(ip("2001:db8::1")));
    }

    #[test]
    fn an_entry_that_is_not_an_address_ends_the_walk() {
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let xff = Proxies {
            trusted: &trusted,
            header: ForwardedHeader::XForwardedFor,
        };
        let rfc = Proxies {
            trusted: &trusted,
            header: ForwardedHeader::Forwarded,
        };
        // The client's injected 6.6.6.6 is never taken for the client.
        assert_eq!(
            client(
                &upgrade("X-Forwarded-For: 6.6.6.6, unknown\r\n"),
                "10.0.0.1",
                xff
            ),
            None
        );
        let hidden = upgrade("Forwarded: for=6.6.6.6, for=_hidden\r\n");
        assert_eq!(client(&hidden, "10.0.0.1", rfc), None);
        let no_for = upgrade("Forwarded: for=6.6.6.6, proto=https\r\n");
        assert_eq!(client(&no_for, "10.0.0.1", rfc), None);
    }

    #[tokio::test]
    async fn the_head_is_read_to_its_end_and_no_further_than_the_limit() {
        let mut input: &[u8] = b"GET / HTTP/1.1\r\nA: b\r\n\r\n\x81\x05hello";
        let (bytes, end) = read_head(&mut input).await.unwrap();
        let end = end.unwrap();
        assert_eq!(&bytes[end..], b"\x81\x05hello");
        // Bare line feeds end a head too.
        let mut bare: &[u8] = b"GET /healthz HTTP/1.1\nHost: x\n\nrest";
        let (bytes, end) = read_head(&mut bare).await.unwrap();
        assert_eq!(&bytes[end.unwrap()..], b"rest");
        // Not HTTP at all (a TLS ClientHello): given up on at the first byte.
        let mut hello: &[u8] = b"\x16\x03\x01\x02\x00\x01";
        let (_, end) = read_head(&mut hello).await.unwrap();
        assert_eq!(end, None);
        let long = vec![b'A'; MAX_HEAD_BYTES + 2000];
        let (_, end) = read_head(&mut long.as_slice()).await.unwrap();
        assert_eq!(end, None);
        // A head that ends just past the limit, read in one chunk, is still too long.
        let mut over = format!(
            "GET / HTTP/1.1\r\nX: {}\r\n\r\n",
            "a".repeat(MAX_HEAD_BYTES)
        )
        .into_bytes();
        over.truncate(MAX_HEAD_BYTES + 30);
        over.extend_from_slice(b"\r\n\r\n");
        let (_, end) = read_head(&mut over.as_slice()).await.unwrap();
        assert_eq!(end, None);
    }
}
