//! A relay as deployed on the internet: TLS (certificates made here), plain HTTP on its port
//! (health, refusals), draining, Prometheus metrics, and reverse proxies. In process, over
//! real sockets on 127.0.0.0/8.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use parley_e2e::TempDir;
use parley_e2e::pki::{TestCa, Validity, client_config};
use parley_relay::{IpNet, RateLimit, Relay, RelayConfig, RelayHandle, Tls};
use rustls::pki_types::ServerName;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

const STEP: Duration = Duration::from_secs(5);

struct Running {
    addr: SocketAddr,
    metrics: Option<SocketAddr>,
    handle: RelayHandle,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<std::io::Result<()>>,
}

async fn start(config: RelayConfig, metrics: bool) -> Running {
    let mut relay = Relay::bind("127.0.0.1:0", config).await.unwrap();
    let metrics = if metrics {
        Some(relay.bind_metrics("127.0.0.1:0").await.unwrap())
    } else {
        None
    };
    let addr = relay.local_addr().unwrap();
    let handle = relay.handle();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(relay.run(async move {
        let _ = stopped.await;
    }));
    Running {
        addr,
        metrics,
        handle,
        stop: Some(stop),
        task,
    }
}

impl Running {
    fn shut_down(&mut self) {
        let _ = self.stop.take().unwrap().send(());
    }
}

type Ws<S> = WebSocketStream<S>;

/// A `wss://localhost` connection trusting `ca_pem`; also returns the certificate it got.
async fn wss(
    addr: SocketAddr,
    ca_pem: &str,
) -> Result<(Ws<tokio_rustls::client::TlsStream<TcpStream>>, Vec<u8>), String> {
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let name = ServerName::try_from("localhost").unwrap();
    let tls = tokio_rustls::TlsConnector::from(client_config(ca_pem))
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    let presented = tls.get_ref().1.peer_certificates().unwrap()[0].to_vec();
    let url = format!("wss://localhost:{}/", addr.port());
    let (ws, _) = tokio_tungstenite::client_async(url, tls)
        .await
        .map_err(|e| e.to_string())?;
    Ok((ws, presented))
}

async fn send<S>(ws: &mut Ws<S>, frame: Value)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    ws.send(Message::Text(frame.to_string().into()))
        .await
        .unwrap();
}

async fn recv<S>(ws: &mut Ws<S>) -> Value
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    loop {
        match timeout(STEP, ws.next()).await.expect("no frame") {
            Some(Ok(Message::Text(text))) => {
                let v: Value = serde_json::from_str(&text).unwrap();
                if v["t"] != "PING" {
                    return v;
                }
            }
            Some(Ok(_)) => {}
            other => panic!("connection ended: {other:?}"),
        }
    }
}

async fn expect<S>(ws: &mut Ws<S>, t: &str) -> Value
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let v = recv(ws).await;
    assert_eq!(v["t"], t, "{v}");
    v
}

/// One plain HTTP request; the status code and the body.
async fn http_get(addr: SocketAddr, path: &str, extra: &str) -> (u16, String) {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(format!("GET {path} HTTP/1.1\r\nHost: relay\r\n{extra}\r\n").as_bytes())
        .await
        .unwrap();
    let mut answer = String::new();
    timeout(STEP, tcp.read_to_string(&mut answer))
        .await
        .expect("no answer")
        .unwrap();
    let status = answer
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not HTTP: {answer:?}"));
    let body = answer
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or_default()
        .to_string();
    (status, body)
}

/// `name{labels} value` lines of a text exposition, every other line being a comment.
fn parse_exposition(text: &str) -> HashMap<String, f64> {
    let mut samples = HashMap::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (name, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("bad line {line:?}"));
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value {line:?}"));
        assert!(
            name.chars().next().is_some_and(|c| c.is_ascii_alphabetic()),
            "bad name {line:?}"
        );
        samples.insert(name.to_string(), value);
    }
    assert!(
        text.trim_end().ends_with("# EOF"),
        "OpenMetrics ends with # EOF"
    );
    samples
}

