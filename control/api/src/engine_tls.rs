//! TLS to the engines' HTTP API, as control and the proxies speak it.
//!
//! Engine certificates come from the cluster CA and name [`SERVER_NAME`],
//! whatever address the engine runs on (addresses move on wake), so a
//! client checks the chain against that CA and that one name, not the
//! address it dialled.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

/// The name in every engine certificate.
pub const SERVER_NAME: &str = "rouse-engine";

/// `GET /cluster/engine-ca`: the cluster CA that engine certificates chain
/// to (public; proxies check engines with it).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct EngineCa {
    pub pem: String,
}

/// A client configuration that trusts engines of the CA in `ca_pem`.
pub fn client_config(ca_pem: &[u8]) -> Result<Arc<ClientConfig>, String> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem) {
        let cert = cert.map_err(|e| format!("the engine CA is not PEM: {e}"))?;
        roots
            .add(cert)
            .map_err(|e| format!("the engine CA is not a certificate: {e}"))?;
    }
    if roots.is_empty() {
        return Err("the engine CA holds no certificate".into());
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let inner = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| format!("cannot verify with the engine CA: {e}"))?;
    let verifier = Arc::new(EngineName {
        inner,
        name: ServerName::try_from(SERVER_NAME).expect("a valid DNS name"),
    });
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Verifies as WebPKI does, for [`SERVER_NAME`] instead of the address.
#[derive(Debug)]
struct EngineName {
    inner: Arc<WebPkiServerVerifier>,
    name: ServerName<'static>,
}

impl ServerCertVerifier for EngineName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _dialled: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.inner
            .verify_server_cert(end_entity, intermediates, &self.name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
