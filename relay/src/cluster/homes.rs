//! Each session's home: claimed atomically in Redis (a live home is never replaced), renewed
//! while held, let go when a claim fails; what a node needs from Redis before it takes a
//! session in; and where to find a session's home or a code's issuer.

use std::time::Duration;

use parley_protocol::{Envelope, FrameError, FrameType};
use tokio::time::Instant;

use super::wire::NodeId;
use super::{Cluster, codes, store_unavailable};
use crate::ids::{InviteCode, SessionId};
use crate::limiter::{AddressKey, SharedLimit};

/// Makes this node a session's home unless a live node already is; answers the home.
pub(super) const CLAIM_SCRIPT: &str = r"
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
pub(super) const LIVE_NODE_SCRIPT: &str = r"
local node = redis.call('GET', KEYS[1])
if not node then return false end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local deadline = redis.call('ZSCORE', KEYS[2], node)
if deadline and tonumber(deadline) > now then return node end
return false
";

impl Cluster {
    pub(super) fn home_ttl(&self) -> Duration {
        let config = self.hub.config();
        config
            .session_idle_ttl
            .max(config.unpaired_session_ttl)
            .saturating_add(Duration::from_secs(60))
    }

    /// Claims the home of every session held here again (which renews it, or records it
    /// if it was lost); a session whose home is now another node is let go.
    pub(super) async fn refresh_homes(&self) -> redis::RedisResult<()> {
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

    /// For an `INVITE_CREATE` from a connection that holds no reserved code
    /// ([`ConnState::reserved_code`]), one taken from this node's reserve for it alone, the
    /// reserve refilled first if it is spent: a burst waits for codes rather than failing,
    /// and no other connection can take the code between now and the hub applying the frame
    /// (taking it there, after a look here, raced under load).
    pub(super) async fn code_for(
        &self,
        env: &Envelope<'_>,
        holds_one: bool,
    ) -> Result<Option<InviteCode>, FrameError> {
        let Some(pool) = self.hub.code_pool() else {
            return Ok(None);
        };
        if env.kind != FrameType::InviteCreate || holds_one {
            return Ok(None);
        }
        if let Some(code) = pool.take(Instant::now()) {
            return Ok(Some(code));
        }
        self.reserve_codes(&pool, codes::POOL_TARGET)
            .await
            .map_err(|_| store_unavailable())?;
        Ok(pool.take(Instant::now()))
    }

    /// What the hub will need from Redis to apply `env` here, fetched before it does (the hub
    /// never waits): if `env` may re-create a session this node does not hold, the session's
    /// mailboxes (see [`Hub::stash_recovered`]). The session so prepared is returned: the
    /// caller clears its leftovers once the frame is applied. A session is never re-created
    /// without its mailboxes: if Redis cannot be read, the frame is refused.
    pub(super) async fn prepare(
        &self,
        env: &Envelope<'_>,
        address: AddressKey,
    ) -> Result<Option<SessionId>, FrameError> {
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
    pub(super) async fn claim_homes(&self, sids: &[SessionId]) {
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
    pub(super) fn let_go(&self, sid: SessionId) {
        for conn in self.hub.forget_session(sid) {
            if let Some(outbox) = self.hub.conns.get(conn) {
                outbox.kill();
            }
        }
    }

    pub(super) async fn claim_home(&self, sid: SessionId) -> redis::RedisResult<NodeId> {
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
    pub(super) async fn home_of(&self, sid: SessionId) -> redis::RedisResult<Option<NodeId>> {
        self.live_node_at(self.keys.home(sid)).await
    }

    /// The live node that issued an invite code, if any.
    pub(super) async fn issuer_of(&self, code: InviteCode) -> redis::RedisResult<Option<NodeId>> {
        self.live_node_at(self.keys.code(code)).await
    }

    pub(super) async fn live_node_at(&self, key: String) -> redis::RedisResult<Option<NodeId>> {
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
}
