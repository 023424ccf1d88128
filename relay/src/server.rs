//! Accepting connections, the metrics port, the periodic sweep, and graceful shutdown.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::registry::Registry;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream, ToSocketAddrs};
use tokio::time::{Instant, timeout};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::cluster::Cluster;
use crate::config::{RelayConfig, later};
use crate::hub::{Hub, Stats};
use crate::read_ahead::ReadAhead;
use crate::{connection, http, metrics};

/// A bound relay, ready to [`run`](Relay::run).
pub struct Relay {
    listener: TcpListener,
    metrics_listener: Option<TcpListener>,
    hub: Arc<Hub>,
    registry: Arc<Registry>,
    /// In a cluster (`--redis`): this node, and its tasks, stopped once every connection is.
    cluster: Option<Arc<Cluster>>,
    cluster_tasks: TaskTracker,
    cluster_stop: CancellationToken,
}

/// A cheap handle for looking at a running relay (tests, operators).
#[derive(Clone)]
pub struct RelayHandle {
    hub: Arc<Hub>,
    registry: Arc<Registry>,
}

impl RelayHandle {
    pub fn stats(&self) -> Stats {
        self.hub.stats()
    }

    /// Loads the TLS certificate and key files again: new connections get the new ones, open
    /// ones go on. On failure nothing changes, and the error says which file and why.
    pub fn reload_tls(&self) -> io::Result<()> {
        match &self.hub.config().tls {
            Some(tls) => tls.reload(),
            None => Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "this relay serves no TLS",
            )),
        }
    }

    /// The metrics, as `/metrics` serves them.
    pub fn metrics_text(&self) -> String {
        metrics::encode(&self.registry).unwrap_or_default()
    }
}

impl Relay {
    /// Binds the listener; refuses a configuration that cannot work (see
    /// [`RelayConfig::validate`]) with `InvalidInput`. In a cluster, joins it first: a Redis
    /// that cannot be reached is `NotConnected`.
    pub async fn bind(addr: impl ToSocketAddrs, config: RelayConfig) -> io::Result<Relay> {
        config.validate()?;
        let listener = TcpListener::bind(addr).await?;
        let hub = Arc::new(Hub::new(config));
        let registry = Arc::new(metrics::registry(hub.clone()));
        let cluster_tasks = TaskTracker::new();
        let cluster_stop = CancellationToken::new();
        let cluster = match &hub.config().cluster {
            Some(config) => Some(
                Cluster::start(config, hub.clone(), &cluster_tasks, cluster_stop.clone())
                    .await
                    .map_err(|e| io::Error::new(io::ErrorKind::NotConnected, e.to_string()))?,
            ),
            None => None,
        };
        Ok(Relay {
            listener,
            metrics_listener: None,
            hub,
            registry,
            cluster,
            cluster_tasks,
            cluster_stop,
        })
    }

