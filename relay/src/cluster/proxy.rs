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
use parley_protocol::data::data_sid;
use tokio::sync::{Notify, mpsc};
use tokio_tungstenite::tungstenite::Bytes;
use tokio_util::sync::CancellationToken;

use super::wire::{NodeId, NodeMsg};
use super::writes::Write;
use super::{Cluster, new_sessions};
use crate::hub::{ConnState, Flow};
use crate::ids::SessionId;
use crate::outbox::{ConnId, Frame, Outbox, PEER_DRAIN_PATIENCE};

/// Frames of one client a gate forwards that the home has not yet applied, at most.
pub const FORWARD_WINDOW: usize = 64;

/// A client of another node, whose frames this node applies to a session at home here.
pub struct Proxy {
    state: Arc<Mutex<ConnState>>,
    stop: CancellationToken,
    pub(super) in_flight: Arc<InFlight>,
    /// The client's frames, to its task that applies them in order.
    inbound: mpsc::Sender<Frame>,
}

/// The gate's side: a client's frames forwarded, and applied, since it connected. Counts
/// are totals, so a lost acknowledgement is made good by the next one.
#[derive(Default)]
pub struct Window {
    forwarded: AtomicUsize,
    applied: AtomicUsize,
    progress: Notify,
}

impl Window {
    pub fn forwarded(&self) {
        self.forwarded.fetch_add(1, Ordering::AcqRel);
    }

    /// The home has applied `total` of the client's frames in all.
    pub fn applied(&self, total: usize) {
        self.applied.fetch_max(total, Ordering::AcqRel);
        self.progress.notify_waiters();
    }

    fn is_full(&self) -> bool {
        let applied = self.applied.load(Ordering::Acquire);
        self.forwarded
            .load(Ordering::Acquire)
            .saturating_sub(applied)
            >= FORWARD_WINDOW
    }

    /// Resolves once there is room again, or after `patience` (the home is slow or gone;
    /// a dead home's clients are closed anyway).
    async fn room(self: Arc<Self>, patience: std::time::Duration) {
        let wait = async {
            loop {
                let progress = self.progress.notified();
                tokio::pin!(progress);
                progress.as_mut().enable();
                if !self.is_full() {
                    return;
                }
                progress.await;
            }
        };
        let _ = tokio::time::timeout(patience, wait).await;
    }
}

/// How long a gate waits for a home to apply a full window before it reads on anyway.
const FORWARD_PATIENCE: std::time::Duration = std::time::Duration::from_secs(10);

/// What a proxy has sent its gate, and what the gate has acknowledged, since the proxy
/// started (totals: a lost acknowledgement is made good by the next one).
#[derive(Default)]
pub struct InFlight {
    sent_frames: AtomicUsize,
    sent_bytes: AtomicUsize,
    acked_frames: AtomicUsize,
    acked_bytes: AtomicUsize,
    acked: Notify,
}

impl InFlight {
    /// The gate has queued `frames` and `bytes` of ours in all.
    pub fn acknowledge(&self, frames: usize, bytes: usize) {
        self.acked_frames.fetch_max(frames, Ordering::AcqRel);
        self.acked_bytes.fetch_max(bytes, Ordering::AcqRel);
        self.acked.notify_waiters();
    }

    fn sent(&self, frames: usize, bytes: usize) {
        self.sent_frames.fetch_add(frames, Ordering::AcqRel);
        self.sent_bytes.fetch_add(bytes, Ordering::AcqRel);
    }

    /// Frames and bytes in flight.
    fn now(&self) -> (usize, usize) {
        let frames = self.sent_frames.load(Ordering::Acquire);
        let bytes = self.sent_bytes.load(Ordering::Acquire);
        (
            frames.saturating_sub(self.acked_frames.load(Ordering::Acquire)),
            bytes.saturating_sub(self.acked_bytes.load(Ordering::Acquire)),
        )
    }
}

