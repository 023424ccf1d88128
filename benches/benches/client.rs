//! Client-side costs: DH, the whole pairing handshake (both sides in one process, through the
//! sans-IO `Host`/`Guest`), PAKE + HKDF, AES-256-GCM, and saving the state file.
//!
//! `cargo bench -p parley-benches --bench client` (add `-- NAME` to run one group).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::hint::black_box;

use aes_gcm::aead::{AeadInOut, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use hkdf::Hkdf;
use parley::dh::DhKeyPair;
use parley::handshake::{Guest, Host, Step};
use serde_json::{Value, json};
use sha2::Sha256;
use spake2::{Ed25519Group, Identity, Password, Spake2};

fn dh(c: &mut Criterion) {
    let mut g = c.benchmark_group("dh");
    g.bench_function("keygen", |b| b.iter(|| DhKeyPair::generate().unwrap()));
    let ours = DhKeyPair::generate().unwrap();
    let theirs = DhKeyPair::generate().unwrap();
    g.bench_function("shared_secret", |b| {
        b.iter(|| ours.shared_secret(black_box(theirs.public())).unwrap())
    });
    g.finish();
}

/// PAKE (SPAKE2 over Ed25519, both sides) and the HKDF-SHA256 key schedule's shape.
fn pake_hkdf(c: &mut Criterion) {
    let mut g = c.benchmark_group("pake");
    let host_id = Identity::new(b"parley/v1/host");
    let guest_id = Identity::new(b"parley/v1/guest");
    g.bench_function("spake2_one_side", |b| {
        b.iter(|| {
            let (a, msg_a) =
                Spake2::<Ed25519Group>::start_a(&Password::new(b"123456"), &host_id, &guest_id);
            let (_, msg_b) =
                Spake2::<Ed25519Group>::start_b(&Password::new(b"123456"), &host_id, &guest_id);
            black_box(&msg_a);
            a.finish(&msg_b).unwrap()
        })
    });
    g.bench_function("hkdf_schedule", |b| {
        let dh_secret = [7u8; 256];
        let pake_key = [9u8; 32];
        let transcript = [1u8; 32];
        b.iter(|| {
            let mut ikm = Vec::with_capacity(288);
            ikm.extend_from_slice(&dh_secret);
            ikm.extend_from_slice(&pake_key);
            let hkdf = Hkdf::<Sha256>::new(Some(&transcript), &ikm);
            let mut out = [0u8; 32];
            for label in [&b"a"[..], b"b", b"c", b"d", b"e", b"f"] {
                hkdf.expand(label, &mut out).unwrap();
                black_box(&out);
            }
        })
    });
    g.finish();
}

fn frame(t: &str, data: Value) -> String {
    json!({"t": t, "sid": "ab".repeat(16), "data": data}).to_string()
}

fn sends(steps: Vec<Step>) -> Vec<Value> {
    steps
        .into_iter()
        .filter_map(|s| match s {
            Step::Send(text) => Some(serde_json::from_str(&text).unwrap()),
            _ => None,
        })
        .collect()
}

/// One whole pairing, both sides, with the relay's part played in between (as
/// client/src/handshake.rs's tests do). Each side does one keygen, one shared secret, SPAKE2,
/// HKDF and the confirmations, and the host also starts its Double Ratchet (one more keygen and
/// shared secret) and both sides exchange the first ratchet messages, so half of this is more
/// than "one handshake side": `handshake/one_side_crypto` measures that alone.
fn pair_in_process() {
    let (mut host, _) = Host::start("ws://relay", "alice").unwrap();
    let invite = sends(
        host.handle(&frame("SESSION_CREATED", json!({"resumeToken": "aa"})))
            .unwrap(),
    );
    let stored = invite[0]["data"].clone();
    let steps = host
        .handle(&frame(
            "INVITE_CODE",
            json!({"code": "123456", "expiresIn": 600}),
        ))
        .unwrap();
    let code = steps
        .into_iter()
        .find_map(|s| match s {
            Step::Invite { code, .. } => Some(code),
            _ => None,
        })
        .unwrap();
    let (mut guest, steps) = Guest::start(&code, "ws://relay", "bob").unwrap();
    let join = sends(steps).remove(0);
    let mut request = join["data"].clone();
    request.as_object_mut().unwrap().remove("code");
    request["clientID"] = json!("c1");
    let mut joined = stored;
    joined["resumeToken"] = json!("bb");
    let accept = sends(host.handle(&frame("JOIN_REQUEST", request)).unwrap()).remove(0);
    guest.handle(&frame("JOINED", joined)).unwrap();
    let mut second = accept["data"].clone();
    second.as_object_mut().unwrap().remove("clientID");
    let confirm = sends(guest.handle(&frame("JOINED", second)).unwrap()).remove(0);
    let host_steps = host.handle(&confirm.to_string()).unwrap();
    let mut host_done = host_steps.iter().any(|s| matches!(s, Step::Paired(_)));
    let hello = sends(host_steps);
    let mut guest_done = false;
    for h in hello {
        let steps = guest.handle(&h.to_string()).unwrap();
        guest_done |= steps.iter().any(|s| matches!(s, Step::Paired(_)));
        for back in sends(steps) {
            let steps = host.handle(&back.to_string()).unwrap();
            host_done |= steps.iter().any(|s| matches!(s, Step::Paired(_)));
        }
    }
    assert!(host_done && guest_done, "pairing did not complete");
}

/// Exactly one side's share of the pairing's crypto, the figure the 1 ms target is about: a DH
/// key generation, the DH secret against the peer's key, SPAKE2 (start and finish) and the HKDF
/// key schedule (`parley::keys::derive`). No framing, JSON or ratchet.
fn one_side(peer_dh: &[u8; 256], peer_pake: &[u8], transcript: &[u8; 32]) {
    let host_id = Identity::new(b"parley/v1/host");
    let guest_id = Identity::new(b"parley/v1/guest");
    let own = DhKeyPair::generate().unwrap();
    black_box(own.public());
    let (pake, msg) =
        Spake2::<Ed25519Group>::start_a(&Password::new(b"123456"), &host_id, &guest_id);
    black_box(&msg);
    let dh_secret = own.shared_secret(black_box(peer_dh)).unwrap();
    let pake_key = pake.finish(black_box(peer_pake)).unwrap();
    black_box(parley::keys::derive(
        dh_secret.as_ref(),
        &pake_key,
        transcript,
    ));
}

fn handshake(c: &mut Criterion) {
    let mut g = c.benchmark_group("handshake");
    g.sample_size(30);
    g.bench_function("both_sides_in_process", |b| b.iter(pair_in_process));
    let peer_dh = *DhKeyPair::generate().unwrap().public();
    let (_, peer_pake) = Spake2::<Ed25519Group>::start_b(
        &Password::new(b"123456"),
        &Identity::new(b"parley/v1/host"),
        &Identity::new(b"parley/v1/guest"),
    );
    let transcript = [1u8; 32];
    g.sample_size(50);
    g.bench_function("one_side_crypto", |b| {
        b.iter(|| one_side(&peer_dh, &peer_pake, &transcript))
    });
    g.finish();
}

fn aes_gcm(c: &mut Criterion) {
    let mut g = c.benchmark_group("aes_gcm");
    let cipher = Aes256Gcm::new(&[3u8; 32].into());
    let nonce = Nonce::from([5u8; 12]);
    let aad = b"parley/v1 sid direction seq";
    for size in [64usize, 1024, 16 * 1024, 64 * 1024] {
        g.throughput(Throughput::Bytes(size as u64));
        let mut buf = vec![0x42u8; size];
        g.bench_function(format!("seal/{size}"), |b| {
            b.iter(|| {
                cipher
                    .encrypt_inout_detached(&nonce, aad, buf.as_mut_slice().into())
                    .unwrap()
            })
        });
        let mut sealed = vec![0x42u8; size];
        let tag = cipher
            .encrypt_inout_detached(&nonce, aad, sealed.as_mut_slice().into())
            .unwrap();
        let mut work = sealed.clone();
        g.bench_function(format!("open/{size}"), |b| {
            b.iter(|| {
                work.copy_from_slice(&sealed);
                cipher
                    .decrypt_inout_detached(&nonce, aad, work.as_mut_slice().into(), &tag)
                    .unwrap()
            })
        });
    }
    // The GHASH half alone: 16 KiB of associated data and nothing to encrypt (one AES block,
    // for the tag). `seal/16384` minus this is the AES-CTR half; BENCHMARKS.md splits the
    // comparison with OpenSSL this way.
    let big_aad = vec![0x42u8; 16 * 1024];
    g.throughput(Throughput::Bytes(big_aad.len() as u64));
    g.bench_function("ghash_only/16384", |b| {
        b.iter(|| {
            cipher
                .encrypt_inout_detached(&nonce, &big_aad, (&mut [][..]).into())
                .unwrap()
        })
    });
    g.finish();
}

/// `Store::save` (write, fsync, rename) of a state file with one session, as a pairing leaves
/// it (ratchet included): the client's cost per state change.
fn state_save(c: &mut Criterion) {
    let dir = std::env::temp_dir().join(format!("parley-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let store = parley_state::Store::open(&dir, "bench").unwrap();
    let mut state = parley_state::StateFile::new("bench");
    state.upsert(parley_benches::sessions().0.record());
    c.bench_function("state/save", |b| b.iter(|| store.save(&state).unwrap()));
    drop(store);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `Store::save` as a conversation goes on: after 10,000 messages acknowledged (the cost must
/// be that of a fresh session: nothing in the record grows with the conversation), and with
/// 100 and 1000 ordinary lines unacknowledged, and with the outbox full of maximum-length
/// messages. The outbox is bounded (protocol.md 3.7), so the last two are the most a save
/// can cost.
fn state_save_by_length(c: &mut Criterion) {
    use parley::session::{Plain, Receipt};
    use parley_protocol::Envelope;

    let line = Plain::Text {
        text: "an ordinary chat line, about as long as people type them".into(),
    };
    let dir = std::env::temp_dir().join(format!("parley-bench-len-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let store = parley_state::Store::open(&dir, "bench").unwrap();
    let mut g = c.benchmark_group("state/save_by_length");
    let mut case = |label: &str, session: &parley::session::Session| {
        let mut state = parley_state::StateFile::new("bench");
        state.upsert(session.record());
        let bytes = serde_json::to_vec_pretty(&state).unwrap().len();
        eprintln!("state/save_by_length/{label}: {bytes} bytes");
        g.bench_function(label, |b| b.iter(|| store.save(&state).unwrap()));
    };

    let (mut host, mut guest) = parley_benches::sessions();
    for _ in 0..10 {
        let frames: Vec<String> = (0..1000).map(|_| host.seal(&line).unwrap().1).collect();
        for frame in &frames {
            guest.receive(&Envelope::parse(frame).unwrap()).unwrap();
        }
        let receipt = guest
            .receipt(Receipt::Delivered {
                upto: guest.received_upto(),
            })
            .unwrap();
        host.take_receipt(&Envelope::parse(&receipt).unwrap())
            .unwrap();
    }
    assert!(!host.has_unacked());
    case("after_10000_acked", &host);

    for pending in [100, 1000] {
        let (mut host, _) = parley_benches::sessions();
        for _ in 0..pending {
            host.seal(&line).unwrap();
        }
        case(&format!("outbox_{pending}_lines"), &host);
    }

    let (mut host, _) = parley_benches::sessions();
    let longest = (1..=parley_protocol::limits::MAX_FRAME_BYTES / 2)
        .rev()
        .step_by(16)
        .map(|len| Plain::Text {
            text: "x".repeat(len),
        })
        .find(|plain| parley_benches::sessions().0.seal(plain).is_ok())
        .unwrap();
    while host.outbox_has_room() {
        host.seal(&longest).unwrap();
    }
    case("outbox_full_max_length", &host);
    g.finish();
    drop(store);
    let _ = std::fs::remove_dir_all(&dir);
}

// The Double Ratchet's costs are in benches/ratchet.rs.

criterion_group!(
    benches,
    dh,
    pake_hkdf,
    handshake,
    aes_gcm,
    state_save,
    state_save_by_length
);
criterion_main!(benches);
