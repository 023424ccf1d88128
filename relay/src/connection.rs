//! One client connection: the WebSocket handshake, then a loop that feeds received frames to
//! the hub and writes the connection's outbox to the socket.
//!
//! One task per connection does both. Outbound frames are drained before the next batch of
//! inbound frames is read (`biased`), so a client that stops reading stops being read: its own
//! replies cannot pile up, and frames its peer sends it fill its bounded outbox until it is
//! dropped.
//!
//! Costs are per batch, not per frame, wherever the load allows: every frame already received
//! is handled before anything is written (a client that sends 32 frames in one write gets its
//! 32 replies in one write too), and everything queued is written with one flush.

use std::collections::VecDeque;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::task::Poll;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use parley_protocol::data::is_data;
use parley_protocol::{ErrorCode, FrameError, FrameType, encode, payload::ErrorData};
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, MissedTickBehavior, timeout};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::error::CapacityError;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Bytes, Error as WsError, Message, Utf8Bytes};
use tokio_util::sync::CancellationToken;

use crate::cluster::Cluster;
use crate::config::{RelayConfig, later};
use crate::http;
use crate::hub::{ConnState, ConnectionSlot, Flow, Hub};
use crate::metrics::Metrics;
use crate::outbox::{ConnId, Frame, Outbox, OutboxReceiver, PEER_DRAIN_PATIENCE};
use crate::read_ahead::ReadAhead;
use crate::tls::Transport;

type Ws = WebSocketStream<ReadAhead<Transport>>;

/// tungstenite's own read buffer, kept for the connection's life. Small, because it is paid by
/// every idle connection; `ReadAhead` makes the socket reads large anyway.
const READ_BUFFER_BYTES: usize = 256;
/// Frames are gathered up to this many bytes before a socket write (a flush writes the rest).
/// The buffer grows only as far as it is used.
const WRITE_BUFFER_BYTES: usize = 64 * 1024;
/// Most frames handled from one wake-up before the outbox is written (fairness between
/// connections on a worker thread, and a bound on the replies queued meanwhile).
const READ_BATCH: usize = 64;

/// Why a connection ended (for the log; never contains client data).
#[derive(Debug)]
enum Ending {
    ClientClosed,
    Shutdown,
    SlowConsumer,
    Idle,
    FrameTooLarge,
    WriteTimeout,
    Transport,
}

pub async fn serve(
    hub: Arc<Hub>,
    cluster: Option<Arc<Cluster>>,
    mut slot: ConnectionSlot,
    id: ConnId,
    stream: TcpStream,
    peer: SocketAddr,
    shutdown: CancellationToken,
) {
    let config = hub.config();
    let _ = stream.set_nodelay(true);
    // Boxed: the opening's state is large and needed only once; inline, it would size the
    // connection's task for its whole life.
    let Some((mut ws, client)) = Box::pin(open(&hub, &mut slot, stream, peer)).await else {
        return;
    };
    let (outbox, outbound) = Outbox::new(
        id,
        config.outbound_queue_frames,
        config.outbound_queue_bytes,
    );
    let mut attached = Attached {
        hub: &hub,
        cluster: cluster.as_deref(),
        state: hub.attach(outbox, client),
    };
    tracing::debug!(conn = id, "connected");
    let ending = run(
        &hub,
        cluster.as_deref(),
        &mut attached.state,
        &mut ws,
        outbound,
        &shutdown,
    )
    .await;
    drop(attached);
    if matches!(ending, Ending::SlowConsumer | Ending::WriteTimeout) {
        hub.metrics().slow_consumer();
    }
    if matches!(ending, Ending::FrameTooLarge) {
        // Off the hub already: the peer hears PEER_OFFLINE while we linger.
        Box::pin(linger(&mut ws, LINGER_TIME)).await;
    }
    drop(slot);
    tracing::debug!(conn = id, ?ending, "disconnected");
}

fn ws_config(config: &RelayConfig) -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(config.max_frame_bytes))
        .max_frame_size(Some(config.max_frame_bytes))
        .read_buffer_size(READ_BUFFER_BYTES)
        .write_buffer_size(WRITE_BUFFER_BYTES)
}

