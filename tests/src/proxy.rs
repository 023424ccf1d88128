//! A hostile relay for tests: a WebSocket proxy between clients and the real relay that can
//! alter, drop or duplicate any frame. It is what a compromised relay could do.

use std::sync::Arc;

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

/// Which way a frame is going.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Toward {
    Relay,
    Client,
}

/// Decides what becomes of each text frame: the frames to pass on instead (empty to drop it).
pub type Tamper = Arc<dyn Fn(Toward, &str) -> Vec<String> + Send + Sync>;

/// The same for each binary message (a DATA frame: protocol.md 2.2).
pub type DataTamper = Arc<dyn Fn(Toward, &[u8]) -> Vec<Vec<u8>> + Send + Sync>;

/// Asked before each frame: `true` cuts that connection there and then (both TCP connections
/// are dropped, the frame with them), as a failing network would.
pub type Cut = Arc<dyn Fn() -> bool + Send + Sync>;

/// Passes every frame on unchanged.
pub fn honest() -> Tamper {
    Arc::new(|_, text| vec![text.to_string()])
}

/// Passes every binary message on unchanged.
pub fn honest_data() -> DataTamper {
    Arc::new(|_, bytes| vec![bytes.to_vec()])
}

pub struct Proxy {
    url: String,
}

impl Proxy {
    /// Starts the proxy on its own thread and runtime; it lives until the test process ends.
    pub fn start(relay_url: &str, tamper: Tamper) -> Proxy {
        Proxy::start_cutting(relay_url, tamper, Arc::new(|| false))
    }

    /// A proxy that also cuts connections whenever `cut` says so.
    pub fn start_cutting(relay_url: &str, tamper: Tamper, cut: Cut) -> Proxy {
        Proxy::start_full(relay_url, tamper, honest_data(), cut)
    }

    /// A proxy that does what `data` says with binary messages, and passes text on.
    pub fn start_data(relay_url: &str, data: DataTamper) -> Proxy {
        Proxy::start_full(relay_url, honest(), data, Arc::new(|| false))
    }

    /// A proxy that does what `data` says with binary messages, and cuts connections whenever
    /// `cut` says so (asked before every frame, text or binary).
    pub fn start_data_cutting(relay_url: &str, data: DataTamper, cut: Cut) -> Proxy {
        Proxy::start_full(relay_url, honest(), data, cut)
    }

    fn start_full(relay_url: &str, tamper: Tamper, data: DataTamper, cut: Cut) -> Proxy {
        let relay_url = relay_url.to_string();
        let addr = crate::serve_on_loopback(move |stream| {
            let (relay_url, cut) = (relay_url.clone(), cut.clone());
            let tampers = (tamper.clone(), data.clone());
            async move {
                let Ok(client) = tokio_tungstenite::accept_async(stream).await else {
                    return;
                };
                let Ok((relay, _)) = tokio_tungstenite::connect_async(&relay_url).await else {
                    return;
                };
                splice(client, relay, tampers, cut).await;
            }
        });
        Proxy {
            url: format!("ws://{addr}"),
        }
    }

    pub fn url(&self) -> &str {
        &self.url
    }
}

async fn splice<C, R>(client: C, relay: R, (tamper, data): (Tamper, DataTamper), cut: Cut)
where
    C: futures_util::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>>
        + futures_util::Sink<Message>
        + Unpin,
    R: futures_util::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>>
        + futures_util::Sink<Message>
        + Unpin,
{
    let (mut client_tx, mut client_rx) = client.split();
    let (mut relay_tx, mut relay_rx) = relay.split();
    // A side that can no longer be written to (it has hung up) is still read until its stream
    // ends: a client's last frames before its Close, a final receipt say, must reach the relay
    // even while frames toward that client are in flight, as they would without the proxy.
    let (mut client_writable, mut relay_writable) = (true, true);
    loop {
        tokio::select! {
            msg = client_rx.next() => {
                let Some(frames) = tampered(msg, Toward::Relay, &tamper, &data) else { break };
                if cut() { return; }
                if relay_writable {
                    relay_writable = pass(&mut relay_tx, frames).await;
                }
            }
            msg = relay_rx.next() => {
                let Some(frames) = tampered(msg, Toward::Client, &tamper, &data) else { break };
                if cut() { return; }
                if client_writable {
                    client_writable = pass(&mut client_tx, frames).await;
                }
            }
        }
    }
    let _ = client_tx.close().await;
    let _ = relay_tx.close().await;
}

/// What becomes of a message read from one side; `None` ends the splice (the stream ended,
/// failed, or sent something other than text or binary).
fn tampered(
    msg: Option<Result<Message, tokio_tungstenite::tungstenite::Error>>,
    toward: Toward,
    tamper: &Tamper,
    data: &DataTamper,
) -> Option<Vec<Message>> {
    match msg {
        Some(Ok(Message::Text(text))) => Some(
            tamper(toward, text.as_str())
                .into_iter()
                .map(|t| Message::Text(t.into()))
                .collect(),
        ),
        Some(Ok(Message::Binary(bytes))) => Some(
            data(toward, &bytes)
                .into_iter()
                .map(|b| Message::Binary(b.into()))
                .collect(),
        ),
        _ => None,
    }
}

/// Sends `frames` in order; false once the sink has failed.
async fn pass<S: futures_util::Sink<Message> + Unpin>(sink: &mut S, frames: Vec<Message>) -> bool {
    for frame in frames {
        if sink.send(frame).await.is_err() {
            return false;
        }
    }
    true
}
