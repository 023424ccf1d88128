//! The Double Ratchet ("The Double Ratchet Algorithm", Perrin & Marlinspike, revision 1) over
//! the product's MODP-14 group. protocol.md 3.6 is the normative description, with vectors.
//!
//! Sans-IO and transactional: [`Ratchet::decrypt`] changes nothing unless the message
//! authenticates, so a forged or replayed message costs the receiver nothing but CPU (bounded
//! by [`MAX_SKIP`]). The caller persists the whole ratchet, together with the delivery
//! counters and the outbox, after every change and before acting on it: a key is then never
//! used twice, and the next message can always be decrypted after a crash.
//!
//! Roles: the host is Signal's Alice (it sends first: its `Hello`); the guest is Bob, and its
//! handshake DH key pair is Bob's initial ratchet key pair, which the host already holds
//! authenticated by the handshake transcript.
//!
//! Beyond Signal: every chain also yields a *receipt key* (`HMAC(CK₀, "…/receipt")`) with
//! which the receiving side authenticates its delivery receipts for that chain. Receipts do
//! not use up message keys, so a lost receipt leaves no skipped key behind, and a stolen state
//! forges receipts only for as long as it could read messages.

use std::collections::BTreeMap;

use aes_gcm::Aes256Gcm;
use aes_gcm::aead::{Aead, KeyInit, Payload};
use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use rand::TryRngCore;
use sha2::Sha256;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::dh::{self, DhError, DhKeyPair, ELEMENT_BYTES};
use crate::keys::SecretKey;

pub const LABEL_ROOT: &[u8] = b"parley/v1/ratchet/root";
pub const LABEL_CHAIN: &[u8] = b"parley/v1/ratchet/chain";
pub const LABEL_MESSAGE_KEY: &[u8] = b"parley/v1/ratchet/message-key";
pub const LABEL_RECEIPT_KEY: &[u8] = b"parley/v1/ratchet/receipt-key";
pub const LABEL_MESSAGE_AEAD: &[u8] = b"parley/v1/ratchet/message-aead";

/// `dh (256) || pn (u32 BE) || n (u32 BE)`.
pub const HEADER_BYTES: usize = ELEMENT_BYTES + 8;
pub const NONCE_BYTES: usize = 12;
pub const TAG_BYTES: usize = 16;

/// The most message keys one message may make the receiver skip (and so compute), and the most
/// skipped keys it keeps in all. A conforming sender has at most 64 messages unacknowledged
/// (protocol.md 3.7), so honest traffic stays far below it.
pub const MAX_SKIP: u32 = 1000;
/// Skipped keys expire once this many newer receiving chains have started: a message skipped
/// over is resent within the sender's window of 64, and each newer chain needs a round trip.
pub const MAX_SKIPPED_AGE: u64 = 128;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RatchetError {
    #[error("message too short to hold a ratchet header and tag")]
    Malformed,
    #[error("the peer's ratchet key is invalid: {0}")]
    PeerKey(DhError),
    #[error(
        "message {n} of its chain is {ahead} ahead of the next expected; more than {MAX_SKIP} skipped messages are refused"
    )]
    TooFarAhead { n: u32, ahead: u64 },
    #[error(
        "that message's key was already used or has expired (a replay, or a message older than the stored skipped keys)"
    )]
    KeyGone,
    #[error(
        "message failed authentication (tampered, replayed into another place, or not for this session)"
    )]
    Authentication,
    #[error("cannot send yet: the peer's first message has not arrived")]
    NotReady,
    #[error("this chain has used up its message numbers")]
    Exhausted,
    #[error("the operating system's random source failed")]
    Random,
}

/// A message header: the sender's current ratchet public key, the length of its previous
/// sending chain, and this message's number in the current one. Sent in clear and
/// authenticated as associated data.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Header {
    pub dh: [u8; ELEMENT_BYTES],
    pub pn: u32,
    pub n: u32,
}

impl Header {
    pub fn to_bytes(&self) -> [u8; HEADER_BYTES] {
        let mut out = [0u8; HEADER_BYTES];
        let (dh, counters) = out.split_at_mut(ELEMENT_BYTES);
        dh.copy_from_slice(&self.dh);
        let (pn, n) = counters.split_at_mut(4);
        pn.copy_from_slice(&self.pn.to_be_bytes());
        n.copy_from_slice(&self.n.to_be_bytes());
        out
    }

