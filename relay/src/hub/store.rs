//! Where session records and invites live, and the only ways to change them.
//!
//! This is the seam a shared store (several relays on one Redis) implements. Access is
//! closure-scoped: no reference to a record escapes a call, so none can be held across an
//! `.await`. Every change goes through [`Sessions::update`] or [`Sessions::insert`]: a
//! *decide* step looks at the record (read-only) and either refuses or returns a [`Change`],
//! whose `apply` is infallible. So a handler cannot mutate and then fail a later check: the
//! checks are over before anything is written, and the record is locked from the first look
//! to the last write. A store in Redis does the same with one `WATCH`/`MULTI` round (or a
//! script) per update: the operations that must be atomic are exactly these updates (take a
//! seat, push to a mailbox or a member, answer a join) plus [`Sessions::claim_invite`].
//!
//! Connections are not in the records: a seat names its connection by id, and the outboxes
//! live in [`Connections`], which is this process's own.
//!
//! Locking: a session entry may be held while an invite entry or a connection entry is
//! locked, never the other way round, so no lock-order cycle exists.

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use tokio::time::Instant;

use std::cell::Cell;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::session::{Invite, Session, SessionState};
use crate::cluster::CodePool;
use crate::ids::{InviteCode, SessionId};
use crate::outbox::{ConnId, Frame, Outbox, Overflow};
use parley_protocol::FrameError;

/// What a handler has decided to do to a session, once every check has passed.
pub trait Change {
    type Output;
    fn apply(self, session: &mut Session, conns: &Connections) -> Self::Output;
}

/// The outboxes of this process's connections, by id.
#[derive(Default)]
pub struct Connections(DashMap<ConnId, Outbox>);

impl Connections {
    pub fn add(&self, outbox: Outbox) {
        self.0.insert(outbox.id(), outbox);
    }

    pub fn remove(&self, id: ConnId) {
        self.0.remove(&id);
    }

    /// Drops every connection (a cluster node that must start afresh).
    pub fn kill_all(&self) {
        for outbox in self.0.iter() {
            outbox.kill();
        }
    }

    pub fn get(&self, id: ConnId) -> Option<Outbox> {
        self.0.get(&id).map(|o| o.clone())
    }

    /// Queues a frame for a connection; `Err` if it is gone or being dropped as a slow
    /// consumer.
    pub fn push(&self, id: ConnId, frame: impl Into<Frame>) -> Result<(), Overflow> {
        match self.0.get(&id) {
            Some(outbox) => outbox.push(frame),
            None => Err(Overflow),
        }
    }
}

#[derive(Default)]
pub struct Sessions {
    map: DashMap<SessionId, Session>,
    invites: DashMap<InviteCode, Invite>,
    /// Sessions by [`SessionState`], kept as they change (a scrape must not walk the map).
    by_state: [AtomicUsize; 3],
    /// In a cluster, new invites take their codes from here (reserved cluster-wide); alone,
    /// a relay draws them at random.
    codes: Option<Arc<CodePool>>,
}

/// How many random codes to try before calling the code space full.
const INVITE_CODE_ATTEMPTS: usize = 16;

impl Sessions {
    pub fn new(codes: Option<Arc<CodePool>>) -> Sessions {
        Sessions {
            codes,
            ..Sessions::default()
        }
    }

    pub fn code_pool(&self) -> Option<Arc<CodePool>> {
        self.codes.clone()
    }

