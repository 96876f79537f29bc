//! API keys (shown once, stored as SHA-256) and Postgres SCRAM verifiers.

use rand::distr::{Alphanumeric, SampleString};
use sha2::{Digest, Sha256};

/// A fresh API key `ak_<32 alphanumerics>` (about 190 bits) and its public id.
pub fn new_api_key() -> (String, String) {
    new_bearer_secret("ak_")
}

/// A fresh control token `rt_<32 alphanumerics>` and its public id.
pub fn new_token() -> (String, String) {
    new_bearer_secret("rt_")
}

fn new_bearer_secret(prefix: &str) -> (String, String) {
    let mut rng = rand::rng();
    let id = Alphanumeric
        .sample_string(&mut rng, 10)
        .to_ascii_lowercase();
    let secret = format!("{prefix}{}", Alphanumeric.sample_string(&mut rng, 32));
    (id, secret)
}

/// What is stored for an API key or a token. They carry enough entropy
/// that a fast hash is the right one: there is nothing to brute-force.
pub fn hash_bearer_secret(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// A random password for the engine's own superuser.
pub fn new_password() -> String {
    Alphanumeric.sample_string(&mut rand::rng(), 32)
}

/// `SCRAM-SHA-256$4096:<salt>$<StoredKey>:<ServerKey>`, the form PostgreSQL
/// stores and accepts in `CREATE ROLE ... PASSWORD`.
pub fn scram_verifier(password: &str) -> String {
    postgres_protocol::password::scram_sha_256(password.as_bytes())
}

pub use rouse_control_api::name::validate_user_name;

/// Writes `contents` to `path` readable by its owner only (0600), replacing
/// what was there, without a moment in which others could open it. A file
/// that already is exactly that is left alone: engines' files are written
/// at every start, and a storm of wakes would otherwise make the
/// filesystem allocate hundreds of inodes.
pub fn write_private(path: &std::path::Path, contents: &[u8]) -> crate::error::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    // SAFETY: geteuid(2) has no preconditions.
    let me = unsafe { libc::geteuid() };
    let ours = std::fs::symlink_metadata(path)
        .is_ok_and(|m| m.is_file() && m.mode() & 0o7777 == 0o600 && m.uid() == me);
    if ours && std::fs::read(path).is_ok_and(|old| old == contents) {
        return Ok(());
    }
    let _ = std::fs::remove_file(path);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(contents))
        .map_err(|e| {
            crate::error::ControlError::Internal(format!("cannot write {}: {e}", path.display()))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_files_are_replaced_only_when_they_differ() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        let inode = || std::fs::metadata(&path).unwrap().ino();
        write_private(&path, b"one").unwrap();
        let first = inode();
        write_private(&path, b"one").unwrap();
        assert_eq!(inode(), first, "the same contents are left in place");
        write_private(&path, b"two").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        write_private(&path, b"two").unwrap();
        let mode = std::fs::metadata(&path).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o600, "a file others could read is written anew");
        // A link is replaced, never followed.
        let target = dir.path().join("elsewhere");
        std::fs::write(&target, b"two").unwrap();
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::remove_file(&path).unwrap();
        std::os::unix::fs::symlink(&target, &path).unwrap();
        write_private(&path, b"two").unwrap();
        assert!(std::fs::symlink_metadata(&path).unwrap().is_file());
    }

    #[test]
    fn keys_are_unique_and_hash_stably() {
        let (id1, k1) = new_api_key();
        let (id2, k2) = new_api_key();
        assert_ne!(k1, k2);
        assert_ne!(id1, id2);
        assert!(k1.starts_with("ak_") && k1.len() == 35);
        assert_eq!(hash_bearer_secret(&k1), hash_bearer_secret(&k1));
        assert_ne!(hash_bearer_secret(&k1), hash_bearer_secret(&k2));
    }

    #[test]
    fn verifier_has_postgres_form() {
        let v = scram_verifier("secret");
        assert!(v.starts_with("SCRAM-SHA-256$4096:"), "{v}");
        assert!(!v.contains('\''));
    }

    #[test]
    fn user_names() {
        assert!(validate_user_name("alice").is_ok());
        assert!(validate_user_name("app_user-1").is_ok());
        assert!(validate_user_name("alice.myapp").is_err());
        assert!(validate_user_name("Alice").is_err());
        assert!(validate_user_name("pg_monitor").is_err());
        assert!(validate_user_name("rouse_admin").is_err());
        assert!(validate_user_name("a\"; DROP").is_err());
    }
}