    /// Splits `header || rest`.
    pub fn parse(bytes: &[u8]) -> Result<(Header, &[u8]), RatchetError> {
        let (dh, rest) = bytes
            .split_first_chunk::<ELEMENT_BYTES>()
            .ok_or(RatchetError::Malformed)?;
        let (pn, rest) = rest
            .split_first_chunk::<4>()
            .ok_or(RatchetError::Malformed)?;
        let (n, rest) = rest
            .split_first_chunk::<4>()
            .ok_or(RatchetError::Malformed)?;
        let header = Header {
            dh: *dh,
            pn: u32::from_be_bytes(*pn),
            n: u32::from_be_bytes(*n),
        };
        Ok((header, rest))
    }
}

/// A sending or receiving chain: its current chain key and the receipt key fixed at its start.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
struct Chain {
    key: [u8; 32],
    receipt: [u8; 32],
}

impl Chain {
    fn start(key: &[u8; 32]) -> Chain {
        Chain {
            receipt: *hmac(key, LABEL_RECEIPT_KEY),
            key: *key,
        }
    }

    /// KDF_CK: the next message key, and the chain moves on (the old chain key is gone).
    fn step(&mut self) -> SecretKey {
        let message_key = SecretKey::from_bytes(*hmac(&self.key, LABEL_MESSAGE_KEY));
        self.key = *hmac(&self.key, LABEL_CHAIN);
        message_key
    }
}

/// Message keys skipped over in one of the peer's chains.
#[derive(Clone)]
struct SkippedChain {
    peer: [u8; ELEMENT_BYTES],
    /// `recv_steps` when the keys were skipped: their age.
    step: u64,
    keys: BTreeMap<u32, SecretKey>,
}

/// One side's ratchet state. Field names follow the specification (DHs, DHr, RK, CKs, CKr,
/// Ns, Nr, PN, MKSKIPPED).
#[derive(Clone)]
pub struct Ratchet {
    root: SecretKey,
    own: DhKeyPair,
    peer: Option<[u8; ELEMENT_BYTES]>,
    send: Option<Chain>,
    recv: Option<Chain>,
    send_n: u32,
    recv_n: u32,
    prev_send_n: u32,
    prev_send_receipt: Option<SecretKey>,
    /// Oldest first.
    skipped: Vec<SkippedChain>,
    recv_steps: u64,
}

/// Where new ratchet key pairs come from: the OS in the product, fixed values in test vectors.
pub type KeySource<'a> = &'a mut dyn FnMut() -> Result<DhKeyPair, DhError>;

impl Ratchet {
    /// Alice (the host): `own` is a fresh key pair, `peer` Bob's (the guest's) handshake key.
    pub fn initiator(
        root: SecretKey,
        own: DhKeyPair,
        peer: &[u8],
    ) -> Result<Ratchet, RatchetError> {
        let peer_key: [u8; ELEMENT_BYTES] = peer.try_into().map_err(|_| RatchetError::Malformed)?;
        let shared = own.shared_secret(peer).map_err(RatchetError::PeerKey)?;
        let (next_root, chain) = kdf_rk(&root, shared.as_ref());
        // Bob's start, plus the half DH step Alice does before her first message.
        Ok(Ratchet {
            root: next_root,
            peer: Some(peer_key),
            send: Some(Chain::start(&chain)),
            ..Ratchet::responder(root, own)
        })
    }

    /// Bob (the guest): `own` is its handshake key pair. It cannot send until Alice's first
    /// message arrives.
    pub fn responder(root: SecretKey, own: DhKeyPair) -> Ratchet {
        Ratchet {
            root,
            own,
            peer: None,
            send: None,
            recv: None,
            send_n: 0,
            recv_n: 0,
            prev_send_n: 0,
            prev_send_receipt: None,
            skipped: Vec::new(),
            recv_steps: 0,
        }
    }

