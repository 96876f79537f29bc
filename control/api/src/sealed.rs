//! Secrets that cross the API or rest in `_system` only encrypted
//! (ChaCha20-Poly1305, a fresh random nonce per seal): `v1.<base64url of
//! nonce ‖ ciphertext ‖ tag>`. One format for both places, so one parser.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use chacha20poly1305::aead::{Aead, KeyInit};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

const PREFIX: &str = "v1.";
const NONCE: usize = 12;

/// A sealed secret, as text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Sealed(String);

/// A 256-bit key for [`Sealed`] values.
#[derive(Clone)]
pub struct SealKey([u8; 32]);

impl SealKey {
    /// The key for `purpose` derived from `secret` (HMAC-SHA-256), so that
    /// one secret yields unrelated keys for unrelated uses.
    pub fn derive(secret: &[u8], purpose: &str) -> SealKey {
        let mut mac =
            <Hmac<Sha256> as Mac>::new_from_slice(secret).expect("HMAC takes any key length");
        mac.update(purpose.as_bytes());
        SealKey(mac.finalize().into_bytes().into())
    }

    /// The key an API answer is sealed with for the caller whose bearer
    /// token is `token`: only that caller can open it.
    pub fn for_bearer(token: &str) -> SealKey {
        SealKey::derive(token.as_bytes(), "rouse: sealed for the bearer")
    }

    pub fn seal(&self, plaintext: &[u8]) -> Sealed {
        let nonce: [u8; NONCE] = rand::random();
        let cipher = ChaCha20Poly1305::new(Key::from_slice(&self.0));
        let mut out = nonce.to_vec();
        out.extend(
            cipher
                .encrypt(Nonce::from_slice(&nonce), plaintext)
                .expect("encryption in memory does not fail"),
        );
        Sealed(format!("{PREFIX}{}", URL_SAFE_NO_PAD.encode(out)))
    }

    /// The plaintext, or `None` for a value sealed with another key,
    /// altered, or not sealed at all.
    pub fn open(&self, sealed: &Sealed) -> Option<Vec<u8>> {
        let bytes = URL_SAFE_NO_PAD
            .decode(sealed.0.strip_prefix(PREFIX)?)
            .ok()?;
        if bytes.len() < NONCE {
            return None;
        }
        let (nonce, ciphertext) = bytes.split_at(NONCE);
        ChaCha20Poly1305::new(Key::from_slice(&self.0))
            .decrypt(Nonce::from_slice(nonce), ciphertext)
            .ok()
    }
}

impl Sealed {
    /// Text as stored; [`Sealed::is_sealed`] tells whether it is one.
    pub fn from_text(text: impl Into<String>) -> Sealed {
        Sealed(text.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `text` has the form of a sealed value (rows written before
    /// secrets were sealed hold them in clear).
    pub fn is_sealed(text: &str) -> bool {
        text.starts_with(PREFIX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn only_the_same_key_opens() {
        let key = SealKey::derive(b"cluster", "secrets at rest");
        let sealed = key.seal(b"hunter2");
        assert!(!sealed.as_str().contains("hunter2"));
        assert_eq!(key.open(&sealed).unwrap(), b"hunter2");
        assert_ne!(key.seal(b"hunter2"), sealed, "the nonce is fresh");
        assert!(SealKey::derive(b"cluster", "other").open(&sealed).is_none());
        assert!(SealKey::for_bearer("t1").open(&sealed).is_none());
        // One bit flipped anywhere (here: in the ciphertext) and it opens no more.
        let mut bytes = URL_SAFE_NO_PAD
            .decode(sealed.as_str().strip_prefix(PREFIX).unwrap())
            .unwrap();
        bytes[NONCE] ^= 1;
        let altered = format!("{PREFIX}{}", URL_SAFE_NO_PAD.encode(bytes));
        assert!(key.open(&Sealed::from_text(altered)).is_none());
        assert!(key.open(&Sealed::from_text("hunter2")).is_none());
    }

    proptest! {
        #[test]
        fn anything_sealed_opens_and_no_text_panics(plain: Vec<u8>, junk: String) {
            let key = SealKey::derive(b"k", "p");
            prop_assert_eq!(key.open(&key.seal(&plain)), Some(plain));
            let _ = key.open(&Sealed::from_text(format!("v1.{junk}")));
        }
    }
}