    pub fn ids(&self) -> Vec<SessionId> {
        self.map.iter().map(|entry| *entry.key()).collect()
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn invite_count(&self) -> usize {
        self.invites.len()
    }

    /// How many sessions are in `state`.
    pub fn count(&self, state: SessionState) -> usize {
        self.by_state
            .get(state as usize)
            .map_or(0, |n| n.load(Ordering::Relaxed))
    }

    /// The counts by walking every session: what [`Self::count`] must always equal.
    #[cfg(test)]
    pub fn count_by_walking(&self, state: SessionState) -> usize {
        self.map.iter().filter(|s| s.state() == state).count()
    }

    fn counted(&self, state: SessionState, up: bool) {
        if let Some(n) = self.by_state.get(state as usize) {
            if up {
                n.fetch_add(1, Ordering::Relaxed);
            } else {
                n.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }

    /// Moves a session's count from `before` to its state now.
    fn recount(&self, before: SessionState, session: &Session) {
        let after = session.state();
        if after != before {
            self.counted(before, false);
            self.counted(after, true);
        }
    }

    pub fn contains(&self, sid: SessionId) -> bool {
        self.map.contains_key(&sid)
    }

    /// Looks at a session; `None` if the relay does not hold it.
    pub fn read<R>(&self, sid: SessionId, f: impl FnOnce(&Session) -> R) -> Option<R> {
        self.map.get(&sid).map(|s| f(&s))
    }

    /// Decides on the session, then applies the decision, under one lock. `None` if the relay
    /// does not hold the session.
    pub fn update<C: Change>(
        &self,
        sid: SessionId,
        conns: &Connections,
        decide: impl FnOnce(&Session) -> Result<C, FrameError>,
    ) -> Option<Result<C::Output, FrameError>> {
        let mut session = self.map.get_mut(&sid)?;
        let before = session.state();
        let change = match decide(&session) {
            Ok(change) => change,
            Err(e) => return Some(Err(e)),
        };
        let output = change.apply(&mut session, conns);
        self.recount(before, &session);
        Some(Ok(output))
    }

    /// Inserts a session under `sid` and applies `first` to it under the same lock; gives the
    /// session back if `sid` is taken (someone was quicker).
    pub fn insert<C: Change>(
        &self,
        sid: SessionId,
        session: Session,
        conns: &Connections,
        first: C,
    ) -> Result<C::Output, Box<Session>> {
        match self.map.entry(sid) {
            Entry::Occupied(_) => Err(Box::new(session)),
            Entry::Vacant(slot) => {
                let before = session.state();
                self.counted(before, true);
                let mut session = slot.insert(session);
                let output = first.apply(&mut session, conns);
                self.recount(before, &session);
                Ok(output)
            }
        }
    }

    /// Inserts a session under a fresh random id.
    pub fn insert_new<C: Change>(
        &self,
        mut session: Session,
        conns: &Connections,
        first: impl Fn(SessionId) -> C,
    ) -> (SessionId, C::Output) {
        loop {
            // 128 random bits: a collision is astronomically unlikely, but cheap to rule out.
            let sid = SessionId::random();
            match self.insert(sid, session, conns, first(sid)) {
                Ok(output) => return (sid, output),
                Err(back) => session = *back,
            }
        }
    }

    /// Takes a session out, if held.
    pub fn remove(&self, sid: SessionId) -> Option<Session> {
        let (_, session) = self.map.remove(&sid)?;
        self.counted(session.state(), false);
        Some(session)
    }

    /// Keeps the sessions `keep` says to keep (the sweep).
    pub fn retain(&self, mut keep: impl FnMut(SessionId, &mut Session) -> bool) {
        self.map.retain(|sid, session| {
            let kept = keep(*sid, session);
            if !kept {
                self.counted(session.state(), false);
            }
            kept
        });
    }

    /// A new code for `sid`, live until `expires_at`: the code `reserved` holds if any (taken
    /// from it), else a new one; `None` if the code space is too full (or, in a cluster, no
    /// reserved code is left).
    pub fn new_invite(
        &self,
        sid: SessionId,
        expires_at: Instant,
        reserved: &Cell<Option<InviteCode>>,
    ) -> Option<InviteCode> {
        (0..INVITE_CODE_ATTEMPTS).find_map(|_| {
            let code = match (&self.codes, reserved.take()) {
                (_, Some(code)) => code,
                (Some(pool), None) => pool.take(Instant::now())?,
                (None, None) => InviteCode::random(),
            };
            match self.invites.entry(code) {
                Entry::Vacant(slot) => {
                    slot.insert(Invite {
                        sid,
                        expires_at,
                        used: false,
                    });
                    Some(code)
                }
                Entry::Occupied(_) => None,
            }
        })
    }

    /// Looks at an invite.
    pub fn invite<R>(&self, code: InviteCode, f: impl FnOnce(&Invite) -> R) -> Option<R> {
        self.invites.get(&code).map(|i| f(&i))
    }

    /// Spends a code if it is still live and unused: `true` only for the one caller that
    /// spent it.
    pub fn claim_invite(&self, code: InviteCode, now: Instant) -> bool {
        match self.invites.get_mut(&code) {
            Some(mut invite) if !invite.used && invite.expires_at > now => {
                invite.used = true;
                true
            }
            _ => false,
        }
    }

    pub fn retain_invites(&self, mut keep: impl FnMut(&Invite) -> bool) {
        self.invites.retain(|_, invite| keep(invite));
    }
}
