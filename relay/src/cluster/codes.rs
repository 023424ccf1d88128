//! Invite codes reserved in Redis ahead of need, so that issuing one stays a synchronous step of
//! the hub and no two nodes ever hand out the same code.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::ids::InviteCode;

/// Codes this node has reserved and not used yet.
pub struct CodePool {
    codes: Mutex<VecDeque<(InviteCode, Instant)>>,
    /// A reserved code is used only this long after its reservation: the reservation lasts
    /// three times as long, which covers the invite's life and its tombstone (see `Hub::sweep`).
    max_age: Duration,
    /// Wakes the reserver when the pool runs low.
    pub(super) low: Notify,
}

/// The reserver tops the pool up to this many codes.
pub(super) const POOL_TARGET: usize = 64;

impl CodePool {
    pub fn new(invite_ttl: Duration) -> CodePool {
        CodePool {
            codes: Mutex::new(VecDeque::with_capacity(POOL_TARGET)),
            max_age: invite_ttl,
            low: Notify::new(),
        }
    }

    fn codes(&self) -> std::sync::MutexGuard<'_, VecDeque<(InviteCode, Instant)>> {
        self.codes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A reserved code, still young enough; `None` if none is left (Redis is unreachable, or
    /// codes are being issued faster than they can be reserved).
    pub fn take(&self, now: Instant) -> Option<InviteCode> {
        let mut codes = self.codes();
        let code = loop {
            let (code, reserved) = codes.pop_front()?;
            if now.saturating_duration_since(reserved) < self.max_age {
                break code;
            }
        };
        if codes.len() < POOL_TARGET / 2 {
            self.low.notify_one();
        }
        Some(code)
    }

    pub(super) fn add(&self, code: InviteCode, reserved: Instant) {
        self.codes().push_back((code, reserved));
    }

    /// Drops codes too old to use; how many are left.
    pub(super) fn fresh(&self, now: Instant) -> usize {
        let mut codes = self.codes();
        codes.retain(|(_, reserved)| now.saturating_duration_since(*reserved) < self.max_age);
        codes.len()
    }

    /// How long a reservation must last in Redis.
    pub(super) fn reservation(&self) -> Duration {
        self.max_age.saturating_mul(3)
    }
}

impl super::Cluster {
    /// Keeps the hub's pool of reserved invite codes full.
    pub(super) async fn run_codes(self: Arc<Self>, stop: CancellationToken) {
        let Some(pool) = self.hub.code_pool() else {
            return;
        };
        loop {
            let missing = POOL_TARGET.saturating_sub(pool.fresh(Instant::now()));
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
    pub(super) async fn reserve_codes(&self, pool: &CodePool, n: usize) -> redis::RedisResult<()> {
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_used_once_and_only_while_young() {
        let pool = CodePool::new(Duration::from_secs(60));
        let start = Instant::now();
        let a = InviteCode::random();
        let b = InviteCode::random();
        pool.add(a, start);
        pool.add(b, start + Duration::from_secs(30));
        assert_eq!(pool.take(start + Duration::from_secs(10)), Some(a));
        // a is gone; b is still young at 80 s (reserved at 30 s).
        assert_eq!(pool.take(start + Duration::from_secs(80)), Some(b));
        assert_eq!(pool.take(start + Duration::from_secs(80)), None);
        pool.add(a, start);
        assert_eq!(pool.fresh(start + Duration::from_secs(60)), 0);
        assert_eq!(pool.take(start + Duration::from_secs(60)), None);
    }
}
