//! protocol.md 3.10's test vectors, computed here and pinned there: each line below must
//! appear in the document exactly, so the spec and the code cannot drift apart.

use sha2::{Digest, Sha256};

use super::chunk::{self, FileKeys, Layout};
use super::offer::FileOffer;
use super::{FileKey, LABEL_ACK_KEY, LABEL_CHUNK_KEY};
use crate::session::Plain;

const DOCUMENT: &str = include_str!("../../../protocol.md");

fn key() -> FileKey {
    FileKey::from_bytes(std::array::from_fn(|i| i as u8))
}

fn id() -> [u8; 16] {
    std::array::from_fn(|i| 0xa0 + i as u8)
}

const FILE: &[u8] = b"hello, file";

fn lines() -> Vec<String> {
    let offer = FileOffer {
        id: id(),
        name: "docs/hello.txt".into(),
        size: FILE.len() as u64,
        sha256: hex::encode(Sha256::digest(FILE)),
        chunk: 4,
        key: key(),
    };
    let keys = FileKeys::new(&key());
    let layout = Layout {
        id: id(),
        size: FILE.len() as u64,
        chunk: 4,
    };
    let offer_json = serde_json::to_string(&Plain::FileOffer(offer)).unwrap();
    vec![
        format!("offer = {offer_json}"),
        format!(
            "chunk key = {}",
            hex::encode(key().derive(LABEL_CHUNK_KEY).as_bytes())
        ),
        format!(
            "ack key = {}",
            hex::encode(key().derive(LABEL_ACK_KEY).as_bytes())
        ),
        format!(
            "chunk keys as derived = {}",
            hex::encode(keys.chunk_key().as_bytes())
        ),
        format!(
            "aad(index 2, pass 1) = {}",
            hex::encode(chunk::associated_data(&layout, 2, 1))
        ),
        format!(
            "nonce(pass 1, index 2) = {}",
            hex::encode(chunk::nonce(1, 2))
        ),
        format!(
            "sealed(index 1, pass 1) = {}",
            hex::encode(chunk::seal(&keys, &layout, 1, 1, &FILE[4..8]).unwrap())
        ),
        format!(
            "sealed(index 2, pass 1) = {}",
            hex::encode(chunk::seal(&keys, &layout, 1, 2, &FILE[8..]).unwrap())
        ),
        format!(
            "ack(received 8, durable 4) = {}",
            hex::encode(chunk::ack(&keys, &id(), 8, 4))
        ),
    ]
}

#[test]
fn protocol_md_states_the_file_vectors() {
    let lines = lines();
    for line in &lines {
        println!("{line}");
    }
    for line in &lines {
        // (The derived chunk key is stated once, as `chunk key`.)
        if line.starts_with("chunk keys as derived") {
            continue;
        }
        assert!(
            DOCUMENT.contains(line.as_str()),
            "protocol.md must say: {line}"
        );
    }
    // The offer read back from the document is the offer.
    let offer_line = &lines[0]["offer = ".len()..];
    let Plain::FileOffer(read) = serde_json::from_str::<Plain>(offer_line).unwrap() else {
        panic!("not an offer");
    };
    assert_eq!(read.key, key());
    assert_eq!(read.id, id());
}

/// The other file messages as protocol.md shows them.
#[test]
fn protocol_md_shows_the_file_messages() {
    use super::FailCode;
    use super::offer::{FileAccept, FileDecline, FileDone, FileFailed};
    let id = id();
    let messages = [
        Plain::FileAccept(FileAccept { id, offset: 0 }),
        Plain::FileDecline(FileDecline {
            id,
            reason: FailCode::TooLarge,
        }),
        Plain::FileDone(FileDone { id }),
        Plain::FileFailed(FileFailed {
            id,
            code: FailCode::ChunkCorrupt,
        }),
    ];
    for plain in messages {
        let json = serde_json::to_string(&plain).unwrap();
        println!("{json}");
        assert!(DOCUMENT.contains(&json), "protocol.md must show {json}");
        assert_eq!(serde_json::from_str::<Plain>(&json).unwrap(), plain);
    }
}

/// The chunk and acknowledgement DATA frames protocol.md shows are what this code sends.
#[test]
fn protocol_md_shows_the_chunk_and_ack_frames() {
    let sid = parley_protocol::data::sid_bytes("7f1c0d2e9a4b3c5d6e7f8091a2b3c4d5").unwrap();
    let keys = FileKeys::new(&key());
    let layout = Layout {
        id: id(),
        size: FILE.len() as u64,
        chunk: 4,
    };
    let frame = chunk::chunk_frame(&keys, &layout, &sid, 1, 2, &FILE[8..]).unwrap();
    let shown = format!("chunk frame = {}", hex::encode(&frame));
    println!("{shown}");
    assert!(DOCUMENT.contains(&shown), "protocol.md must show {shown}");
    let ack = chunk::ack_frame(&sid, &chunk::ack(&keys, &id(), 8, 4));
    let shown = format!("ack frame = {}", hex::encode(&ack));
    println!("{shown}");
    assert!(DOCUMENT.contains(&shown), "protocol.md must show {shown}");
    // And they read back.
    let (_, body) = parley_protocol::data::parse(&frame).unwrap();
    let Some(chunk::FileData::Chunk(sealed)) = chunk::data_in(body) else {
        panic!("not a chunk");
    };
    let (header, data) = chunk::open(&keys, &layout, sealed).unwrap();
    assert_eq!((header.pass, header.index, &data[..]), (1, 2, &b"ile"[..]));
}
