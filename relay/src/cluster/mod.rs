//! Several relays on one Redis, behaving as one relay (`--redis`).
//!
//! Each session lives in one node's memory, its *home*, where the ordinary hub applies every
//! frame of it: the rules are the single relay's, and two members on the same node pay no
//! Redis round trip per frame. Redis holds what the nodes must agree on:
//!
//! - which nodes are alive (`nodes`, a sorted set of heartbeat deadlines, renewed every
//!   second; a node that misses [`nodes::NODE_TTL`] is dead),
//! - each session's home (`home:SID`, claimed atomically: a live home is never replaced),
//! - which node issued each invite code (`code:CODE`, reserved before it is handed out, so two
//!   nodes never issue the same code),
//! - each node's inbox (`inbox:NODE`, a stream of sealed entries),
//! - the mailboxes, mirrored (`mbox:SID:ROLE`), and the shared rate limits and counts.
//!
//! A client may connect to any node (its *gate*). The gate applies a frame itself if the
//! session is at home there (or is new), and otherwise appends it to the home's inbox; the
//! home applies it for a *proxy* of that client and sends what the hub queues for the proxy
//! back to the gate's inbox, which writes it to the client. Streams keep each sender's order.
//!
//! When a node dies, the others notice within [`nodes::NODE_TTL`] plus a second: gates close the
//! clients whose sessions lived there (they reconnect and take their seats back with their
//! resume tokens, which every node can check: all share one `--secret-file`), and homes drop
//! the proxies of the dead gate's clients (their peers hear `PEER_OFFLINE`).
//!
//! One module per part: `nodes` (heartbeats, leases, the dead), `homes` (claims, taking a
//! session in), `route` (the gate), `proxy` (the home, and flow control between them),
//! `inbox` (reading), `writes` (writing), `wire` (the messages), `codes`, `limits`.
//! docs/cluster.md has the design, the keys and the known limits.

mod codes;
mod homes;
mod inbox;
mod limits;
mod nodes;
mod proxy;
mod route;
mod wire;
mod writes;

use std::collections::{HashMap, HashSet};

use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use dashmap::DashMap;
use redis::Script;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::mpsc;
use tokio::time::Instant;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use codes::CodePool;
use proxy::Proxy;
pub use wire::NodeId;
use wire::NodeMsg;
use writes::Write;

use parley_protocol::{ErrorCode, FrameError};

use crate::hub::{ConnState, Hub, Role};
use crate::ids::{InviteCode, SessionId};
use crate::outbox::ConnId;

/// Writes waiting for Redis; beyond it, frames for other nodes, and frames to be kept in a
/// mailbox, are refused with `store_unavailable` (Redis is down or too slow).
const WRITES_CAPACITY: usize = 65_536;
/// How long a Redis command may take before it counts as failed.
const STORE_TIMEOUT: Duration = Duration::from_secs(2);

/// Where the cluster's shared state is.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// `redis://HOST:PORT[/DB]`.
    pub url: String,
    /// Put before every key, so several deployments can share one Redis.
    pub prefix: String,
}

/// The names of the keys, under the deployment's prefix.
struct Keys {
    prefix: String,
}

impl Keys {
    fn nodes(&self) -> String {
        format!("{}nodes", self.prefix)
    }
    fn load(&self) -> String {
        format!("{}load", self.prefix)
    }
    fn home(&self, sid: SessionId) -> String {
        format!("{}home:{sid}", self.prefix)
    }
    fn code(&self, code: InviteCode) -> String {
        format!("{}code:{code}", self.prefix)
    }
    fn inbox(&self, node: NodeId) -> String {
        format!("{}inbox:{node}", self.prefix)
    }
    fn mailbox(&self, sid: SessionId, role: Role) -> String {
        let role = match role {
            Role::Host => "host",
            Role::Guest => "guest",
        };
        format!("{}mbox:{sid}:{role}", self.prefix)
    }
}

/// The sessions (and homes) a local client's frames went to, at other nodes.
#[derive(Default)]
struct Routes {
    sessions: Vec<(SessionId, NodeId)>,
    homes: Vec<NodeId>,
}

/// Sessions a client may be routed to, at most (a client names a session it is not in only to
/// be refused; this bounds what such attempts can make a gate remember).
const MAX_ROUTES: usize = 64;

pub struct Cluster {
    me: NodeId,
    keys: Keys,
    redis: ConnectionManager,
    hub: Arc<Hub>,
    /// What is to be written to Redis, in order (see [`Write`]), each with the generation it
    /// was queued in: what was queued before the node started afresh is not written.
    writes: mpsc::Sender<(u64, Write)>,
    generation: std::sync::atomic::AtomicU64,
    alive: RwLock<HashSet<NodeId>>,
    /// When the heartbeat last succeeded, and since when it has without a gap: after Redis
    /// was away, other nodes' heartbeats need a moment to come back before a missing one
    /// means a dead node.
    beats: Mutex<nodes::Beats>,
    routes: DashMap<ConnId, Routes>,
    proxies: Mutex<HashMap<(NodeId, ConnId), Proxy>>,
    /// Local clients' frames forwarded to homes and not yet applied (see `proxy`).
    windows: DashMap<ConnId, Arc<proxy::Window>>,
    /// What this gate has queued for each local client from each home, in all (see `proxy`).
    queued: DashMap<ConnId, Vec<(NodeId, usize, usize)>>,
    /// Seals what this node writes to inboxes, and opens what it reads (see `wire`).
    seal: wire::InboxSeal,
    heartbeat: Script,
    claim: Script,
    live_node: Script,
    bucket: Script,
}

