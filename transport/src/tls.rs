//! The coordinator's TLS identity and how agents pin it.
//!
//! A coordinator holds one self-signed certificate; agents trust exactly that certificate,
//! named by the SHA-256 fingerprint of its DER encoding, so no CA is needed on a fleet.

use sha2::{Digest, Sha256};

/// Server name the coordinator's certificate is issued for and agents ask for.
pub const SERVER_NAME: &str = "ddome-coordinator";

/// A certificate and its private key, both DER.
#[derive(Clone)]
pub struct Identity {
    /// X.509 certificate, DER.
    pub cert_der: Vec<u8>,
    /// PKCS#8 private key, DER.
    pub key_der: Vec<u8>,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        f.debug_struct("Identity")
            .field("fingerprint", &fingerprint(&self.cert_der))
            .finish_non_exhaustive()
    }
}

/// Why an identity could not be made.
#[derive(Debug, thiserror::Error)]
#[error("generating the TLS certificate: {0}")]
pub struct IdentityError(#[from] rcgen::Error);

impl Identity {
    /// A fresh key pair and a self-signed certificate for [`SERVER_NAME`] (plus `extra_names`).
    pub fn self_signed(extra_names: &[String]) -> Result<Self, IdentityError> {
        let mut names = vec![SERVER_NAME.to_string()];
        names.extend(extra_names.iter().cloned());
        let certified = rcgen::generate_simple_self_signed(names)?;
        Ok(Self {
            cert_der: certified.cert.der().to_vec(),
            key_der: certified.signing_key.serialize_der(),
        })
    }

    /// The certificate's fingerprint, as agents pin it.
    pub fn fingerprint(&self) -> String {
        fingerprint(&self.cert_der)
    }
}

/// SHA-256 of a DER certificate, lower-case hex (64 characters).
pub fn fingerprint(cert_der: &[u8]) -> String {
    hex::encode(Sha256::digest(cert_der))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_identities_differ_and_fingerprints_are_sha256_hex() {
        let a = Identity::self_signed(&[]).unwrap();
        let b = Identity::self_signed(&[]).unwrap();
        assert_eq!(a.fingerprint().len(), 64);
        assert_ne!(a.fingerprint(), b.fingerprint());
        assert!(!format!("{a:?}").contains("key_der"));
    }
}
