//! The home's side: proxies of other nodes' clients, and the flow control between a home and
//! a gate, which gives a cluster the single relay's backpressure.
//!
//! On one relay, a sender whose peer's queue is congested stops being read until the queue
//! drains, and a peer that never drains overflows its queue and is dropped. Across nodes:
//!
//! - Home to gate: a proxy has at most half a queue (by frames and by bytes) in flight: frames
//!   the gate has not yet queued for its client with room to spare (`w`, [`Acks`]). Beyond
//!   that, frames wait in the proxy's own queue, where a sender at the home sees it congested
//!   and waits, as it would for a local peer; a client that stops reading overflows the
//!   proxy's queue and is dropped (`d`).
//! - Gate to home: a gate forwards at most [`FORWARD_WINDOW`] of a client's frames that the
//!   home has not applied (`a`); then it stops reading from the client. The home applies a
//!   proxy's frames in order, in the proxy's own task, and when a frame meets a congested
//!   peer queue it waits for that queue to drain (with the single relay's patience) before the
//!   next, and before saying they are applied.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use parley_protocol::Envelope;
use tokio::sync::{Notify, mpsc};
use tokio_tungstenite::tungstenite::Utf8Bytes;
use tokio_util::sync::CancellationToken;

use super::wire::{NodeId, NodeMsg};
use super::writes::Write;
use super::{Cluster, new_sessions};
use crate::hub::{ConnState, Flow};
use crate::outbox::{ConnId, Outbox, PEER_DRAIN_PATIENCE};

/// Frames of one client a gate forwards that the home has not yet applied, at most.
pub const FORWARD_WINDOW: usize = 64;

/// A client of another node, whose frames this node applies to a session at home here.
pub struct Proxy {
    state: Arc<Mutex<ConnState>>,
    stop: CancellationToken,
    pub(super) in_flight: Arc<InFlight>,
    /// The client's frames, to its task that applies them in order.
    inbound: mpsc::Sender<Utf8Bytes>,
}

/// The gate's side: a client's frames forwarded and not yet applied.
#[derive(Default)]
pub struct Window {
    frames: AtomicUsize,
    applied: Notify,
}

impl Window {
    pub fn forwarded(&self) {
        self.frames.fetch_add(1, Ordering::AcqRel);
    }

    pub fn applied(&self, frames: usize) {
        let _ = self
            .frames
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                Some(n.saturating_sub(frames))
            });
        self.applied.notify_waiters();
    }

    fn is_full(&self) -> bool {
        self.frames.load(Ordering::Acquire) >= FORWARD_WINDOW
    }

    /// Resolves once there is room again, or after `patience` (the home is slow or gone;
    /// a dead home's clients are closed anyway).
    async fn room(self: Arc<Self>, patience: std::time::Duration) {
        let wait = async {
            loop {
                let applied = self.applied.notified();
                tokio::pin!(applied);
                applied.as_mut().enable();
                if !self.is_full() {
                    return;
                }
                applied.await;
            }
        };
        let _ = tokio::time::timeout(patience, wait).await;
    }
}

/// How long a gate waits for a home to apply a full window before it reads on anyway.
const FORWARD_PATIENCE: std::time::Duration = std::time::Duration::from_secs(10);

/// Frames a proxy has sent its gate that the gate has not acknowledged.
#[derive(Default)]
pub struct InFlight {
    frames: AtomicUsize,
    bytes: AtomicUsize,
    acked: Notify,
}

impl InFlight {
    pub fn acknowledge(&self, frames: usize, bytes: usize) {
        let less = |n: usize, by: usize| Some(n.saturating_sub(by));
        let _ = self
            .frames
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| less(n, frames));
        let _ = self
            .bytes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| less(n, bytes));
        self.acked.notify_waiters();
    }
}

/// What a gate has queued for its clients in one read of its inbox, per home and client, to
/// acknowledge.
#[derive(Default)]
pub struct Acks(HashMap<(NodeId, ConnId), (usize, usize)>);

