//! SCRAM-SHA-256 (RFC 5802/7677) without channel binding, as PostgreSQL
//! speaks it: the proxy verifies the client against the stored verifier,
//! and keeps the ClientKey the client proved, which lets it authenticate to
//! the backend as the same role (whose verifier is the same) without ever
//! knowing the password.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use rand::RngCore;
use rouse_control_api::scram;
use sha2::{Digest, Sha256};

pub(crate) const MECHANISM: &str = "SCRAM-SHA-256";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ScramError {
    #[error("malformed SCRAM message")]
    Malformed,
    #[error("channel binding is not supported")]
    ChannelBinding,
    #[error("SCRAM nonce mismatch")]
    Nonce,
    #[error("wrong password")]
    Proof,
    #[error("the backend's SCRAM parameters differ from the stored verifier")]
    Parameters,
    #[error("the backend's SCRAM signature is wrong")]
    ServerSignature,
}

/// `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Verifier {
    pub(crate) iterations: u32,
    pub(crate) salt: Vec<u8>,
    stored_key: [u8; 32],
    server_key: [u8; 32],
}

fn key32(b64: &str) -> Option<[u8; 32]> {
    B64.decode(b64).ok()?.try_into().ok()
}

impl Verifier {
    pub(crate) fn parse(s: &str) -> Option<Verifier> {
        let rest = s.strip_prefix("SCRAM-SHA-256$")?;
        let (params, keys) = rest.split_once('$')?;
        let (iterations, salt) = params.split_once(':')?;
        let (stored, server) = keys.split_once(':')?;
        Some(Verifier {
            iterations: iterations.parse().ok()?,
            salt: B64.decode(salt).ok()?,
            stored_key: key32(stored)?,
            server_key: key32(server)?,
        })
    }

    /// A verifier no password matches: unknown users fail exactly like a
    /// wrong password, so user names cannot be probed. Its salt is derived
    /// from `who` with a key of the proxy's, so that asking twice shows
    /// the same salt, as for a real user.
    pub(crate) fn impossible(mock_key: &[u8; 32], who: &str) -> Verifier {
        let salt = hmac(mock_key, who)[..16].to_vec();
        let mut stored_key = [0u8; 32];
        rand::rng().fill_bytes(&mut stored_key);
        Verifier {
            iterations: 4096,
            salt,
            stored_key,
            server_key: [0; 32],
        }
    }
}

impl Verifier {
    /// What a password must hash to: with the salt, what tells this
    /// verifier from the role's next one.
    pub(crate) fn stored_key(&self) -> &[u8; 32] {
        &self.stored_key
    }

    /// The ClientKey of `password` when it is this verifier's: a cleartext
    /// login (SQL over HTTP) ends where a SCRAM exchange does, with the key
    /// that logs in to the backend.
    pub(crate) fn client_key_for(&self, password: &str) -> Option<[u8; 32]> {
        // As libpq prepares a password; one SASLprep refuses is used as is.
        let prepared = stringprep::saslprep(password).unwrap_or(password.into());
        let salted = scram::salted_password(prepared.as_bytes(), &self.salt, self.iterations);
        let client_key = scram::client_key(&salted);
        let stored: [u8; 32] = Sha256::digest(client_key).into();
        same(&stored, &self.stored_key).then_some(client_key)
    }
}

