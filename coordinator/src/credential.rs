//! Device names and the credentials issued at enrolment.
//!
//! A credential is 32 bytes from the operating system's CSPRNG, shown to the admin once as
//! `ddome1.<64 hex digits>`. The coordinator keeps only a random salt and
//! SHA-256(salt || secret). A slow password hash (argon2, scrypt) exists to make guessing
//! low-entropy human passwords expensive; a 256-bit random token cannot be guessed at any
//! speed, so one salted SHA-256 is as strong here and keeps authentication cheap.

use std::fmt;

use rand::TryRngCore;
use rand::rngs::OsRng;
use sha2::{Digest, Sha256};

/// Prefix of every credential's text form; the digit versions the format.
const CREDENTIAL_PREFIX: &str = "ddome1.";
/// Bytes of secret in a credential.
const SECRET_LEN: usize = 32;
/// Bytes of salt stored beside each credential's hash.
pub(crate) const SALT_LEN: usize = 16;
/// Longest device name, in bytes (names are ASCII).
const MAX_NAME_LEN: usize = 64;

/// A device's name, checked: 1 to 64 characters of `[A-Za-z0-9._-]`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DeviceName(String);

/// Why a string is not a device name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// The name is the empty string.
    #[error("a device name cannot be empty")]
    Empty,
    /// The name is longer than 64 characters.
    #[error("device name is {len} characters long; at most {MAX_NAME_LEN} are allowed")]
    TooLong {
        /// Length of the rejected name, in bytes.
        len: usize,
    },
    /// The name holds a character outside `[A-Za-z0-9._-]`.
    #[error(
        "device name {name:?} contains {found:?}; only A-Z, a-z, 0-9, '.', '_' and '-' are allowed"
    )]
    BadCharacter {
        /// The rejected name.
        name: String,
        /// The first character that is not allowed.
        found: char,
    },
}

impl DeviceName {
    /// Checks `name` against the allowed alphabet and length.
    pub fn new(name: &str) -> Result<Self, NameError> {
        if name.is_empty() {
            return Err(NameError::Empty);
        }
        if let Some(found) = name
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
        {
            return Err(NameError::BadCharacter {
                name: name.to_string(),
                found,
            });
        }
        // Checked after the alphabet, so the length is in characters as well as bytes.
        if name.len() > MAX_NAME_LEN {
            return Err(NameError::TooLong { len: name.len() });
        }
        Ok(Self(name.to_string()))
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for DeviceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for DeviceName {
    type Err = NameError;

    fn from_str(name: &str) -> Result<Self, NameError> {
        Self::new(name)
    }
}

/// A device's secret. `Debug` hides it; [`Credential::reveal`] is the one way to print it.
#[derive(Clone, PartialEq, Eq)]
pub struct Credential([u8; SECRET_LEN]);

/// Why a string is not a credential.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a credential is \"{CREDENTIAL_PREFIX}\" followed by {} hex digits", SECRET_LEN * 2)]
pub struct CredentialFormatError;

/// The operating system's random number generator failed.
#[derive(Debug, thiserror::Error)]
#[error("the operating system's random number generator failed: {0}")]
pub struct RandomnessError(#[from] rand::rand_core::OsError);

impl Credential {
    /// A fresh credential from the operating system's CSPRNG.
    pub fn generate() -> Result<Self, RandomnessError> {
        let mut secret = [0; SECRET_LEN];
        OsRng.try_fill_bytes(&mut secret)?;
        Ok(Self(secret))
    }

    /// Reads the text form, `ddome1.<64 hex digits>` (either case), surrounding whitespace
    /// ignored.
    pub fn parse(text: &str) -> Result<Self, CredentialFormatError> {
        let digits = text
            .trim()
            .strip_prefix(CREDENTIAL_PREFIX)
            .ok_or(CredentialFormatError)?;
        let mut secret = [0; SECRET_LEN];
        hex::decode_to_slice(digits, &mut secret).map_err(|_| CredentialFormatError)?;
        Ok(Self(secret))
    }

    /// The text form, to show the admin once or to hand to the device. Never log it.
    pub fn reveal(&self) -> String {
        format!("{CREDENTIAL_PREFIX}{}", hex::encode(self.0))
    }
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Credential(<secret>)")
    }
}

impl std::str::FromStr for Credential {
    type Err = CredentialFormatError;

    fn from_str(text: &str) -> Result<Self, CredentialFormatError> {
        Self::parse(text)
    }
}

/// What the store keeps of a credential: a random salt and SHA-256(salt || secret).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CredentialHash {
    pub(crate) salt: [u8; SALT_LEN],
    pub(crate) digest: [u8; 32],
}

impl CredentialHash {
    /// Hashes `credential` under a fresh salt.
    pub(crate) fn new(credential: &Credential) -> Result<Self, RandomnessError> {
        let mut salt = [0; SALT_LEN];
        OsRng.try_fill_bytes(&mut salt)?;
        Ok(Self {
            salt,
            digest: salted_digest(&salt, credential),
        })
    }

