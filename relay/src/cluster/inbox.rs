//! This node's inbox: read in order (a blocking stream read on its own connection), each
//! entry opened, and each message acted on.

use std::sync::Arc;
use std::time::Duration;

use redis::aio::ConnectionManager;
use tokio_util::sync::CancellationToken;

use super::wire::{self, NodeMsg};
use super::{Cluster, proxy};

/// How long one inbox read waits for entries before asking again.
pub(super) const INBOX_BLOCK: Duration = Duration::from_secs(1);

impl Cluster {
    /// Reads this node's inbox and acts on each entry, in order.
    pub(super) async fn run_inbox(
        self: Arc<Self>,
        mut reader: ConnectionManager,
        stop: CancellationToken,
    ) {
        let inbox = self.keys.inbox(self.me);
        let mut last = String::from("0");
        let mut delay = Duration::from_millis(10);
        loop {
            let mut xread = redis::cmd("XREAD");
            xread
                .arg("COUNT")
                .arg(512)
                .arg("BLOCK")
                .arg(INBOX_BLOCK.as_millis() as u64)
                .arg("STREAMS")
                .arg(&inbox)
                .arg(&last);
            let read = tokio::select! {
                () = stop.cancelled() => return,
                read = xread.query_async::<Option<redis::streams::StreamReadReply>>(&mut reader) => read,
            };
            let reply = match read {
                Ok(reply) => {
                    delay = Duration::from_millis(10);
                    reply
                }
                Err(e) => {
                    self.hub.metrics().store_request(Duration::ZERO, true);
                    tracing::warn!(error = %e, "cannot read this node's inbox; retrying");
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = tokio::time::sleep(delay) => {}
                    }
                    delay = (delay * 2).min(Duration::from_secs(1));
                    continue;
                }
            };
            let Some(reply) = reply else { continue };
            let mut acks = proxy::Acks::default();
            for entry in reply.keys.into_iter().flat_map(|k| k.ids) {
                let sealed = entry
                    .map
                    .get("m")
                    .and_then(|v| redis::from_redis_value_ref::<Vec<u8>>(v).ok())
                    .unwrap_or_default();
                // The entry that made the inbox is empty: no message.
                if !sealed.is_empty() {
                    match self.seal.open(self.me, &sealed) {
                        Some(entry) => {
                            for msg in wire::unpack(&entry) {
                                match msg.and_then(NodeMsg::parse) {
                                    Some(msg) => self.receive(msg, &mut acks).await,
                                    None => tracing::warn!("skipped a damaged inbox message"),
                                }
                            }
                        }
                        None => tracing::warn!(
                            "skipped an inbox entry not sealed for this node (another secret file?)"
                        ),
                    }
                }
                last = entry.id;
            }
            self.send_acks(acks);
            // What has been read is done with: trim it (the last entry stays as the mark).
            let trimmed = self
                .store(async |redis| {
                    redis::cmd("XTRIM")
                        .arg(&inbox)
                        .arg("MINID")
                        .arg(&last)
                        .query_async::<()>(redis)
                        .await
                })
                .await;
            if let Err(e) = trimmed {
                tracing::debug!(error = %e, "inbox not trimmed; next time");
            }
        }
    }

    pub(super) async fn receive(self: &Arc<Self>, msg: NodeMsg, acks: &mut proxy::Acks) {
        match msg {
            NodeMsg::Frame {
                gate,
                conn,
                ip,
                frame,
            } => self.apply_for_proxy(gate, conn, ip, frame),
            NodeMsg::Closed { gate, conn } => {
                let proxy = self.lock_proxies().remove(&(gate, conn));
                if let Some(proxy) = proxy {
                    self.end_proxy(proxy);
                }
            }
            NodeMsg::Out { home, conn, frame } => {
                let len = frame.len();
                // Gone meanwhile: its sessions' homes hear `Closed` from us.
                if self.hub.conns.push(conn, frame).is_ok() {
                    acks.add(home, conn, len);
                }
            }
            NodeMsg::Written {
                gate,
                conn,
                frames,
                bytes,
            } => {
                if let Some(proxy) = self.lock_proxies().get(&(gate, conn)) {
                    proxy.in_flight.acknowledge(frames, bytes);
                }
            }
            NodeMsg::Applied { conn, frames } => self.applied(conn, frames),
            NodeMsg::Drop { conn } => {
                if let Some(outbox) = self.hub.conns.get(conn) {
                    outbox.kill();
                }
            }
        }
    }
}