/// Equal, in constant time: how much of a guess matched must not show.
fn same(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn hmac(key: &[u8], msg: &str) -> [u8; 32] {
    scram::hmac(key, msg.as_bytes())
}

fn xor(a: &[u8; 32], b: &[u8; 32]) -> [u8; 32] {
    std::array::from_fn(|i| a[i] ^ b[i])
}

fn nonce() -> String {
    let mut raw = [0u8; 18];
    rand::rng().fill_bytes(&mut raw);
    B64.encode(raw)
}

/// `k=v` attribute of a comma-separated SCRAM message.
fn attr(msg: &str, key: char) -> Option<&str> {
    msg.split(',')
        .find_map(|part| part.strip_prefix(key)?.strip_prefix('='))
}

/// The proxy as SCRAM server, towards the client.
pub(crate) struct ServerExchange {
    client_first_bare: String,
    server_first: String,
    nonce: String,
}

impl ServerExchange {
    /// Takes the client-first-message, returns the server-first-message.
    pub(crate) fn start(
        verifier: &Verifier,
        client_first: &str,
    ) -> Result<(ServerExchange, String), ScramError> {
        let (gs2, bare) = match client_first.split_once(',') {
            Some((flag, rest)) => {
                let (_authzid, bare) = rest.split_once(',').ok_or(ScramError::Malformed)?;
                (flag, bare)
            }
            None => return Err(ScramError::Malformed),
        };
        match gs2 {
            "n" | "y" => {}
            f if f.starts_with("p=") => return Err(ScramError::ChannelBinding),
            _ => return Err(ScramError::Malformed),
        }
        let client_nonce = attr(bare, 'r')
            .filter(|n| !n.is_empty())
            .ok_or(ScramError::Malformed)?;
        let nonce = format!("{client_nonce}{}", self::nonce());
        let server_first = format!(
            "r={nonce},s={},i={}",
            B64.encode(&verifier.salt),
            verifier.iterations
        );
        Ok((
            ServerExchange {
                client_first_bare: bare.to_string(),
                server_first: server_first.clone(),
                nonce,
            },
            server_first,
        ))
    }

    /// Checks the client-final-message; returns the ClientKey the client
    /// proved and the server-final-message.
    pub(crate) fn finish(
        self,
        verifier: &Verifier,
        client_final: &str,
    ) -> Result<([u8; 32], String), ScramError> {
        let (without_proof, proof) = client_final
            .rsplit_once(",p=")
            .ok_or(ScramError::Malformed)?;
        if attr(without_proof, 'r') != Some(self.nonce.as_str()) {
            return Err(ScramError::Nonce);
        }
        let proof: [u8; 32] = B64
            .decode(proof)
            .ok()
            .and_then(|p| p.try_into().ok())
            .ok_or(ScramError::Malformed)?;
        let auth = format!(
            "{},{},{without_proof}",
            self.client_first_bare, self.server_first
        );
        let client_key = xor(&proof, &hmac(&verifier.stored_key, &auth));
        let stored: [u8; 32] = Sha256::digest(client_key).into();
        if !same(&stored, &verifier.stored_key) {
            return Err(ScramError::Proof);
        }
        let signature = hmac(&verifier.server_key, &auth);
        Ok((client_key, format!("v={}", B64.encode(signature))))
    }
}

/// The proxy as SCRAM client, towards the backend, with a proven ClientKey.
pub(crate) struct ClientExchange {
    client_first_bare: String,
    nonce: String,
    expected_signature: Option<[u8; 32]>,
}

impl ClientExchange {
    /// The client-first-message.
    pub(crate) fn start() -> (ClientExchange, String) {
        let nonce = nonce();
        let bare = format!("n=,r={nonce}");
        let first = format!("n,,{bare}");
        (
            ClientExchange {
                client_first_bare: bare,
                nonce,
                expected_signature: None,
            },
            first,
        )
    }

    /// Takes the server-first-message, returns the client-final-message.
    pub(crate) fn respond(
        &mut self,
        verifier: &Verifier,
        client_key: &[u8; 32],
        server_first: &str,
    ) -> Result<String, ScramError> {
        let nonce = attr(server_first, 'r').ok_or(ScramError::Malformed)?;
        if !nonce.starts_with(&self.nonce) || nonce.len() == self.nonce.len() {
            return Err(ScramError::Nonce);
        }
        let salt = attr(server_first, 's')
            .and_then(|s| B64.decode(s).ok())
            .ok_or(ScramError::Malformed)?;
        let iterations: u32 = attr(server_first, 'i')
            .and_then(|i| i.parse().ok())
            .ok_or(ScramError::Malformed)?;
        if salt != verifier.salt || iterations != verifier.iterations {
            return Err(ScramError::Parameters);
        }
        let without_proof = format!("c=biws,r={nonce}");
        let auth = format!("{},{server_first},{without_proof}", self.client_first_bare);
        let proof = xor(client_key, &hmac(&verifier.stored_key, &auth));
        self.expected_signature = Some(hmac(&verifier.server_key, &auth));
        Ok(format!("{without_proof},p={}", B64.encode(proof)))
    }

    /// Checks the server-final-message.
    pub(crate) fn verify(&self, server_final: &str) -> Result<(), ScramError> {
        let got = attr(server_final, 'v')
            .and_then(|v| B64.decode(v).ok())
            .ok_or(ScramError::Malformed)?;
        match self.expected_signature {
            Some(want) if got == want => Ok(()),
            _ => Err(ScramError::ServerSignature),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A client that knows the password, as libpq computes it.
    fn client_proof(
        password: &str,
        salt: &[u8],
        iterations: u32,
        auth: &str,
    ) -> ([u8; 32], [u8; 32]) {
        let salted = scram::salted_password(password.as_bytes(), salt, iterations);
        let client_key = scram::client_key(&salted);
        let stored: [u8; 32] = Sha256::digest(client_key).into();
        (xor(&client_key, &hmac(&stored, auth)), client_key)
    }

    fn exchange(password: &str, verifier: &Verifier) -> Result<[u8; 32], ScramError> {
        let first = "n,,n=,r=abc123";
        let (server, server_first) = ServerExchange::start(verifier, first)?;
        let nonce = attr(&server_first, 'r').unwrap();
        let without_proof = format!("c=biws,r={nonce}");
        let auth = format!("n=,r=abc123,{server_first},{without_proof}");
        let (proof, _) = client_proof(password, &verifier.salt, verifier.iterations, &auth);
        let (client_key, _) = server.finish(
            verifier,
            &format!("{without_proof},p={}", B64.encode(proof)),
        )?;
        Ok(client_key)
    }

    #[test]
    fn a_cleartext_password_gives_the_key_a_scram_exchange_proves() {
        let v = Verifier::parse(&postgres_protocol::password::scram_sha_256(b"secret")).unwrap();
        assert_eq!(
            v.client_key_for("secret"),
            Some(exchange("secret", &v).unwrap())
        );
        assert_eq!(v.client_key_for("Secret"), None);
        assert_eq!(v.client_key_for(""), None);
        let unknown = Verifier::impossible(&[7; 32], "alice.shop");
        assert_eq!(unknown.client_key_for("secret"), None);
    }

    #[test]
    fn right_and_wrong_passwords() {
        let v = Verifier::parse(&postgres_protocol::password::scram_sha_256(b"secret")).unwrap();
        assert!(exchange("secret", &v).is_ok());
        assert_eq!(exchange("wrong", &v), Err(ScramError::Proof));
        assert_eq!(
            exchange("secret", &Verifier::impossible(&[7; 32], "alice.shop")),
            Err(ScramError::Proof)
        );
    }

    #[test]
    fn the_proven_client_key_authenticates_to_a_backend_with_the_same_verifier() {
        let v = Verifier::parse(&postgres_protocol::password::scram_sha_256(b"secret")).unwrap();
        let client_key = exchange("secret", &v).unwrap();
        // The backend is a ServerExchange with the same verifier.
        let (mut client, first) = ClientExchange::start();
        let (backend, backend_first) = ServerExchange::start(&v, &first).unwrap();
        let fin = client.respond(&v, &client_key, &backend_first).unwrap();
        let (_, server_final) = backend.finish(&v, &fin).unwrap();
        assert_eq!(client.verify(&server_final), Ok(()));
        assert_eq!(client.verify("v=AAAA"), Err(ScramError::ServerSignature));
    }

    #[test]
    fn an_unknown_user_shows_the_same_salt_every_time_and_differs_per_user() {
        let salt = |who| Verifier::impossible(&[7; 32], who).salt;
        assert_eq!(salt("alice.shop"), salt("alice.shop"));
        assert_ne!(salt("alice.shop"), salt("bob.shop"));
        assert_ne!(
            Verifier::impossible(&[8; 32], "alice.shop").salt,
            salt("alice.shop")
        );
    }

    #[test]
    fn refuses_channel_binding_and_garbage() {
        let v = Verifier::impossible(&[7; 32], "alice.shop");
        assert!(matches!(
            ServerExchange::start(&v, "p=tls-server-end-point,,n=,r=x"),
            Err(ScramError::ChannelBinding)
        ));
        assert!(matches!(
            ServerExchange::start(&v, "n,,n="),
            Err(ScramError::Malformed)
        ));
        assert!(Verifier::parse("md5abc").is_none());
    }

    proptest! {
        #[test]
        fn never_panics(first in "\\PC{0,60}", last in "\\PC{0,80}") {
            let v = Verifier::impossible(&[7; 32], "alice.shop");
            if let Ok((server, _)) = ServerExchange::start(&v, &first) {
                let _ = server.finish(&v, &last);
            }
            let (mut c, _) = ClientExchange::start();
            let _ = c.respond(&v, &[0; 32], &last);
        }
    }
}
