//! The Double Ratchet's per-message costs (protocol.md 3.6), and what a message costs the
//! session around it (sealing into the outbox, the saved record's size).
//!
//! `cargo bench -p parley-benches --bench ratchet`
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use parley::dh::DhKeyPair;
use parley::session::{Plain, Receipt};
use parley_benches::{ratchets, sessions};
use parley_protocol::Envelope;

const AD: &[u8] = b"parley/v1/message sid direction seq";

fn ratchet(c: &mut Criterion) {
    let mut g = c.benchmark_group("ratchet");
    let plaintext = [0x42u8; 64];

    // Within a turn: one KDF_CK step and AES-256-GCM on each side, no exponentiation.
    let (mut alice, mut bob) = ratchets();
    let first = alice.encrypt(&plaintext, AD).unwrap();
    bob.decrypt(&first, AD, &mut DhKeyPair::generate).unwrap();
    g.bench_function("same_chain_encrypt_and_decrypt_64B", |b| {
        b.iter(|| {
            let m = alice.encrypt(black_box(&plaintext), AD).unwrap();
            bob.decrypt(&m, AD, &mut DhKeyPair::generate).unwrap()
        })
    });

    // Every message a new turn: each receiver does a whole DH ratchet step (two
    // exponentiations with the peer's new key, one key generation). Two messages per iteration.
    let (mut alice, mut bob) = ratchets();
    let first = alice.encrypt(&plaintext, AD).unwrap();
    bob.decrypt(&first, AD, &mut DhKeyPair::generate).unwrap();
    g.sample_size(20);
    g.bench_function("two_turns_one_message_each_way_64B", |b| {
        b.iter(|| {
            let m = bob.encrypt(black_box(&plaintext), AD).unwrap();
            alice.decrypt(&m, AD, &mut DhKeyPair::generate).unwrap();
            let m = alice.encrypt(black_box(&plaintext), AD).unwrap();
            bob.decrypt(&m, AD, &mut DhKeyPair::generate).unwrap()
        })
    });

    // A forged header with a new ratchet key: what the receiver spends before refusing it.
    let forged = {
        let mut m = alice.encrypt(&plaintext, AD).unwrap();
        m[..256].copy_from_slice(DhKeyPair::generate().unwrap().public());
        m
    };
    g.bench_function("forged_new_key_refused", |b| {
        b.iter(|| {
            bob.decrypt(black_box(&forged), AD, &mut DhKeyPair::generate)
                .unwrap_err()
        })
    });
    g.finish();
}

/// One chat line through the session layer, one way: seal into the outbox, serialise the
/// record (what a save writes, without the fsync), receive, receipt back, outbox emptied.
fn session_message(c: &mut Criterion) {
    let mut g = c.benchmark_group("session");
    let (mut host, mut guest) = sessions();
    let line = Plain::Text {
        text: "x".repeat(64),
    };
    g.bench_function("one_line_sealed_saved_received_acknowledged", |b| {
        b.iter(|| {
            let (_, frame) = host.seal(&line).unwrap();
            black_box(serde_json::to_vec(&host.record()).unwrap());
            guest.receive(&Envelope::parse(&frame).unwrap()).unwrap();
            black_box(serde_json::to_vec(&guest.record()).unwrap());
            let receipt = guest
                .receipt(Receipt::Delivered {
                    upto: guest.received_upto(),
                })
                .unwrap();
            host.take_receipt(&Envelope::parse(&receipt).unwrap())
                .unwrap();
        })
    });
    g.finish();
    eprintln!(
        "saved record sizes after the run: host {} bytes, guest {} bytes",
        serde_json::to_vec(&host.record()).unwrap().len(),
        serde_json::to_vec(&guest.record()).unwrap().len()
    );
}

criterion_group!(benches, ratchet, session_message);
criterion_main!(benches);
