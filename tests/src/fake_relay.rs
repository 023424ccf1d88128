//! A scripted relay for tests: a bare WebSocket server that answers each text frame a client
//! sends as a script says, and records what it received. It stands for a relay that is broken
//! or hostile in ways a proxy in front of the real relay cannot be: it can stay silent, send
//! junk, huge frames or absurd numbers.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

/// What to answer to one text frame, given the connection's number (0 for the first) and the
/// frame: the messages to send back, in order (empty: say nothing).
pub type Script = Arc<dyn Fn(usize, &str) -> Vec<Message> + Send + Sync>;

pub struct FakeRelay {
    url: String,
    connections: Arc<AtomicUsize>,
    received: Arc<Mutex<Vec<(usize, String)>>>,
}

impl FakeRelay {
    /// Starts the server on its own thread and runtime; it lives until the test process ends.
    pub fn start(script: Script) -> FakeRelay {
        let connections = Arc::new(AtomicUsize::new(0));
        let received = Arc::new(Mutex::new(Vec::new()));
        let (count, log) = (connections.clone(), received.clone());
        let addr = crate::serve_on_loopback(move |stream| {
            let (script, count, log) = (script.clone(), count.clone(), log.clone());
            async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
                    return;
                };
                let index = count.fetch_add(1, Ordering::SeqCst);
                while let Some(Ok(msg)) = ws.next().await {
                    let Message::Text(text) = msg else { continue };
                    log.lock().unwrap().push((index, text.to_string()));
                    for answer in script(index, text.as_str()) {
                        if ws.send(answer).await.is_err() {
                            return;
                        }
                    }
                }
            }
        });
        FakeRelay {
            url: format!("ws://{addr}"),
            connections,
            received,
        }
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// How many WebSocket connections it has accepted so far.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    /// Every text frame received so far, with its connection's number.
    pub fn received(&self) -> Vec<(usize, String)> {
        self.received.lock().unwrap().clone()
    }
}

/// The `t` of a frame, if it is JSON with one.
pub fn frame_type(text: &str) -> Option<String> {
    let value: serde_json::Value = serde_json::from_str(text).ok()?;
    value.get("t")?.as_str().map(str::to_string)
}

pub fn text(frame: impl Into<String>) -> Message {
    Message::Text(frame.into().into())
}
