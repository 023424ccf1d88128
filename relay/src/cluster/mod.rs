//! Several relays on one Redis, behaving as one relay (`--redis`).
//!
//! Each session lives in one node's memory, its *home*, where the ordinary hub applies every
//! frame of it: the rules are the single relay's, and two members on the same node pay no
//! Redis round trip per frame. Redis holds what the nodes must agree on:
//!
//! - which nodes are alive (`nodes`, a sorted set of heartbeat deadlines, renewed every
//!   second; a node that misses [`NODE_TTL`] is dead),
//! - each session's home (`home:SID`, claimed atomically: a live home is never replaced),
//! - which node issued each invite code (`code:CODE`, reserved before it is handed out, so two
//!   nodes never issue the same code),
//! - each node's inbox (`inbox:NODE`, a stream).
//!
//! A client may connect to any node (its *gate*). The gate applies a frame itself if the
//! session is at home there (or is new), and otherwise appends it to the home's inbox; the
//! home applies it for a *proxy* of that client and sends what the hub queues for the proxy
//! back to the gate's inbox, which writes it to the client. Streams keep each sender's order.
//!
//! When a node dies, the others notice within [`NODE_TTL`] plus a second: gates close the
//! clients whose sessions lived there (they reconnect and take their seats back with their
//! resume tokens, which every node can check: all share one `--secret-file`), and homes drop
//! the proxies of the dead gate's clients (their peers hear `PEER_OFFLINE`).
//!
//! docs/cluster.md has the design, the keys and what is not (yet) shared.

mod codes;
mod limits;
mod proxy;
mod route;
mod wire;
mod writes;

use std::collections::{HashMap, HashSet};

use std::sync::{Arc, Mutex, PoisonError, RwLock};
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

use parley_protocol::{Envelope, ErrorCode, FrameError, FrameType};

use crate::hub::{ConnState, Hub, Role};
use crate::ids::{InviteCode, SessionId};
use crate::limiter::{AddressKey, SharedLimit};
use crate::outbox::ConnId;

/// How long a node counts as alive after its last heartbeat.
pub const NODE_TTL: Duration = Duration::from_secs(5);
/// How often a node renews its heartbeat and reads who else is alive.
const HEARTBEAT: Duration = Duration::from_secs(1);
/// How long after its last good heartbeat began a node still acts for its sessions: a
/// heartbeat short of [`NODE_TTL`], so it stops before any other node can count it dead.
const LEASE: Duration = NODE_TTL.saturating_sub(HEARTBEAT);
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

/// Renews this node's heartbeat and what it holds (`load`: sessions, mailbox bytes), forgets
/// nodes whose heartbeat has lapsed, keeps this node's
/// inbox alive as long as the node (creating it with an empty entry: other nodes append only
/// to an inbox that exists, so a dead node's inbox is not made again), and answers the live
/// nodes, with what the others hold (the relay-wide caps are the cluster's). Deadlines are in Redis's own
/// clock, so the nodes' clocks need not agree.
const HEARTBEAT_SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]) * 10)
if redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('XADD', KEYS[2], '*', 'm', '')
end
redis.call('PEXPIRE', KEYS[2], tonumber(ARGV[2]) * 10)
redis.call('HSET', KEYS[3], ARGV[1], ARGV[3] .. ' ' .. ARGV[4])
redis.call('PEXPIRE', KEYS[3], tonumber(ARGV[2]) * 10)
local nodes = redis.call('ZRANGE', KEYS[1], 0, -1)
local alive = {}
for _, n in ipairs(nodes) do alive[n] = true end
local sessions, bytes = 0, 0
for _, n in ipairs(redis.call('HKEYS', KEYS[3])) do
  if not alive[n] then
    redis.call('HDEL', KEYS[3], n)
  elseif n ~= ARGV[1] then
    local s, b = string.match(redis.call('HGET', KEYS[3], n), '^(%d+) (%d+)$')
    sessions = sessions + (tonumber(s) or 0)
    bytes = bytes + (tonumber(b) or 0)
  end
end
return {nodes, sessions, bytes}
";

