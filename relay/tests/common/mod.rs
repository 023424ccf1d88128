//! A relay in-process on 127.0.0.1:0 and a plain WebSocket test client that speaks raw JSON.
#![allow(
    dead_code,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing
)]

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use parley_relay::{Relay, RelayConfig, RelayHandle};
use serde_json::{Value, json};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// How long a test waits for any one expected frame before failing.
pub const STEP: Duration = Duration::from_secs(5);

pub struct TestRelay {
    pub addr: SocketAddr,
    pub handle: RelayHandle,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<std::io::Result<()>>>,
}

impl TestRelay {
    pub async fn start() -> TestRelay {
        TestRelay::with_config(RelayConfig::default()).await
    }

    pub async fn with_config(config: RelayConfig) -> TestRelay {
        let relay = Relay::bind("127.0.0.1:0", config).await.unwrap();
        let addr = relay.local_addr().unwrap();
        let handle = relay.handle();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(relay.run(async move {
            let _ = stopped.await;
        }));
        TestRelay {
            addr,
            handle,
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub fn url(&self) -> String {
        format!("ws://{}", self.addr)
    }

    pub async fn client(&self) -> TestClient {
        TestClient::connect(&self.url()).await
    }

    /// A client whose socket is bound to another loopback address (127.0.0.0/8 all routes to
    /// `lo`), so per-address limits see a different remote.
    pub async fn client_from(&self, ip: [u8; 4]) -> TestClient {
        let socket = TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::new(IpAddr::from(ip), 0)).unwrap();
        let stream = socket.connect(self.addr).await.unwrap();
        TestClient::over(stream, &self.url()).await
    }

    /// A client with a tiny kernel receive buffer, for slow-reader tests.
    pub async fn client_with_small_buffer(&self) -> TestClient {
        let socket = TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let stream = socket.connect(self.addr).await.unwrap();
        TestClient::over(stream, &self.url()).await
    }

    /// Stops the relay and waits for `run` to return.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(STEP, task)
                .await
                .expect("relay did not stop")
                .unwrap()
                .unwrap();
        }
    }

    /// A host and a guest paired through the Parley flow (tokens, no stored parameters).
    pub async fn pair(&self) -> Pair {
        let mut host = self.client().await;
        let guest = self.client().await;
        let (sid, host_token) = host.create_session().await;
        let code = host.invite(&sid).await;
        Pair::complete(host, guest, sid, host_token, &code).await
    }
}

pub struct Pair {
    pub host: TestClient,
    pub guest: TestClient,
    pub sid: String,
    pub host_token: String,
    pub guest_token: String,
}

impl Pair {
    /// JOIN with `code`, then the host accepts; checks every frame on the way.
    pub async fn complete(
        mut host: TestClient,
        mut guest: TestClient,
        sid: String,
        host_token: String,
        code: &str,
    ) -> Pair {
        guest
            .send(json!({"t": "JOIN", "data": {"code": code, "publicKey": "bb", "pake": "p2"}}))
            .await;
        let request = host.expect("JOIN_REQUEST").await;
        assert_eq!(request["sid"], sid.as_str());
        assert_eq!(request["data"]["publicKey"], "bb");
        assert_eq!(
            request["data"]["pake"], "p2",
            "extra fields reach the host untouched"
        );
        assert!(
            request["data"].get("code").is_none(),
            "the invite code must never be forwarded"
        );
        let client_id = request["data"]["clientID"].as_str().unwrap().to_string();
        let joined = guest.expect("JOINED").await;
        assert_eq!(joined["sid"], sid.as_str());
        let joiner_token = joined["data"]["resumeToken"].as_str().unwrap().to_string();
        assert_eq!(joiner_token.len(), 64);
        host.send(json!({"t": "JOIN_ACCEPT", "sid": sid, "data": {"clientID": client_id, "publicKey": "aa", "confirm": "c1", "resumeToken": "forged by the host"}}))
            .await;
        let mut accepted = guest.expect("JOINED").await;
        // The member's token replaces the joiner's; the host's own fields pass untouched.
        let guest_token = accepted["data"]["resumeToken"]
            .as_str()
            .unwrap()
            .to_string();
        assert_eq!(guest_token.len(), 64);
        assert_ne!(guest_token, joiner_token);
        accepted["data"]
            .as_object_mut()
            .unwrap()
            .remove("resumeToken");
        assert_eq!(
            accepted["data"],
            json!({"publicKey": "aa", "confirm": "c1"})
        );
        Pair {
            host,
            guest,
            sid,
            host_token,
            guest_token,
        }
    }