#[tokio::test]
async fn the_original_flow_works_over_wss_and_a_plaintext_client_fails_cleanly() {
    let dir = TempDir::new("tls");
    let ca = TestCa::new("Parley test CA");
    let cert = ca.server(
        dir.path(),
        "relay",
        &["localhost", "127.0.0.1"],
        Validity::Now,
    );
    let tls = Tls::load(&cert.cert, &cert.key).unwrap();
    let mut relay = start(
        RelayConfig {
            tls: Some(Arc::new(tls)),
            ..RelayConfig::default()
        },
        false,
    )
    .await;

    let (mut alice, presented) = wss(relay.addr, &ca.pem).await.unwrap();
    assert_eq!(presented, cert.der);
    send(&mut alice, json!({"t": "CREATE_SESSION"})).await;
    let sid = expect(&mut alice, "SESSION_CREATED").await["sid"].clone();
    send(&mut alice, json!({"t": "INVITE_CREATE", "sid": sid})).await;
    let code = expect(&mut alice, "INVITE_CODE").await["data"]["code"].clone();
    send(
        &mut alice,
        json!({"t": "INVITE_CREATE", "sid": sid, "data": {"prime": "ff", "generator": "02", "publicKey": "aa"}}),
    )
    .await;
    let (mut bob, _) = wss(relay.addr, &ca.pem).await.unwrap();
    send(
        &mut bob,
        json!({"t": "JOIN", "data": {"code": code, "publicKey": "bb"}}),
    )
    .await;
    let request = expect(&mut alice, "JOIN_REQUEST").await;
    let joined = expect(&mut bob, "JOINED").await;
    assert_eq!(joined["data"]["prime"], "ff");
    send(
        &mut alice,
        json!({"t": "JOIN_ACCEPT", "sid": sid, "data": {"clientID": request["data"]["clientID"], "publicKey": "aa"}}),
    )
    .await;
    expect(&mut bob, "JOINED").await;
    send(
        &mut alice,
        json!({"t": "MSG", "sid": sid, "data": {"payload": "00ff", "msgID": "1"}}),
    )
    .await;
    assert_eq!(expect(&mut bob, "MSG").await["data"]["payload"], "00ff");
    assert_eq!(expect(&mut alice, "DELIVERED").await["data"]["msgID"], "1");

    // Plain WebSocket and plain HTTP on the TLS port: refused, nothing hangs.
    let plain = timeout(
        STEP,
        tokio_tungstenite::connect_async(format!("ws://{}/", relay.addr)),
    )
    .await
    .expect("a plaintext client must not hang");
    assert!(plain.is_err());
    let mut tcp = TcpStream::connect(relay.addr).await.unwrap();
    tcp.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut rest = Vec::new();
    let _ = timeout(STEP, tcp.read_to_end(&mut rest))
        .await
        .expect("closed");
    // The wrong CA is refused by the client, and the relay goes on serving.
    let other = TestCa::new("Someone else");
    assert!(wss(relay.addr, &other.pem).await.is_err());
    send(
        &mut bob,
        json!({"t": "MSG", "sid": sid, "data": {"payload": "01", "msgID": "2"}}),
    )
    .await;
    assert_eq!(expect(&mut alice, "MSG").await["data"]["msgID"], "2");
    let metrics = parse_exposition(&relay.handle.metrics_text());
    assert_eq!(metrics["parley_relay_failed_tls_handshakes_total"], 3.0);
    relay.shut_down();
}

