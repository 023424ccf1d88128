//! What nodes of a cluster say to each other, through each node's inbox (a Redis stream).
//!
//! One field per entry, `m`: one or more messages, each as its length in bytes (decimal), `|`,
//! then the message's bytes ([`pack`], [`unpack`]), the whole sealed with AES-256-GCM under a key
//! derived from the relay secret ([`InboxSeal`]): a random 96-bit nonce, then the ciphertext
//! and tag, with the destination node's id as associated data. Entries carry clients' frames,
//! resume tokens among them: whoever reads Redis (or its append-only file) must not be able
//! to read them, nor forge or redirect one. A writer puts everything it has for one node at
//! once in one entry. A message has one of these forms (the frame, which may contain `|`,
//! always comes last; the header fields are ASCII):
//!
//! - `f|GATE|CONN|IP|FRAME`: a client's frame, from its gate (the node it is connected to) to
//!   the session's home (the node that holds the session); `F|…` the same with a binary
//!   `DATA` frame (its raw bytes);
//! - `c|GATE|CONN`: that client's connection closed at its gate;
//! - `o|HOME|CONN|FRAME`: a frame for a client, from a home to the client's gate; `O|…` the
//!   same with a binary `DATA` frame;
//! - `w|GATE|CONN|FRAMES|BYTES`: the gate has queued that many of the home's frames for the
//!   client and its queue has room again: the home may send as many more (flow control);
//! - `a|CONN|FRAMES`: the home has applied that many of the client's frames: the gate may
//!   forward as many more (flow control);
//! - `d|CONN`: the home dropped the client (its queue there overflowed); the gate closes it.
//!
//! Redis is the operator's, not the peer's, but a damaged entry is still only skipped: it
//! never takes a node down.

use std::fmt;
use std::net::IpAddr;

use tokio_tungstenite::tungstenite::{Bytes, Utf8Bytes};

use crate::outbox::{ConnId, Frame};

/// A relay process in a cluster: random, new at every start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(u64);

impl NodeId {
    pub fn random() -> NodeId {
        NodeId(rand::random())
    }

    pub fn parse(s: &str) -> Option<NodeId> {
        if s.len() != 16 || !s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return None;
        }
        u64::from_str_radix(s, 16).ok().map(NodeId)
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// One entry of a node's inbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeMsg {
    Frame {
        gate: NodeId,
        conn: ConnId,
        ip: IpAddr,
        frame: Frame,
    },
    Closed {
        gate: NodeId,
        conn: ConnId,
    },
    Out {
        home: NodeId,
        conn: ConnId,
        frame: Frame,
    },
    Written {
        gate: NodeId,
        conn: ConnId,
        frames: usize,
        bytes: usize,
    },
    Applied {
        conn: ConnId,
        frames: usize,
    },
    Drop {
        conn: ConnId,
    },
}

/// `head` (ASCII), then the frame's bytes.
fn with_frame(head: &str, frame: &Frame) -> Vec<u8> {
    let body: &[u8] = match frame {
        Frame::Text(text) => text.as_bytes(),
        Frame::Binary(bytes) => bytes,
    };
    let mut out = Vec::with_capacity(head.len().saturating_add(body.len()));
    out.extend_from_slice(head.as_bytes());
    out.extend_from_slice(body);
    out
}

/// The frame of a message whose kind said text (`f`, `o`: must be UTF-8) or binary (`F`, `O`).
fn frame_of(binary: bool, bytes: &[u8]) -> Option<Frame> {
    let bytes = Bytes::copy_from_slice(bytes);
    if binary {
        Some(Frame::Binary(bytes))
    } else {
        Utf8Bytes::try_from(bytes).ok().map(Frame::Text)
    }
}

/// One `|`-separated header field, as text.
fn field(part: Option<&[u8]>) -> Option<&str> {
    std::str::from_utf8(part?).ok()
}

impl NodeMsg {
    pub fn encode(&self) -> Vec<u8> {
        let binary = |frame: &Frame| matches!(frame, Frame::Binary(_));
        match self {
            NodeMsg::Frame {
                gate,
                conn,
                ip,
                frame,
            } => {
                let kind = if binary(frame) { 'F' } else { 'f' };
                with_frame(&format!("{kind}|{gate}|{conn}|{ip}|"), frame)
            }
            NodeMsg::Closed { gate, conn } => format!("c|{gate}|{conn}").into_bytes(),
            NodeMsg::Out { home, conn, frame } => {
                let kind = if binary(frame) { 'O' } else { 'o' };
                with_frame(&format!("{kind}|{home}|{conn}|"), frame)
            }
            NodeMsg::Written {
                gate,
                conn,
                frames,
                bytes,
            } => format!("w|{gate}|{conn}|{frames}|{bytes}").into_bytes(),
            NodeMsg::Applied { conn, frames } => format!("a|{conn}|{frames}").into_bytes(),
            NodeMsg::Drop { conn } => format!("d|{conn}").into_bytes(),
        }
    }

