//! Known-answer vectors: the values protocol.md ("Test vectors") publishes, checked against the
//! code, and checked to be the ones the document shows.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use parley::dh::DhKeyPair;
use parley::handshake::{SPAKE2_ID_GUEST, SPAKE2_ID_HOST};
use parley::keys::{self, Transcript};
use parley::message::{self, Direction};
use parley::ratchet::{HEADER_BYTES, Header, Ratchet};
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

fn session_keys() -> keys::SessionKeys {
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
    keys::derive(shared.as_ref(), &PAKE_KEY, &t)
}

#[test]
fn key_schedule_vectors() {
    let keys = session_keys();
    check("confirm_host", &keys.host_confirm.to_hex());
    check("confirm_guest", &keys.guest_confirm.to_hex());
    check("ratchet_root", &keys.ratchet_root.to_hex());
    check("safety_number", &keys.safety_number);
    check("restore_proof", &keys.restore_proof);
}

/// 32 bytes counting up from `first`: the ratchet key pairs' private exponents.
fn exponent(first: u8) -> [u8; 32] {
    std::array::from_fn(|i| first.wrapping_add(i as u8))
}

/// Checks one message's parts: its header fields, then what follows the header and nonce.
fn check_message(name: &str, message: &[u8]) {
    let (header, rest) = Header::parse(message).unwrap();
    assert_eq!(message.len(), HEADER_BYTES + rest.len());
    let sealed = &rest[12..];
    check(&format!("{name}.dh[0..16]"), &hex::encode(&header.dh[..16]));
    check(&format!("sha256({name}.dh)"), &sha(&header.dh));
    check(
        &format!("{name}.pn,n"),
        &format!("{},{}", header.pn, header.n),
    );
    check(&format!("{name}.ciphertext||tag"), &hex::encode(sealed));
}

#[test]
fn ratchet_vectors() {
    let keys = session_keys();
    let guest_handshake = DhKeyPair::from_private(guest_private());
    let h2g = |seq| message::associated_data(&SID, Direction::HostToGuest, seq);
    let g2h = |seq| message::associated_data(&SID, Direction::GuestToHost, seq);
    check("aad(host to guest, 2)", &hex::encode(h2g(2)));

    let mut host = Ratchet::initiator(
        keys.ratchet_root.clone(),
        DhKeyPair::from_private(exponent(0x41)),
        guest_handshake.public(),
    )
    .unwrap();
    let mut guest = Ratchet::responder(keys.ratchet_root.clone(), guest_handshake);
    check("host RK after start", host.record().root_key.expose());

    let hello_host = br#"{"k":"hello","name":"host"}"#;
    let text = br#"{"k":"text","text":"hello"}"#;
    let m1 = host
        .encrypt_with_nonce(hello_host, &h2g(1), &[0x01; 12])
        .unwrap();
    let m2 = host.encrypt_with_nonce(text, &h2g(2), &[0x02; 12]).unwrap();
    check_message("m1", &m1);
    check_message("m2", &m2);

    // The guest gets m2 first (m1's key is skipped), then m1.
    let mut guest_keys = [exponent(0x61), exponent(0xa1)].into_iter();
    let mut guest_source = || Ok(DhKeyPair::from_private(guest_keys.next().unwrap()));
    assert_eq!(
        *guest.decrypt(&m2, &h2g(2), &mut guest_source).unwrap(),
        text.to_vec()
    );
    assert_eq!(guest.skipped_keys(), 1);
    assert_eq!(
        *guest.decrypt(&m1, &h2g(1), &mut guest_source).unwrap(),
        hello_host.to_vec()
    );
    check("guest RK after its step", guest.record().root_key.expose());

    let hello_guest = br#"{"k":"hello","name":"guest"}"#;
    let g1 = guest
        .encrypt_with_nonce(hello_guest, &g2h(1), &[0x03; 12])
        .unwrap();
    check_message("g1", &g1);
    let mut host_keys = [exponent(0x81)].into_iter();
    let mut host_source = || Ok(DhKeyPair::from_private(host_keys.next().unwrap()));
    assert_eq!(
        *host.decrypt(&g1, &g2h(1), &mut host_source).unwrap(),
        hello_guest.to_vec()
    );
    check("host RK after its step", host.record().root_key.expose());

    let again = br#"{"k":"text","text":"again"}"#;
    let m3 = host
        .encrypt_with_nonce(again, &h2g(3), &[0x04; 12])
        .unwrap();
    check_message("m3", &m3);
    assert_eq!(
        *guest.decrypt(&m3, &h2g(3), &mut guest_source).unwrap(),
        again.to_vec()
    );
    check(
        "guest RK after receiving m3",
        guest.record().root_key.expose(),
    );
    check("m3 payload", &hex::encode(&m3));

    // The guest's receipt for m3, under the receipt key of the host's current chain.
    let receipt_key = guest.receipt_key_to_send().unwrap();
    check("receipt key (host's chain of m3)", &receipt_key.to_hex());
    let receipt_aad = [b"parley/v1/receipt".as_slice(), &SID, &[2]].concat();
    let iv: [u8; 12] = std::array::from_fn(|i| i as u8);
    let receipt = message::seal_with_iv(
        &receipt_key,
        &iv,
        &receipt_aad,
        br#"{"k":"delivered","upto":3}"#,
    );
    check("receipt", &receipt);
    assert!(host.receipt_keys_to_accept().contains(&receipt_key));
}