#[tokio::test]
async fn a_reload_changes_the_certificate_for_new_connections_and_a_bad_one_is_refused() {
    let dir = TempDir::new("reload");
    let (old_ca, new_ca) = (TestCa::new("Old CA"), TestCa::new("New CA"));
    let first = old_ca.server(dir.path(), "relay", &["localhost"], Validity::Now);
    let tls = Tls::load(&first.cert, &first.key).unwrap();
    let mut relay = start(
        RelayConfig {
            tls: Some(Arc::new(tls)),
            ..RelayConfig::default()
        },
        false,
    )
    .await;
    let (mut open, presented) = wss(relay.addr, &old_ca.pem).await.unwrap();
    assert_eq!(presented, first.der);

    // Renewed: the same file names, a certificate from another CA.
    let second = new_ca.server(dir.path(), "relay", &["localhost"], Validity::Now);
    relay.handle.reload_tls().unwrap();
    let (_, presented) = wss(relay.addr, &new_ca.pem).await.unwrap();
    assert_eq!(presented, second.der);
    assert!(wss(relay.addr, &old_ca.pem).await.is_err());
    // The connection opened before goes on.
    send(&mut open, json!({"t": "PING"})).await;
    expect(&mut open, "PONG").await;

    // A broken renewal: refused, with the file named, and the certificate in use stays.
    std::fs::write(&second.cert, "-----BEGIN CERTIFICATE-----\nnot base64\n").unwrap();
    let err = relay.handle.reload_tls().unwrap_err();
    assert!(err.to_string().contains("relay.crt"), "{err}");
    let (_, presented) = wss(relay.addr, &new_ca.pem).await.unwrap();
    assert_eq!(presented, second.der);
    relay.shut_down();
}

#[tokio::test]
async fn plain_http_gets_plain_answers_and_health_turns_503_while_draining() {
    let mut relay = start(
        RelayConfig {
            drain_time: Duration::from_secs(2),
            handshake_timeout: Duration::from_secs(60),
            ..RelayConfig::default()
        },
        false,
    )
    .await;
    assert_eq!(
        http_get(relay.addr, "/healthz", "").await,
        (200, "ok\n".into())
    );
    assert_eq!(http_get(relay.addr, "/", "").await.0, 426);
    assert_eq!(http_get(relay.addr, "/nope", "").await.0, 404);
    assert_eq!(
        http_get(relay.addr, "/metrics", "").await.0,
        404,
        "metrics are not public"
    );
    let mut tcp = TcpStream::connect(relay.addr).await.unwrap();
    tcp.write_all(b"GET\x00\x01garbage\r\n\r\n").await.unwrap();
    let mut answer = String::new();
    timeout(STEP, tcp.read_to_string(&mut answer))
        .await
        .unwrap()
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer:?}");
    // A TLS client on the plain port (a wss:// URL for a ws:// relay) is closed at once, not
    // left to the (here, long) handshake time limit: its handshake fails within STEP.
    let tcp = TcpStream::connect(relay.addr).await.unwrap();
    let ca = TestCa::new("Any CA");
    let tls = tokio_rustls::TlsConnector::from(client_config(&ca.pem));
    let name = ServerName::try_from("localhost").unwrap();
    let failed = timeout(STEP, tls.connect(name, tcp)).await;
    assert!(
        matches!(failed, Ok(Err(_))),
        "closed promptly, not timed out"
    );

    // An open connection, then SIGTERM: health says 503 and newcomers are turned away, while
    // the open connection is still served until the drain time is over.
    let (mut open, _) = tokio_tungstenite::connect_async(format!("ws://{}/", relay.addr))
        .await
        .unwrap();
    relay.shut_down();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(http_get(relay.addr, "/healthz", "").await.0, 503);
    let refused = tokio_tungstenite::connect_async(format!("ws://{}/", relay.addr)).await;
    assert!(refused.is_err(), "no new WebSocket while draining");
    send(&mut open, json!({"t": "PING"})).await;
    expect(&mut open, "PONG").await;
    let closed = timeout(Duration::from_secs(10), relay.task)
        .await
        .expect("the relay stops after the drain");
    assert!(closed.unwrap().is_ok());
}

