//! The cluster key: one secret every node of a cluster holds. The node that
//! founds a cluster makes it (`<data_dir>/cluster.key`, mode 0600); a node
//! that joins is given a copy (`discovery.cluster_secret_file`), which it
//! keeps in its own data directory. Logins that every node must know, such
//! as `_system`'s, are derived from it, so that they never cross the wire.

use std::path::Path;

use hmac::{Hmac, Mac};
use rouse_config::Config;
use sha2::Sha256;

use crate::error::{ControlError, Result};
use crate::secrets::write_private;

const FILE: &str = "cluster.key";

pub struct ClusterKey(Vec<u8>);

impl ClusterKey {
    /// The key of this node's cluster: the configured file, else its own
    /// copy, else (for a node that founds a cluster) a new one.
    pub fn load(config: &Config) -> Result<ClusterKey> {
        let own = config.node.data_dir.join(FILE);
        if let Some(given) = &config.discovery.cluster_secret_file {
            let key = read(given)?;
            if read(&own).ok().as_ref().map(|k| &k.0) != Some(&key.0) {
                write_private(&own, &key.0)?;
            }
            return Ok(key);
        }
        if own.exists() {
            return read(&own);
        }
        if !config.discovery.bootstrap_peers.is_empty() {
            return Err(ControlError::BadRequest(format!(
                "this node joins a cluster but has no cluster key: set discovery.cluster_secret_file to a copy of the first node's {}",
                Path::new("<data_dir>").join(FILE).display()
            )));
        }
        let key = hex::encode(rand::random::<[u8; 32]>()).into_bytes();
        write_private(&own, &key)?;
        tracing::info!(path = %own.display(), "made the cluster key: nodes that join need a copy");
        Ok(ClusterKey(key))
    }

    /// A key that seals secrets for `purpose`, the same on every node.
    pub fn sealing(&self, purpose: &str) -> rouse_control_api::SealKey {
        rouse_control_api::SealKey::derive(&self.0, purpose)
    }

    /// The pre-shared key of the cluster's private libp2p network.
    pub fn network_key(&self) -> [u8; 32] {
        let mut out = [0u8; 32];
        hex::decode_to_slice(self.derive("libp2p private network"), &mut out)
            .expect("an HMAC-SHA-256 in hex is 32 bytes");
        out
    }

    /// A secret for `purpose`, the same on every node of the cluster.
    pub fn derive(&self, purpose: &str) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes any key length");
        mac.update(purpose.as_bytes());
        hex::encode(mac.finalize().into_bytes())
    }
}

fn read(path: &Path) -> Result<ClusterKey> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ControlError::BadRequest(format!(
            "cannot read the cluster key {}: {e}",
            path.display()
        ))
    })?;
    let key = text.trim();
    if key.len() < 32 {
        return Err(ControlError::BadRequest(format!(
            "the cluster key {} is shorter than 32 characters",
            path.display()
        )));
    }
    Ok(ClusterKey(key.as_bytes().to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &Path) -> Config {
        let mut c = Config::default();
        c.node.data_dir = dir.to_path_buf();
        c
    }

    #[test]
    fn a_founder_makes_the_key_and_a_joiner_must_be_given_it() {
        let founder = tempfile::tempdir().unwrap();
        let key = ClusterKey::load(&config(founder.path())).unwrap();
        let file = founder.path().join(FILE);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
            0o600
        );
        // The same key again after a restart.
        assert_eq!(
            ClusterKey::load(&config(founder.path()))
                .unwrap()
                .derive("x"),
            key.derive("x")
        );

        let joiner = tempfile::tempdir().unwrap();
        let mut c = config(joiner.path());
        c.discovery.bootstrap_peers = vec!["/ip4/127.0.0.1/tcp/4001".into()];
        assert!(
            ClusterKey::load(&c).is_err(),
            "a joiner made a key of its own"
        );
        c.discovery.cluster_secret_file = Some(file);
        assert_eq!(ClusterKey::load(&c).unwrap().derive("x"), key.derive("x"));
        // It keeps a copy, and restarts with it alone.
        c.discovery.cluster_secret_file = None;
        assert_eq!(ClusterKey::load(&c).unwrap().derive("x"), key.derive("x"));
        assert_ne!(key.derive("x"), key.derive("y"));
    }
}