    pub fn parse(msg: &[u8]) -> Option<NodeMsg> {
        let mut kind_rest = msg.splitn(2, |b| *b == b'|');
        let kind = kind_rest.next()?;
        let rest = kind_rest.next()?;
        let fields = |n: usize| rest.splitn(n, |b| *b == b'|');
        match kind {
            b"f" | b"F" => {
                let mut parts = fields(4);
                let gate = NodeId::parse(field(parts.next())?)?;
                let conn = field(parts.next())?.parse().ok()?;
                let ip = field(parts.next())?.parse().ok()?;
                let frame = frame_of(kind == b"F", parts.next()?)?;
                Some(NodeMsg::Frame {
                    gate,
                    conn,
                    ip,
                    frame,
                })
            }
            b"c" => {
                let mut parts = fields(2);
                Some(NodeMsg::Closed {
                    gate: NodeId::parse(field(parts.next())?)?,
                    conn: field(parts.next())?.parse().ok()?,
                })
            }
            b"o" | b"O" => {
                let mut parts = fields(3);
                Some(NodeMsg::Out {
                    home: NodeId::parse(field(parts.next())?)?,
                    conn: field(parts.next())?.parse().ok()?,
                    frame: frame_of(kind == b"O", parts.next()?)?,
                })
            }
            b"w" => {
                let mut parts = fields(5);
                let msg = NodeMsg::Written {
                    gate: NodeId::parse(field(parts.next())?)?,
                    conn: field(parts.next())?.parse().ok()?,
                    frames: field(parts.next())?.parse().ok()?,
                    bytes: field(parts.next())?.parse().ok()?,
                };
                parts.next().is_none().then_some(msg)
            }
            b"a" => {
                let mut parts = fields(2);
                Some(NodeMsg::Applied {
                    conn: field(parts.next())?.parse().ok()?,
                    frames: field(parts.next())?.parse().ok()?,
                })
            }
            b"d" => Some(NodeMsg::Drop {
                conn: field(Some(rest))?.parse().ok()?,
            }),
            _ => None,
        }
    }
}

/// Seals and opens inbox entries.
pub struct InboxSeal(aes_gcm::Aes256Gcm);

const NONCE_BYTES: usize = 12;

impl InboxSeal {
    pub fn new(key: &[u8; 32]) -> InboxSeal {
        use aes_gcm::aead::KeyInit;
        InboxSeal(aes_gcm::Aes256Gcm::new(key.into()))
    }

    /// `nonce ‖ AES-256-GCM(entry, aad = to)`.
    pub fn seal(&self, to: NodeId, entry: &[u8]) -> Vec<u8> {
        use aes_gcm::aead::{Aead, Payload};
        let nonce: [u8; NONCE_BYTES] = rand::random();
        let aad = to.to_string();
        let payload = Payload {
            msg: entry,
            aad: aad.as_bytes(),
        };
        // Only fails beyond 64 GiB of entry, far beyond any batch.
        let sealed = self.0.encrypt(&nonce.into(), payload).unwrap_or_default();
        let mut out = Vec::with_capacity(NONCE_BYTES.saturating_add(sealed.len()));
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        out
    }

    /// An entry sealed for `to`; `None` if it was not (damaged, forged, or meant for another
    /// node).
    pub fn open(&self, to: NodeId, sealed: &[u8]) -> Option<Vec<u8>> {
        use aes_gcm::aead::{Aead, Payload};
        let nonce: [u8; NONCE_BYTES] = sealed.get(..NONCE_BYTES)?.try_into().ok()?;
        let aad = to.to_string();
        let payload = Payload {
            msg: sealed.get(NONCE_BYTES..)?,
            aad: aad.as_bytes(),
        };
        self.0.decrypt(&nonce.into(), payload).ok()
    }
}

/// Appends one message to an entry.
pub fn pack(entry: &mut Vec<u8>, msg: &[u8]) {
    entry.extend_from_slice(msg.len().to_string().as_bytes());
    entry.push(b'|');
    entry.extend_from_slice(msg);
}