#[tokio::test]
async fn metrics_move_by_exactly_what_an_exchange_causes_and_name_nobody() {
    let relay = start(
        RelayConfig {
            ping_interval: Duration::from_secs(3600),
            ..RelayConfig::default()
        },
        true,
    )
    .await;
    let metrics_addr = relay.metrics.unwrap();
    let url = format!("ws://{}/", relay.addr);
    let (mut host, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    let (mut guest, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    send(&mut host, json!({"t": "CREATE_SESSION"})).await;
    let created = expect(&mut host, "SESSION_CREATED").await;
    let sid = created["sid"].as_str().unwrap().to_string();
    send(&mut host, json!({"t": "INVITE_CREATE", "sid": sid})).await;
    let code = expect(&mut host, "INVITE_CODE").await["data"]["code"]
        .as_str()
        .unwrap()
        .to_string();
    let wrong = if code == "000000" { "000001" } else { "000000" };
    send(&mut guest, json!({"t": "JOIN", "data": {"code": wrong}})).await;
    assert_eq!(
        expect(&mut guest, "ERROR").await["data"]["code"],
        "invite_unknown"
    );
    send(&mut guest, json!({"t": "JOIN", "data": {"code": code}})).await;
    let request = expect(&mut host, "JOIN_REQUEST").await;
    let joined = expect(&mut guest, "JOINED").await;
    send(
        &mut host,
        json!({"t": "JOIN_ACCEPT", "sid": sid, "data": {"clientID": request["data"]["clientID"]}}),
    )
    .await;
    let accepted = expect(&mut guest, "JOINED").await;
    for i in 0..3 {
        send(
            &mut host,
            json!({"t": "MSG", "sid": sid, "data": {"payload": "00", "msgID": i}}),
        )
        .await;
        expect(&mut guest, "MSG").await;
        expect(&mut host, "DELIVERED").await;
    }
    guest.send(Message::Text("nonsense".into())).await.unwrap();
    assert_eq!(
        expect(&mut guest, "ERROR").await["data"]["code"],
        "malformed_json"
    );

    let (status, text) = http_get(metrics_addr, "/metrics", "").await;
    assert_eq!(status, 200);
    let m = parse_exposition(&text);
    let got = |name: &str| {
        m.get(name)
            .copied()
            .unwrap_or_else(|| panic!("no {name} in {text}"))
    };
    // To the host: SESSION_CREATED, INVITE_CODE, JOIN_REQUEST, 3 DELIVERED; to the guest:
    // ERROR, JOINED, JOINED, 3 MSG, ERROR: 13 frames sent.
    for (name, want) in [
        ("parley_relay_connections", 2.0),
        (r#"parley_relay_sessions{state="paired"}"#, 1.0),
        (r#"parley_relay_sessions{state="unpaired"}"#, 0.0),
        (
            r#"parley_relay_frames_received_total{type="CREATE_SESSION"}"#,
            1.0,
        ),
        (r#"parley_relay_frames_received_total{type="JOIN"}"#, 2.0),
        (
            r#"parley_relay_frames_received_total{type="JOIN_ACCEPT"}"#,
            1.0,
        ),
        (r#"parley_relay_frames_received_total{type="MSG"}"#, 3.0),
        (
            r#"parley_relay_frames_received_total{type="unparsed"}"#,
            1.0,
        ),
        (
            r#"parley_relay_errors_sent_total{code="invite_unknown"}"#,
            1.0,
        ),
        (
            r#"parley_relay_errors_sent_total{code="malformed_json"}"#,
            1.0,
        ),
        (r#"parley_relay_errors_sent_total{code="not_member"}"#, 0.0),
        ("parley_relay_rate_limited_total", 0.0),
        ("parley_relay_frames_sent_total", 13.0),
    ] {
        assert_eq!(got(name), want, "{name}");
    }
    assert!(got("parley_relay_bytes_sent_total") > 0.0);
    assert!(got("parley_relay_process_resident_memory_bytes") > 0.0);
    assert!(got("parley_relay_process_open_fds") > 0.0);
    assert_eq!(
        got("parley_relay_mailbox_frames"),
        0.0,
        "the join was answered"
    );
    // No label names a session, a code, a token or an address.
    for secret in [
        sid.as_str(),
        code.as_str(),
        joined["data"]["resumeToken"].as_str().unwrap(),
        accepted["data"]["resumeToken"].as_str().unwrap(),
        created["data"]["resumeToken"].as_str().unwrap(),
        "127.0.0.1",
    ] {
        assert!(!text.contains(secret), "metrics leak {secret}");
    }
    assert_eq!(http_get(metrics_addr, "/healthz", "").await.0, 200);
    assert_eq!(http_get(metrics_addr, "/other", "").await.0, 404);
}

/// A WebSocket from a given loopback address, with extra request headers.
async fn ws_from(
    relay: SocketAddr,
    ip: [u8; 4],
    headers: &[(&'static str, &str)],
) -> Ws<MaybeTlsStream<TcpStream>> {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(IpAddr::from(ip), 0)).unwrap();
    let stream = socket.connect(relay).await.unwrap();
    let mut request = format!("ws://{relay}/").into_client_request().unwrap();
    for (name, value) in headers {
        request.headers_mut().insert(*name, value.parse().unwrap());
    }
    tokio_tungstenite::client_async(request, MaybeTlsStream::Plain(stream))
        .await
        .unwrap()
        .0
}

#[tokio::test]
async fn forwarded_addresses_count_only_from_a_trusted_proxy() {
    let relay = start(
        RelayConfig {
            trusted_proxies: vec!["127.0.0.5/32".parse::<IpNet>().unwrap()],
            join_failures_per_address: RateLimit {
                burst: 2,
                refill: Duration::from_secs(3600),
            },
            ..RelayConfig::default()
        },
        false,
    )
    .await;
    // Each failed JOIN is charged to the address the relay believes in.
    async fn failures_until_limited(ws: &mut Ws<MaybeTlsStream<TcpStream>>) -> usize {
        for n in 0..5 {
            send(ws, json!({"t": "JOIN", "data": {"code": "000000"}})).await;
            let e = expect(ws, "ERROR").await;
            if e["data"]["code"] == "rate_limited" {
                return n;
            }
            assert_eq!(e["data"]["code"], "invite_unknown");
        }
        panic!("never limited");
    }
    let proxy = [127, 0, 0, 5];
    let mut a = ws_from(relay.addr, proxy, &[("x-forwarded-for", "198.51.100.1")]).await;
    assert_eq!(failures_until_limited(&mut a).await, 2);
    // Another client behind the same proxy is someone else.
    let mut b = ws_from(relay.addr, proxy, &[("x-forwarded-for", "198.51.100.2")]).await;
    assert_eq!(failures_until_limited(&mut b).await, 2);
    // The first client again, on a new connection through the proxy: still limited, even
    // when it adds a Forwarded header of its own (the proxy passes it on; it is not the
    // header the relay reads) or puts an address of its choosing in front.
    let mut a2 = ws_from(
        relay.addr,
        proxy,
        &[
            ("x-forwarded-for", "203.0.113.50, 198.51.100.1"),
            ("forwarded", "for=203.0.113.51"),
        ],
    )
    .await;
    assert_eq!(failures_until_limited(&mut a2).await, 0);

    // From anyone else the header is ignored: its own address is charged.
    let stranger = [127, 0, 0, 6];
    let mut c = ws_from(relay.addr, stranger, &[("x-forwarded-for", "198.51.100.3")]).await;
    assert_eq!(failures_until_limited(&mut c).await, 2);
    let mut d = ws_from(relay.addr, stranger, &[("x-forwarded-for", "198.51.100.4")]).await;
    assert_eq!(failures_until_limited(&mut d).await, 0);
}
