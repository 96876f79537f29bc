//! Apps, their API keys and their Postgres users. A user saved while a
//! database of the app runs is applied to it at once.

use rouse_control_api::*;
use rouse_runtime::clock::now_ms;
use tracing::info;

use super::settings::first_access_setting;
use super::Manager;
use crate::engine;
use crate::error::{ControlError, Result};
use crate::model::UserRecord;
use crate::secrets;

impl Manager {
    pub(super) async fn require_app(&self, app: &Name) -> Result<()> {
        if self.store.app_exists(app).await? {
            Ok(())
        } else {
            Err(ControlError::NotFound(format!("app {app} does not exist")))
        }
    }

    pub async fn create_app(&self, req: &CreateApp) -> Result<AppInfo> {
        let app = &req.name;
        let _guard = self.creating.lock().await;
        if self.store.app_exists(app).await? {
            return Err(ControlError::AlreadyExists(format!(
                "app {app} already exists"
            )));
        }
        let now = now_ms();
        self.store.insert_app(app, now).await?;
        if !req.create_on_first_access {
            self.store
                .set_setting(&first_access_setting(app), "false")
                .await?;
        }
        info!(app = %app, create_on_first_access = req.create_on_first_access, "app created");
        Ok(AppInfo {
            name: app.clone(),
            created_at: now,
            create_on_first_access: req.create_on_first_access,
        })
    }

    pub async fn create_key(&self, app: &Name) -> Result<ApiKeyCreated> {
        self.require_app(app).await?;
        let (id, key) = secrets::new_api_key();
        self.store
            .insert_key(app, &id, &secrets::hash_bearer_secret(&key), now_ms())
            .await?;
        info!(app = %app, key_id = %id, "API key issued");
        Ok(ApiKeyCreated {
            app: app.clone(),
            id,
            key,
        })
    }

    pub async fn list_keys(&self, app: &Name) -> Result<Vec<ApiKeyInfo>> {
        self.require_app(app).await?;
        Ok(self
            .store
            .list_keys(app)
            .await?
            .into_iter()
            .map(|(id, created_at)| ApiKeyInfo { id, created_at })
            .collect())
    }

    pub async fn revoke_key(&self, app: &Name, id: &str) -> Result<()> {
        if !self.store.delete_key(app, id).await? {
            return Err(ControlError::NotFound(format!("app {app} has no key {id}")));
        }
        info!(app = %app, key_id = %id, "API key revoked");
        self.publish(Event::KeyRevoked {
            app: app.clone(),
            id: id.to_string(),
        });
        Ok(())
    }

    pub async fn verify_key(&self, key: &str) -> Result<KeyOwner> {
        match self
            .store
            .find_key(&secrets::hash_bearer_secret(key))
            .await?
        {
            Some((app, id)) => Ok(KeyOwner { app, id }),
            None => Err(ControlError::NotFound("unknown API key".into())),
        }
    }

    pub async fn upsert_user(&self, app: &Name, name: &str, password: &str) -> Result<UserInfo> {
        secrets::validate_user_name(name).map_err(ControlError::BadRequest)?;
        if password.is_empty() {
            return Err(ControlError::BadRequest(
                "password must not be empty".into(),
            ));
        }
        self.require_app(app).await?;
        let user = UserRecord {
            name: name.to_string(),
            verifier: secrets::scram_verifier(password),
        };
        self.store.upsert_user(app, &user).await?;
        // Running Postgres databases of the app learn the role now; the
        // others when they next start.
        let users = self.store.users(app).await?;
        for rec in self.store.databases(Some(app)).await? {
            let slot = self.slot(&rec.key);
            let _deciding = slot.deciding.lock().await;
            if !self.is_up(&rec.key, &rec) {
                continue;
            }
            match rec.engine {
                Engine::Rqlite => {}
                Engine::Postgres => {
                    engine::postgres::apply_users(&rec.replicas[0], &rec.secret, &users).await?
                }
                Engine::Patroni => {
                    if let Some(reg) = self.patroni_registration(&rec.key) {
                        engine::patroni::apply_users(
                            &rec.key.app,
                            &rec.replicas,
                            &reg,
                            &rec.secret,
                            &users,
                        )
                        .await?
                    }
                }
            }
        }
        info!(app = %app, user = name, "Postgres user saved");
        self.publish(Event::UserChanged {
            app: app.clone(),
            name: name.to_string(),
        });
        Ok(UserInfo {
            app: app.clone(),
            name: name.to_string(),
            scram_verifier: user.verifier,
        })
    }

    pub async fn user(&self, app: &Name, name: &str) -> Result<UserInfo> {
        self.store
            .users(app)
            .await?
            .into_iter()
            .find(|u| u.name == name)
            .map(|u| UserInfo {
                app: app.clone(),
                name: u.name,
                scram_verifier: u.verifier,
            })
            .ok_or_else(|| ControlError::NotFound(format!("app {app} has no user {name}")))
    }
}
