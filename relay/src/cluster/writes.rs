//! Mailboxes in Redis: every change the hub makes to a mailbox is mirrored to a list per seat
//! (`mbox:SID:ROLE`, entries `UNIX_MS|FRAME`), written in order with everything else this node
//! writes. A node that takes a session in (re-created from a member's token: its home died, or
//! the relay restarted) reads the lists back, so what waited for a member is still there.

use std::time::Duration;

use redis::Pipeline;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Utf8Bytes;

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
        msg: String,
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
pub fn pipeline(batch: &[Write], keys: &Keys) -> Pipeline {
    let mut pipe = redis::pipe();
    pipe.atomic();
    let mut inboxes: Vec<(NodeId, String)> = Vec::new();
    for write in batch {
        match write {
            Write::Inbox { node, msg } => {
                let at = match inboxes.iter().position(|(n, _)| n == node) {
                    Some(at) => at,
                    None => {
                        inboxes.push((*node, String::new()));
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
            .arg(entry)
            .ignore();
    }
    pipe
}

impl Write {
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
            Write::ThenQueue { .. } => {}
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

    fn when_durable(&self, outbox: Outbox, frame: Utf8Bytes) {
        if let Err(e) = self.writes.try_send(Write::ThenQueue { outbox, frame }) {
            // Only when Redis has been away long enough to fill the queue: the sender hears
            // nothing for this frame and sends it again (it keeps it until acknowledged).
            tracing::warn!("a DELIVERED could not wait for its write; dropped");
            drop(e);
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

    /// The mailboxes Redis holds for a session (empty if none).
    pub(super) async fn load_mailboxes(&self, sid: SessionId) -> redis::RedisResult<Recovered> {
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
