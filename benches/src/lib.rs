//! Criterion benchmarks for Parley live in `benches/` beside this file: `cargo bench -p
//! parley-benches`. BENCHMARKS.md at the workspace root has the figures and how to run the
//! relay harness. This library holds only what several benches share.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use parley::dh::DhKeyPair;
use parley::keys::SecretKey;
use parley::ratchet::Ratchet;
use parley::session::{NewSession, Session};
use parley_state::{Role, Secret};

/// Alice's (the host's) and Bob's (the guest's) ratchets, as a pairing leaves them.
pub fn ratchets() -> (Ratchet, Ratchet) {
    let root = SecretKey::from_bytes([9; 32]);
    let bob_key = DhKeyPair::generate().unwrap();
    let alice = Ratchet::initiator(
        root.clone(),
        DhKeyPair::generate().unwrap(),
        bob_key.public(),
    )
    .unwrap();
    (alice, Ratchet::responder(root, bob_key))
}

/// A host and a guest session, as a pairing leaves them.
pub fn sessions() -> (Session, Session) {
    let (alice, bob) = ratchets();
    let make = |role, ratchet| {
        Session::new(NewSession {
            sid: "00112233445566778899aabbccddeeff".into(),
            sid_bytes: [0x11; 16],
            role,
            relay_url: "ws://127.0.0.1:1".into(),
            resume_token: Secret::new("ab".repeat(32)),
            restore_proof: Secret::new("cd".repeat(32)),
            ratchet,
            safety_number: "0000 0000 0000".into(),
            now: 0,
        })
    };
    (make(Role::Host, alice), make(Role::Guest, bob))
}
