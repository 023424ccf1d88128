//! One client connection: the WebSocket handshake, then a loop that feeds received frames to
//! the hub and writes the connection's outbox to the socket.
//!
//! One task per connection does both. Outbound frames are drained before the next inbound frame
//! is read (`biased`), so a client that stops reading stops being read: its own replies cannot
//! pile up, and frames its peer sends it fill its bounded outbox until it is dropped.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use parley_protocol::{ErrorCode, FrameType, encode, payload::ErrorData};
use tokio::net::TcpStream;
use tokio::time::{Instant, MissedTickBehavior, timeout};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::error::CapacityError;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message, Utf8Bytes};
use tokio_util::sync::CancellationToken;

use crate::config::later;
use crate::hub::{ConnState, ConnectionSlot, Hub};
use crate::outbox::{ConnId, Outbox, OutboxReceiver};

/// Most frames written in one batch before the socket is flushed.
const WRITE_BATCH: usize = 64;

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
    slot: ConnectionSlot,
    id: ConnId,
    stream: TcpStream,
    peer: SocketAddr,
    shutdown: CancellationToken,
) {
    let config = hub.config();
    let ws_config = WebSocketConfig::default()
        .max_message_size(Some(config.max_frame_bytes))
        .max_frame_size(Some(config.max_frame_bytes))
        .read_buffer_size(8 * 1024)
        .write_buffer_size(8 * 1024);
    let _ = stream.set_nodelay(true);
    let ws = match timeout(
        config.handshake_timeout,
        tokio_tungstenite::accept_async_with_config(stream, Some(ws_config)),
    )
    .await
    {
        Ok(Ok(ws)) => ws,
        Ok(Err(e)) => return tracing::debug!(conn = id, error = %e, "websocket handshake failed"),
        Err(_) => return tracing::debug!(conn = id, "websocket handshake timed out"),
    };
    let (outbox, outbound) = Outbox::new(
        id,
        config.outbound_queue_frames,
        config.outbound_queue_bytes,
    );
    let mut attached = Attached {
        hub: &hub,
        state: ConnState::new(outbox, peer.ip(), config),
    };
    tracing::debug!(conn = id, "connected");
    let ending = run(&hub, &mut attached.state, ws, outbound, &shutdown).await;
    drop(attached);
    drop(slot);
    tracing::debug!(conn = id, ?ending, "disconnected");
}

/// Frees the connection's seats when it ends, however it ends (a panic included), so that no
/// seat keeps a dead connection and every peer hears `PEER_OFFLINE`.
struct Attached<'a> {
    hub: &'a Hub,
    state: ConnState,
}

impl Drop for Attached<'_> {
    fn drop(&mut self) {
        self.hub.disconnect(&self.state);
    }
}

async fn run(
    hub: &Hub,
    state: &mut ConnState,
    mut ws: WebSocketStream<TcpStream>,
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

    loop {
        tokio::select! {
            biased;
            () = shutdown.cancelled() => {
                close(&mut ws, CloseCode::Away, "relay shutting down", config.shutdown_grace).await;
                return Ending::Shutdown;
            }
            () = outbox.killed() => return Ending::SlowConsumer,
            Some(frame) = outbound.recv() => {
                let written = write_batch(&mut ws, frame, &mut outbound, &outbox);
                match timeout(config.write_timeout, written).await {
                    Ok(Ok(())) => {}
                    Ok(Err(ending)) => return ending,
                    Err(_) => return Ending::WriteTimeout,
                }
            }
            incoming = ws.next() => {
                last_heard = Instant::now();
                match incoming {
                    Some(Ok(Message::Text(text))) => hub.handle(state, &text),
                    Some(Ok(Message::Binary(bytes))) => match Utf8Bytes::try_from(bytes) {
                        Ok(text) => hub.handle(state, &text),
                        Err(_) => refuse_binary(&outbox),
                    },
                    Some(Ok(Message::Close(_))) | None => return Ending::ClientClosed,
                    // Pings are answered by tungstenite itself; any traffic counts as life.
                    Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                    Some(Err(WsError::Capacity(CapacityError::MessageTooLong { .. }))) => {
                        reject_oversize(&mut ws, config.max_frame_bytes, config.write_timeout).await;
                        return Ending::FrameTooLarge;
                    }
                    Some(Err(_)) => return Ending::Transport,
                }
            }
            _ = ping.tick() => {
                if last_heard.elapsed() >= config.idle_timeout {
                    close(&mut ws, CloseCode::Away, "no traffic; connection considered dead", config.write_timeout).await;
                    return Ending::Idle;
                }
                let _ = outbox.push(encode::<()>(FrameType::Ping, None, None));
            }
        }
    }
}

/// Writes `first` and whatever else is already queued, then flushes once: one syscall for a
/// burst of frames instead of one each. Gives up as soon as the connection is marked dead.
async fn write_batch(
    ws: &mut WebSocketStream<TcpStream>,
    first: Utf8Bytes,
    outbound: &mut OutboxReceiver,
    outbox: &Outbox,
) -> Result<(), Ending> {
    let write = async {
        ws.feed(Message::Text(first)).await?;
        for _ in 1..WRITE_BATCH {
            let Some(frame) = outbound.try_recv() else {
                break;
            };
            ws.feed(Message::Text(frame)).await?;
        }
        ws.flush().await
    };
    tokio::select! {
        result = write => result.map_err(|_| Ending::Transport),
        () = outbox.killed() => Err(Ending::SlowConsumer),
    }
}

fn refuse_binary(outbox: &Outbox) {
    let data = ErrorData {
        code: ErrorCode::MalformedJson.as_str().into(),
        message: "binary frame is not UTF-8 text; frames are JSON text".into(),
        msg_id: None,
    };
    let _ = outbox.push(encode(FrameType::Error, None, Some(&data)));
}

/// The oversized message cannot be skipped (its rest is still on the socket), so say why and
/// close with 1009 "message too big".
async fn reject_oversize(ws: &mut WebSocketStream<TcpStream>, max: usize, limit: Duration) {
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

async fn close(
    ws: &mut WebSocketStream<TcpStream>,
    code: CloseCode,
    reason: &'static str,
    limit: Duration,
) {
    let frame = CloseFrame {
        code,
        reason: reason.into(),
    };
    let _ = timeout(limit, ws.close(Some(frame))).await;
}