    /// A MSG each way arrives byte for byte and is acknowledged with DELIVERED.
    pub async fn exchange(&mut self, tag: &str) {
        let sid = self.sid.clone();
        self.host
            .assert_delivers(&mut self.guest, &sid, &format!("{tag}-h"))
            .await;
        self.guest
            .assert_delivers(&mut self.host, &sid, &format!("{tag}-g"))
            .await;
    }
}

pub struct TestClient {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

impl TestClient {
    pub async fn connect(url: &str) -> TestClient {
        let (ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
        TestClient { ws }
    }

    async fn over(stream: TcpStream, url: &str) -> TestClient {
        let (ws, _) = tokio_tungstenite::client_async(url, MaybeTlsStream::Plain(stream))
            .await
            .unwrap();
        TestClient { ws }
    }

    pub async fn send(&mut self, frame: Value) {
        self.send_text(&frame.to_string()).await;
    }

    pub async fn send_text(&mut self, text: &str) {
        self.ws.send(Message::Text(text.into())).await.unwrap();
    }

    /// The next frame's raw text, skipping the relay's PINGs.
    pub async fn recv_text(&mut self) -> String {
        loop {
            let msg = tokio::time::timeout(STEP, self.ws.next())
                .await
                .expect("timed out waiting for a frame");
            match msg {
                Some(Ok(Message::Text(text))) if text.as_str() != r#"{"t":"PING"}"# => {
                    return text.to_string();
                }
                Some(Ok(Message::Text(_) | Message::Ping(_) | Message::Pong(_))) => {}
                other => panic!("expected a text frame, got {other:?}"),
            }
        }
    }

    pub async fn recv(&mut self) -> Value {
        serde_json::from_str(&self.recv_text().await).unwrap()
    }

    /// The next frame, which must be of type `t`.
    pub async fn expect(&mut self, t: &str) -> Value {
        let frame = self.recv().await;
        assert_eq!(frame["t"], t, "unexpected frame {frame}");
        frame
    }

    /// The next frame, which must be an ERROR with this code and a non-empty message.
    pub async fn expect_error(&mut self, code: &str) -> Value {
        let frame = self.expect("ERROR").await;
        assert_eq!(frame["data"]["code"], code, "unexpected error {frame}");
        assert!(
            frame["data"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty())
        );
        frame
    }

    /// Proves nothing was queued for us before now: PING is answered by PONG, and frames are
    /// delivered in order, so anything sent to us earlier would arrive first.
    pub async fn expect_nothing_pending(&mut self) {
        self.send(json!({"t": "PING"})).await;
        self.expect("PONG").await;
    }

    /// Starts the closing handshake and returns the relay's answer: its Close frame, or the
    /// error that ended the stream without one.
    pub async fn close_and_read_reply(&mut self) -> Result<Option<CloseFrame>, String> {
        self.ws.close(None).await.map_err(|e| e.to_string())?;
        loop {
            let msg = tokio::time::timeout(STEP, self.ws.next())
                .await
                .map_err(|_| "no answer to our close".to_string())?;
            match msg {
                Some(Ok(Message::Close(frame))) => return Ok(frame),
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e.to_string()),
                None => return Err("the stream ended without a close frame".into()),
            }
        }
    }

    /// The connection ends: a close frame (returned) or the stream simply ending.
    pub async fn expect_closed(&mut self) -> Option<CloseFrame> {
        loop {
            let msg = tokio::time::timeout(STEP, self.ws.next())
                .await
                .expect("connection was not closed");
            match msg {
                Some(Ok(Message::Close(frame))) => return frame,
                None | Some(Err(_)) => return None,
                Some(Ok(_)) => {}
            }
        }
    }

    pub async fn create_session(&mut self) -> (String, String) {
        self.send(json!({"t": "CREATE_SESSION"})).await;
        let created = self.expect("SESSION_CREATED").await;
        let sid = created["sid"].as_str().unwrap().to_string();
        assert_eq!(sid.len(), 32);
        assert!(sid.bytes().all(|b| b.is_ascii_hexdigit()));
        let token = created["data"]["resumeToken"].as_str().unwrap().to_string();
        (sid, token)
    }