/// Makes this node a session's home unless a live node already is; answers the home.
const CLAIM_SCRIPT: &str = r"
local current = redis.call('GET', KEYS[1])
if current and current ~= ARGV[1] then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local deadline = redis.call('ZSCORE', KEYS[2], current)
  if deadline and tonumber(deadline) > now then
    return current
  end
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return ARGV[1]
";

/// The value of a key that names a node (a session's home, a code's issuer), if that node is
/// alive: Redis's own view, so a node that has just joined is seen at once.
const LIVE_NODE_SCRIPT: &str = r"
local node = redis.call('GET', KEYS[1])
if not node then return false end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local deadline = redis.call('ZSCORE', KEYS[2], node)
if deadline and tonumber(deadline) > now then return node end
return false
";

struct Beats {
    last: Instant,
    steady_since: Instant,
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
    beats: Mutex<Beats>,
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
            manager_config.set_response_timeout(Some(STORE_TIMEOUT + INBOX_BLOCK)),
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
            beats: Mutex::new(Beats {
                last: Instant::now(),
                steady_since: Instant::now(),
            }),
            routes: DashMap::new(),
            proxies: Mutex::new(HashMap::new()),
            windows: DashMap::new(),
            queued: DashMap::new(),
            seal,
            heartbeat: Script::new(HEARTBEAT_SCRIPT),
            claim: Script::new(CLAIM_SCRIPT),
            live_node: Script::new(LIVE_NODE_SCRIPT),
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

    async fn beat(&self) -> redis::RedisResult<()> {
        let started = Instant::now();
        let stats = self.hub.stats();
        let (nodes, others_sessions, others_bytes): (Vec<String>, u64, u64) = self
            .store(async |redis| {
                self.heartbeat
                    .key(self.keys.nodes())
                    .key(self.keys.inbox(self.me))
                    .key(self.keys.load())
                    .arg(self.me.to_string())
                    .arg(NODE_TTL.as_millis() as u64)
                    .arg(stats.sessions)
                    .arg(stats.mailbox_bytes)
                    .invoke_async(redis)
                    .await
            })
            .await?;
        self.hub.set_others(
            usize::try_from(others_sessions).unwrap_or(usize::MAX),
            usize::try_from(others_bytes).unwrap_or(usize::MAX),
        );
        let now: HashSet<NodeId> = nodes.iter().filter_map(|n| NodeId::parse(n)).collect();
        let gone: Vec<NodeId> = {
            let mut alive = self
                .alive
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let gone = alive.difference(&now).copied().collect();
            *alive = now;
            gone
        };
        let (absent, steady) = {
            let mut beats = self.beats.lock().unwrap_or_else(PoisonError::into_inner);
            // From the start of the last good beat (the earliest Redis can have set our
            // deadline) to the end of this one (the latest it can have run).
            let absent = Instant::now().saturating_duration_since(beats.last);
            beats.last = started;
            if absent >= HEARTBEAT.saturating_mul(2) {
                beats.steady_since = started;
            }
            (
                absent,
                started.saturating_duration_since(beats.steady_since),
            )
        };
        if absent >= LEASE {
            // The others have counted this node dead, and may have taken its sessions in
            // meanwhile: what it holds can no longer be trusted.
            tracing::warn!(
                seconds = absent.as_secs(),
                "this node lost Redis for longer than a heartbeat lasts; closing every connection and starting afresh"
            );
            self.start_afresh();
            return Ok(());
        }
        for node in gone {
            tracing::warn!(node = %node, "a cluster node has gone");
        }
        if steady >= NODE_TTL {
            self.forget_the_dead();
        }
        Ok(())
    }

    /// Forgets every session (not their mailboxes in Redis: whoever takes them in reads
    /// those) and closes every connection and proxy; clients come back and re-attach.
    fn start_afresh(&self) {
        // What is queued for Redis described sessions others may hold now: void.
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        self.hub.forget_all_sessions();
        let proxies: Vec<Proxy> = self.lock_proxies().drain().map(|(_, p)| p).collect();
        for proxy in proxies {
            self.end_proxy(proxy);
        }
        // The homes our clients' frames went to drop their proxies.
        let routed: Vec<ConnId> = self.routes.iter().map(|r| *r.key()).collect();
        for conn in routed {
            self.connection_closed(conn);
        }
        self.hub.conns.kill_all();
    }

