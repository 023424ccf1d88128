//! Everything a node writes to Redis, in order, from one queue: messages for other nodes'
//! inboxes (packed and sealed per node), mailbox changes, shared rate-limit charges, and the
//! frames that wait for those writes (a kept frame's `DELIVERED`). One writer task sends each
//! batch as one transaction, exactly once (see `run_writes`).
//!
//! Mailboxes in Redis: every change the hub makes to a mailbox is mirrored to a list per seat
//! (`mbox:SID:ROLE`, entries `UNIX_MS|FRAME`). A node that takes a session in (re-created from
//! a member's token: its home died, or the relay restarted) reads the lists back, so what
//! waited for a member is still there.

use std::sync::Arc;
use std::time::Duration;

use redis::Pipeline;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Utf8Bytes;
use tokio_util::sync::CancellationToken;

use super::wire::{self, NodeId};
use super::{Cluster, Keys, WRITES_CAPACITY};
use crate::hub::Role;
use crate::ids::SessionId;
use crate::journal::{self, Journal, Recovered};
use crate::outbox::Outbox;

/// One queued write, or a frame that waits for the writes before it.
pub enum Write {
    Inbox {
        node: NodeId,
        msg: Vec<u8>,
    },
    Append {
        sid: SessionId,
        role: Role,
        entry: String,
        ttl: Duration,
    },
    Remove {
        sid: SessionId,
        role: Role,
        n: usize,
    },
    Forget {
        sid: SessionId,
    },
    /// One token from a shared rate-limit bucket (see `limits`).
    Charge {
        key: String,
        burst: u32,
        per: u64,
    },
    /// A seat's list replaced by these entries.
    Rewrite {
        sid: SessionId,
        role: Role,
        entries: Vec<String>,
        ttl: Duration,
    },
    /// Resolved once everything queued before it is written.
    Flushed(tokio::sync::oneshot::Sender<()>),
    ThenQueue {
        outbox: Outbox,
        frame: Utf8Bytes,
    },
}

/// An inbox holds at most about this many entries (a node that stops reading must not fill
/// Redis); a live node reads its inbox continuously.
const INBOX_MAX_ENTRIES: usize = 1_000_000;

/// One batch of writes as one pipeline: the inbox messages for each node packed into one
/// entry (in order), every other write as its own commands.
/// Most bytes one transaction carries: a batch of large frames is split (a transaction that
/// takes long to send and run times out, and is then asked after, see `run_writes`).
const BATCH_BYTES: usize = 4 << 20;