/// Everything before the WebSocket: TLS if configured, then the HTTP request, answered here
/// unless it is an upgrade (see `http`). The connection and the address it counts for, or
/// `None` once it has been answered or has failed. The handshake time limit covers all of it.
async fn open(
    hub: &Hub,
    slot: &mut ConnectionSlot,
    stream: TcpStream,
    peer: SocketAddr,
) -> Option<(Ws, IpAddr)> {
    let config = hub.config();
    // How far the opening got, for the metrics if the time limit cuts it short.
    let stage = AtomicU8::new(Stage::Tls as u8);
    let opening = async {
        let transport = match &config.tls {
            Some(tls) => match tls.acceptor().accept(stream).await {
                Ok(tls) => Transport::Tls(Box::new(tls)),
                Err(e) => {
                    stage.store(Stage::Counted as u8, Ordering::Relaxed);
                    hub.metrics().failed_tls_handshake();
                    tracing::debug!(error = %e, "TLS handshake failed");
                    return None;
                }
            },
            None => Transport::Plain(stream),
        };
        stage.store(Stage::Request as u8, Ordering::Relaxed);
        let mut stream = ReadAhead::new(transport);
        let (head, end) = match http::read_head(&mut stream).await {
            Ok(read) => read,
            Err(e) => {
                stage.store(Stage::Counted as u8, Ordering::Relaxed);
                hub.metrics().failed_upgrade();
                tracing::debug!(error = %e, "reading the HTTP request failed");
                return None;
            }
        };
        stage.store(Stage::Counted as u8, Ordering::Relaxed);
        let Some(end) = end else {
            hub.metrics().failed_upgrade();
            if head.len() > http::MAX_HEAD_BYTES {
                answer(&mut stream, http::Status::HeadersTooLarge, false).await;
            }
            return None;
        };
        let (request_head, rest) = head.split_at(end.min(head.len()));
        let proxies = http::Proxies {
            trusted: &config.trusted_proxies,
            header: config.forwarded_header,
        };
        match http::parse(request_head, peer.ip(), proxies, false) {
            http::Request::Upgrade {
                accept_key,
                forwarded_for,
            } => {
                if hub.is_draining() {
                    hub.metrics().failed_upgrade();
                    answer(&mut stream, http::Status::ServiceUnavailable, false).await;
                    return None;
                }
                let client = forwarded_for.unwrap_or(peer.ip()).to_canonical();
                if !slot.assign(client) {
                    hub.metrics().refused_connection();
                    answer(&mut stream, http::Status::ServiceUnavailable, false).await;
                    return None;
                }
                let written = async {
                    stream
                        .write_all(&http::upgrade_response(&accept_key))
                        .await?;
                    stream.flush().await
                };
                if written.await.is_err() {
                    hub.metrics().failed_upgrade();
                    return None;
                }
                stream.unread(rest);
                let ws =
                    WebSocketStream::from_raw_socket(stream, Role::Server, Some(ws_config(config)))
                        .await;
                Some((ws, client))
            }
            http::Request::Health { head_only } => {
                hub.metrics().plain_http_request();
                let status = if hub.is_draining() {
                    http::Status::ServiceUnavailable
                } else {
                    http::Status::Ok
                };
                answer(&mut stream, status, head_only).await;
                None
            }
            http::Request::Metrics => None,
            http::Request::Refuse(status) => {
                hub.metrics().plain_http_request();
                answer(&mut stream, status, false).await;
                None
            }
        }
    };
    let opened = timeout(config.handshake_timeout, opening).await;
    match opened {
        Ok(Some(opened)) => {
            slot.upgraded();
            Some(opened)
        }
        Ok(None) => None,
        Err(_) => {
            match stage.load(Ordering::Relaxed) {
                s if s == Stage::Tls as u8 => hub.metrics().failed_tls_handshake(),
                s if s == Stage::Request as u8 => hub.metrics().failed_upgrade(),
                _ => {} // counted already, when it was answered
            }
            tracing::debug!("connection timed out before its WebSocket upgrade");
            None
        }
    }
}

/// How far a connection's opening got.
#[repr(u8)]
enum Stage {
    Tls,
    Request,
    Counted,
}

/// A short plain answer, then the connection is closed.
async fn answer<S: AsyncWrite + Unpin>(stream: &mut S, status: http::Status, head_only: bool) {
    let response = http::response(status, "text/plain; charset=utf-8", None, head_only);
    let _ = stream.write_all(&response).await;
    let _ = stream.shutdown().await;
}

/// Frees the connection's seats when it ends, however it ends (a panic included), so that no
/// seat keeps a dead connection and every peer hears `PEER_OFFLINE`.
struct Attached<'a> {
    hub: &'a Hub,
    cluster: Option<&'a Cluster>,
    state: ConnState,
}

impl Drop for Attached<'_> {
    fn drop(&mut self) {
        self.hub.disconnect(&self.state);
        if let Some(cluster) = self.cluster {
            cluster.connection_closed(self.state.outbox().id());
        }
    }
}

