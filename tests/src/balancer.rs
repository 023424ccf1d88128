//! A TCP load balancer for the cluster tests: each new connection goes to the next backend in
//! turn that accepts it, with no stickiness, as a plain L4 balancer would.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::net::TcpStream;

pub struct Balancer {
    url: String,
    backends: Arc<Mutex<Vec<String>>>,
}

impl Balancer {
    /// Starts on its own thread and runtime; it lives until the test process ends.
    pub fn start(backends: &[&str]) -> Balancer {
        let backends: Arc<Mutex<Vec<String>>> =
            Arc::new(Mutex::new(backends.iter().map(|b| b.to_string()).collect()));
        let shared = backends.clone();
        let turn = Arc::new(AtomicUsize::new(0));
        let addr = crate::serve_on_loopback(move |mut client| {
            let list = shared.lock().unwrap().clone();
            let first = turn.fetch_add(1, Ordering::Relaxed);
            async move {
                for i in 0..list.len() {
                    let backend = &list[(first + i) % list.len()];
                    if let Ok(mut server) = TcpStream::connect(backend).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                        return;
                    }
                }
            }
        });
        Balancer {
            url: format!("ws://{addr}"),
            backends,
        }
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// Replaces the backends (for connections from now on).
    pub fn set_backends(&self, backends: &[&str]) {
        *self.backends.lock().unwrap() = backends.iter().map(|b| b.to_string()).collect();
    }
}
