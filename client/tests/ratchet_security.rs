//! What the Double Ratchet promises at the session level, with sessions saved and loaded
//! through the state file's own format: post-compromise recovery after a stolen state file,
//! crash safety (no key ever used twice, nothing lost), and state that stays bounded over
//! long conversations.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use parley::dh::DhKeyPair;
use parley::keys::SecretKey;
use parley::ratchet::{Header, Ratchet};
use parley::session::{NewSession, Plain, Receipt, ReceiveError, Session};
use parley_protocol::Envelope;
use parley_state::{Role, Secret, SessionRecord};
use serde_json::Value;

const SID: &str = "00112233445566778899aabbccddeeff";

/// Host and guest as a pairing leaves them.
fn pair() -> (Session, Session) {
    let root = SecretKey::from_bytes([9; 32]);
    let guest_key = DhKeyPair::generate().unwrap();
    let host = Ratchet::initiator(
        root.clone(),
        DhKeyPair::generate().unwrap(),
        guest_key.public(),
    )
    .unwrap();
    let guest = Ratchet::responder(root, guest_key);
    let make = |role, ratchet| {
        Session::new(NewSession {
            sid: SID.into(),
            sid_bytes: hex::decode(SID).unwrap().try_into().unwrap(),
            role,
            relay_url: "ws://127.0.0.1:1".into(),
            resume_token: Secret::new("t".into()),
            restore_proof: Secret::new("p".into()),
            ratchet,
            safety_number: "0000 0000 0000".into(),
            now: 0,
        })
    };
    (make(Role::Host, host), make(Role::Guest, guest))
}

fn text(t: &str) -> Plain {
    Plain::Text { text: t.into() }
}

/// The state file's bytes for a session, as written to disk.
fn save(session: &Session) -> String {
    serde_json::to_string(&session.record()).unwrap()
}

fn load(saved: &str) -> Session {
    let record: SessionRecord = serde_json::from_str(saved).unwrap();
    Session::from_record(&record).unwrap()
}

fn deliver(to: &mut Session, frame: &str) -> Result<Vec<String>, ReceiveError> {
    let received = to.receive(&Envelope::parse(frame).unwrap())?;
    Ok(received
        .due
        .into_iter()
        .filter_map(|m| match m.plain {
            Plain::Text { text } => Some(text),
            _ => None,
        })
        .collect())
}

fn acknowledge(receiver: &Session, sender: &mut Session) {
    let receipt = receiver
        .receipt(Receipt::Delivered {
            upto: receiver.received_upto(),
        })
        .unwrap();
    sender
        .take_receipt(&Envelope::parse(&receipt).unwrap())
        .unwrap();
}

fn header(frame: &str) -> Header {
    let frame: Value = serde_json::from_str(frame).unwrap();
    let payload = hex::decode(frame["data"]["payload"].as_str().unwrap()).unwrap();
    Header::parse(&payload).unwrap().0
}

#[test]
fn a_stolen_state_file_reads_only_until_the_next_turn() {
    let (mut host, mut guest) = pair();
    let (_, h1) = host.seal(&text("h1")).unwrap();
    deliver(&mut guest, &h1).unwrap();
    let (_, g1) = guest.seal(&text("g1")).unwrap();
    deliver(&mut host, &g1).unwrap();

    // The guest's state file is copied. The thief also records all traffic from now on.
    let stolen = save(&guest);

    // The host's next turn: the thief, following along, reads it.
    let (_, h2) = host.seal(&text("h2 readable")).unwrap();
    let (_, h3) = host.seal(&text("h3 readable")).unwrap();
    let mut thief = load(&stolen);
    assert_eq!(deliver(&mut thief, &h2).unwrap(), ["h2 readable"]);
    assert_eq!(deliver(&mut thief, &h3).unwrap(), ["h3 readable"]);

    // The guest answers: a DH ratchet step with a key pair that was never in the file.
    assert_eq!(
        deliver(&mut guest, &h2).unwrap(),
        ["h2 readable"],
        "the real guest is unaffected"
    );
    deliver(&mut guest, &h3).unwrap();
    let (_, g2) = guest.seal(&text("g2 closed")).unwrap();
    deliver(&mut host, &g2).unwrap();
    let (_, h4) = host.seal(&text("h4 closed")).unwrap();
    let (_, h5) = host.seal(&text("h5 closed")).unwrap();
    assert_ne!(header(&h4).dh, header(&h2).dh, "the host stepped too");
    assert_eq!(deliver(&mut guest, &h4).unwrap(), ["h4 closed"]);

    // Everything after the step stays closed to the thief, whichever copy it starts from:
    // the one it kept up to date, or a fresh copy of the stolen file. (Each attempt must fail
    // outright: a message merely held for a gap would have been decrypted.)
    for frame in [&h4, &h5] {
        for mut attempt in [load(&save(&thief)), load(&stolen)] {
            let result = attempt.receive(&Envelope::parse(frame).unwrap());
            assert!(
                matches!(result, Err(ReceiveError::Ratchet(_))),
                "{result:?}"
            );
        }
    }
    // And the thief's copy still reads what it read before (the attempts themselves work).
    assert_eq!(deliver(&mut load(&stolen), &h2).unwrap(), ["h2 readable"]);
}

