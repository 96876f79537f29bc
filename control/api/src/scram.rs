//! SCRAM-SHA-256 keys and verifiers as PostgreSQL stores them
//! (`SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`), for the
//! logins that control generates and the proxies use: the one home of the
//! key derivation, so that both sides derive the same.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

/// PostgreSQL's default, and what control's verifiers use.
pub const ITERATIONS: u32 = 4096;

/// RFC 5802's `Hi(password, salt, i)`: PBKDF2 with HMAC-SHA-256. The
/// password is taken as given (SASLprep is the caller's).
pub fn salted_password(password: &[u8], salt: &[u8], iterations: u32) -> [u8; 32] {
    let prf = Hmac::<Sha256>::new_from_slice(password).expect("HMAC takes any key length");
    let mut u = {
        let mut m = prf.clone();
        m.update(salt);
        m.update(&[0, 0, 0, 1]);
        <[u8; 32]>::from(m.finalize().into_bytes())
    };
    let mut salted = u;
    for _ in 1..iterations {
        let mut m = prf.clone();
        m.update(&u);
        u = m.finalize().into_bytes().into();
        for (s, b) in salted.iter_mut().zip(u) {
            *s ^= b;
        }
    }
    salted
}

/// `HMAC(key, msg)` with SHA-256.
pub fn hmac(key: &[u8], msg: &[u8]) -> [u8; 32] {
    let mut m = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
    m.update(msg);
    m.finalize().into_bytes().into()
}

/// The ClientKey of a salted password: what a client proves it knows.
pub fn client_key(salted: &[u8; 32]) -> [u8; 32] {
    hmac(salted, b"Client Key")
}

/// The verifier of `password` with `salt`, without SASLprep: for the
/// generated (ASCII) passwords of control's own logins.
pub fn verifier(password: &str, salt: &[u8]) -> String {
    let salted = salted_password(password.as_bytes(), salt, ITERATIONS);
    let stored: [u8; 32] = Sha256::digest(client_key(&salted)).into();
    let server = hmac(&salted, b"Server Key");
    format!(
        "SCRAM-SHA-256${ITERATIONS}:{}${}:{}",
        B64.encode(salt),
        B64.encode(stored),
        B64.encode(server)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pbkdf2_matches_rfc_7914s_vector() {
        // PBKDF2-HMAC-SHA256("passwd", "salt", 1), the first 32 bytes.
        assert_eq!(
            hex::encode(salted_password(b"passwd", b"salt", 1)),
            "55ac046e56e3089fec1691c22544b605f94185216dde0465e68b9d57c20dacbc"
        );
    }

    #[test]
    fn a_verifier_has_postgres_form_and_is_stable() {
        let v = verifier("secret", b"0123456789abcdef");
        assert!(
            v.starts_with("SCRAM-SHA-256$4096:MDEyMzQ1Njc4OWFiY2RlZg==$"),
            "{v}"
        );
        assert_eq!(v, verifier("secret", b"0123456789abcdef"));
        assert_ne!(v, verifier("secret", b"fedcba9876543210"));
    }
}