    /// Whether this node may still act for the sessions it holds: its last heartbeat is
    /// recent enough that no other node can have counted it dead. Past that, every frame
    /// is refused (`store_unavailable`) until the heartbeat comes back and the node has
    /// started afresh.
    pub(super) fn holds_lease(&self) -> bool {
        let beats = self.beats.lock().unwrap_or_else(PoisonError::into_inner);
        beats.last.elapsed() < LEASE
    }

    async fn run_heartbeat(self: Arc<Self>, stop: CancellationToken) {
        let mut every = tokio::time::interval(HEARTBEAT);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut refreshed = Instant::now();
        loop {
            tokio::select! {
                () = stop.cancelled() => {
                    // Leaving: the others need not wait for our heartbeat to lapse.
                    let _ = self
                        .store(async |redis| {
                            redis::cmd("ZREM")
                                .arg(self.keys.nodes())
                                .arg(self.me.to_string())
                                .query_async::<()>(redis)
                                .await
                        })
                        .await;
                    return;
                }
                _ = every.tick() => {}
            }
            if let Err(e) = self.beat().await {
                tracing::warn!(error = %e, "cluster heartbeat failed; retrying");
            }
            // Homes of sessions still held are kept as long as the sessions may be.
            if refreshed.elapsed() >= self.home_ttl() / 4 {
                refreshed = Instant::now();
                if let Err(e) = self.refresh_homes().await {
                    tracing::warn!(error = %e, "cannot refresh session homes; retrying");
                }
            }
        }
    }

    fn home_ttl(&self) -> Duration {
        let config = self.hub.config();
        config
            .session_idle_ttl
            .max(config.unpaired_session_ttl)
            .saturating_add(Duration::from_secs(60))
    }

    /// Claims the home of every session held here again (which renews it, or records it
    /// if it was lost); a session whose home is now another node is let go.
    async fn refresh_homes(&self) -> redis::RedisResult<()> {
        let ttl = self.home_ttl().as_millis() as u64;
        let sids = self.hub.session_ids();
        for chunk in sids.chunks(1000) {
            let mut pipe = redis::pipe();
            for sid in chunk {
                pipe.cmd("EVAL")
                    .arg(CLAIM_SCRIPT)
                    .arg(2)
                    .arg(self.keys.home(*sid))
                    .arg(self.keys.nodes())
                    .arg(self.me.to_string())
                    .arg(ttl);
            }
            let homes: Vec<String> = self
                .store(async |redis| pipe.query_async(redis).await)
                .await?;
            for (sid, home) in chunk.iter().zip(homes) {
                if NodeId::parse(&home).is_some_and(|home| home != self.me) {
                    self.let_go(*sid);
                }
            }
        }
        Ok(())
    }

