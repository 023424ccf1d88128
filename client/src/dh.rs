//! Finite-field Diffie-Hellman over the RFC 3526 2048-bit MODP group (group 14), generator 2.
//!
//! Private exponents are 256 random bits from the OS: RFC 3526 puts group 14 at roughly 110
//! bits of strength and asks for exponents of at least twice that; RFC 7919 (section 5.2)
//! recommends at least 225 bits for the same-size ffdhe2048. 256 bits meets both and keeps a
//! key generation to one 256-bit modular exponentiation. Public keys and the shared secret are
//! fixed-length 256-byte big-endian strings on the wire and in the key schedule.
//!
//! The exponentiations use crypto-bigint's fixed-size Montgomery form (`MontyForm<U2048>`,
//! `pow_bounded_exp` over the exponent's 256 bits): as fast as num-bigint's general `modpow`
//! on the reference machine (BENCHMARKS.md), but constant-time, with its temporaries on the
//! stack.

use std::sync::OnceLock;

use crypto_bigint::modular::{MontyForm, MontyParams};
use crypto_bigint::{Encoding, Odd, U256, U2048};
use num_bigint::BigUint;
use num_traits::One;
use rand::TryRngCore;
use zeroize::{Zeroize, Zeroizing};

/// RFC 3526, section 3: the 2048-bit MODP group's prime, big-endian hex.
pub const MODP14_PRIME_HEX: &str = "\
FFFFFFFFFFFFFFFFC90FDAA22168C234C4C6628B80DC1CD129024E088A67CC74\
020BBEA63B139B22514A08798E3404DDEF9519B3CD3A431B302B0A6DF25F1437\
4FE1356D6D51C245E485B576625E7EC6F44C42E9A637ED6B0BFF5CB6F406B7ED\
EE386BFB5A899FA5AE9F24117C4B1FE649286651ECE45B3DC2007CB8A163BF05\
98DA48361C55D39A69163FA8FD24CF5F83655D23DCA3AD961C62F356208552BB\
9ED529077096966D670C354E4ABC9804F1746C08CA18217C32905E462E36CE3B\
E39E772C180E86039B2783A2EC07A28FB5C55DF06F4C52C9DE2BCBF695581718\
3995497CEA956AE515D2261898FA051015728E5A8AACAA68FFFFFFFFFFFFFFFF";
pub const GENERATOR: u32 = 2;
/// Bytes in a group element (public key, shared secret).
pub const ELEMENT_BYTES: usize = 256;
/// Bytes of a private exponent.
pub const PRIVATE_BYTES: usize = 32;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DhError {
    #[error("peer's public key is not {ELEMENT_BYTES} bytes of hex")]
    Encoding,
    #[error("peer's public key is outside 1 < y < p-1")]
    OutOfRange,
    #[error("the operating system's random source failed")]
    Random,
}

/// The prime as a fixed-size integer (the hex constant is checked when this is compiled).
const P: U2048 = U2048::from_be_hex(MODP14_PRIME_HEX);

/// Montgomery parameters for `P`, computed once: `None` only if `P` were even, which it is not.
fn params() -> Option<&'static MontyParams<{ U2048::LIMBS }>> {
    static PARAMS: OnceLock<Option<MontyParams<{ U2048::LIMBS }>>> = OnceLock::new();
    PARAMS
        .get_or_init(|| Option::<Odd<U2048>>::from(Odd::new(P)).map(MontyParams::new_vartime))
        .as_ref()
}

/// `base^x mod p` for a 256-bit exponent, in constant time.
fn modpow(base: &U2048, private: &[u8; PRIVATE_BYTES]) -> Result<[u8; ELEMENT_BYTES], DhError> {
    let params = params().ok_or(DhError::OutOfRange)?;
    let mut x = U256::from_be_bytes(*private);
    let result = MontyForm::new(base, *params)
        .pow_bounded_exp(&x, 256)
        .retrieve();
    x.zeroize();
    Ok(result.to_be_bytes())
}

fn prime() -> BigUint {
    // The constant is valid hex; parse_bytes cannot fail on it. Fall back to zero only to
    // avoid a panic path (every public key would then be refused).
    BigUint::parse_bytes(MODP14_PRIME_HEX.as_bytes(), 16).unwrap_or_default()
}