    /// RatchetEncrypt: `header || nonce || ciphertext || tag`, associated data `ad || header`.
    pub fn encrypt(&mut self, plaintext: &[u8], ad: &[u8]) -> Result<Vec<u8>, RatchetError> {
        let mut nonce = [0u8; NONCE_BYTES];
        rand::rngs::OsRng
            .try_fill_bytes(&mut nonce)
            .map_err(|_| RatchetError::Random)?;
        self.encrypt_with_nonce(plaintext, ad, &nonce)
    }

    /// [`Self::encrypt`] with a given nonce (test vectors only need this to be public).
    pub fn encrypt_with_nonce(
        &mut self,
        plaintext: &[u8],
        ad: &[u8],
        nonce: &[u8; NONCE_BYTES],
    ) -> Result<Vec<u8>, RatchetError> {
        let chain = self.send.as_mut().ok_or(RatchetError::NotReady)?;
        let next_n = self.send_n.checked_add(1).ok_or(RatchetError::Exhausted)?;
        let header = Header {
            dh: *self.own.public(),
            pn: self.prev_send_n,
            n: self.send_n,
        }
        .to_bytes();
        let message_key = chain.step();
        self.send_n = next_n;
        Ok(seal_message(&message_key, &header, nonce, plaintext, ad))
    }

    /// RatchetDecrypt, all or nothing: on any error the state is as it was.
    pub fn decrypt(
        &mut self,
        message: &[u8],
        ad: &[u8],
        new_key_pair: KeySource<'_>,
    ) -> Result<Zeroizing<Vec<u8>>, RatchetError> {
        let (header, _) = Header::parse(message)?;
        if let Some(plaintext) = self.try_skipped(&header, message, ad)? {
            return Ok(plaintext);
        }
        let mut next = self.clone();
        let new_peer_key = next.peer.as_ref() != Some(&header.dh);
        if new_peer_key {
            next.skip_to(header.pn)?;
            next.start_receiving_chain(&header.dh)?;
        }
        if header.n < next.recv_n {
            return Err(RatchetError::KeyGone);
        }
        next.skip_to(header.n)?;
        let message_key = next.recv.as_mut().ok_or(RatchetError::KeyGone)?.step();
        next.recv_n = next.recv_n.checked_add(1).ok_or(RatchetError::Exhausted)?;
        let plaintext = open_message(&message_key, message, ad)?;
        // Only an authentic message earns the rest of the step (a key pair and a second
        // exponentiation): a forged header costs the receiver one exponentiation, not three.
        if new_peer_key {
            next.start_sending_chain(new_key_pair)?;
        }
        *self = next;
        Ok(plaintext)
    }

    /// The key that authenticates our receipts for the peer's current chain (the one we are
    /// acknowledging), or none before the peer's first message.
    pub fn receipt_key_to_send(&self) -> Option<SecretKey> {
        self.recv
            .as_ref()
            .map(|chain| SecretKey::from_bytes(chain.receipt))
    }

    /// The keys a receipt from the peer may be under: our current sending chain's, then the
    /// previous one's (receipts sent before the peer saw our new ratchet key).
    pub fn receipt_keys_to_accept(&self) -> Vec<SecretKey> {
        self.send
            .iter()
            .map(|chain| SecretKey::from_bytes(chain.receipt))
            .chain(self.prev_send_receipt.iter().cloned())
            .collect()
    }

    /// How many skipped message keys are stored.
    pub fn skipped_keys(&self) -> usize {
        self.skipped.iter().map(|c| c.keys.len()).sum()
    }

    fn try_skipped(
        &mut self,
        header: &Header,
        message: &[u8],
        ad: &[u8],
    ) -> Result<Option<Zeroizing<Vec<u8>>>, RatchetError> {
        let Some((index, chain)) = self
            .skipped
            .iter_mut()
            .enumerate()
            .find(|(_, c)| c.peer == header.dh)
        else {
            return Ok(None);
        };
        let Some(key) = chain.keys.get(&header.n) else {
            return Ok(None);
        };
        // Deleted only once the message authenticates: a forgery must not destroy it.
        let plaintext = open_message(key, message, ad)?;
        chain.keys.remove(&header.n);
        if chain.keys.is_empty() {
            self.skipped.remove(index);
        }
        Ok(Some(plaintext))
    }