    /// Acts on nodes that are not alive (checked at every heartbeat, so a route or proxy made
    /// just before a node died is caught too): close our clients whose sessions lived there
    /// (they come back and re-attach, and their sessions find a new home), and drop the
    /// proxies of its clients here (their peers hear `PEER_OFFLINE`).
    fn forget_the_dead(&self) {
        let mut closing = Vec::new();
        self.routes.retain(|conn, routes| {
            if routes.homes.iter().all(|home| self.is_alive(*home)) {
                true
            } else {
                closing.push(*conn);
                false
            }
        });
        for conn in closing {
            if let Some(outbox) = self.hub.conns.get(conn) {
                outbox.kill();
            }
        }
        let orphans: Vec<Proxy> = {
            let mut proxies = self.lock_proxies();
            let dead: Vec<_> = proxies
                .keys()
                .filter(|(gate, _)| !self.is_alive(*gate))
                .copied()
                .collect();
            dead.iter().filter_map(|k| proxies.remove(k)).collect()
        };
        for proxy in orphans {
            self.end_proxy(proxy);
        }
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

    /// Writes what was queued to Redis, in order, batched: messages to other nodes' inboxes
    /// and mailbox changes. Retried until Redis takes them (what the relay accepted is not
    /// given up while the node lives); then the frames that waited for them are queued.
    ///
    /// Each batch is one transaction that also sets `wseq:NODE` to the batch's number: after
    /// an error (a timeout may come after Redis ran it), the node asks whether the batch ran
    /// before running it again, so nothing is written twice.
    async fn run_writes(
        self: Arc<Self>,
        mut queued: mpsc::Receiver<(u64, Write)>,
        stop: CancellationToken,
    ) {
        let mut tagged = Vec::new();
        let mut taken = Vec::new();
        let mut number = 0u64;
        let mark = format!("{}wseq:{}", self.keys.prefix, self.me);
        loop {
            let n = tokio::select! {
                () = stop.cancelled() => return,
                n = queued.recv_many(&mut tagged, 512) => n,
            };
            if n == 0 {
                return;
            }
            // What was queued before the node started afresh is void: it described sessions
            // that other nodes may hold now.
            let current = self.generation();
            taken.extend(
                tagged
                    .drain(..)
                    .filter(|(generation, _)| *generation == current)
                    .map(|(_, write)| write),
            );
            for batch in writes::batches(&mut taken) {
                number = number.wrapping_add(1);
                let pipe = writes::pipeline(&batch, &self.keys, &self.seal, (&mark, number));
                if !self.write_once(&pipe, &mark, number, &stop).await {
                    return;
                }
                for write in batch {
                    match write {
                        Write::ThenQueue { outbox, frame } => {
                            let _ = outbox.push(frame);
                        }
                        Write::Flushed(flushed) => {
                            let _ = flushed.send(());
                        }
                        _ => {}
                    }
                }
            }
        }
    }

    /// Runs a batch's transaction until Redis has it, exactly once; `false` if stopped first.
    async fn write_once(
        &self,
        pipe: &redis::Pipeline,
        mark: &str,
        number: u64,
        stop: &CancellationToken,
    ) -> bool {
        let mut delay = Duration::from_millis(10);
        loop {
            match self
                .store(async |redis| pipe.query_async::<()>(redis).await)
                .await
            {
                Ok(()) => return true,
                Err(e) => tracing::warn!(error = %e, "cannot write to Redis; retrying"),
            }
            // Did it run after all? Ask until Redis answers.
            loop {
                tokio::select! {
                    () = stop.cancelled() => return false,
                    () = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(Duration::from_secs(1));
                let ran: redis::RedisResult<Option<u64>> = self
                    .store(async |redis| redis::cmd("GET").arg(mark).query_async(redis).await)
                    .await;
                match ran {
                    Ok(Some(n)) if n == number => return true,
                    Ok(_) => break, // it did not: run it again
                    Err(_) => continue,
                }
            }
        }
    }

    /// Reads this node's inbox and acts on each entry, in order.
    async fn run_inbox(self: Arc<Self>, mut reader: ConnectionManager, stop: CancellationToken) {
        let inbox = self.keys.inbox(self.me);
        let mut last = String::from("0");
        let mut delay = Duration::from_millis(10);
        loop {
            let mut xread = redis::cmd("XREAD");
            xread
                .arg("COUNT")
                .arg(512)
                .arg("BLOCK")
                .arg(INBOX_BLOCK.as_millis() as u64)
                .arg("STREAMS")
                .arg(&inbox)
                .arg(&last);
            let read = tokio::select! {
                () = stop.cancelled() => return,
                read = xread.query_async::<Option<redis::streams::StreamReadReply>>(&mut reader) => read,
            };
            let reply = match read {
                Ok(reply) => {
                    delay = Duration::from_millis(10);
                    reply
                }
                Err(e) => {
                    self.hub.metrics().store_request(Duration::ZERO, true);
                    tracing::warn!(error = %e, "cannot read this node's inbox; retrying");
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = tokio::time::sleep(delay) => {}
                    }
                    delay = (delay * 2).min(Duration::from_secs(1));
                    continue;
                }
            };
            let Some(reply) = reply else { continue };
            let mut acks = proxy::Acks::default();
            for entry in reply.keys.into_iter().flat_map(|k| k.ids) {
                let sealed = entry
                    .map
                    .get("m")
                    .and_then(|v| redis::from_redis_value_ref::<Vec<u8>>(v).ok())
                    .unwrap_or_default();
                // The entry that made the inbox is empty: no message.
                if !sealed.is_empty() {
                    match self.seal.open(self.me, &sealed) {
                        Some(text) => {
                            for msg in wire::unpack(&text) {
                                match msg.and_then(NodeMsg::parse) {
                                    Some(msg) => self.receive(msg, &mut acks).await,
                                    None => tracing::warn!("skipped a damaged inbox message"),
                                }
                            }
                        }
                        None => tracing::warn!(
                            "skipped an inbox entry not sealed for this node (another secret file?)"
                        ),
                    }
                }
                last = entry.id;
            }
            self.send_acks(acks);
            // What has been read is done with: trim it (the last entry stays as the mark).
            let trimmed = self
                .store(async |redis| {
                    redis::cmd("XTRIM")
                        .arg(&inbox)
                        .arg("MINID")
                        .arg(&last)
                        .query_async::<()>(redis)
                        .await
                })
                .await;
            if let Err(e) = trimmed {
                tracing::debug!(error = %e, "inbox not trimmed; next time");
            }
        }
    }

    async fn receive(self: &Arc<Self>, msg: NodeMsg, acks: &mut proxy::Acks) {
        match msg {
            NodeMsg::Frame {
                gate,
                conn,
                ip,
                frame,
            } => self.apply_for_proxy(gate, conn, ip, frame),
            NodeMsg::Closed { gate, conn } => {
                let proxy = self.lock_proxies().remove(&(gate, conn));
                if let Some(proxy) = proxy {
                    self.end_proxy(proxy);
                }
            }
            NodeMsg::Out { home, conn, frame } => {
                let len = frame.len();
                // Gone meanwhile: its sessions' homes hear `Closed` from us.
                if self.hub.conns.push(conn, frame).is_ok() {
                    acks.add(home, conn, len);
                }
            }
            NodeMsg::Written {
                gate,
                conn,
                frames,
                bytes,
            } => {
                if let Some(proxy) = self.lock_proxies().get(&(gate, conn)) {
                    proxy.in_flight.acknowledge(frames, bytes);
                }
            }
            NodeMsg::Applied { conn, frames } => self.applied(conn, frames),
            NodeMsg::Drop { conn } => {
                if let Some(outbox) = self.hub.conns.get(conn) {
                    outbox.kill();
                }
            }
        }
    }

    /// What the hub will need from Redis to apply `env` here, fetched before it does (the hub
    /// never waits): a reserved code for an `INVITE_CREATE` when this node's reserve is spent
    /// (a burst waits for codes rather than failing), and, if `env` may re-create a session
    /// this node does not hold, the session's mailboxes (see [`Hub::stash_recovered`]). The
    /// session so prepared is returned: the caller clears its leftovers once the frame is
    /// applied. A session is never re-created without its mailboxes: if Redis cannot be
    /// read, the frame is refused.
    async fn prepare(
        &self,
        env: &Envelope<'_>,
        address: AddressKey,
    ) -> Result<Option<SessionId>, FrameError> {
        if env.kind == FrameType::InviteCreate
            && let Some(pool) = self.hub.code_pool()
            && pool.fresh(Instant::now()) == 0
        {
            self.reserve_codes(&pool, codes::POOL_TARGET)
                .await
                .map_err(|_| store_unavailable())?;
        }
        if !matches!(env.kind, FrameType::Reattach | FrameType::Restore) {
            return Ok(None);
        }
        let Some(sid) = env.sid().and_then(SessionId::parse) else {
            return Ok(None);
        };
        if self.hub.holds_session(sid) || !crate::cmd::reattach::could_recreate(&self.hub, env) {
            return Ok(None);
        }
        // Re-creating counts as creating, across the cluster.
        self.check_shared(SharedLimit::SessionsCreated, address)
            .await?;
        let recovered = self
            .load_mailboxes(sid)
            .await
            .map_err(|_| store_unavailable())?;
        self.hub.stash_recovered(sid, recovered);
        Ok(Some(sid))
    }

    /// Makes this node the home of sessions it has just taken in (created, or re-created from
    /// a token). Awaited before the client can read the answer, so no other node can claim a
    /// session whose token it has not yet seen.
    async fn claim_homes(&self, sids: &[SessionId]) {
        for sid in sids {
            match self.claim_home(*sid).await {
                Ok(home) if home == self.me => {}
                Ok(home) => {
                    tracing::warn!(
                        session = %sid.tag(), home = %home,
                        "a session taken in here has a live home elsewhere; letting it go"
                    );
                    self.let_go(*sid);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot record a session's home; letting it go");
                    self.let_go(*sid);
                }
            }
        }
    }

    /// Forgets a session this node may not keep (another node is its home, or none could be
    /// recorded) and closes its members here; they come back and re-attach where it lives.
    fn let_go(&self, sid: SessionId) {
        for conn in self.hub.forget_session(sid) {
            if let Some(outbox) = self.hub.conns.get(conn) {
                outbox.kill();
            }
        }
    }

    async fn claim_home(&self, sid: SessionId) -> redis::RedisResult<NodeId> {
        let home: String = self
            .store(async |redis| {
                self.claim
                    .key(self.keys.home(sid))
                    .key(self.keys.nodes())
                    .arg(self.me.to_string())
                    .arg(self.home_ttl().as_millis() as u64)
                    .invoke_async(redis)
                    .await
            })
            .await?;
        Ok(NodeId::parse(&home).unwrap_or(self.me))
    }

    /// The live home of a session, if it has one.
    async fn home_of(&self, sid: SessionId) -> redis::RedisResult<Option<NodeId>> {
        self.live_node_at(self.keys.home(sid)).await
    }

    /// The live node that issued an invite code, if any.
    async fn issuer_of(&self, code: InviteCode) -> redis::RedisResult<Option<NodeId>> {
        self.live_node_at(self.keys.code(code)).await
    }

    async fn live_node_at(&self, key: String) -> redis::RedisResult<Option<NodeId>> {
        let node: Option<String> = self
            .store(async |redis| {
                self.live_node
                    .key(key)
                    .key(self.keys.nodes())
                    .invoke_async(redis)
                    .await
            })
            .await?;
        Ok(node.as_deref().and_then(NodeId::parse))
    }

    /// Keeps the hub's pool of reserved invite codes full.
    async fn run_codes(self: Arc<Self>, stop: CancellationToken) {
        let Some(pool) = self.hub.code_pool() else {
            return;
        };
        loop {
            let missing = codes::POOL_TARGET.saturating_sub(pool.fresh(Instant::now()));
            let wait = if missing == 0 {
                Duration::from_secs(10)
            } else {
                match self.reserve_codes(&pool, missing).await {
                    Ok(()) => Duration::ZERO,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot reserve invite codes; retrying");
                        Duration::from_secs(1)
                    }
                }
            };
            if wait.is_zero() {
                continue;
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = pool.low.notified() => {}
                () = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Reserves up to `n` random codes (fewer if some are taken by other nodes).
    async fn reserve_codes(&self, pool: &CodePool, n: usize) -> redis::RedisResult<()> {
        let candidates: Vec<InviteCode> = (0..n).map(|_| InviteCode::random()).collect();
        let mut pipe = redis::pipe();
        let ttl = pool.reservation().as_millis() as u64;
        for code in &candidates {
            pipe.cmd("SET")
                .arg(self.keys.code(*code))
                .arg(self.me.to_string())
                .arg("NX")
                .arg("PX")
                .arg(ttl);
        }
        let answers: Vec<Option<String>> = self
            .store(async |redis| pipe.query_async(redis).await)
            .await?;
        let now = Instant::now();
        for (code, answer) in candidates.into_iter().zip(answers) {
            if answer.is_some() {
                pool.add(code, now);
            }
        }
        Ok(())
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

/// How long one inbox read waits for entries before asking again.
const INBOX_BLOCK: Duration = Duration::from_secs(1);

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