/// The connection's loop. Everything it awaits only now and then (writes, the backpressure
/// wait, closing) is boxed: the task's own allocation, held by every idle connection, is then
/// only as large as the idle state, not as the largest state it ever passes through.
async fn run(
    hub: &Hub,
    cluster: Option<&Cluster>,
    state: &mut ConnState,
    ws: &mut Ws,
    mut outbound: OutboxReceiver,
    shutdown: &CancellationToken,
) -> Ending {
    let config = hub.config();
    let outbox = state.outbox().clone();
    let mut ping = tokio::time::interval_at(
        later(Instant::now(), config.ping_interval),
        config.ping_interval,
    );
    ping.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut last_heard = Instant::now();
    // The frames being written; swapped with the outbox's queue, so both keep their capacity.
    let mut batch = VecDeque::new();
    // Set while reading is paused for a congested peer (see `outbox`): resolves once it has
    // drained, or has been waited for long enough.
    let mut peer_drain: Option<Pin<Box<dyn Future<Output = ()> + Send>>> = None;
    // Mailboxed frames wait to be handed to us as our queue drains (see `Hub::hand_over`).
    let mut hand_over_pending = false;

    loop {
        tokio::select! {
            biased;
            () = shutdown.cancelled() => {
                Box::pin(close(ws, CloseCode::Away, "relay shutting down", config.shutdown_grace)).await;
                return Ending::Shutdown;
            }
            taken = outbound.next_batch(&mut batch) => {
                if taken.is_err() {
                    return Ending::SlowConsumer;
                }
                if let Err(ending) = Box::pin(write_out(ws, &mut batch, &outbound, &outbox, hub.metrics(), config.write_timeout)).await {
                    return ending;
                }
                if hand_over_pending {
                    hand_over_pending = hub.hand_over(state).hand_over_pending;
                }
            }
            () = drained(&mut peer_drain), if peer_drain.is_some() => peer_drain = None,
            incoming = ws.next(), if peer_drain.is_none() => {
                last_heard = Instant::now();
                let mut flow = match Box::pin(receive(hub, cluster, state, ws, incoming)).await {
                    Received::Flow(flow) => flow,
                    Received::End(ending) => return ending,
                };
                // Whatever else has already arrived, while the replies still fit easily.
                for _ in 1..READ_BATCH {
                    if !outbox.has_room_for(0) || flow.wait_for.is_some() {
                        break;
                    }
                    let Poll::Ready(incoming) =
                        std::future::poll_fn(|cx| Poll::Ready(ws.poll_next_unpin(cx))).await
                    else {
                        break;
                    };
                    match Box::pin(receive(hub, cluster, state, ws, incoming)).await {
                        Received::Flow(next) => flow = flow.and(next),
                        Received::End(ending) => return ending,
                    }
                }
                hand_over_pending |= flow.hand_over_pending;
                // Backpressure: read nothing more until the peer has caught up (this arm
                // is off meanwhile); our own queue is still written.
                if let Some(peer) = flow.wait_for {
                    peer_drain = Some(Box::pin(async move { peer.drained(PEER_DRAIN_PATIENCE).await }));
                } else if let Some(wait) = flow.wait_until {
                    peer_drain = Some(wait);
                }
            }
            _ = ping.tick() => {
                if last_heard.elapsed() >= config.idle_timeout {
                    Box::pin(close(ws, CloseCode::Away, "no traffic; connection considered dead", config.write_timeout)).await;
                    return Ending::Idle;
                }
                let _ = outbox.push(encode::<()>(FrameType::Ping, None, None));
            }
        }
    }
}

/// Waits for the peer's drain, if one is awaited (its `select!` arm is off otherwise).
async fn drained(wait: &mut Option<Pin<Box<dyn Future<Output = ()> + Send>>>) {
    if let Some(wait) = wait {
        wait.await;
    }
}

/// What one received item led to.
enum Received {
    Flow(Flow),
    End(Ending),
}

/// Applies one received item.
async fn receive(
    hub: &Hub,
    cluster: Option<&Cluster>,
    state: &mut ConnState,
    ws: &mut Ws,
    incoming: Option<Result<Message, WsError>>,
) -> Received {
    let config = hub.config();
    match incoming {
        Some(Ok(Message::Text(text))) => {
            return Received::Flow(apply(hub, cluster, state, &text).await);
        }
        Some(Ok(Message::Binary(bytes))) if is_data(&bytes) => {
            return Received::Flow(apply_data(hub, cluster, state, bytes).await);
        }
        Some(Ok(Message::Binary(bytes))) => match Utf8Bytes::try_from(bytes.clone()) {
            Ok(text) => return Received::Flow(apply(hub, cluster, state, &text).await),
            Err(_) => {
                hub.metrics().frame_received(None, bytes.len());
                let e = FrameError::new(
                    ErrorCode::MalformedJson,
                    "a binary message is a DATA frame (first byte 0x01) or JSON text in UTF-8; this one is neither",
                );
                state.send_error(None, &e, None);
            }
        },
        Some(Ok(Message::Close(_))) => {
            // tungstenite has queued the Close reply; send it, so the client's closing
            // handshake ends cleanly instead of waiting for the socket to drop.
            let _ = timeout(config.write_timeout, ws.flush()).await;
            return Received::End(Ending::ClientClosed);
        }
        None => return Received::End(Ending::ClientClosed),
        // Pings are answered by tungstenite itself; any traffic counts as life.
        Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
        Some(Err(WsError::Capacity(CapacityError::MessageTooLong { .. }))) => {
            hub.metrics().error_sent(ErrorCode::FrameTooLarge);
            reject_oversize(ws, config.max_frame_bytes, config.write_timeout).await;
            return Received::End(Ending::FrameTooLarge);
        }
        Some(Err(_)) => return Received::End(Ending::Transport),
    }
    Received::Flow(Flow::default())
}

