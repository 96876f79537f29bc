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

    /// Deletes an app: its databases are dropped (stopped, data removed),
    /// its keys revoked and its logins removed, on every proxy at once.
    /// `confirm` must repeat the app's name.
    pub async fn delete_app(&self, app: &Name, confirm: Option<&str>) -> Result<AppDeleted> {
        self.require_app(app).await?;
        let databases = self.store.databases(Some(app)).await?;
        if confirm != Some(app.as_str()) {
            return Err(ControlError::BadRequest(format!(
                "deleting app {app} drops its {} databases with their data, its keys and its logins: repeat its name as ?confirm={app}",
                databases.len()
            )));
        }
        let _guard = self.creating.lock().await;
        for rec in &databases {
            self.drop_database(&rec.key).await?;
        }
        let keys = self.store.list_keys(app).await?;
        let users = self.store.users(app).await?;
        self.store
            .delete_app(app, &[first_access_setting(app)])
            .await?;
        for (id, _) in &keys {
            self.publish(Event::KeyRevoked {
                app: app.clone(),
                id: id.clone(),
            });
        }
        for u in &users {
            self.publish(Event::UserChanged {
                app: app.clone(),
                name: u.name.clone(),
            });
        }
        info!(app = %app, databases = databases.len(), keys = keys.len(), users = users.len(), "app deleted");
        Ok(AppDeleted {
            app: app.clone(),
            databases: databases.into_iter().map(|r| r.key.db).collect(),
            keys: keys.len(),
            users: users.len(),
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
        self.user_changed(app, name).await?;
        info!(app = %app, user = name, "Postgres user saved");
        Ok(UserInfo {
            app: app.clone(),
            name: name.to_string(),
            scram_verifier: user.verifier,
        })
    }

    /// Removes a login: every proxy refuses it from now on, and running
    /// databases of the app take its LOGIN away (the others at their next
    /// start).
    pub async fn delete_user(&self, app: &Name, name: &str) -> Result<()> {
        if !self.store.delete_user(app, name).await? {
            return Err(ControlError::NotFound(format!(
                "app {app} has no user {name}"
            )));
        }
        self.user_changed(app, name).await?;
        info!(app = %app, user = name, "Postgres user removed");
        Ok(())
    }

    /// Tells the proxies first (a removed or changed login must stop
    /// working at once), then brings the app's running Postgres databases
    /// in line with its users; the others follow when they next start.
    async fn user_changed(&self, app: &Name, name: &str) -> Result<()> {
        self.publish(Event::UserChanged {
            app: app.clone(),
            name: name.to_string(),
        });
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
        Ok(())
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