/// Splits what was taken from the queue into batches of at most [`BATCH_BYTES`] (a write
/// bigger than that goes alone), in order.
pub fn batches(taken: &mut Vec<Write>) -> Vec<Vec<Write>> {
    let mut out = Vec::new();
    let mut current = Vec::new();
    let mut bytes = 0usize;
    for write in taken.drain(..) {
        let size = write.size();
        if !current.is_empty() && bytes.saturating_add(size) > BATCH_BYTES {
            out.push(std::mem::take(&mut current));
            bytes = 0;
        }
        bytes = bytes.saturating_add(size);
        current.push(write);
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

/// One batch as one transaction: first the batch's number in `mark` (see `run_writes`), then
/// the inbox messages for each node packed into one entry (in order), and every other write
/// as its own commands.
pub fn pipeline(
    batch: &[Write],
    keys: &Keys,
    seal: &wire::InboxSeal,
    (mark, number): (&str, u64),
) -> Pipeline {
    let mut pipe = redis::pipe();
    pipe.atomic();
    pipe.cmd("SET")
        .arg(mark)
        .arg(number)
        .arg("PX")
        .arg(MARK_TTL_MS)
        .ignore();
    let mut inboxes: Vec<(NodeId, Vec<u8>)> = Vec::new();
    for write in batch {
        match write {
            Write::Inbox { node, msg } => {
                let at = match inboxes.iter().position(|(n, _)| n == node) {
                    Some(at) => at,
                    None => {
                        inboxes.push((*node, Vec::new()));
                        inboxes.len().saturating_sub(1)
                    }
                };
                if let Some((_, entry)) = inboxes.get_mut(at) {
                    wire::pack(entry, msg);
                }
            }
            other => other.add_to(&mut pipe, keys),
        }
    }
    for (node, entry) in inboxes {
        pipe.cmd("XADD")
            .arg(keys.inbox(node))
            .arg("NOMKSTREAM")
            .arg("MAXLEN")
            .arg("~")
            .arg(INBOX_MAX_ENTRIES)
            .arg("*")
            .arg("m")
            .arg(seal.seal(node, &entry))
            .ignore();
    }
    pipe
}

/// How long a node's batch mark lives (it is renewed by every batch).
const MARK_TTL_MS: u64 = 600_000;

impl Write {
    /// About how many bytes it sends.
    fn size(&self) -> usize {
        match self {
            Write::Inbox { msg, .. } => msg.len(),
            Write::Append { entry, .. } => entry.len(),
            Write::Rewrite { entries, .. } => entries.iter().map(String::len).sum(),
            _ => 64,
        }
    }

    fn add_to(&self, pipe: &mut Pipeline, keys: &Keys) {
        match self {
            Write::Inbox { .. } => {} // packed by `pipeline`
            Write::Append {
                sid,
                role,
                entry,
                ttl,
            } => {
                let key = keys.mailbox(*sid, *role);
                pipe.rpush(&key, entry).ignore();
                pipe.pexpire(&key, millis(*ttl)).ignore();
            }
            Write::Remove { sid, role, n } => {
                let first_kept = isize::try_from(*n).unwrap_or(isize::MAX);
                pipe.ltrim(keys.mailbox(*sid, *role), first_kept, -1)
                    .ignore();
            }
            Write::Forget { sid } => {
                pipe.del(&[
                    keys.mailbox(*sid, Role::Host),
                    keys.mailbox(*sid, Role::Guest),
                ])
                .ignore();
            }
            Write::Charge { key, burst, per } => {
                pipe.cmd("EVAL")
                    .arg(super::limits::BUCKET_SCRIPT)
                    .arg(1)
                    .arg(key)
                    .arg(burst)
                    .arg(per)
                    .arg(1)
                    .ignore();
            }
            Write::Rewrite {
                sid,
                role,
                entries,
                ttl,
            } => {
                let key = keys.mailbox(*sid, *role);
                pipe.del(&key).ignore();
                if !entries.is_empty() {
                    pipe.rpush(&key, entries).ignore();
                    pipe.pexpire(&key, millis(*ttl)).ignore();
                }
            }
            Write::ThenQueue { .. } | Write::Flushed(_) => {}
        }
    }
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

impl Journal for Cluster {
    fn has_room(&self) -> bool {
        // Room kept for what must never be refused (removals, the promises waiting on writes).
        self.writes.capacity() > WRITES_CAPACITY / 16
    }

    fn appended(&self, sid: SessionId, role: Role, frame: &Utf8Bytes) {
        let entry = journal::entry(journal::unix_ms(), frame);
        let ttl = self.hub.config().mailbox.max_age;
        self.must_write(Write::Append {
            sid,
            role,
            entry,
            ttl,
        });
    }

    fn removed(&self, sid: SessionId, role: Role, n: usize) {
        self.must_write(Write::Remove { sid, role, n });
    }

    fn forgotten(&self, sid: SessionId) {
        self.must_write(Write::Forget { sid });
    }

    fn rewritten(&self, sid: SessionId, role: Role, frames: &[(Instant, Utf8Bytes)]) {
        let (now, now_ms) = (Instant::now(), journal::unix_ms());
        let entries = frames
            .iter()
            .map(|(at, frame)| {
                let age = u64::try_from(now.saturating_duration_since(*at).as_millis())
                    .unwrap_or(u64::MAX);
                journal::entry(now_ms.saturating_sub(age), frame)
            })
            .collect();
        let ttl = self.hub.config().mailbox.max_age;
        self.must_write(Write::Rewrite {
            sid,
            role,
            entries,
            ttl,
        });
    }

    fn when_durable(&self, outbox: Outbox, frame: Utf8Bytes) {
        if !self.write(Write::ThenQueue { outbox, frame }) {
            // Only when Redis has been away long enough to fill the queue: the sender hears
            // nothing for this frame and sends it again (it keeps it until acknowledged).
            tracing::warn!("a DELIVERED could not wait for its write; dropped");
        }
    }
}

impl Cluster {
    /// Queues a mailbox change; if the queue is full, Redis has been unreachable for a long
    /// time and the lists will disagree with memory: said loudly, and counted.
    fn must_write(&self, write: Write) {
        if !self.write(write) {
            self.hub.metrics().store_request(Duration::ZERO, true);
            tracing::error!(
                "a mailbox change could not be queued for Redis; the stored mailbox is now stale"
            );
        }
    }

    /// The mailboxes Redis holds for a session (empty if none), once every mailbox change
    /// this node queued before has been written (a sweep's forgetting, a hand-over).
    pub(super) async fn load_mailboxes(&self, sid: SessionId) -> redis::RedisResult<Recovered> {
        let (flushed, written) = tokio::sync::oneshot::channel();
        let unavailable = || redis::RedisError::from((redis::ErrorKind::Io, "writes pending"));
        if !self.write(Write::Flushed(flushed)) {
            return Err(unavailable());
        }
        match tokio::time::timeout(super::STORE_TIMEOUT.saturating_mul(2), written).await {
            Ok(Ok(())) => {}
            _ => return Err(unavailable()),
        }
        let (host, guest): (Vec<String>, Vec<String>) = self
            .store(async |redis| {
                redis::pipe()
                    .lrange(self.keys.mailbox(sid, Role::Host), 0, -1)
                    .lrange(self.keys.mailbox(sid, Role::Guest), 0, -1)
                    .query_async(redis)
                    .await
            })
            .await?;
        let (now, now_ms) = (Instant::now(), journal::unix_ms());
        let read = |entries: Vec<String>| {
            entries
                .iter()
                .filter_map(|e| journal::parse_entry(e, now, now_ms))
                .collect()
        };
        Ok(Recovered {
            host: read(host),
            guest: read(guest),
        })
    }
}

impl Cluster {
    /// Writes what was queued to Redis, in order, batched: messages to other nodes' inboxes
    /// and mailbox changes. Retried until Redis takes them (what the relay accepted is not
    /// given up while the node lives); then the frames that waited for them are queued.
    ///
    /// Each batch is one transaction that also sets `wseq:NODE` to the batch's number: after
    /// an error (a timeout may come after Redis ran it), the node asks whether the batch ran
    /// before running it again, so nothing is written twice.
    pub(super) async fn run_writes(
        self: Arc<Self>,
        mut queued: mpsc::Receiver<(u64, Write)>,
        stop: CancellationToken,
    ) {
        let mut tagged = Vec::new();
        let mut taken = Vec::new();
        let mut number = 0u64;
        let mark = format!("{}wseq:{}", self.keys.prefix, self.me);
        loop {
            let n = tokio::select! {
                () = stop.cancelled() => return,
                n = queued.recv_many(&mut tagged, 512) => n,
            };
            if n == 0 {
                return;
            }
            // What was queued before the node started afresh is void: it described sessions
            // that other nodes may hold now.
            let current = self.generation();
            taken.extend(
                tagged
                    .drain(..)
                    .filter(|(generation, _)| *generation == current)
                    .map(|(_, write)| write),
            );
            for batch in batches(&mut taken) {
                number = number.wrapping_add(1);
                let pipe = pipeline(&batch, &self.keys, &self.seal, (&mark, number));
                if !self.write_once(&pipe, &mark, number, &stop).await {
                    return;
                }
                for write in batch {
                    match write {
                        Write::ThenQueue { outbox, frame } => {
                            let _ = outbox.push(frame);
                        }
                        Write::Flushed(flushed) => {
                            let _ = flushed.send(());
                        }
                        _ => {}
                    }
                }
            }
        }
    }

    /// Runs a batch's transaction until Redis has it, exactly once; `false` if stopped first.
    pub(super) async fn write_once(
        &self,
        pipe: &redis::Pipeline,
        mark: &str,
        number: u64,
        stop: &CancellationToken,
    ) -> bool {
        let mut delay = Duration::from_millis(10);
        loop {
            match self
                .store(async |redis| pipe.query_async::<()>(redis).await)
                .await
            {
                Ok(()) => return true,
                Err(e) => tracing::warn!(error = %e, "cannot write to Redis; retrying"),
            }
            // Did it run after all? Ask until Redis answers.
            loop {
                tokio::select! {
                    () = stop.cancelled() => return false,
                    () = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(Duration::from_secs(1));
                let ran: redis::RedisResult<Option<u64>> = self
                    .store(async |redis| redis::cmd("GET").arg(mark).query_async(redis).await)
                    .await;
                match ran {
                    Ok(Some(n)) if n == number => return true,
                    Ok(_) => break, // it did not: run it again
                    Err(_) => continue,
                }
            }
        }
    }
}