/// How long a proxy waits for its gate to acknowledge a full window before it gives the
/// client up (the gate is gone, or lost our messages): dropped, the client reconnects.
const ACK_PATIENCE: std::time::Duration = std::time::Duration::from_secs(30);

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
        frame: Frame,
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
            self.drop_proxy(gate, conn);
        }
    }

    /// Applies one of a proxy's frames: what Redis must provide first, then the hub.
    async fn apply_one(
        &self,
        state: &Mutex<ConnState>,
        frame: &tokio_tungstenite::tungstenite::Utf8Bytes,
    ) -> Flow {
        if !self.holds_lease() {
            let env = Envelope::parse(frame.as_str()).ok();
            let sid = env.as_ref().and_then(|e| e.sid());
            lock(state).send_error(sid, &super::store_unavailable(), None);
            return Flow::default();
        }
        let (address, holds_code) = {
            let state = lock(state);
            (state.address, state.reserved_code.is_some())
        };
        let recovering = match Envelope::parse(frame.as_str()) {
            Ok(env) => {
                let prepared = match self.code_for(&env, holds_code).await {
                    Ok(code) => {
                        {
                            let mut state = lock(state);
                            state.reserved_code = state.reserved_code.or(code);
                        }
                        self.prepare(&env, address).await
                    }
                    Err(e) => Err(e),
                };
                match prepared {
                    Ok(recovering) => recovering,
                    Err(e) => {
                        lock(state).send_error(env.sid(), &e, None);
                        return Flow::default();
                    }
                }
            }
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

    /// Applies one of a proxy's `DATA` frames (nothing to ask Redis first).
    fn apply_data(&self, state: &Mutex<ConnState>, frame: &Bytes) -> Flow {
        let mut state = lock(state);
        if !self.holds_lease() {
            let sid = data_sid(frame).map(|sid| SessionId(sid).to_string());
            state.send_error(sid.as_deref(), &super::store_unavailable(), None);
            return Flow::default();
        }
        self.hub.handle_data(&mut state, frame)
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
        let (cluster, home) = (self.clone(), self.me);
        tokio::spawn(async move {
            let mut batch = VecDeque::new();
            loop {
                // Room in the window first.
                let waited = tokio::time::timeout(ACK_PATIENCE, async {
                    loop {
                        let acked = task_flight.acked.notified();
                        tokio::pin!(acked);
                        acked.as_mut().enable();
                        let (frames, bytes) = task_flight.now();
                        if frames < window.0 && bytes < window.1 {
                            return;
                        }
                        acked.await;
                    }
                });
                let room = tokio::select! {
                    () = task_stop.cancelled() => return,
                    waited = waited => waited.is_ok(),
                };
                let taken = if room {
                    let room = window.0.saturating_sub(task_flight.now().0);
                    tokio::select! {
                        () = task_stop.cancelled() => return,
                        taken = outbound.next_batch_up_to(&mut batch, room) => taken.is_ok(),
                    }
                } else {
                    false
                };
                if !taken {
                    // Overflowed (the client does not read), or the gate stopped answering:
                    // the client is dropped, and its seats here freed.
                    cluster.drop_proxy(gate, conn);
                    return;
                }
                let mut bytes = 0usize;
                let frames = batch.len();
                for frame in batch.drain(..) {
                    bytes = bytes.saturating_add(frame.len());
                    let msg = NodeMsg::Out { home, conn, frame }.encode();
                    if !cluster
                        .write_waiting(Write::Inbox { node: gate, msg })
                        .await
                    {
                        return;
                    }
                }
                task_flight.sent(frames, bytes);
                // The queue's own bound now counts only what is not in flight; the window
                // bounds the rest.
                outbound.written(bytes);
                let _ = cluster.hub.hand_over(&lock(&task_state));
            }
        });
        // The applying task: in order; a congested peer here holds the client's next frames
        // (and the gate's window) until it drains.
        let (inbound, mut frames) = mpsc::channel::<Frame>(FORWARD_WINDOW.saturating_mul(2));
        let (cluster, apply_state, apply_stop) = (self.clone(), state.clone(), stop.clone());
        tokio::spawn(async move {
            let mut batch = Vec::with_capacity(FORWARD_WINDOW);
            let mut applied = 0usize;
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
                    let flow = match &frame {
                        Frame::Text(text) => cluster.apply_one(&apply_state, text).await,
                        Frame::Binary(data) => cluster.apply_data(&apply_state, data),
                    };
                    if let Some(peer) = flow.wait_for {
                        peer.drained(PEER_DRAIN_PATIENCE).await;
                    }
                }
                applied = applied.saturating_add(n);
                let msg = NodeMsg::Applied {
                    conn,
                    frames: applied,
                }
                .encode();
                if !cluster
                    .write_waiting(Write::Inbox { node: gate, msg })
                    .await
                {
                    return;
                }
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

    /// Gives a proxy's client up: its seats here are freed, and its gate closes it.
    fn drop_proxy(&self, gate: NodeId, conn: ConnId) {
        let proxy = self.lock_proxies().remove(&(gate, conn));
        if let Some(proxy) = proxy {
            self.end_proxy(proxy);
        }
        let _ = self.send(gate, &NodeMsg::Drop { conn });
    }

    /// The gate's side: acknowledges what it has queued for its clients (as totals since
    /// each client's first frame from that home), each once the client's queue has room
    /// (within the single relay's patience).
    pub(super) fn send_acks(self: &Arc<Self>, acks: Acks) {
        for ((home, conn), (frames, bytes)) in acks.0 {
            let (frames, bytes) = {
                let mut homes = self.queued.entry(conn).or_default();
                let at = match homes.iter().position(|(h, _, _)| *h == home) {
                    Some(at) => at,
                    None => {
                        homes.push((home, 0, 0));
                        homes.len().saturating_sub(1)
                    }
                };
                match homes.get_mut(at) {
                    Some((_, f, b)) => {
                        *f = f.saturating_add(frames);
                        *b = b.saturating_add(bytes);
                        (*f, *b)
                    }
                    None => (frames, bytes),
                }
            };
            let ack = NodeMsg::Written {
                gate: self.me,
                conn,
                frames,
                bytes,
            };
            match self.hub.conns.get(conn) {
                Some(outbox) if outbox.is_congested() => {
                    let cluster = self.clone();
                    tokio::spawn(async move {
                        outbox.drained(PEER_DRAIN_PATIENCE).await;
                        let msg = ack.encode();
                        cluster
                            .write_waiting(Write::Inbox { node: home, msg })
                            .await;
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
    pub(super) fn applied(&self, conn: ConnId, total: usize) {
        if let Some(window) = self.windows.get(&conn) {
            window.applied(total);
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
