//! Finite-field Diffie-Hellman over the RFC 3526 2048-bit MODP group (group 14), generator 2.
//!
//! Private exponents are 256 random bits from the OS: RFC 3526 puts group 14 at roughly 110
//! bits of strength and asks for exponents of at least twice that; RFC 7919 (section 5.2)
//! recommends at least 225 bits for the same-size ffdhe2048. 256 bits meets both and keeps a
//! key generation to one 256-bit modular exponentiation. Public keys and the shared secret are
//! fixed-length 256-byte big-endian strings on the wire and in the key schedule.
//!
//! The exponentiations are OpenSSL's (libcrypto, through the `openssl` crate; built from source
//! unless `OPENSSL_NO_VENDOR=1`, see client/Cargo.toml): `BN_mod_exp` with the exponent flagged
//! `BN_FLG_CONSTTIME`, which takes OpenSSL's constant-time fixed-window exponentiation
//! (`BN_mod_exp_mont_consttime`, the one it uses for its own DH and RSA private keys; on x86-64
//! its `mulx`/`adx` assembly, with the table of powers read by a constant-time gather). That is
//! about 0.28 ms per exponentiation on the reference machine, against 0.67 ms for crypto-bigint
//! 0.6 (0.6 ms for 0.7), which brings one handshake side under 1 ms (BENCHMARKS.md). Its timing
//! depends on the exponent only through its length in 64-bit words, which is 4 unless the top
//! 64 random bits are all zero (odds 2^-64).
//!
//! What is cleared, and what is not:
//! - cleared: our copies of the exponent (`Zeroizing`); the exponent's and the result's
//!   `BIGNUM`s, which are made with `BN_secure_new` (OpenSSL cleanses a secure `BIGNUM`'s limbs
//!   when it frees or regrows them) and are also `BN_clear`ed before they are dropped; the
//!   scratch `BIGNUM`s of the `BN_CTX` (`BN_CTX_secure_new`; freed with `BN_clear_free`); the
//!   table of precomputed powers inside `BN_mod_exp_mont_consttime` (`OPENSSL_cleanse`); the
//!   byte buffer the result is read out through, and the shared secret (`Zeroizing`).
//! - not cleared: whatever OpenSSL's C and assembly routines leave in their own stack frames
//!   and in registers (as with crypto-bigint's stack temporaries before). The secure heap is
//!   not initialised, so "secure" here means cleared on free, not locked in memory. The public
//!   base (2, or the peer's public key) and the Montgomery context (made from the public prime)
//!   are not secret and are freed normally.

use std::sync::OnceLock;

use num_bigint::BigUint;
use num_traits::One;
use openssl::bn::{BigNum, BigNumContext, BigNumRef};
use rand::TryRngCore;
use zeroize::Zeroizing;

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
    /// OpenSSL could not do the arithmetic: in practice only a failed allocation.
    #[error("the big-number library (OpenSSL) failed")]
    Arithmetic,
}

/// The prime as an OpenSSL `BIGNUM`, parsed once (`None` only if OpenSSL failed to allocate).
fn prime_bn() -> Option<&'static BigNum> {
    static P: OnceLock<Option<BigNum>> = OnceLock::new();
    P.get_or_init(|| BigNum::from_hex_str(MODP14_PRIME_HEX).ok())
        .as_ref()
}