    /// SkipMessageKeys: stores the current receiving chain's keys up to (not including) `until`.
    fn skip_to(&mut self, until: u32) -> Result<(), RatchetError> {
        let Some(chain) = self.recv.as_mut() else {
            return Ok(());
        };
        if until <= self.recv_n {
            return Ok(());
        }
        let ahead = u64::from(until - self.recv_n);
        if ahead > u64::from(MAX_SKIP) {
            return Err(RatchetError::TooFarAhead { n: until, ahead });
        }
        let peer = self.peer.ok_or(RatchetError::KeyGone)?;
        let mut keys = BTreeMap::new();
        while self.recv_n < until {
            keys.insert(self.recv_n, chain.step());
            self.recv_n += 1;
        }
        match self.skipped.iter_mut().find(|c| c.peer == peer) {
            Some(existing) => existing.keys.append(&mut keys),
            None => self.skipped.push(SkippedChain {
                peer,
                step: self.recv_steps,
                keys,
            }),
        }
        // Over the bound: the oldest keys go first.
        let mut excess = self.skipped_keys().saturating_sub(MAX_SKIP as usize);
        while excess > 0 {
            let Some(oldest) = self.skipped.first_mut() else {
                break;
            };
            if oldest.keys.pop_first().is_some() {
                excess -= 1;
            }
            if oldest.keys.is_empty() {
                self.skipped.remove(0);
            }
        }
        Ok(())
    }

    /// DHRatchet, first half: a new receiving chain from the peer's new key.
    fn start_receiving_chain(&mut self, peer: &[u8; ELEMENT_BYTES]) -> Result<(), RatchetError> {
        self.prev_send_n = self.send_n;
        self.send_n = 0;
        self.recv_n = 0;
        self.peer = Some(*peer);
        let shared = self
            .own
            .shared_secret(peer)
            .map_err(RatchetError::PeerKey)?;
        let (root, chain) = kdf_rk(&self.root, shared.as_ref());
        self.root = root;
        self.recv = Some(Chain::start(&chain));
        self.recv_steps = self.recv_steps.saturating_add(1);
        let now = self.recv_steps;
        self.skipped
            .retain(|c| now.saturating_sub(c.step) < MAX_SKIPPED_AGE);
        Ok(())
    }

    /// DHRatchet, second half: a new key pair of ours and a new sending chain.
    fn start_sending_chain(&mut self, new_key_pair: KeySource<'_>) -> Result<(), RatchetError> {
        let peer = self.peer.ok_or(RatchetError::NotReady)?;
        self.own = new_key_pair().map_err(|_| RatchetError::Random)?;
        let shared = self
            .own
            .shared_secret(&peer)
            .map_err(RatchetError::PeerKey)?;
        let (root, chain) = kdf_rk(&self.root, shared.as_ref());
        self.root = root;
        self.prev_send_receipt = self
            .send
            .replace(Chain::start(&chain))
            .map(|old| SecretKey::from_bytes(old.receipt));
        Ok(())
    }

    /// The state as saved in the state file.
    pub fn record(&self) -> parley_state::RatchetRecord {
        use parley_state::{ChainRecord, Secret, SkippedChainRecord, SkippedKeyRecord};
        let chain = |c: &Chain| ChainRecord {
            chain_key: Secret::new(hex::encode(c.key)),
            receipt_key: Secret::new(hex::encode(c.receipt)),
        };
        parley_state::RatchetRecord {
            root_key: Secret::new(self.root.to_hex().to_string()),
            own_private: Secret::new(self.own.private_hex().to_string()),
            peer_public: self.peer.map(hex::encode),
            send_chain: self.send.as_ref().map(chain),
            recv_chain: self.recv.as_ref().map(chain),
            send_n: self.send_n,
            recv_n: self.recv_n,
            prev_send_n: self.prev_send_n,
            prev_send_receipt_key: self
                .prev_send_receipt
                .as_ref()
                .map(|k| Secret::new(k.to_hex().to_string())),
            skipped: self
                .skipped
                .iter()
                .map(|c| SkippedChainRecord {
                    peer_public: hex::encode(c.peer),
                    step: c.step,
                    keys: c
                        .keys
                        .iter()
                        .map(|(n, key)| SkippedKeyRecord {
                            n: *n,
                            key: Secret::new(key.to_hex().to_string()),
                        })
                        .collect(),
                })
                .collect(),
            recv_steps: self.recv_steps,
        }
    }