/// Hands the spake2 crate a fixed scalar where it asks for randomness: it reads 64 bytes and
/// reduces them, little-endian, modulo the group order; the scalar's 32 little-endian bytes
/// followed by 32 zero bytes therefore give exactly that scalar (it is below the order).
struct FixedScalar {
    bytes: [u8; 64],
    at: usize,
}

impl FixedScalar {
    /// `scalar` as big-endian hex, the way protocol.md writes it.
    fn new(scalar_be_hex: &str) -> FixedScalar {
        let mut bytes = [0u8; 64];
        let mut le = hex::decode(scalar_be_hex).unwrap();
        assert_eq!(le.len(), 32);
        le.reverse();
        bytes[..32].copy_from_slice(&le);
        FixedScalar { bytes, at: 0 }
    }
}

impl rand_core_06::RngCore for FixedScalar {
    fn next_u32(&mut self) -> u32 {
        rand_core_06::impls::next_u32_via_fill(self)
    }
    fn next_u64(&mut self) -> u64 {
        rand_core_06::impls::next_u64_via_fill(self)
    }
    fn fill_bytes(&mut self, dest: &mut [u8]) {
        let end = self.at + dest.len();
        dest.copy_from_slice(&self.bytes[self.at..end]);
        self.at = end;
    }
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand_core_06::Error> {
        self.fill_bytes(dest);
        Ok(())
    }
}

impl rand_core_06::CryptoRng for FixedScalar {}

/// SPAKE2 (3.4) with fixed scalars: the messages each side sends and the key both get.
#[test]
fn spake2_vectors() {
    use spake2::{Ed25519Group, Identity, Password, Spake2};
    const HOST_SCALAR: &str = "0111111111111111111111111111111111111111111111111111111111111111";
    const GUEST_SCALAR: &str = "0222222222222222222222222222222222222222222222222222222222222222";
    check("spake2 password", "553108");
    check("spake2 host scalar x", HOST_SCALAR);
    check("spake2 guest scalar y", GUEST_SCALAR);
    let password = Password::new(b"553108");
    let (host, host_msg) = Spake2::<Ed25519Group>::start_a_with_rng(
        &password,
        &Identity::new(SPAKE2_ID_HOST),
        &Identity::new(SPAKE2_ID_GUEST),
        FixedScalar::new(HOST_SCALAR),
    );
    let (guest, guest_msg) = Spake2::<Ed25519Group>::start_b_with_rng(
        &password,
        &Identity::new(SPAKE2_ID_HOST),
        &Identity::new(SPAKE2_ID_GUEST),
        FixedScalar::new(GUEST_SCALAR),
    );
    check("spake2 host message", &hex::encode(&host_msg));
    check("spake2 guest message", &hex::encode(&guest_msg));
    let key = host.finish(&guest_msg).unwrap();
    assert_eq!(key, guest.finish(&host_msg).unwrap());
    check("spake2 key", &hex::encode(&key));
}