    /// Whether `credential` is the one this hash was made from, in time that does not
    /// depend on where the digests differ.
    pub(crate) fn verify(&self, credential: &Credential) -> bool {
        constant_time_eq(&self.digest, &salted_digest(&self.salt, credential))
    }
}

fn salted_digest(salt: &[u8], credential: &Credential) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update(salt);
    hasher.update(credential.0);
    hasher.finalize().into()
}

/// Compares two digests without an early exit, so timing does not reveal how long a
/// matching prefix an attacker has found. `black_box` keeps the optimiser from
/// reintroducing a branch.
fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let difference = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(difference) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_accept_the_allowed_alphabet_up_to_64_characters() {
        for good in ["a", "pi-4.kitchen_01", &"x".repeat(64), "A.B-C_9"] {
            assert_eq!(DeviceName::new(good).unwrap().as_str(), good);
        }
    }

    #[test]
    fn names_reject_empty_long_and_foreign_characters() {
        assert_eq!(DeviceName::new(""), Err(NameError::Empty));
        assert_eq!(
            DeviceName::new(&"x".repeat(65)),
            Err(NameError::TooLong { len: 65 })
        );
        for (bad, found) in [("a b", ' '), ("dev/1", '/'), ("é", 'é'), ("x\n", '\n')] {
            assert_eq!(
                DeviceName::new(bad),
                Err(NameError::BadCharacter {
                    name: bad.to_string(),
                    found
                })
            );
        }
    }

    #[test]
    fn credentials_round_trip_through_text_and_differ() {
        let a = Credential::generate().unwrap();
        let b = Credential::generate().unwrap();
        assert_ne!(a, b);
        let text = a.reveal();
        assert!(text.starts_with("ddome1."));
        assert_eq!(text.len(), "ddome1.".len() + 64);
        assert_eq!(Credential::parse(&text).unwrap(), a);
        assert_eq!(
            Credential::parse(&text.to_uppercase().replace("DDOME1", "ddome1")),
            Ok(a)
        );
    }

    #[test]
    fn malformed_credentials_are_rejected() {
        let good = Credential::generate().unwrap().reveal();
        for bad in [
            "",
            "ddome1.",
            &good["ddome1.".len()..],
            &good.replace("ddome1.", "ddome2."),
            &good[..good.len() - 1],
            &format!("{good}0"),
            &format!("{}g", &good[..good.len() - 1]),
        ] {
            assert_eq!(
                Credential::parse(bad),
                Err(CredentialFormatError),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn debug_hides_the_secret() {
        let credential = Credential::generate().unwrap();
        let hex_digits = &credential.reveal()["ddome1.".len()..];
        assert!(!format!("{credential:?}").contains(hex_digits));
    }

    #[test]
    fn hashes_verify_only_their_own_credential_and_salts_differ() {
        let credential = Credential::generate().unwrap();
        let first = CredentialHash::new(&credential).unwrap();
        let second = CredentialHash::new(&credential).unwrap();
        assert!(first.verify(&credential));
        assert!(second.verify(&credential));
        assert_ne!(first.salt, second.salt);
        assert_ne!(first.digest, second.digest);
        assert!(!first.verify(&Credential::generate().unwrap()));
    }

    #[test]
    fn constant_time_eq_finds_a_difference_in_any_byte() {
        let a = [7u8; 32];
        assert!(constant_time_eq(&a, &a));
        for i in 0..32 {
            let mut b = a;
            b[i] ^= 1;
            assert!(!constant_time_eq(&a, &b));
        }
    }
}