    /// The state from the state file; `None` names the first damaged field.
    pub fn from_record(record: &parley_state::RatchetRecord) -> Result<Ratchet, &'static str> {
        let key = |hex_key: &str, what| SecretKey::from_hex(hex_key).ok_or(what);
        let bytes32 = |hex_key: &str, what| {
            let mut out = Zeroizing::new([0u8; 32]);
            hex::decode_to_slice(hex_key, out.as_mut()).map_err(|_| what)?;
            Ok::<_, &'static str>(out)
        };
        let element = |hex_key: &str, what| {
            let mut out = [0u8; ELEMENT_BYTES];
            hex::decode_to_slice(hex_key, &mut out).map_err(|_| what)?;
            dh::validate_public(&out).map_err(|_| what)?;
            Ok::<_, &'static str>(out)
        };
        let chain = |c: &parley_state::ChainRecord| {
            Ok::<_, &'static str>(Chain {
                key: *bytes32(c.chain_key.expose(), "chain key")?,
                receipt: *bytes32(c.receipt_key.expose(), "receipt key")?,
            })
        };
        let own = DhKeyPair::from_private(*bytes32(record.own_private.expose(), "ratchet key")?);
        let mut skipped = Vec::new();
        for c in &record.skipped {
            let mut keys = BTreeMap::new();
            for k in &c.keys {
                keys.insert(k.n, key(k.key.expose(), "skipped key")?);
            }
            skipped.push(SkippedChain {
                peer: element(&c.peer_public, "skipped chain")?,
                step: c.step,
                keys,
            });
        }
        Ok(Ratchet {
            root: key(record.root_key.expose(), "root key")?,
            own,
            peer: record
                .peer_public
                .as_deref()
                .map(|p| element(p, "peer ratchet key"))
                .transpose()?,
            send: record.send_chain.as_ref().map(chain).transpose()?,
            recv: record.recv_chain.as_ref().map(chain).transpose()?,
            send_n: record.send_n,
            recv_n: record.recv_n,
            prev_send_n: record.prev_send_n,
            prev_send_receipt: record
                .prev_send_receipt_key
                .as_ref()
                .map(|k| key(k.expose(), "receipt key"))
                .transpose()?,
            skipped,
            recv_steps: record.recv_steps,
        })
    }
}

fn hmac(key: &[u8; 32], label: &[u8]) -> Zeroizing<[u8; 32]> {
    // HMAC takes keys of any length: new_from_slice cannot fail.
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(key) else {
        return Zeroizing::new([0; 32]);
    };
    mac.update(label);
    Zeroizing::new(mac.finalize().into_bytes().into())
}

/// KDF_RK: HKDF-SHA256, salt = RK, IKM = the DH output, 64 bytes: the new RK, then a chain key.
pub fn kdf_rk(root: &SecretKey, dh_output: &[u8]) -> (SecretKey, Zeroizing<[u8; 32]>) {
    let hkdf = Hkdf::<Sha256>::new(Some(root.as_bytes()), dh_output);
    let mut out = Zeroizing::new([0u8; 64]);
    // 64 bytes is far below HKDF-SHA256's limit: expand cannot fail.
    let _ = hkdf.expand(LABEL_ROOT, out.as_mut());
    let (new_root, chain) = out.split_at(32);
    let mut root_bytes = Zeroizing::new([0u8; 32]);
    let mut chain_bytes = Zeroizing::new([0u8; 32]);
    root_bytes.copy_from_slice(new_root);
    chain_bytes.copy_from_slice(chain);
    (SecretKey::from_bytes(*root_bytes), chain_bytes)
}

/// The AES-256-GCM key of one message key.
fn message_aead(message_key: &SecretKey) -> Aes256Gcm {
    let hkdf = Hkdf::<Sha256>::new(None, message_key.as_bytes());
    let mut key = Zeroizing::new([0u8; 32]);
    // 32 bytes is far below HKDF-SHA256's limit: expand cannot fail.
    let _ = hkdf.expand(LABEL_MESSAGE_AEAD, key.as_mut());
    Aes256Gcm::new(&(*key).into())
}

