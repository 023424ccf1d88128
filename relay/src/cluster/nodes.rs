//! Which nodes are alive: each node's heartbeat (a deadline in Redis's clock, renewed every
//! second, with what the node holds for the cluster-wide caps), the lease that says whether a
//! node may still act for its sessions, and what a node does about the dead, or about having
//! been counted dead itself.

use std::collections::HashSet;
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::wire::NodeId;
use super::{Cluster, Proxy};
use crate::outbox::ConnId;

/// How long a node counts as alive after its last heartbeat.
pub const NODE_TTL: Duration = Duration::from_secs(5);
/// How often a node renews its heartbeat and reads who else is alive.
const HEARTBEAT: Duration = Duration::from_secs(1);
/// How long after its last good heartbeat began a node still acts for its sessions: a
/// heartbeat short of [`NODE_TTL`], so it stops before any other node can count it dead.
const LEASE: Duration = NODE_TTL.saturating_sub(HEARTBEAT);

/// Renews this node's heartbeat and what it holds (`load`: sessions, mailbox bytes), forgets
/// nodes whose heartbeat has lapsed, keeps this node's
/// inbox alive as long as the node (creating it with an empty entry: other nodes append only
/// to an inbox that exists, so a dead node's inbox is not made again), and answers the live
/// nodes, with what the others hold (the relay-wide caps are the cluster's). Deadlines are in Redis's own
/// clock, so the nodes' clocks need not agree.
pub(super) const HEARTBEAT_SCRIPT: &str = r"
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

/// When the heartbeat last succeeded, and since when it has without a gap: after Redis was
/// away, other nodes' heartbeats need a moment to come back before a missing one means a dead
/// node.
pub(super) struct Beats {
    last: Instant,
    steady_since: Instant,
    /// After starting afresh, the node acts for no session until then: every other node
    /// that lost Redis too has had a heartbeat to come back and start afresh itself, so no
    /// session is taken in while another node still holds its old copy.
    quiet_until: Instant,
}

impl Beats {
    pub(super) fn new() -> Beats {
        Beats {
            last: Instant::now(),
            steady_since: Instant::now(),
            quiet_until: Instant::now(),
        }
    }
}

/// How long a node that started afresh waits before it acts for sessions again.
const QUIET_AFTER_AFRESH: Duration = HEARTBEAT.saturating_mul(3);

impl Cluster {
    pub(super) async fn beat(&self) -> redis::RedisResult<()> {
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
            self.beats
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .quiet_until = Instant::now() + QUIET_AFTER_AFRESH;
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
    pub(super) fn start_afresh(&self) {
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
        beats.last.elapsed() < LEASE && Instant::now() >= beats.quiet_until
    }

    pub(super) async fn run_heartbeat(self: Arc<Self>, stop: CancellationToken) {
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

    /// Acts on nodes that are not alive (checked at every heartbeat, so a route or proxy made
    /// just before a node died is caught too): close our clients whose sessions lived there
    /// (they come back and re-attach, and their sessions find a new home), and drop the
    /// proxies of its clients here (their peers hear `PEER_OFFLINE`).
    pub(super) fn forget_the_dead(&self) {
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
}