/// Applies a client's frame: by the hub, or, in a cluster, wherever its session lives.
async fn apply(
    hub: &Hub,
    cluster: Option<&Cluster>,
    state: &mut ConnState,
    frame: &Utf8Bytes,
) -> Flow {
    match cluster {
        Some(cluster) => cluster.dispatch(state, frame).await,
        None => hub.handle(state, frame),
    }
}

/// Applies a client's `DATA` frame: by the hub, or, in a cluster, wherever its session lives.
async fn apply_data(
    hub: &Hub,
    cluster: Option<&Cluster>,
    state: &mut ConnState,
    frame: Bytes,
) -> Flow {
    match cluster {
        Some(cluster) => cluster.dispatch_data(state, frame).await,
        None => hub.handle_data(state, &frame),
    }
}

/// Writes `batch` out, within the write timeout, unless the connection is killed meanwhile.
async fn write_out(
    ws: &mut Ws,
    batch: &mut VecDeque<Frame>,
    outbound: &OutboxReceiver,
    outbox: &Outbox,
    metrics: &Metrics,
    limit: Duration,
) -> Result<(), Ending> {
    let written = async {
        tokio::select! {
            result = write_batch(ws, batch, outbound, metrics) => result,
            () = outbox.killed() => Err(Ending::SlowConsumer),
        }
    };
    match timeout(limit, written).await {
        Ok(result) => result,
        Err(_) => Err(Ending::WriteTimeout),
    }
}

/// Writes every frame of `batch`, then flushes once: one system call for a burst of frames
/// instead of one each.
async fn write_batch(
    ws: &mut Ws,
    batch: &mut VecDeque<Frame>,
    outbound: &OutboxReceiver,
    metrics: &Metrics,
) -> Result<(), Ending> {
    let (mut frames, mut bytes) = (0, 0);
    let mut fed = Ok(());
    while let Some(frame) = batch.pop_front() {
        frames += 1;
        bytes += frame.len();
        fed = ws.feed(frame.into_message()).await;
        if fed.is_err() {
            break;
        }
    }
    // In tungstenite's write buffer now, or lost with the connection: off the bound.
    outbound.written(bytes);
    metrics.written(frames, bytes);
    fed.map_err(|_| Ending::Transport)?;
    ws.flush().await.map_err(|_| Ending::Transport)
}

/// The oversized message cannot be skipped (its rest is still on the socket), so say why and
/// close with 1009 "message too big".
async fn reject_oversize(ws: &mut Ws, max: usize, limit: Duration) {
    let data = ErrorData {
        code: ErrorCode::FrameTooLarge.as_str().into(),
        message: format!(
            "frame exceeds the relay's limit of {max} bytes; the connection is closed"
        )
        .into(),
        msg_id: None,
    };
    let frame = encode(FrameType::Error, None, Some(&data));
    let _ = timeout(limit, ws.send(Message::Text(frame.into()))).await;
    close(ws, CloseCode::Size, "frame too large", limit).await;
}

/// Most bytes of an oversize message read and thrown away before the socket is dropped, and
/// for how long at most.
const LINGER_BYTES: usize = 4 * 1024 * 1024;
const LINGER_TIME: Duration = Duration::from_secs(2);

/// Ends our side of the stream and reads (and drops) what the client still sends, for a
/// while: closing a socket with unread data makes the kernel answer with a reset, and a reset
/// can destroy the `ERROR` and Close frames we just sent before the client has read them.
async fn linger(ws: &mut Ws, limit: Duration) {
    let stream = ws.get_mut();
    let _ = timeout(limit, async {
        let _ = stream.shutdown().await;
        let mut buf = vec![0u8; 16 * 1024];
        let mut left = LINGER_BYTES;
        while left > 0 {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    })
    .await;
}

async fn close(ws: &mut Ws, code: CloseCode, reason: &'static str, limit: Duration) {
    let frame = CloseFrame {
        code,
        reason: reason.into(),
    };
    let _ = timeout(limit, ws.close(Some(frame))).await;
}
