//! The relay behind nginx, configured exactly as docs/deploy/nginx-parley.conf says (only its
//! ports, upstream and certificate paths changed): WebSocket over TLS through the proxy, the
//! health check, and the client addresses the proxy forwards, trusted for rate limits.
//! Needs nginx (Debian: nginx-light; .ci/run installs it).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::net::{IpAddr, SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use parley_e2e::pki::{TestCa, Validity, client_config};
use parley_e2e::{RelayProcess, TempDir};
use rustls::pki_types::ServerName;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpSocket;
use tokio_tungstenite::tungstenite::Message;

const STEP: Duration = Duration::from_secs(10);

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Nginx(Child);

impl Drop for Nginx {
    /// SIGTERM, so the master stops its workers too (SIGKILL would orphan them).
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let deadline = Instant::now() + STEP;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// nginx with the deployment guide's site, listening on `https_port`, in front of `relay`.
fn nginx(
    dir: &std::path::Path,
    cert: &parley_e2e::pki::ServerCert,
    relay: &str,
    https_port: u16,
) -> Nginx {
    let site = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../docs/deploy/nginx-parley.conf"
    ))
    .unwrap();
    let site = site
        .replace(
            "listen 443 ssl;",
            &format!("listen 127.0.0.1:{https_port} ssl;"),
        )
        .replace("listen [::]:443 ssl;", "")
        .replace("listen 80;", &format!("listen 127.0.0.1:{};", free_port()))
        .replace("listen [::]:80;", "")
        .replace("server 127.0.0.1:9000;", &format!("server {relay};"))
        .replace(
            "/etc/letsencrypt/live/relay.example.org/fullchain.pem",
            cert.cert.to_str().unwrap(),
        )
        .replace(
            "/etc/letsencrypt/live/relay.example.org/privkey.pem",
            cert.key.to_str().unwrap(),
        )
        .replace("/var/www/acme", dir.to_str().unwrap());
    assert!(
        site.contains(relay),
        "the upstream line moved; update this test"
    );
    std::fs::write(dir.join("parley.conf"), site).unwrap();
    let d = dir.display();
    std::fs::write(
        dir.join("nginx.conf"),
        format!(
            "pid {d}/nginx.pid;\nerror_log stderr;\ndaemon off;\nevents {{}}\nhttp {{\n  access_log off;\n  client_body_temp_path {d};\n  proxy_temp_path {d};\n  include {d}/parley.conf;\n}}\n"
        ),
    )
    .unwrap();
    let child = Command::new("nginx")
        .args(["-c", dir.join("nginx.conf").to_str().unwrap()])
        .args(["-p", dir.to_str().unwrap(), "-e", "stderr"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("nginx is needed for this test: apt-get install nginx-light (.ci/run does)");
    // Up once it accepts connections.
    let deadline = Instant::now() + STEP;
    while std::net::TcpStream::connect(("127.0.0.1", https_port)).is_err() {
        assert!(Instant::now() < deadline, "nginx did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    Nginx(child)
}

type Wss =
    tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;

/// `wss://localhost` through nginx, from the loopback address `from`.
async fn wss_from(from: [u8; 4], port: u16, ca_pem: &str) -> Wss {
    let config = client_config(ca_pem);
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(IpAddr::from(from), 0)).unwrap();
    let tcp = socket
        .connect(SocketAddr::from(([127, 0, 0, 1], port)))
        .await
        .unwrap();
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    tokio_tungstenite::client_async(format!("wss://localhost:{port}/"), tls)
        .await
        .unwrap()
        .0
}

async fn round_trip(ws: &mut Wss, frame: Value) -> Value {
    ws.send(Message::Text(frame.to_string().into()))
        .await
        .unwrap();
    loop {
        match tokio::time::timeout(STEP, ws.next()).await.unwrap() {
            Some(Ok(Message::Text(t))) => {
                let v: Value = serde_json::from_str(&t).unwrap();
                if v["t"] != "PING" {
                    return v;
                }
            }
            Some(Ok(_)) => {}
            other => panic!("connection ended: {other:?}"),
        }
    }
}

/// Failed JOINs until the relay rate-limits this connection's address.
async fn failures_until_limited(ws: &mut Wss) -> usize {
    for n in 0..6 {
        let e = round_trip(ws, json!({"t": "JOIN", "data": {"code": "000000"}})).await;
        if e["data"]["code"] == "rate_limited" {
            return n;
        }
        assert_eq!(e["data"]["code"], "invite_unknown", "{e}");
    }
    panic!("never rate-limited");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_works_behind_the_guides_nginx_and_sees_real_client_addresses() {
    let dir = TempDir::new("nginx");
    let ca = TestCa::new("Parley test CA");
    let cert = ca.server(dir.path(), "relay", &["localhost"], Validity::Now);
    let relay = RelayProcess::start(&[
        "--trusted-proxy",
        "127.0.0.1",
        "--join-failures-per-address",
        "2",
    ]);
    let https_port = free_port();
    let _nginx = nginx(dir.path(), &cert, relay.addr(), https_port);

    // Health, through the proxy (over TLS, as a load balancer would ask).
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", https_port))
        .await
        .unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(client_config(&ca.pem))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    tls.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    // Read the answer as far as its body; nginx may keep the TLS connection open after it.
    let mut answer = String::new();
    let deadline = Instant::now() + STEP;
    while !answer.ends_with("ok\n") && Instant::now() < deadline {
        let mut chunk = [0u8; 512];
        match tokio::time::timeout(STEP, tls.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => answer.push_str(&String::from_utf8_lossy(&chunk[..n])),
            _ => break,
        }
    }
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with("ok\n"), "{answer}");

    // A session through nginx: host and guest pair and a message goes through.
    let mut host = wss_from([127, 0, 0, 2], https_port, &ca.pem).await;
    let mut guest = wss_from([127, 0, 0, 3], https_port, &ca.pem).await;
    let sid = round_trip(&mut host, json!({"t": "CREATE_SESSION"})).await["sid"].clone();
    let code =
        round_trip(&mut host, json!({"t": "INVITE_CREATE", "sid": sid})).await["data"]["code"]
            .clone();
    let joined = round_trip(&mut guest, json!({"t": "JOIN", "data": {"code": code}})).await;
    assert_eq!(joined["t"], "JOINED");

    // The relay charges each client's own address, as nginx forwarded it: one limited client
    // does not limit the other, though both reach the relay from nginx's 127.0.0.1.
    let mut a = wss_from([127, 0, 0, 4], https_port, &ca.pem).await;
    assert_eq!(failures_until_limited(&mut a).await, 2);
    let mut b = wss_from([127, 0, 0, 5], https_port, &ca.pem).await;
    assert_eq!(failures_until_limited(&mut b).await, 2);
}