    pub async fn invite(&mut self, sid: &str) -> String {
        self.send(json!({"t": "INVITE_CREATE", "sid": sid})).await;
        let invite = self.expect("INVITE_CODE").await;
        assert_eq!(invite["sid"], sid);
        let code = invite["data"]["code"].as_str().unwrap().to_string();
        assert_eq!(code.len(), 6);
        assert!(code.bytes().all(|b| b.is_ascii_digit()));
        code
    }

    /// Sends a MSG and checks the peer gets the exact bytes and we get DELIVERED.
    pub async fn assert_delivers(&mut self, peer: &mut TestClient, sid: &str, msg_id: &str) {
        let text = format!(
            r#"{{"t":"MSG","sid":"{sid}","data":{{"payload":"00aa{msg_id}","msgID":"{msg_id}","seq":1}}}}"#
        );
        self.send_text(&text).await;
        assert_eq!(
            peer.recv_text().await,
            text,
            "MSG must be forwarded byte for byte"
        );
        let delivered = self.expect("DELIVERED").await;
        assert_eq!(delivered["sid"], sid);
        assert_eq!(delivered["data"]["msgID"], msg_id);
    }
}

impl TestClient {
    /// The next text frame, relay PINGs included.
    pub async fn recv_raw(&mut self) -> String {
        loop {
            let msg = tokio::time::timeout(STEP, self.ws.next())
                .await
                .expect("timed out waiting for a frame");
            match msg {
                Some(Ok(Message::Text(text))) => return text.to_string(),
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                other => panic!("expected a text frame, got {other:?}"),
            }
        }
    }
}

impl TestClient {
    pub async fn ws_send_binary(&mut self, bytes: Vec<u8>) {
        self.ws.send(Message::Binary(bytes.into())).await.unwrap();
    }

    /// Sends without failing the test when the relay has already hung up.
    pub async fn try_send_text(
        &mut self,
        text: &str,
    ) -> Result<(), tokio_tungstenite::tungstenite::Error> {
        tokio::time::timeout(STEP, self.ws.send(Message::Text(text.into())))
            .await
            .unwrap_or(Err(tokio_tungstenite::tungstenite::Error::ConnectionClosed))
    }
}

impl TestClient {
    /// Sends several frames in one socket write, so the relay reads them in one batch.
    pub async fn send_batch(&mut self, texts: &[String]) {
        for text in texts {
            self.ws
                .feed(Message::Text(text.as_str().into()))
                .await
                .unwrap();
        }
        self.ws.flush().await.unwrap();
    }
}

impl TestClient {
    /// The next text frame (relay PINGs skipped), or why none came: for tests that count
    /// failures instead of stopping at the first.
    pub async fn try_recv(&mut self) -> Result<String, String> {
        loop {
            let msg = tokio::time::timeout(STEP, self.ws.next())
                .await
                .map_err(|_| "timed out waiting for a frame".to_string())?;
            match msg {
                Some(Ok(Message::Text(text))) if text.as_str() != r#"{"t":"PING"}"# => {
                    return Ok(text.to_string());
                }
                Some(Ok(Message::Text(_) | Message::Ping(_) | Message::Pong(_))) => {}
                Some(Ok(other)) => return Err(format!("expected a text frame, got {other:?}")),
                Some(Err(e)) => return Err(e.to_string()),
                None => return Err("the connection ended".into()),
            }
        }
    }
}

impl TestRelay {
    /// Like [`client_from`](Self::client_from), but the upgrade may be refused.
    pub async fn try_client_from(
        &self,
        ip: [u8; 4],
    ) -> Result<TestClient, tokio_tungstenite::tungstenite::Error> {
        let socket = TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::new(IpAddr::from(ip), 0)).unwrap();
        let stream = socket.connect(self.addr).await?;
        let (ws, _) = tokio::time::timeout(
            STEP,
            tokio_tungstenite::client_async(&self.url(), MaybeTlsStream::Plain(stream)),
        )
        .await
        .map_err(|_| tokio_tungstenite::tungstenite::Error::ConnectionClosed)??;
        Ok(TestClient { ws })
    }
}