/// One side's key pair. The private exponent is zeroized on drop. (The transient `BigUint`
/// copies num-bigint makes during exponentiation are not; the limitation is noted in
/// protocol.md.)
#[derive(Clone)]
pub struct DhKeyPair {
    private: Zeroizing<[u8; PRIVATE_BYTES]>,
    public: [u8; ELEMENT_BYTES],
}

impl DhKeyPair {
    /// A fresh key pair, its exponent straight from the OS random source.
    pub fn generate() -> Result<DhKeyPair, DhError> {
        let mut private = Zeroizing::new([0u8; PRIVATE_BYTES]);
        rand::rngs::OsRng
            .try_fill_bytes(private.as_mut())
            .map_err(|_| DhError::Random)?;
        Ok(DhKeyPair::from_private(*private))
    }

    /// A key pair from a given exponent (for test vectors).
    pub fn from_private(private: [u8; PRIVATE_BYTES]) -> DhKeyPair {
        let private = Zeroizing::new(private);
        let public = modpow(&U2048::from_u32(GENERATOR), &private).unwrap_or_else(|_| {
            // Unreachable (the prime is odd); num-bigint gives the same answer, without a panic.
            let x = BigUint::from_bytes_be(private.as_ref());
            to_element(&BigUint::from(GENERATOR).modpow(&x, &prime()))
        });
        DhKeyPair { private, public }
    }

    /// The private exponent as hex, for the state file only.
    pub fn private_hex(&self) -> Zeroizing<String> {
        Zeroizing::new(hex::encode(self.private.as_ref()))
    }

    pub fn public(&self) -> &[u8; ELEMENT_BYTES] {
        &self.public
    }

    /// `peer^x mod p`, after checking the peer's key.
    pub fn shared_secret(
        &self,
        peer_public: &[u8],
    ) -> Result<Zeroizing<[u8; ELEMENT_BYTES]>, DhError> {
        validate_public(peer_public)?;
        let y = U2048::from_be_slice(peer_public);
        let mut shared = modpow(&y, &self.private)?;
        let out = Zeroizing::new(shared);
        shared.zeroize();
        Ok(out)
    }
}

/// Refuses anything but a 256-byte value with 1 < y < p-1: 0, 1 and p-1 would force the
/// shared secret into a tiny set.
pub fn validate_public(bytes: &[u8]) -> Result<BigUint, DhError> {
    if bytes.len() != ELEMENT_BYTES {
        return Err(DhError::Encoding);
    }
    let y = BigUint::from_bytes_be(bytes);
    let p = prime();
    if y <= BigUint::one() || y >= &p - BigUint::one() {
        return Err(DhError::OutOfRange);
    }
    Ok(y)
}

fn to_element(n: &BigUint) -> [u8; ELEMENT_BYTES] {
    let bytes = n.to_bytes_be();
    let mut out = [0u8; ELEMENT_BYTES];
    // n < p < 2^2048, so it fits; left-pad with zeros to the fixed length.
    let start = ELEMENT_BYTES.saturating_sub(bytes.len());
    for (dst, src) in out.iter_mut().skip(start).zip(bytes.iter()) {
        *dst = *src;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_sides_agree() {
        let a = DhKeyPair::generate().unwrap();
        let b = DhKeyPair::generate().unwrap();
        assert_eq!(
            *a.shared_secret(b.public()).unwrap(),
            *b.shared_secret(a.public()).unwrap()
        );
    }

    #[test]
    fn weak_public_keys_are_refused() {
        let a = DhKeyPair::generate().unwrap();
        let p = prime();
        for bad in [
            BigUint::from(0u32),
            BigUint::one(),
            &p - BigUint::one(),
            p.clone(),
            &p + BigUint::one(),
        ] {
            let mut bytes = bad.to_bytes_be();
            while bytes.len() < ELEMENT_BYTES {
                bytes.insert(0, 0);
            }
            assert!(a.shared_secret(&bytes).is_err(), "{bad:x}");
        }
        assert_eq!(a.shared_secret(&[2u8; 10]).unwrap_err(), DhError::Encoding);
        let two = to_element(&BigUint::from(2u32));
        assert!(a.shared_secret(&two).is_ok());
    }

    #[test]
    fn prime_is_the_rfc_3526_group_14_prime() {
        let p = prime();
        assert_eq!(p.bits(), 2048);
        // RFC 3526: p = 2^2048 - 2^1984 - 1 + 2^64 * ( [2^1918 pi] + 124476 ).
        let low = &p % BigUint::from(1u64 << 32);
        assert_eq!(low, BigUint::from(0xFFFF_FFFFu32));
    }
}