/// The messages of an entry, in order; `None` where the rest is damaged (it ends there).
pub fn unpack(mut entry: &[u8]) -> impl Iterator<Item = Option<&[u8]>> {
    std::iter::from_fn(move || {
        if entry.is_empty() {
            return None;
        }
        let next = entry.iter().position(|b| *b == b'|').and_then(|bar| {
            let len: usize = std::str::from_utf8(entry.get(..bar)?).ok()?.parse().ok()?;
            let rest = entry.get(bar.checked_add(1)?..)?;
            Some((rest.get(..len)?, rest.get(len..)?))
        });
        match next {
            Some((msg, rest)) => {
                entry = rest;
                Some(Some(msg))
            }
            None => {
                entry = &[];
                Some(None)
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_sealed_for_their_node() {
        let seal = InboxSeal::new(&[7; 32]);
        let (to, other) = (NodeId::random(), NodeId::random());
        let text = br#"37|f|0011223344556677|1|127.0.0.1|{"t":"REATTACH"}"#;
        let sealed = seal.seal(to, text);
        assert!(
            !sealed.windows(8).any(|w| w == b"REATTACH"),
            "readable in Redis"
        );
        assert_eq!(seal.open(to, &sealed).as_deref(), Some(&text[..]));
        assert_eq!(
            seal.open(other, &sealed),
            None,
            "redirected to another node"
        );
        assert_eq!(
            InboxSeal::new(&[8; 32]).open(to, &sealed),
            None,
            "another secret"
        );
        let mut flipped = sealed.clone();
        if let Some(b) = flipped.last_mut() {
            *b ^= 1;
        }
        assert_eq!(seal.open(to, &flipped), None, "altered");
        assert_eq!(seal.open(to, &sealed[..5]), None, "cut short");
        assert_ne!(seal.seal(to, text), sealed, "a fresh nonce each time");
    }

    #[test]
    fn entries_carry_messages_in_order() {
        let msgs: [&[u8]; 4] = [
            "o|1|{\"t\":\"X\",\"é\":\"|9|\"}".as_bytes(),
            b"d|2",
            b"",
            b"O|1|\x01\xff|\x00",
        ];
        let mut entry = Vec::new();
        for m in msgs {
            pack(&mut entry, m);
        }
        let back: Vec<Option<&[u8]>> = unpack(&entry).collect();
        assert_eq!(back, msgs.map(Some));
        // Damage ends the entry: what came before it is kept.
        let mut damaged = Vec::new();
        pack(&mut damaged, b"d|1");
        damaged.extend_from_slice(b"99|short");
        assert_eq!(
            unpack(&damaged).collect::<Vec<_>>(),
            [Some(&b"d|1"[..]), None]
        );
        assert_eq!(unpack(b"x|").collect::<Vec<_>>(), [None]);
        assert_eq!(unpack(b"").count(), 0);
    }

    #[test]
    fn every_message_reads_back_as_written() {
        let gate = NodeId::random();
        let frame = Frame::Text(Utf8Bytes::from(
            r#"{"t":"MSG","sid":"a|b","data":{"x":"|||"}}"#,
        ));
        let data = Frame::Binary(Bytes::from_static(b"\x01|\xff\x00|"));
        let all = [
            NodeMsg::Frame {
                gate,
                conn: 7,
                ip: "2001:db8::1".parse().unwrap(),
                frame: frame.clone(),
            },
            NodeMsg::Frame {
                gate,
                conn: u64::MAX,
                ip: "127.0.0.1".parse().unwrap(),
                frame: Frame::Text(Utf8Bytes::from("")),
            },
            NodeMsg::Frame {
                gate,
                conn: 8,
                ip: "127.0.0.1".parse().unwrap(),
                frame: data.clone(),
            },
            NodeMsg::Closed { gate, conn: 9 },
            NodeMsg::Out {
                home: gate,
                conn: 3,
                frame,
            },
            NodeMsg::Out {
                home: gate,
                conn: 3,
                frame: data,
            },
            NodeMsg::Written {
                gate,
                conn: 3,
                frames: 12,
                bytes: 3456,
            },
            NodeMsg::Applied { conn: 5, frames: 7 },
            NodeMsg::Drop { conn: 4 },
        ];
        for msg in all {
            assert_eq!(NodeMsg::parse(&msg.encode()), Some(msg));
        }
    }

    #[test]
    fn damaged_entries_are_refused() {
        for text in [
            "",
            "x|1",
            "f|0011223344556677|1|127.0.0.1",
            "f|00112233445566|1|127.0.0.1|{}",
            "f|0011223344556677|-1|127.0.0.1|{}",
            "f|0011223344556677|1|nowhere|{}",
            "c|0011223344556677",
            "o|abc|{}",
            "o|0011223344556677|x|{}",
            "w|0011223344556677|1|2",
            "w|0011223344556677|1|2|3|4",
            "a|5",
            "a|5|-1",
            "d|",
            "d|18446744073709551616",
        ] {
            assert_eq!(NodeMsg::parse(text.as_bytes()), None, "{text:?}");
        }
        assert_eq!(
            NodeMsg::parse(b"o|0011223344556677|1|\xff"),
            None,
            "not UTF-8"
        );
    }

    #[test]
    fn node_ids_have_one_spelling() {
        let id = NodeId::random();
        assert_eq!(NodeId::parse(&id.to_string()), Some(id));
        assert_eq!(NodeId::parse("00112233445566AA"), None);
        assert_eq!(NodeId::parse("+0112233445566aa"), None);
    }
}