/// `base^x mod p` for a 256-bit secret exponent `x`, in constant time (see the module comment
/// for what is cleared). `base` must be below `p`: the generator, or a validated public key.
fn modpow(
    base: &BigNumRef,
    private: &[u8; PRIVATE_BYTES],
) -> Result<Zeroizing<[u8; ELEMENT_BYTES]>, DhError> {
    let p = prime_bn().ok_or(DhError::Arithmetic)?;
    let fail = |_| DhError::Arithmetic;
    let mut x = BigNum::new_secure().map_err(fail)?;
    x.copy_from_slice(private.as_ref()).map_err(fail)?;
    x.set_const_time();
    let mut result = BigNum::new_secure().map_err(fail)?;
    let mut ctx = BigNumContext::new_secure().map_err(fail)?;
    let done = result.mod_exp(base, &x, p, &mut ctx);
    x.clear();
    done.map_err(fail)?;
    let bytes = Zeroizing::new(result.to_vec_padded(ELEMENT_BYTES as i32).map_err(fail)?);
    result.clear();
    let mut out = Zeroizing::new([0u8; ELEMENT_BYTES]);
    if bytes.len() != ELEMENT_BYTES {
        return Err(DhError::Arithmetic);
    }
    out.copy_from_slice(&bytes);
    Ok(out)
}

fn prime() -> BigUint {
    // The constant is valid hex; parse_bytes cannot fail on it. Fall back to zero only to
    // avoid a panic path (every public key would then be refused).
    BigUint::parse_bytes(MODP14_PRIME_HEX.as_bytes(), 16).unwrap_or_default()
}

/// One side's key pair. The private exponent is zeroized on drop.
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
        DhKeyPair::try_from_private(private)
    }

    /// A key pair from a given exponent (test vectors, and the ratchet's key restored from the
    /// state file). Should OpenSSL fail (it can only fail to allocate), the public key is left
    /// all zeros, which every peer refuses (`validate_public`): the pairing or ratchet step
    /// then fails visibly, without a panic or a variable-time fallback.
    pub fn from_private(private: [u8; PRIVATE_BYTES]) -> DhKeyPair {
        let private = Zeroizing::new(private);
        DhKeyPair::try_from_private(private.clone()).unwrap_or(DhKeyPair {
            private,
            public: [0u8; ELEMENT_BYTES],
        })
    }

    fn try_from_private(private: Zeroizing<[u8; PRIVATE_BYTES]>) -> Result<DhKeyPair, DhError> {
        let generator = BigNum::from_u32(GENERATOR).map_err(|_| DhError::Arithmetic)?;
        let public = *modpow(&generator, &private)?;
        Ok(DhKeyPair { private, public })
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
        let y = BigNum::from_slice(peer_public).map_err(|_| DhError::Arithmetic)?;
        modpow(&y, &self.private)
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

#[cfg(test)]
mod tests {
    use super::*;

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

    /// OpenSSL's answers against num-bigint's general `modpow` (variable-time, fine for fixed
    /// test inputs), for the generator and a peer-like base, with exponents that have leading
    /// zero bytes, a top bit set, and the extremes.
    #[test]
    fn matches_num_bigint() {
        let p = prime();
        let mut exponents = vec![[0u8; PRIVATE_BYTES], [0xFF; PRIVATE_BYTES]];
        let mut small = [0u8; PRIVATE_BYTES];
        small[PRIVATE_BYTES - 1] = 5;
        exponents.push(small);
        let mut short = [0x5Au8; PRIVATE_BYTES];
        short[..9].fill(0);
        exponents.push(short);
        for i in 0..8u8 {
            exponents.push(core::array::from_fn(|j| {
                (j as u8).wrapping_mul(37) ^ i.wrapping_mul(101)
            }));
        }
        let peer = DhKeyPair::from_private([0x42; PRIVATE_BYTES]);
        let p_minus_2 = to_element(&(&p - BigUint::from(2u32)));
        for x in exponents {
            let ours = DhKeyPair::from_private(x);
            let e = BigUint::from_bytes_be(&x);
            let expect = to_element(&BigUint::from(GENERATOR).modpow(&e, &p));
            assert_eq!(ours.public(), &expect);
            for base in [peer.public(), &p_minus_2] {
                let expect = to_element(&BigUint::from_bytes_be(base).modpow(&e, &p));
                assert_eq!(*ours.shared_secret(base).unwrap(), expect);
            }
        }
    }
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
