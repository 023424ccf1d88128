//! The per-address limits, held across the cluster: failed `JOIN`s and sessions created.
//!
//! Each node keeps its own limiters as a relay alone does, and also counts every charge in a
//! token bucket in Redis (`limit:KIND:TAG`, the address named by a MAC under the relay's
//! secret, so no address is stored), with the same burst and refill. A gate looks at the
//! shared bucket before it applies or forwards a `JOIN`, a `CREATE_SESSION` or a `REATTACH`
//! that would re-create a session: an address that used up its allowance on other nodes is
//! refused here too. If Redis cannot be asked, the node's own limiters still hold.

use parley_protocol::{ErrorCode, FrameError};

use super::Cluster;
use super::writes::Write;
use crate::config::RateLimit;
use crate::limiter::{AddressKey, SharedLimit, SharedLimits};

/// A token bucket in Redis's clock: `ARGV` = burst, milliseconds per token, cost (0 only
/// looks). Answers 1 if a token was there before the cost.
pub(super) const BUCKET_SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local burst = tonumber(ARGV[1])
local per = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local held = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(held[1]) or burst
local at = tonumber(held[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - at) / per)
local allowed = tokens >= 1
if cost > 0 then
  tokens = math.max(0, tokens - cost)
  redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', now)
  redis.call('PEXPIRE', KEYS[1], math.ceil((burst - tokens) * per) + 1000)
end
if allowed then return 1 end
return 0
";

impl Cluster {
    fn limit(&self, limit: SharedLimit) -> (RateLimit, &'static str) {
        let config = self.hub.config();
        match limit {
            SharedLimit::JoinFailures => (config.join_failures_per_address, "join"),
            SharedLimit::SessionsCreated => (config.sessions_created_per_address, "create"),
        }
    }

    pub(super) fn bucket_key(&self, limit: SharedLimit, address: AddressKey) -> String {
        let (_, kind) = self.limit(limit);
        let tag = self.hub.config().secret.address_tag(&address.bytes());
        format!("{}limit:{kind}:{tag}", self.keys.prefix)
    }

    pub(super) fn bucket_args(&self, limit: SharedLimit) -> (u32, u64) {
        let (rate, _) = self.limit(limit);
        let per = u64::try_from(rate.refill.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        (rate.burst, per)
    }

    /// Refuses the frame if `address` has used up `limit` across the cluster. Redis being
    /// unreachable refuses nothing (the node's own limiters still count).
    pub(super) async fn check_shared(
        &self,
        limit: SharedLimit,
        address: AddressKey,
    ) -> Result<(), FrameError> {
        let key = self.bucket_key(limit, address);
        let (burst, per) = self.bucket_args(limit);
        let allowed: redis::RedisResult<i64> = self
            .store(async |redis| {
                self.bucket
                    .key(key)
                    .arg(burst)
                    .arg(per)
                    .arg(0)
                    .invoke_async(redis)
                    .await
            })
            .await;
        match allowed {
            Ok(0) => Err(match limit {
                SharedLimit::JoinFailures => FrameError::new(
                    ErrorCode::RateLimited,
                    "too many failed join attempts from this connection or address; wait a minute and try again",
                ),
                SharedLimit::SessionsCreated => FrameError::new(
                    ErrorCode::RateLimited,
                    "too many sessions created from this address; wait a minute and try again",
                ),
            }),
            _ => Ok(()),
        }
    }
}

impl SharedLimits for Cluster {
    fn charged(&self, limit: SharedLimit, address: AddressKey) {
        let (burst, per) = self.bucket_args(limit);
        let key = self.bucket_key(limit, address);
        // Best effort: a charge that cannot be queued is counted by this node alone.
        let _ = self.write(Write::Charge { key, burst, per });
    }
}
