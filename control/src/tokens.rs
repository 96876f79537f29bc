//! Control API tokens: who is calling, and in which role.
//!
//! Tokens live in `_system` as SHA-256 hashes, so one works on every node
//! and a copy of `_system` grants nothing. The node that founds `_system`
//! makes the first `admin` and `proxy` tokens and writes them to
//! `<data_dir>/tokens/` (0600), so that a local proxy and the command line
//! need no set-up step.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rouse_control_api::access::TOKENS_DIR;
use rouse_control_api::{Role, TokenCreated, TokenInfo};
use rouse_runtime::clock::now_ms;

use crate::error::{ControlError, Result};
use crate::meta::Store;
use crate::secrets::{hash_bearer_secret, new_token, write_private};

/// How long a checked token is believed without asking `_system` again:
/// a token revoked on another node stops working within this time (at
/// once on the node that revoked it).
const BELIEVED_FOR: Duration = Duration::from_secs(5);
/// Bounds the memory of checked tokens, valid or not.
const MAX_REMEMBERED: usize = 10_000;

pub struct Tokens {
    store: Store,
    /// Hash → role (`None`: unknown) and when that was read.
    checked: Mutex<HashMap<String, (Option<Role>, Instant)>>,
}

impl Tokens {
    pub fn new(store: Store) -> Tokens {
        Tokens {
            store,
            checked: Mutex::new(HashMap::new()),
        }
    }

    /// The role of the token in an `Authorization: Bearer <token>` value.
    pub async fn role(&self, authorization: Option<&str>) -> Result<Role> {
        let token = authorization
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or(ControlError::Unauthorized)?;
        let hash = hash_bearer_secret(token);
        let remembered = self
            .checked
            .lock()
            .expect("tokens poisoned")
            .get(&hash)
            .filter(|(_, at)| at.elapsed() < BELIEVED_FOR)
            .map(|(role, _)| role.clone());
        let role = match remembered {
            Some(role) => role,
            None => {
                let role = self.store.token_role(&hash).await?;
                let mut checked = self.checked.lock().expect("tokens poisoned");
                if checked.len() >= MAX_REMEMBERED {
                    checked.clear();
                }
                checked.insert(hash, (role.clone(), Instant::now()));
                role
            }
        };
        role.ok_or(ControlError::Unauthorized)
    }

    pub async fn create(&self, role: &Role) -> Result<TokenCreated> {
        let (id, token) = new_token();
        self.store
            .insert_token(&id, role, &hash_bearer_secret(&token), now_ms())
            .await?;
        tracing::info!(%id, %role, "control token created");
        Ok(TokenCreated {
            id,
            role: role.clone(),
            token,
        })
    }

    pub async fn list(&self) -> Result<Vec<TokenInfo>> {
        self.store.tokens().await
    }

    pub async fn revoke(&self, id: &str) -> Result<()> {
        if !self.store.delete_token(id).await? {
            return Err(ControlError::NotFound(format!("no token with id {id:?}")));
        }
        self.checked.lock().expect("tokens poisoned").clear();
        tracing::info!(%id, "control token revoked");
        Ok(())
    }

    /// On the node that founded `_system` (or upgraded one made before
    /// tokens): when no admin token exists, makes an `admin` and a `proxy`
    /// token and writes them to `<data_dir>/tokens/{admin,proxy}`.
    pub async fn found(&self, data_dir: &Path) -> Result<()> {
        if self.list().await?.iter().any(|t| t.role == Role::Admin) {
            return Ok(());
        }
        let dir = data_dir.join(TOKENS_DIR);
        std::fs::create_dir_all(&dir)
            .map_err(|e| ControlError::Internal(format!("cannot create {}: {e}", dir.display())))?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).map_err(|e| {
            ControlError::Internal(format!("cannot restrict {}: {e}", dir.display()))
        })?;
        for (role, file) in [(Role::Admin, "admin"), (Role::Proxy, "proxy")] {
            let made = self.create(&role).await?;
            write_private(&dir.join(file), made.token.as_bytes())?;
        }
        tracing::info!(dir = %dir.display(), "wrote the first admin and proxy tokens");
        Ok(())
    }
}
