//! Token buckets for failed `JOIN` attempts, per connection and per remote address.
//!
//! Only failures are charged: a person who types the right code is never slowed down, while a
//! guesser, who fails almost every time, runs out of tokens. The check happens before the code
//! is looked up, so an empty bucket also refuses a correct guess: being limited tells the
//! guesser nothing.

use std::net::IpAddr;

use dashmap::DashMap;
use tokio::time::Instant;

use crate::config::RateLimit;

#[derive(Debug, Clone, Copy)]
pub struct TokenBucket {
    tokens: f64,
    updated: Instant,
}

impl TokenBucket {
    pub fn full(limit: RateLimit, now: Instant) -> Self {
        TokenBucket {
            tokens: f64::from(limit.burst),
            updated: now,
        }
    }

    fn refill(&mut self, limit: RateLimit, now: Instant) {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        let rate = 1.0 / limit.refill.as_secs_f64().max(f64::EPSILON);
        self.tokens = (self.tokens + elapsed * rate).min(f64::from(limit.burst));
        self.updated = now;
    }

    /// Whether at least one token is left.
    pub fn allows(&mut self, limit: RateLimit, now: Instant) -> bool {
        self.refill(limit, now);
        self.tokens >= 1.0
    }

    pub fn charge(&mut self, limit: RateLimit, now: Instant) {
        self.refill(limit, now);
        self.tokens = (self.tokens - 1.0).max(0.0);
    }

    fn is_full(&mut self, limit: RateLimit, now: Instant) -> bool {
        self.refill(limit, now);
        self.tokens >= f64::from(limit.burst)
    }
}

/// The key for an address: IPv4 as is, IPv6 by its /64 (one host usually owns a whole /64).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AddressKey {
    V4(u32),
    V6Prefix64(u64),
}

impl AddressKey {
    /// The bytes that name the address (for [`crate::ids::RelaySecret::address_tag`]).
    pub fn bytes(&self) -> Vec<u8> {
        match self {
            AddressKey::V4(v4) => v4.to_be_bytes().to_vec(),
            AddressKey::V6Prefix64(prefix) => prefix.to_be_bytes().to_vec(),
        }
    }
}

impl From<IpAddr> for AddressKey {
    fn from(ip: IpAddr) -> Self {
        match ip.to_canonical() {
            IpAddr::V4(v4) => AddressKey::V4(u32::from(v4)),
            IpAddr::V6(v6) => AddressKey::V6Prefix64((u128::from(v6) >> 64) as u64),
        }
    }
}

/// The limits a cluster holds across its nodes, besides each node's own count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SharedLimit {
    JoinFailures,
    SessionsCreated,
}

/// Where a cluster node also counts what its limiters charge (see `cluster`).
pub trait SharedLimits: Send + Sync {
    fn charged(&self, limit: SharedLimit, address: AddressKey);
}

pub struct AddressLimiter {
    limit: RateLimit,
    buckets: DashMap<AddressKey, TokenBucket>,
}

impl AddressLimiter {
    pub fn new(limit: RateLimit) -> Self {
        AddressLimiter {
            limit,
            buckets: DashMap::new(),
        }
    }

    pub fn allows(&self, key: AddressKey, now: Instant) -> bool {
        self.buckets
            .get_mut(&key)
            .is_none_or(|mut b| b.allows(self.limit, now))
    }

    pub fn charge(&self, key: AddressKey, now: Instant) {
        self.buckets
            .entry(key)
            .or_insert_with(|| TokenBucket::full(self.limit, now))
            .charge(self.limit, now);
    }

    /// Forgets buckets that have refilled: they hold nothing an absent bucket would not.
    pub fn sweep(&self, now: Instant) {
        self.buckets.retain(|_, b| !b.is_full(self.limit, now));
    }

    pub fn len(&self) -> usize {
        self.buckets.len()
    }
}

/// How many of something each address holds at once, within a cap (connections, openings).
pub struct AddressCounts {
    max: usize,
    held: DashMap<AddressKey, usize>,
}

impl AddressCounts {
    pub fn new(max: usize) -> Self {
        AddressCounts {
            max,
            held: DashMap::new(),
        }
    }

    /// One more for `key`, unless it holds `max` already.
    pub fn try_add(&self, key: AddressKey) -> bool {
        let mut n = self.held.entry(key).or_insert(0);
        if *n >= self.max {
            return false;
        }
        *n += 1;
        true
    }

    /// One fewer for `key`; an address that holds none is forgotten.
    pub fn remove(&self, key: AddressKey) {
        if let dashmap::mapref::entry::Entry::Occupied(mut n) = self.held.entry(key) {
            if *n.get() <= 1 {
                n.remove();
            } else {
                *n.get_mut() -= 1;
            }
        }
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.held.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const LIMIT: RateLimit = RateLimit {
        burst: 3,
        refill: Duration::from_secs(10),
    };

    #[test]
    fn bucket_allows_burst_then_refills() {
        let start = Instant::now();
        let mut bucket = TokenBucket::full(LIMIT, start);
        for _ in 0..3 {
            assert!(bucket.allows(LIMIT, start));
            bucket.charge(LIMIT, start);
        }
        assert!(!bucket.allows(LIMIT, start));
        assert!(!bucket.allows(LIMIT, start + Duration::from_secs(9)));
        assert!(bucket.allows(LIMIT, start + Duration::from_secs(10)));
    }

    #[test]
    fn ipv6_addresses_share_their_64() {
        let a: IpAddr = "2001:db8::1".parse().unwrap_or(IpAddr::from([0u8; 16]));
        let b: IpAddr = "2001:db8::ffff:2"
            .parse()
            .unwrap_or(IpAddr::from([0u8; 16]));
        let c: IpAddr = "2001:db8:0:1::1".parse().unwrap_or(IpAddr::from([0u8; 16]));
        assert_eq!(AddressKey::from(a), AddressKey::from(b));
        assert_ne!(AddressKey::from(a), AddressKey::from(c));
        let mapped: IpAddr = "::ffff:127.0.0.1"
            .parse()
            .unwrap_or(IpAddr::from([0u8; 16]));
        assert_eq!(
            AddressKey::from(mapped),
            AddressKey::from(IpAddr::from([127, 0, 0, 1]))
        );
    }

    #[test]
    fn address_counts_are_capped_and_forget_empty_addresses() {
        let counts = AddressCounts::new(2);
        let key = AddressKey::from(IpAddr::from([10, 0, 0, 1]));
        assert!(counts.try_add(key));
        assert!(counts.try_add(key));
        assert!(!counts.try_add(key));
        counts.remove(key);
        assert!(counts.try_add(key));
        counts.remove(key);
        counts.remove(key);
        assert_eq!(counts.len(), 0);
        counts.remove(key);
        assert_eq!(counts.len(), 0);
    }

    #[test]
    fn limiter_sweeps_refilled_buckets() {
        let limiter = AddressLimiter::new(LIMIT);
        let key = AddressKey::from(IpAddr::from([10, 0, 0, 1]));
        let start = Instant::now();
        limiter.charge(key, start);
        limiter.sweep(start);
        assert_eq!(limiter.len(), 1);
        limiter.sweep(start + Duration::from_secs(10));
        assert_eq!(limiter.len(), 0);
    }
}