/// What `connect` could not do.
#[derive(Debug, thiserror::Error)]
#[error("cannot use Redis at {url}: {source}")]
pub struct ClusterError {
    url: String,
    source: redis::RedisError,
}

impl Cluster {
    /// Connects to Redis, announces this node, and starts the node's tasks (heartbeat, inbox,
    /// outgoing frames, invite codes) on `tracker`, until `stop`.
    pub async fn start(
        config: &ClusterConfig,
        hub: Arc<Hub>,
        tracker: &TaskTracker,
        stop: CancellationToken,
    ) -> Result<Arc<Cluster>, ClusterError> {
        let failed = |source| ClusterError {
            url: redacted(&config.url),
            source,
        };
        let client = redis::Client::open(config.url.as_str()).map_err(failed)?;
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(STORE_TIMEOUT))
            .set_response_timeout(Some(STORE_TIMEOUT))
            .set_max_delay(Duration::from_secs(1));
        let redis = ConnectionManager::new_with_config(client.clone(), manager_config.clone())
            .await
            .map_err(failed)?;
        // The inbox is read with a blocking command: on its own connection, with room for the
        // block in its timeout.
        let reader = ConnectionManager::new_with_config(
            client,
            manager_config.set_response_timeout(Some(STORE_TIMEOUT + inbox::INBOX_BLOCK)),
        )
        .await
        .map_err(failed)?;
        let (writes, queued_writes) = mpsc::channel(WRITES_CAPACITY);
        let seal = wire::InboxSeal::new(&hub.config().secret.inbox_key());
        let cluster = Arc::new(Cluster {
            me: NodeId::random(),
            keys: Keys {
                prefix: config.prefix.clone(),
            },
            redis,
            hub,
            writes,
            generation: std::sync::atomic::AtomicU64::new(0),
            alive: RwLock::new(HashSet::new()),
            beats: Mutex::new(nodes::Beats::new()),
            routes: DashMap::new(),
            proxies: Mutex::new(HashMap::new()),
            windows: DashMap::new(),
            queued: DashMap::new(),
            seal,
            heartbeat: Script::new(nodes::HEARTBEAT_SCRIPT),
            claim: Script::new(homes::CLAIM_SCRIPT),
            live_node: Script::new(homes::LIVE_NODE_SCRIPT),
            bucket: Script::new(limits::BUCKET_SCRIPT),
        });
        // Alive before the first client: a home claimed by a node nobody has heard of yet
        // would be taken over at once.
        cluster.beat().await.map_err(failed)?;
        cluster.hub.set_journal(cluster.clone());
        cluster.hub.set_shared_limits(cluster.clone());
        tracing::info!(node = %cluster.me, "joined the cluster");
        tracker.spawn(cluster.clone().run_heartbeat(stop.clone()));
        tracker.spawn(cluster.clone().run_inbox(reader, stop.clone()));
        tracker.spawn(cluster.clone().run_writes(queued_writes, stop.clone()));
        tracker.spawn(cluster.clone().run_codes(stop));
        Ok(cluster)
    }

    fn is_alive(&self, node: NodeId) -> bool {
        self.alive
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .contains(&node)
    }

    /// One Redis command (or script, or pipeline), timed and counted.
    async fn store<T>(
        &self,
        op: impl AsyncFnOnce(&mut ConnectionManager) -> redis::RedisResult<T>,
    ) -> redis::RedisResult<T> {
        let mut redis = self.redis.clone();
        let started = Instant::now();
        let result = op(&mut redis).await;
        self.hub
            .metrics()
            .store_request(started.elapsed(), result.is_err());
        result
    }

    fn lock_proxies(&self) -> std::sync::MutexGuard<'_, HashMap<(NodeId, ConnId), Proxy>> {
        self.proxies
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Queues a message for another node's inbox; `false` if too much is waiting already.
    fn send(&self, node: NodeId, msg: &NodeMsg) -> bool {
        self.write(Write::Inbox {
            node,
            msg: msg.encode(),
        })
    }

    /// Queues a write; `false` if too much is waiting already (Redis is down or slow).
    fn write(&self, write: Write) -> bool {
        self.writes.try_send((self.generation(), write)).is_ok()
    }

    /// Queues a write, waiting for room; `false` if the node is stopping.
    async fn write_waiting(&self, write: Write) -> bool {
        self.writes.send((self.generation(), write)).await.is_ok()
    }

    fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::Acquire)
    }

    /// A local connection has closed: the homes that applied its frames drop its proxies.
    pub fn connection_closed(&self, conn: ConnId) {
        self.windows.remove(&conn);
        self.queued.remove(&conn);
        if let Some((_, routes)) = self.routes.remove(&conn) {
            for home in routes.homes {
                let _ = self.send(
                    home,
                    &NodeMsg::Closed {
                        gate: self.me,
                        conn,
                    },
                );
            }
        }
    }
}

fn store_unavailable() -> FrameError {
    FrameError::new(
        ErrorCode::StoreUnavailable,
        "the relay cannot reach its shared store; nothing was done: try again shortly",
    )
}

/// Sessions `state` sits in now that it did not before.
fn new_sessions(before: &[(SessionId, crate::hub::Role)], state: &ConnState) -> Vec<SessionId> {
    state
        .memberships
        .iter()
        .filter(|(sid, _)| !before.iter().any(|(b, _)| b == sid))
        .map(|(sid, _)| *sid)
        .collect()
}

/// A Redis URL without its user and password, for messages.
fn redacted(url: &str) -> String {
    match (url.split_once("://"), url.rfind('@')) {
        (Some((scheme, _)), Some(at)) => format!("{scheme}://***{}", url.get(at..).unwrap_or("")),
        _ => url.to_string(),
    }
}