fn message_ad(ad: &[u8], header: &[u8]) -> Vec<u8> {
    let mut full = Vec::with_capacity(ad.len() + header.len());
    full.extend_from_slice(ad);
    full.extend_from_slice(header);
    full
}

fn seal_message(
    message_key: &SecretKey,
    header: &[u8; HEADER_BYTES],
    nonce: &[u8; NONCE_BYTES],
    plaintext: &[u8],
    ad: &[u8],
) -> Vec<u8> {
    let cipher = message_aead(message_key);
    let aad = message_ad(ad, header);
    // Only fails for plaintexts over 64 GiB, far beyond any frame.
    let sealed = cipher
        .encrypt(
            &(*nonce).into(),
            Payload {
                msg: plaintext,
                aad: &aad,
            },
        )
        .unwrap_or_default();
    let mut out = Vec::with_capacity(HEADER_BYTES + NONCE_BYTES + sealed.len());
    out.extend_from_slice(header);
    out.extend_from_slice(nonce);
    out.extend_from_slice(&sealed);
    out
}

fn open_message(
    message_key: &SecretKey,
    message: &[u8],
    ad: &[u8],
) -> Result<Zeroizing<Vec<u8>>, RatchetError> {
    let (header, rest) = message
        .split_at_checked(HEADER_BYTES)
        .ok_or(RatchetError::Malformed)?;
    let (nonce, sealed) = rest
        .split_first_chunk::<NONCE_BYTES>()
        .ok_or(RatchetError::Malformed)?;
    if sealed.len() < TAG_BYTES {
        return Err(RatchetError::Malformed);
    }
    let cipher = message_aead(message_key);
    let aad = message_ad(ad, header);
    cipher
        .decrypt(
            &(*nonce).into(),
            Payload {
                msg: sealed,
                aad: &aad,
            },
        )
        .map(Zeroizing::new)
        .map_err(|_| RatchetError::Authentication)
}

#[cfg(test)]
mod tests {
    use super::*;

    const AD: &[u8] = b"ad";

    fn fresh() -> Result<DhKeyPair, DhError> {
        DhKeyPair::generate()
    }

    /// Alice (host) and Bob (guest), as a pairing leaves them.
    fn pair() -> (Ratchet, Ratchet) {
        let root = SecretKey::from_bytes([7; 32]);
        let bob_key = DhKeyPair::generate().unwrap();
        let alice = Ratchet::initiator(root.clone(), fresh().unwrap(), bob_key.public()).unwrap();
        (alice, Ratchet::responder(root, bob_key))
    }

    fn send(from: &mut Ratchet, text: &str) -> Vec<u8> {
        from.encrypt(text.as_bytes(), AD).unwrap()
    }

    fn open(to: &mut Ratchet, message: &[u8]) -> Result<String, RatchetError> {
        to.decrypt(message, AD, &mut fresh)
            .map(|p| String::from_utf8(p.to_vec()).unwrap())
    }

    fn header(message: &[u8]) -> Header {
        Header::parse(message).unwrap().0
    }

    #[test]
    fn every_turn_of_the_conversation_is_a_new_ratchet_key() {
        let (mut alice, mut bob) = pair();
        assert_eq!(
            bob.encrypt(b"x", AD),
            Err(RatchetError::NotReady),
            "Bob waits for Alice"
        );
        let a1 = send(&mut alice, "a1");
        let a2 = send(&mut alice, "a2");
        assert_eq!(header(&a1).dh, header(&a2).dh, "same turn, same key");
        assert_eq!((header(&a1).n, header(&a2).n), (0, 1));
        assert_eq!(open(&mut bob, &a1).unwrap(), "a1");
        assert_eq!(open(&mut bob, &a2).unwrap(), "a2");
        let b1 = send(&mut bob, "b1");
        assert_ne!(header(&b1).dh, header(&a1).dh);
        assert_eq!(open(&mut alice, &b1).unwrap(), "b1");
        let a3 = send(&mut alice, "a3");
        assert_ne!(header(&a3).dh, header(&a1).dh, "Alice stepped too");
        assert_eq!(header(&a3).pn, 2, "the previous chain had two messages");
        assert_eq!(open(&mut bob, &a3).unwrap(), "a3");
    }

