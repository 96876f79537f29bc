//! The node's libp2p identity: an ed25519 key kept owner-only under
//! `node.data_dir`, so that a restarted node is the same peer to the others.

use std::path::Path;

use libp2p::identity::Keypair;
use tracing::info;

use super::wire::PeersError;

/// The node's libp2p key, under `node.data_dir`.
const KEY_FILE: &str = "p2p_key";

/// The node's key from `<data_dir>/p2p_key`, made (owner-only) on first use.
pub(super) fn load_or_create_key(data_dir: &Path) -> Result<Keypair, PeersError> {
    let path = data_dir.join(KEY_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => {
            return Keypair::from_protobuf_encoding(&bytes).map_err(|e| PeersError::KeyDecode {
                path,
                message: e.to_string(),
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(PeersError::KeyIo {
                what: "read",
                path,
                source,
            })
        }
    }
    let key = Keypair::generate_ed25519();
    let bytes = key
        .to_protobuf_encoding()
        .map_err(|e| PeersError::Setup(format!("cannot encode the libp2p key: {e}")))?;
    write_private(&path, &bytes).map_err(|source| PeersError::KeyIo {
        what: "write",
        path: path.clone(),
        source,
    })?;
    info!(path = %path.display(), "made a new libp2p key");
    Ok(key)
}

/// Writes through a temporary file (a crash never leaves half a key) that
/// only the owner can read (the key is the node's identity).
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_is_kept_across_loads() {
        let dir = tempfile::tempdir().unwrap();
        let a = load_or_create_key(dir.path()).unwrap();
        let b = load_or_create_key(dir.path()).unwrap();
        assert_eq!(a.public().to_peer_id(), b.public().to_peer_id());
        let mode = std::fs::metadata(dir.path().join(KEY_FILE)).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(mode.permissions().mode() & 0o777, 0o600);
    }
}
