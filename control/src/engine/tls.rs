//! TLS between the engines of different nodes: every rqlited (tenant
//! databases and `_system`) speaks Raft and its cluster service over mutual
//! TLS with certificates of the cluster CA, so a host without one cannot
//! join a Raft cluster or read its traffic.
//!
//! The CA is derived from the cluster key: every node that holds the key
//! makes the same CA certificate (Ed25519 signs deterministically, and
//! every field is fixed), and none has to be handed out. Each node makes a
//! key and certificate of its own at start, for the name [`SERVER_NAME`]
//! (engines verify that name, not addresses, which move on wake).

use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, PKCS_ED25519,
};

use crate::cluster_key::ClusterKey;
use crate::error::{ControlError, Result};

/// The name in every node certificate, verified by the engines and their
/// HTTP clients.
pub use rouse_control_api::engine_tls::SERVER_NAME;

/// File names in each replica directory (the only one a sandboxed engine
/// may read).
const CA_FILE: &str = "tls-ca.pem";
const CERT_FILE: &str = "tls-node.pem";
const KEY_FILE: &str = "tls-node.key";

/// This node's engine certificate and the cluster CA, as PEM.
pub struct NodeTls {
    ca: String,
    cert: String,
    key: String,
}

/// The PKCS#8 v1 header of an Ed25519 private key; the 32-byte seed follows.
const ED25519_PKCS8_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];

fn tls_error(e: rcgen::Error) -> ControlError {
    ControlError::Internal(format!("cannot make the engine certificates: {e}"))
}

impl NodeTls {
    pub fn new(cluster_key: &ClusterKey) -> Result<NodeTls> {
        let mut seed = [0u8; 32];
        hex::decode_to_slice(cluster_key.derive("engine cluster CA"), &mut seed)
            .expect("an HMAC-SHA-256 in hex is 32 bytes");
        let mut pkcs8 = ED25519_PKCS8_PREFIX.to_vec();
        pkcs8.extend_from_slice(&seed);
        let ca_key = KeyPair::try_from(pkcs8.as_slice()).map_err(tls_error)?;
        let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(tls_error)?;
        ca.distinguished_name
            .push(DnType::CommonName, "rouse cluster CA");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = ca.self_signed(&ca_key).map_err(tls_error)?;

        let key = KeyPair::generate_for(&PKCS_ED25519).map_err(tls_error)?;
        let mut node = CertificateParams::new(vec![SERVER_NAME.to_string()]).map_err(tls_error)?;
        node.distinguished_name
            .push(DnType::CommonName, SERVER_NAME);
        node.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        node.use_authority_key_identifier_extension = true;
        let cert = node.signed_by(&key, &ca, &ca_key).map_err(tls_error)?;
        Ok(NodeTls {
            ca: ca.pem(),
            cert: cert.pem(),
            key: key.serialize_pem(),
        })
    }

    /// Writes the CA, certificate and key into `dir` (each 0600).
    pub fn write(&self, dir: &Path) -> Result<()> {
        for (name, pem) in [
            (CA_FILE, &self.ca),
            (CERT_FILE, &self.cert),
            (KEY_FILE, &self.key),
        ] {
            crate::secrets::write_private(&dir.join(name), pem.as_bytes())?;
        }
        Ok(())
    }

    /// How control reaches engines' HTTP API over TLS.
    pub fn client_config(&self) -> Result<std::sync::Arc<rustls::ClientConfig>> {
        rouse_control_api::engine_tls::client_config(self.ca.as_bytes())
            .map_err(ControlError::Internal)
    }

    /// The cluster CA, for proxies to check engines with.
    pub fn ca_pem(&self) -> &str {
        &self.ca
    }

    /// rqlited's arguments for mutual TLS between nodes (and `https`: TLS
    /// on the HTTP API), with the files [`NodeTls::write`] put in `dir`.
    pub fn rqlited_args(dir: &Path, https: bool) -> Vec<std::ffi::OsString> {
        let mut args: Vec<std::ffi::OsString> = vec![
            "-node-ca-cert".into(),
            dir.join(CA_FILE).into(),
            "-node-cert".into(),
            dir.join(CERT_FILE).into(),
            "-node-key".into(),
            dir.join(KEY_FILE).into(),
            "-node-verify-client".into(),
            "-node-verify-server-name".into(),
            SERVER_NAME.into(),
        ];
        if https {
            args.extend([
                "-http-cert".into(),
                dir.join(CERT_FILE).into(),
                "-http-key".into(),
                dir.join(KEY_FILE).into(),
            ]);
        }
        args
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(dir: &Path) -> ClusterKey {
        let mut config = rouse_config::Config::default();
        config.node.data_dir = dir.to_path_buf();
        ClusterKey::load(&config).unwrap()
    }

    #[test]
    fn every_holder_of_the_key_makes_the_same_ca_and_its_own_node_key() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (
            NodeTls::new(&key(dir.path())).unwrap(),
            NodeTls::new(&key(dir.path())).unwrap(),
        );
        assert_eq!(a.ca, b.ca);
        assert_ne!(a.key, b.key);
        let other = tempfile::tempdir().unwrap();
        assert_ne!(NodeTls::new(&key(other.path())).unwrap().ca, a.ca);
    }
}
