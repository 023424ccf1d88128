//! Accepting connections, the periodic sweep, and graceful shutdown.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, ToSocketAddrs};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::RelayConfig;
use crate::connection;
use crate::hub::{Hub, Stats};

/// A bound relay, ready to [`run`](Relay::run).
pub struct Relay {
    listener: TcpListener,
    hub: Arc<Hub>,
}

/// A cheap handle for looking at a running relay (tests, operators).
#[derive(Clone)]
pub struct RelayHandle {
    hub: Arc<Hub>,
}

impl RelayHandle {
    pub fn stats(&self) -> Stats {
        self.hub.stats()
    }
}

impl Relay {
    /// Binds the listener; refuses a configuration that cannot work (see
    /// [`RelayConfig::validate`]) with `InvalidInput`.
    pub async fn bind(addr: impl ToSocketAddrs, config: RelayConfig) -> io::Result<Relay> {
        config.validate()?;
        let listener = TcpListener::bind(addr).await?;
        Ok(Relay {
            listener,
            hub: Arc::new(Hub::new(config)),
        })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    pub fn handle(&self) -> RelayHandle {
        RelayHandle {
            hub: self.hub.clone(),
        }
    }

    /// Serves until `shutdown` resolves, then closes every connection with 1001 "going away"
    /// (each gets `shutdown_grace` to receive it) and returns.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> io::Result<()> {
        let Relay { listener, hub } = self;
        let stop = CancellationToken::new();
        let tracker = TaskTracker::new();
        tracker.spawn(sweep(hub.clone(), stop.clone()));

        let mut next_id = 0u64;
        let mut backoff = Duration::from_millis(10);
        tokio::pin!(shutdown);
        loop {
            let accepted = tokio::select! {
                () = &mut shutdown => break,
                accepted = listener.accept() => accepted,
            };
            let (stream, peer) = match accepted {
                Ok(pair) => {
                    backoff = Duration::from_millis(10);
                    pair
                }
                Err(e) => {
                    // Usually out of file descriptors: wait for some to free up rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            };
            let Some(slot) = hub.admit_connection(peer.ip()) else {
                tracing::warn!(
                    "connection refused: relay at max_connections, or its address at max_connections_per_address"
                );
                continue;
            };
            next_id += 1;
            tracker.spawn(connection::serve(
                hub.clone(),
                slot,
                next_id,
                stream,
                peer,
                stop.clone(),
            ));
        }

        tracing::info!("shutting down");
        stop.cancel();
        tracker.close();
        let grace = hub
            .config()
            .shutdown_grace
            .saturating_add(Duration::from_millis(500));
        if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
            tracing::warn!("some connections did not close in time");
        }
        Ok(())
    }
}

async fn sweep(hub: Arc<Hub>, stop: CancellationToken) {
    let mut every = tokio::time::interval(hub.config().sweep_interval);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = every.tick() => hub.sweep(Instant::now()),
        }
    }
}