    /// Also serves `GET /metrics` (and `/healthz`) on `addr`, plain HTTP: keep it private.
    pub async fn bind_metrics(&mut self, addr: impl ToSocketAddrs) -> io::Result<SocketAddr> {
        let listener = TcpListener::bind(addr).await?;
        let bound = listener.local_addr()?;
        self.metrics_listener = Some(listener);
        Ok(bound)
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    pub fn handle(&self) -> RelayHandle {
        RelayHandle {
            hub: self.hub.clone(),
            registry: self.registry.clone(),
        }
    }

    /// Serves until `shutdown` resolves; then drains: `/healthz` answers 503 and new
    /// connections are refused for `drain_time` while open ones go on, then every connection
    /// is closed with 1001 "going away" (each gets `shutdown_grace` to receive it), and `run`
    /// returns.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> io::Result<()> {
        let Relay {
            listener,
            metrics_listener,
            hub,
            registry,
            cluster,
            cluster_tasks,
            cluster_stop,
        } = self;
        let config = hub.config();
        let stop = CancellationToken::new();
        let tracker = TaskTracker::new();
        tracker.spawn(sweep(hub.clone(), stop.clone()));

        let mut backoff = Duration::from_millis(10);
        // What shutdown has reached: serving, draining (until the first deadline), closing
        // (until every connection has gone, or the second deadline).
        let far = later(Instant::now(), Duration::MAX);
        let mut drain_until = far;
        let mut close_until = far;
        let mut closing = false;
        tokio::pin!(shutdown);
        loop {
            let accepted = tokio::select! {
                () = &mut shutdown, if !hub.is_draining() => {
                    tracing::info!("draining");
                    hub.start_draining();
                    drain_until = later(Instant::now(), config.drain_time);
                    continue;
                }
                () = tokio::time::sleep_until(drain_until), if hub.is_draining() && !closing => {
                    tracing::info!("shutting down");
                    closing = true;
                    stop.cancel();
                    tracker.close();
                    close_until = later(Instant::now(), config.shutdown_grace.saturating_add(Duration::from_millis(500)));
                    continue;
                }
                () = tracker.wait(), if closing => break,
                () = tokio::time::sleep_until(close_until), if closing => {
                    tracing::warn!("some connections did not close in time");
                    break;
                }
                accepted = accept(metrics_listener.as_ref()), if metrics_listener.is_some() => {
                    if let Ok((stream, peer)) = accepted {
                        tracker.spawn(serve_metrics(hub.clone(), registry.clone(), stream, peer));
                    }
                    continue;
                }
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
            // An IPv4 client on a dual-stack socket is its IPv4 address, for limits and logs.
            let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
            let Some(slot) = hub.admit_connection(peer.ip()) else {
                hub.metrics().refused_connection();
                tracing::warn!(
                    "connection refused: relay at max_connections, or its address at max_connections_per_address"
                );
                continue;
            };
            tracker.spawn(connection::serve(
                hub.clone(),
                cluster.clone(),
                slot,
                hub.next_conn_id(),
                stream,
                peer,
                stop.clone(),
            ));
        }
        cluster_stop.cancel();
        cluster_tasks.close();
        cluster_tasks.wait().await;
        Ok(())
    }
}

async fn accept(listener: Option<&TcpListener>) -> io::Result<(TcpStream, SocketAddr)> {
    match listener {
        Some(listener) => listener.accept().await,
        None => std::future::pending().await,
    }
}

/// One request on the metrics port: `/metrics`, `/healthz`, or a plain refusal.
async fn serve_metrics(
    hub: Arc<Hub>,
    registry: Arc<Registry>,
    stream: TcpStream,
    peer: SocketAddr,
) {
    let mut stream = ReadAhead::new(stream);
    let answered = async {
        let (head, end) = http::read_head(&mut stream).await?;
        let end = end.ok_or_else(|| io::Error::other("no complete request head"))?;
        let nobody = http::Proxies {
            trusted: &[],
            header: http::ForwardedHeader::default(),
        };
        let head = head.get(..end).unwrap_or_default();
        let response = match http::parse(head, peer.ip(), nobody, true) {
            http::Request::Metrics => match metrics::encode(&registry) {
                Ok(text) => {
                    http::response(http::Status::Ok, metrics::CONTENT_TYPE, Some(&text), false)
                }
                Err(_) => {
                    http::response(http::Status::ServiceUnavailable, "text/plain", None, false)
                }
            },
            http::Request::Health { head_only } => {
                let status = if hub.is_draining() {
                    http::Status::ServiceUnavailable
                } else {
                    http::Status::Ok
                };
                http::response(status, "text/plain", None, head_only)
            }
            http::Request::Upgrade { .. } => {
                http::response(http::Status::NotFound, "text/plain", None, false)
            }
            http::Request::Refuse(status) => http::response(status, "text/plain", None, false),
        };
        stream.write_all(&response).await?;
        stream.shutdown().await
    };
    let _ = timeout(hub.config().handshake_timeout, answered).await;
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
