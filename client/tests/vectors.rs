//! Known-answer vectors: the values protocol.md ("Test vectors") publishes, checked against the
//! code, and checked to be the ones the document shows.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use parley::dh::DhKeyPair;
use parley::keys::{self, Transcript};
use parley::message::{self, Direction};
use sha2::{Digest, Sha256};

const DOCUMENT: &str = include_str!("../../protocol.md");

fn host_private() -> [u8; 32] {
    std::array::from_fn(|i| i as u8 + 1) // 01 02 .. 20
}

fn guest_private() -> [u8; 32] {
    std::array::from_fn(|i| 0x21 + i as u8) // 21 22 .. 40
}

const SID: [u8; 16] = [
    0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0xff,
];

fn host_pake() -> Vec<u8> {
    let mut m = vec![0x41];
    m.extend([0xaa; 32]);
    m
}

fn guest_pake() -> Vec<u8> {
    let mut m = vec![0x42];
    m.extend([0xbb; 32]);
    m
}

const PAKE_KEY: [u8; 32] = [0x5a; 32];

/// Checks a value and that protocol.md shows the same value.
fn check(name: &str, actual: &str) {
    if std::env::var("PRINT_VECTORS").is_ok() {
        println!("{name} = {actual}");
        return;
    }
    let line = format!("{name} = {actual}");
    assert!(
        DOCUMENT.contains(&line),
        "protocol.md must contain `{line}`"
    );
}

fn sha(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

#[test]
fn dh_vectors() {
    let host = DhKeyPair::from_private(host_private());
    let guest = DhKeyPair::from_private(guest_private());
    check("sha256(host_dh)", &sha(host.public()));
    check("sha256(guest_dh)", &sha(guest.public()));
    let shared = host.shared_secret(guest.public()).unwrap();
    assert_eq!(*shared, *guest.shared_secret(host.public()).unwrap());
    check("sha256(dh_secret)", &sha(shared.as_ref()));
    check("host_dh[0..16]", &hex::encode(&host.public()[..16]));
}

#[test]
fn key_schedule_and_message_vectors() {
    let host = DhKeyPair::from_private(host_private());
    let guest = DhKeyPair::from_private(guest_private());
    let shared = host.shared_secret(guest.public()).unwrap();
    let (hp, gp) = (host_pake(), guest_pake());
    let transcript = Transcript {
        sid: &SID,
        host_dh: host.public(),
        guest_dh: guest.public(),
        host_pake: &hp,
        guest_pake: &gp,
    };
    let t = transcript.hash();
    check("transcript_hash", &hex::encode(t));
    let keys = keys::derive(shared.as_ref(), &PAKE_KEY, &t);
    check("confirm_host", &keys.host_confirm.to_hex());
    check("confirm_guest", &keys.guest_confirm.to_hex());
    check("key_host_to_guest", &keys.host_to_guest.to_hex());
    check("key_guest_to_host", &keys.guest_to_host.to_hex());
    check("safety_number", &keys.safety_number);

    let aad = message::associated_data(&SID, Direction::HostToGuest, 2);
    check("aad", &hex::encode(&aad));
    let iv: [u8; 12] = std::array::from_fn(|i| i as u8);
    let payload = message::seal_with_iv(
        &keys.host_to_guest,
        &iv,
        &aad,
        br#"{"k":"text","text":"hello"}"#,
    );
    check("payload", &payload);
    assert_eq!(
        message::open(&keys.host_to_guest, &aad, &payload).unwrap(),
        br#"{"k":"text","text":"hello"}"#
    );
}
