//! A TCP load balancer for the cluster tests: each new connection goes to the next backend in
//! turn that accepts it, with no stickiness, as a plain L4 balancer would.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};

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
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
                tx.send(listener.local_addr().unwrap()).unwrap();
                let turn = Arc::new(AtomicUsize::new(0));
                loop {
                    let Ok((mut client, _)) = listener.accept().await else {
                        return;
                    };
                    let list = shared.lock().unwrap().clone();
                    let first = turn.fetch_add(1, Ordering::Relaxed);
                    tokio::spawn(async move {
                        for i in 0..list.len() {
                            let backend = &list[(first + i) % list.len()];
                            if let Ok(mut server) = TcpStream::connect(backend).await {
                                let _ =
                                    tokio::io::copy_bidirectional(&mut client, &mut server).await;
                                return;
                            }
                        }
                    });
                }
            });
        });
        let addr = rx.recv().unwrap();
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