    #[test]
    fn out_of_order_and_lost_messages_within_max_skip_decrypt() {
        let (mut alice, mut bob) = pair();
        let first: Vec<Vec<u8>> = (0..5).map(|i| send(&mut alice, &format!("a{i}"))).collect();
        assert_eq!(open(&mut bob, &first[4]).unwrap(), "a4");
        assert_eq!(bob.skipped_keys(), 4);
        assert_eq!(open(&mut bob, &first[1]).unwrap(), "a1");
        // A turn: Bob answers; Alice's next chain starts while a0, a2, a3 are still missing.
        let b = send(&mut bob, "b");
        assert_eq!(open(&mut alice, &b).unwrap(), "b");
        let next = send(&mut alice, "next");
        let after = send(&mut alice, "after");
        assert_eq!(open(&mut bob, &after).unwrap(), "after");
        assert_eq!(open(&mut bob, &first[3]).unwrap(), "a3");
        assert_eq!(open(&mut bob, &next).unwrap(), "next");
        assert_eq!(open(&mut bob, &first[0]).unwrap(), "a0");
        assert_eq!(open(&mut bob, &first[2]).unwrap(), "a2");
        assert_eq!(
            bob.skipped_keys(),
            0,
            "every skipped key used once, then gone"
        );
        // Each key is used once: the same message again finds nothing (an old chain's key is
        // not even known as such any more).
        assert_eq!(open(&mut bob, &first[2]), Err(RatchetError::Authentication));
        assert_eq!(open(&mut bob, &after), Err(RatchetError::KeyGone));
    }

    #[test]
    fn skipping_more_than_max_skip_is_refused_and_changes_nothing() {
        let (mut alice, mut bob) = pair();
        let messages: Vec<Vec<u8>> = (0..=MAX_SKIP + 1)
            .map(|i| send(&mut alice, &i.to_string()))
            .collect();
        let too_far = messages.last().unwrap();
        let err = open(&mut bob, too_far).unwrap_err();
        assert!(matches!(err, RatchetError::TooFarAhead { n, .. } if n == MAX_SKIP + 1));
        assert!(err.to_string().contains("1000"), "{err}");
        assert_eq!(bob.skipped_keys(), 0);
        // Exactly MAX_SKIP ahead is still fine, and the rest follow.
        let limit = &messages[MAX_SKIP as usize];
        assert_eq!(open(&mut bob, limit).unwrap(), MAX_SKIP.to_string());
        assert_eq!(bob.skipped_keys(), MAX_SKIP as usize);
        assert_eq!(open(&mut bob, too_far).unwrap(), (MAX_SKIP + 1).to_string());
        assert_eq!(open(&mut bob, &messages[0]).unwrap(), "0");
    }

    #[test]
    fn forgeries_and_replays_change_nothing() {
        let (mut alice, mut bob) = pair();
        let m0 = send(&mut alice, "m0");
        let m1 = send(&mut alice, "m1");
        // A forged copy of m1: tampered body, or a header naming another key or number.
        let mut body = m1.clone();
        *body.last_mut().unwrap() ^= 1;
        let mut other_n = m1.clone();
        other_n[HEADER_BYTES - 1] = 9;
        let mut other_dh = m1.clone();
        other_dh[..ELEMENT_BYTES].copy_from_slice(fresh().unwrap().public());
        for forged in [body, other_n, other_dh] {
            assert_eq!(open(&mut bob, &forged), Err(RatchetError::Authentication));
            assert_eq!(bob.skipped_keys(), 0);
        }
        assert_eq!(open(&mut bob, &m1).unwrap(), "m1");
        // m0's key is now a skipped key: a forgery under its header must not destroy it.
        let mut forged_m0 = m0.clone();
        *forged_m0.last_mut().unwrap() ^= 1;
        assert_eq!(
            open(&mut bob, &forged_m0),
            Err(RatchetError::Authentication)
        );
        assert_eq!(open(&mut bob, &m0).unwrap(), "m0");
        assert_eq!(open(&mut bob, &m0), Err(RatchetError::KeyGone));
        assert_eq!(open(&mut bob, &[1, 2, 3]), Err(RatchetError::Malformed));
    }

