//! The invite code a person reads out: `<relay code>-<secret>`, e.g. `042917-553108`.
//!
//! The relay code (6 digits) is what the relay issued and what `JOIN` carries. The secret
//! (6 more digits, about 19.9 bits, from a CSPRNG) never leaves the client:
//! it is the SPAKE2 password. Digits are easy to read aloud in any language.

use std::fmt;
use std::str::FromStr;

use rand::Rng;
use zeroize::Zeroizing;

pub const RELAY_CODE_DIGITS: usize = 6;
pub const SECRET_DIGITS: usize = 6;

/// A full invite code. The secret is zeroized on drop and never printed by `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub struct InviteCode {
    relay_code: String,
    secret: Zeroizing<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid invite code: expected {RELAY_CODE_DIGITS} digits, a dash, then {SECRET_DIGITS} digits (like 042917-553108)"
)]
pub struct BadInviteCode;

impl InviteCode {
    /// A new secret to go with the relay's code.
    pub fn with_new_secret(relay_code: &str) -> Result<InviteCode, BadInviteCode> {
        if !is_digits(relay_code, RELAY_CODE_DIGITS) {
            return Err(BadInviteCode);
        }
        // ThreadRng: a CSPRNG seeded, and periodically reseeded, from the OS.
        let n: u32 = rand::rng().random_range(0..10u32.pow(SECRET_DIGITS as u32));
        let secret = Zeroizing::new(format!("{n:0width$}", width = SECRET_DIGITS));
        Ok(InviteCode {
            relay_code: relay_code.to_string(),
            secret,
        })
    }

    /// The same secret with the relay's code (the host draws its secret before it has one).
    pub fn with_relay_code(&self, relay_code: &str) -> Result<InviteCode, BadInviteCode> {
        if !is_digits(relay_code, RELAY_CODE_DIGITS) {
            return Err(BadInviteCode);
        }
        Ok(InviteCode {
            relay_code: relay_code.to_string(),
            secret: self.secret.clone(),
        })
    }

    /// The part sent to the relay in `JOIN`.
    pub fn relay_code(&self) -> &str {
        &self.relay_code
    }

    /// The SPAKE2 password; never sent anywhere.
    pub fn secret(&self) -> &str {
        &self.secret
    }

    /// The whole code, for showing to the person who reads it out.
    pub fn reveal(&self) -> String {
        format!("{}-{}", self.relay_code, self.secret.as_str())
    }
}

fn is_digits(s: &str, n: usize) -> bool {
    s.len() == n && s.bytes().all(|b| b.is_ascii_digit())
}

impl FromStr for InviteCode {
    type Err = BadInviteCode;

    /// Accepts the code as printed; spaces around it and around the dash are forgiven.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (relay, secret) = s.trim().split_once('-').ok_or(BadInviteCode)?;
        let (relay, secret) = (relay.trim(), secret.trim());
        if !is_digits(relay, RELAY_CODE_DIGITS) || !is_digits(secret, SECRET_DIGITS) {
            return Err(BadInviteCode);
        }
        Ok(InviteCode {
            relay_code: relay.to_string(),
            secret: Zeroizing::new(secret.to_string()),
        })
    }
}

impl fmt::Debug for InviteCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "InviteCode({}-******)", self.relay_code)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_reveals() {
        let code: InviteCode = " 042917 - 553108 ".parse().unwrap();
        assert_eq!(code.relay_code(), "042917");
        assert_eq!(code.secret(), "553108");
        assert_eq!(code.reveal(), "042917-553108");
        assert!(!format!("{code:?}").contains("553108"));
    }

    #[test]
    fn rejects_malformed_codes() {
        for bad in [
            "",
            "042917",
            "042917-",
            "04291-553108",
            "042917-55310",
            "04291a-553108",
            "042917_553108",
            "042917-553108-1",
        ] {
            assert_eq!(bad.parse::<InviteCode>(), Err(BadInviteCode), "{bad}");
        }
    }

    #[test]
    fn new_secrets_are_six_digits_and_vary() {
        let a = InviteCode::with_new_secret("000001").unwrap();
        assert_eq!(a.secret().len(), SECRET_DIGITS);
        let distinct: std::collections::HashSet<String> = (0..20)
            .map(|_| {
                InviteCode::with_new_secret("000001")
                    .unwrap()
                    .secret()
                    .to_string()
            })
            .collect();
        assert!(distinct.len() > 1);
        assert!(InviteCode::with_new_secret("12345").is_err());
    }
}