/// Sends `n` lines from `from` to `to`, each acknowledged, and returns the largest saved state
/// of either side seen along the way (bytes).
fn converse(host: &mut Session, guest: &mut Session, n: usize, alternate: bool) -> (usize, usize) {
    let mut largest = 0;
    let mut at_tenth = 0;
    for i in 0..n {
        let host_speaks = !alternate || i % 2 == 0;
        let (from, to) = if host_speaks {
            (&mut *host, &mut *guest)
        } else {
            (&mut *guest, &mut *host)
        };
        let (_, frame) = from.seal(&text(&format!("message {i}"))).unwrap();
        assert_eq!(deliver(to, &frame).unwrap(), [format!("message {i}")]);
        acknowledge(to, from);
        if i % 500 == 0 || i == n - 1 {
            let size = save(host).len().max(save(guest).len());
            largest = largest.max(size);
            if i == n / 10 {
                at_tenth = size;
            }
        }
    }
    (largest, at_tenth)
}

#[test]
fn ten_thousand_messages_one_way_keep_the_state_bounded() {
    long_conversation(false);
}

#[test]
fn ten_thousand_messages_taking_turns_keep_the_state_bounded() {
    long_conversation(true);
}

fn long_conversation(alternate: bool) {
    let (mut host, mut guest) = pair();
    // The guest must hear from the host first.
    let (_, hello) = host.seal(&text("start")).unwrap();
    deliver(&mut guest, &hello).unwrap();
    acknowledge(&guest, &mut host);
    let (largest, at_tenth) = converse(&mut host, &mut guest, 10_000, alternate);
    eprintln!(
        "alternate={alternate}: saved state {at_tenth} bytes at 1,000 messages, at most {largest}"
    );
    assert!(
        largest <= at_tenth + 64,
        "state grew from {at_tenth} to {largest} bytes"
    );
    assert!(largest < 4096, "{largest} bytes");
    assert!(!host.has_unacked() && !guest.has_unacked());
}

/// Both sides send; the channel loses and reorders frames; either side crashes at any point
/// and restarts from what it last saved, following the driver's rule (save after sealing and
/// before sending; save after receiving and before showing). No two different ciphertexts ever
/// go out under one ratchet key, and each side shows the other's lines exactly once, in order.
#[test]
fn crashes_anywhere_never_reuse_a_key_or_lose_a_message() {
    const N: usize = 40;
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut roll = |n: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n
    };
    let (host, guest) = pair();
    let mut live = [host, guest];
    let mut disk = [save(&live[0]), save(&live[1])];
    let mut typed = [0usize; 2];
    let mut shown: [Vec<String>; 2] = [Vec::new(), Vec::new()];
    let mut wire: Vec<(usize, String)> = Vec::new(); // (to, frame)
    let mut used_keys: std::collections::HashMap<(Vec<u8>, u32), String> =
        std::collections::HashMap::new();
    // The host speaks first (the guest cannot before it has heard the host).
    let (_, first) = live[0].seal(&text("0-0")).unwrap();
    disk[0] = save(&live[0]);
    typed[0] = 1;
    wire.push((1, first));

    for _step in 0..20_000 {
        let done = typed == [N, N]
            && shown[0].len() == N
            && shown[1].len() == N
            && !live[0].has_unacked()
            && !live[1].has_unacked();
        if done {
            break;
        }
        let side = roll(2) as usize;
        match roll(10) {
            // Type a line (the guest only once it has heard from the host).
            0..=2 if typed[side] < N && (side == 0 || live[1].received_upto() > 0) => {
                let line = format!("{side}-{}", typed[side]);
                if roll(5) == 0 {
                    // Crash before the save: a different line was sealed under the same key
                    // and is gone; the next frame must not collide with anything sent.
                    live[side].seal(&text(&format!("{line} (lost)"))).unwrap();
                    live[side] = load(&disk[side]);
                    continue;
                }
                live[side].seal(&text(&line)).unwrap();
                disk[side] = save(&live[side]);
                typed[side] += 1;
            }
            // (Re)send the unacknowledged, as on a reconnect or the retransmit timer.
            3 | 4 => {
                for (_, frame) in live[side].unacked() {
                    wire.push((1 - side, frame.to_string()));
                }
            }
            // Deliver a frame in flight (any one: reordering), or lose it.
            5..=7 if !wire.is_empty() => {
                let (to, frame) = wire.swap_remove(roll(wire.len() as u64) as usize);
                if roll(6) == 0 {
                    continue; // lost
                }
                if frame.contains("\"MSG_READ\"") {
                    // A receipt overtaken by two turns of the ratchet is refused (its chain's
                    // receipt key is gone); receipts are cumulative, a later one will do.
                    let _ = live[to].take_receipt(&Envelope::parse(&frame).unwrap());
                    continue;
                }
                let h = header(&frame);
                let previous = used_keys.insert((h.dh.to_vec(), h.n), frame.clone());
                assert!(
                    previous.is_none_or(|p| p == frame),
                    "two different messages under one key"
                );
                let lines = deliver(&mut live[to], &frame).unwrap();
                if roll(5) == 0 {
                    // Crash before the save: as if it never arrived.
                    live[to] = load(&disk[to]);
                    continue;
                }
                disk[to] = save(&live[to]);
                shown[to].extend(lines);
                let receipt = live[to]
                    .receipt(Receipt::Delivered {
                        upto: live[to].received_upto(),
                    })
                    .ok();
                wire.extend(receipt.map(|r| (1 - to, r)));
            }
            // Crash at rest.
            8 => live[side] = load(&disk[side]),
            _ => {}
        }
    }
    for (side, lines) in shown.iter().enumerate() {
        let expected: Vec<String> = (0..N).map(|i| format!("{}-{i}", 1 - side)).collect();
        assert_eq!(*lines, expected, "side {side}");
    }
}