    #[test]
    fn skipped_keys_expire_after_max_skipped_age_turns() {
        let (mut alice, mut bob) = pair();
        let lost = send(&mut alice, "lost");
        let kept = send(&mut alice, "kept");
        open(&mut bob, &kept).unwrap();
        assert_eq!(bob.skipped_keys(), 1);
        for turn in 0..MAX_SKIPPED_AGE {
            let b = send(&mut bob, "b");
            open(&mut alice, &b).unwrap();
            let a = send(&mut alice, "a");
            open(&mut bob, &a).unwrap();
            if turn + 1 < MAX_SKIPPED_AGE {
                assert_eq!(bob.skipped_keys(), 1, "turn {turn}");
            }
        }
        assert_eq!(bob.skipped_keys(), 0, "expired");
        assert_eq!(open(&mut bob, &lost), Err(RatchetError::Authentication));
    }

    #[test]
    fn stored_skipped_keys_are_bounded_oldest_first() {
        let (mut alice, mut bob) = pair();
        // Two chains of Alice's, each with 600 messages of which only the last arrives.
        let mut firsts = Vec::new();
        for _ in 0..2 {
            let chain: Vec<Vec<u8>> = (0..601).map(|i| send(&mut alice, &i.to_string())).collect();
            open(&mut bob, chain.last().unwrap()).unwrap();
            firsts.push((chain[0].clone(), chain[599].clone()));
            let b = send(&mut bob, "b");
            open(&mut alice, &b).unwrap();
        }
        assert_eq!(bob.skipped_keys(), MAX_SKIP as usize);
        let (oldest, newest_of_first) = &firsts[0];
        assert_eq!(
            open(&mut bob, oldest),
            Err(RatchetError::Authentication),
            "evicted"
        );
        assert_eq!(open(&mut bob, newest_of_first).unwrap(), "599");
        assert_eq!(open(&mut bob, &firsts[1].0).unwrap(), "0");
    }

    #[test]
    fn a_saved_and_loaded_ratchet_carries_on_exactly() {
        let (mut alice, mut bob) = pair();
        let a0 = send(&mut alice, "a0");
        let a1 = send(&mut alice, "a1");
        open(&mut bob, &a1).unwrap();
        let mut bob = Ratchet::from_record(&bob.record()).unwrap();
        assert_eq!(open(&mut bob, &a0).unwrap(), "a0", "skipped keys survive");
        let b = send(&mut bob, "b");
        let mut alice = Ratchet::from_record(&alice.record()).unwrap();
        assert_eq!(open(&mut alice, &b).unwrap(), "b");
        let mut damaged = alice.record();
        damaged.root_key = parley_state::Secret::new("zz".into());
        assert_eq!(Ratchet::from_record(&damaged).err(), Some("root key"));
    }

    #[test]
    fn receipt_keys_follow_the_chains() {
        let (mut alice, mut bob) = pair();
        assert!(bob.receipt_key_to_send().is_none());
        let a = send(&mut alice, "a");
        open(&mut bob, &a).unwrap();
        let old = bob.receipt_key_to_send().unwrap();
        assert!(alice.receipt_keys_to_accept().contains(&old));
        // Alice turns her ratchet: a receipt under her old chain is still accepted, once.
        let b = send(&mut bob, "b");
        open(&mut alice, &b).unwrap();
        assert!(alice.receipt_keys_to_accept().contains(&old));
        let a2 = send(&mut alice, "a2");
        open(&mut bob, &a2).unwrap();
        let new = bob.receipt_key_to_send().unwrap();
        assert_ne!(new, old);
        assert_eq!(alice.receipt_keys_to_accept().first(), Some(&new));
        let b2 = send(&mut bob, "b2");
        open(&mut alice, &b2).unwrap();
        assert!(
            !alice.receipt_keys_to_accept().contains(&old),
            "two turns later: gone"
        );
    }
}