impl Acks {
    pub fn add(&mut self, home: NodeId, conn: ConnId, bytes: usize) {
        let (frames, total) = self.0.entry((home, conn)).or_default();
        *frames = frames.saturating_add(1);
        *total = total.saturating_add(bytes);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Cluster {
    /// A frame a gate forwarded: to its client's proxy here, to be applied in order.
    pub(super) fn apply_for_proxy(
        self: &Arc<Self>,
        gate: NodeId,
        conn: ConnId,
        ip: IpAddr,
        frame: Utf8Bytes,
    ) {
        let queued = {
            let mut proxies = self.lock_proxies();
            let proxy = proxies
                .entry((gate, conn))
                .or_insert_with(|| self.start_proxy(gate, conn, ip));
            proxy.inbound.try_send(frame).is_ok()
        };
        if !queued {
            // More than the window allows: the gate is not ours to trust blindly either.
            tracing::warn!("a gate sent beyond its window; dropping that client");
            if let Some(proxy) = self.lock_proxies().remove(&(gate, conn)) {
                self.end_proxy(proxy);
            }
            let _ = self.send(gate, &NodeMsg::Drop { conn });
        }
    }

    /// Applies one of a proxy's frames: what Redis must provide first, then the hub.
    async fn apply_one(&self, state: &Mutex<ConnState>, frame: &Utf8Bytes) -> Flow {
        let address = lock(state).address;
        let recovering = match Envelope::parse(frame.as_str()) {
            Ok(env) => match self.prepare(&env, address).await {
                Ok(recovering) => recovering,
                Err(e) => {
                    lock(state).send_error(env.sid(), &e, None);
                    return Flow::default();
                }
            },
            Err(_) => None,
        };
        let (flow, new_seats) = {
            let mut state = lock(state);
            let before = state.memberships.clone();
            let flow = self.hub.handle(&mut state, frame);
            (flow, new_sessions(&before, &state))
        };
        if let Some(sid) = recovering {
            self.hub.take_recovered(sid);
        }
        self.claim_homes(&new_seats).await;
        flow
    }

    /// A proxy: the hub's connection state for a remote client, and a task that sends what
    /// the hub queues for it to its gate, within the flow-control window.
    fn start_proxy(self: &Arc<Self>, gate: NodeId, conn: ConnId, ip: IpAddr) -> Proxy {
        let config = self.hub.config();
        let (outbox, mut outbound) = Outbox::new(
            self.hub.next_conn_id(),
            config.outbound_queue_frames,
            config.outbound_queue_bytes,
        );
        // Half the client's own queue may be in flight: the gate's queue never overflows
        // because of us alone.
        let window = (
            (config.outbound_queue_frames / 2).max(1),
            (config.outbound_queue_bytes / 2).max(config.max_frame_bytes),
        );
        let state = Arc::new(Mutex::new(self.hub.attach(outbox, ip)));
        let in_flight = Arc::new(InFlight::default());
        let stop = CancellationToken::new();
        let (task_state, task_stop, task_flight) = (state.clone(), stop.clone(), in_flight.clone());
        let (hub, writes, home) = (self.hub.clone(), self.writes.clone(), self.me);
        tokio::spawn(async move {
            let mut batch = VecDeque::new();
            loop {
                // Room in the window first.
                loop {
                    let acked = task_flight.acked.notified();
                    tokio::pin!(acked);
                    acked.as_mut().enable();
                    let frames = task_flight.frames.load(Ordering::Acquire);
                    if frames < window.0 && task_flight.bytes.load(Ordering::Acquire) < window.1 {
                        break;
                    }
                    tokio::select! {
                        () = task_stop.cancelled() => return,
                        () = acked => {}
                    }
                }
                let room = window
                    .0
                    .saturating_sub(task_flight.frames.load(Ordering::Acquire));
                let taken = tokio::select! {
                    () = task_stop.cancelled() => return,
                    taken = outbound.next_batch_up_to(&mut batch, room) => taken,
                };
                if taken.is_err() {
                    let msg = NodeMsg::Drop { conn }.encode();
                    let _ = writes.try_send(Write::Inbox { node: gate, msg });
                    return;
                }
                let mut bytes = 0usize;
                let frames = batch.len();
                for frame in batch.drain(..) {
                    bytes = bytes.saturating_add(frame.len());
                    let msg = NodeMsg::Out { home, conn, frame }.encode();
                    if writes.send(Write::Inbox { node: gate, msg }).await.is_err() {
                        return;
                    }
                }
                task_flight.frames.fetch_add(frames, Ordering::AcqRel);
                task_flight.bytes.fetch_add(bytes, Ordering::AcqRel);
                // The queue's own bound now counts only what is not in flight; the window
                // bounds the rest.
                outbound.written(bytes);
                let _ = hub.hand_over(&lock(&task_state));
            }
        });
        // The applying task: in order; a congested peer here holds the client's next frames
        // (and the gate's window) until it drains.
        let (inbound, mut frames) = mpsc::channel::<Utf8Bytes>(FORWARD_WINDOW.saturating_mul(2));
        let (cluster, apply_state, apply_stop) = (self.clone(), state.clone(), stop.clone());
        tokio::spawn(async move {
            let mut batch = Vec::with_capacity(FORWARD_WINDOW);
            loop {
                let n = tokio::select! {
                    () = apply_stop.cancelled() => return,
                    n = frames.recv_many(&mut batch, FORWARD_WINDOW) => n,
                };
                if n == 0 {
                    return;
                }
                for frame in batch.drain(..) {
                    // As a connection stops reading while its own queue is half full (its
                    // replies must fit), so does a proxy.
                    let own = lock(&apply_state).outbox.clone();
                    if !own.has_room_for(0) {
                        own.drained(PEER_DRAIN_PATIENCE).await;
                    }
                    let flow = cluster.apply_one(&apply_state, &frame).await;
                    if let Some(peer) = flow.wait_for {
                        peer.drained(PEER_DRAIN_PATIENCE).await;
                    }
                }
                let _ = cluster.send(gate, &NodeMsg::Applied { conn, frames: n });
            }
        });
        Proxy {
            state,
            stop,
            in_flight,
            inbound,
        }
    }

    pub(super) fn end_proxy(&self, proxy: Proxy) {
        proxy.stop.cancel();
        self.hub.disconnect(&lock(&proxy.state));
    }

    /// The gate's side: acknowledges what it has queued for its clients, each once the
    /// client's queue has room (within the single relay's patience).
    pub(super) fn send_acks(&self, acks: Acks) {
        for ((home, conn), (frames, bytes)) in acks.0 {
            let ack = NodeMsg::Written {
                gate: self.me,
                conn,
                frames,
                bytes,
            };
            match self.hub.conns.get(conn) {
                Some(outbox) if outbox.is_congested() => {
                    let writes = self.writes.clone();
                    tokio::spawn(async move {
                        outbox.drained(PEER_DRAIN_PATIENCE).await;
                        let msg = ack.encode();
                        let _ = writes.send(Write::Inbox { node: home, msg }).await;
                    });
                }
                _ => {
                    let _ = self.send(home, &ack);
                }
            }
        }
    }

    /// The gate's side: a client's frame is on its way to a home.
    pub(super) fn forwarded(&self, conn: ConnId) {
        self.windows.entry(conn).or_default().forwarded();
    }

    /// The gate's side: a home has applied some of a client's frames.
    pub(super) fn applied(&self, conn: ConnId, frames: usize) {
        if let Some(window) = self.windows.get(&conn) {
            window.applied(frames);
        }
    }

    /// For a frame forwarded from a client: if its window is full, the flow that reads
    /// nothing more from the client until the home has applied some.
    pub(super) fn forward_flow(&self, conn: ConnId) -> Flow {
        match self.windows.get(&conn) {
            Some(window) if window.is_full() => Flow {
                wait_until: Some(Box::pin(window.clone().room(FORWARD_PATIENCE))),
                ..Flow::default()
            },
            _ => Flow::default(),
        }
    }
}
