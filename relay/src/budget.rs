//! Memory the relay keeps for clients beyond their connections (mailboxed frames, pending
//! `JOIN_REQUEST`s), bounded relay-wide and per address, so that a few addresses cannot take
//! what is shared by all.
//!
//! A [`Charge`] is the right to hold some bytes: taken before the bytes are stored, given back
//! when it is dropped with them. Nothing else frees budget, so it cannot leak or be freed twice.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;

use crate::limiter::AddressKey;

pub struct Budget {
    total: AtomicUsize,
    /// Charges outstanding (frames held).
    held: AtomicUsize,
    max_total: usize,
    /// In a cluster, what the other nodes hold (from their heartbeats): the relay-wide bound
    /// is the cluster's.
    others: AtomicUsize,
    per_address: DashMap<AddressKey, usize>,
    max_per_address: usize,
}

/// Bytes held against the budget, for one address, until dropped.
#[derive(Debug)]
pub struct Charge {
    budget: Arc<Budget>,
    /// `None`: charged to the relay-wide total only (see [`Budget::charge_shared`]).
    address: Option<AddressKey>,
    bytes: usize,
}

impl std::fmt::Debug for Budget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Budget")
            .field("total", &self.total())
            .finish_non_exhaustive()
    }
}

impl Budget {
    pub fn new(max_total: usize, max_per_address: usize) -> Arc<Budget> {
        Arc::new(Budget {
            total: AtomicUsize::new(0),
            held: AtomicUsize::new(0),
            max_total,
            others: AtomicUsize::new(0),
            per_address: DashMap::new(),
            max_per_address,
        })
    }

    /// What the other nodes of a cluster hold.
    pub fn set_others(&self, bytes: usize) {
        self.others.store(bytes, Ordering::Relaxed);
    }

    fn within_total(&self, total: usize) -> bool {
        total.saturating_add(self.others.load(Ordering::Relaxed)) <= self.max_total
    }

    /// Bytes held in all.
    pub fn total(&self) -> usize {
        self.total.load(Ordering::Relaxed)
    }

    /// Charges outstanding.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    /// Takes `bytes` for `address`, if both its share and the relay-wide total have room.
    pub fn charge(self: &Arc<Self>, address: AddressKey, bytes: usize) -> Option<Charge> {
        // The address's entry stays locked until its count is updated.
        let entry = self.per_address.entry(address);
        let held = match &entry {
            Entry::Occupied(e) => *e.get(),
            Entry::Vacant(_) => 0,
        };
        let after = held
            .checked_add(bytes)
            .filter(|after| *after <= self.max_per_address)?;
        self.total
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |total| {
                total.checked_add(bytes).filter(|t| self.within_total(*t))
            })
            .ok()?;
        match entry {
            Entry::Occupied(mut e) => *e.get_mut() = after,
            Entry::Vacant(v) => {
                v.insert(after);
            }
        }
        self.held.fetch_add(1, Ordering::AcqRel);
        Some(Charge {
            budget: self.clone(),
            address: Some(address),
            bytes,
        })
    }

    /// Takes `bytes` from the relay-wide total only: for frames whose sender is not known
    /// (a cluster node taking over another's mailboxes).
    pub fn charge_shared(self: &Arc<Self>, bytes: usize) -> Option<Charge> {
        self.total
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |total| {
                total.checked_add(bytes).filter(|t| self.within_total(*t))
            })
            .ok()?;
        self.held.fetch_add(1, Ordering::AcqRel);
        Some(Charge {
            budget: self.clone(),
            address: None,
            bytes,
        })
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        let budget = &self.budget;
        budget.total.fetch_sub(self.bytes, Ordering::AcqRel);
        budget.held.fetch_sub(1, Ordering::AcqRel);
        if let Some(address) = self.address
            && let Entry::Occupied(mut held) = budget.per_address.entry(address)
        {
            let left = held.get().saturating_sub(self.bytes);
            if left == 0 {
                held.remove();
            } else {
                *held.get_mut() = left;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::IpAddr;

    fn address(last: u8) -> AddressKey {
        AddressKey::from(IpAddr::from([10, 0, 0, last]))
    }

    #[test]
    fn bounded_per_address_and_in_all_and_given_back_on_drop() {
        let budget = Budget::new(25, 10);
        let a = budget.charge(address(1), 6).unwrap();
        assert!(
            budget.charge(address(1), 5).is_none(),
            "11 > 10 for one address"
        );
        let a2 = budget.charge(address(1), 4).unwrap();
        let b = budget.charge(address(2), 10).unwrap();
        assert!(budget.charge(address(3), 6).is_none(), "26 > 25 in all");
        let c = budget.charge(address(3), 5).unwrap();
        assert_eq!(budget.total(), 25);
        assert_eq!(budget.held(), 4);
        drop((a, a2, b, c));
        assert_eq!(budget.total(), 0);
        assert!(budget.per_address.is_empty(), "no entry left behind");
        assert!(budget.charge(address(1), usize::MAX).is_none());
    }
}
