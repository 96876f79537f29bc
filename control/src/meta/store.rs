//! Metadata in the `_system` rqlite database: apps, API keys, control
//! tokens, Postgres users, databases and where their replicas run. Keys and
//! tokens are kept as hashes; database secrets sealed with a key derived
//! from the cluster key, so that a copy of `_system` alone gives none away. rqlite's Raft, not home-made
//! consistency, keeps it safe (one node here, three across nodes).

use rouse_control_api::{DatabaseStatus, DbKey, Name, Role, SealKey, Sealed, TokenInfo};
use serde_json::Value;

use crate::error::{ControlError, Result};
use crate::model::{DatabaseRecord, ReplicaRecord, UserRecord};
use crate::rqlite::{RqliteClient, RqliteError, Stmt};

const SCHEMA: [&str; 9] = [
    "CREATE TABLE IF NOT EXISTS apps (name TEXT PRIMARY KEY, created_at INTEGER NOT NULL)",
    "CREATE TABLE IF NOT EXISTS api_keys (id TEXT PRIMARY KEY, app TEXT NOT NULL, hash TEXT NOT NULL UNIQUE, created_at INTEGER NOT NULL)",
    "CREATE TABLE IF NOT EXISTS pg_users (app TEXT NOT NULL, name TEXT NOT NULL, verifier TEXT NOT NULL, PRIMARY KEY (app, name))",
    "CREATE TABLE IF NOT EXISTS databases (app TEXT NOT NULL, name TEXT NOT NULL, engine TEXT NOT NULL, replication_factor INTEGER NOT NULL, status TEXT NOT NULL, reason TEXT, created_at INTEGER NOT NULL, last_activity INTEGER NOT NULL, last_wake_ms INTEGER, secret TEXT NOT NULL, PRIMARY KEY (app, name))",
    "CREATE TABLE IF NOT EXISTS replicas (app TEXT NOT NULL, db TEXT NOT NULL, idx INTEGER NOT NULL, node_id TEXT NOT NULL, host TEXT NOT NULL, port INTEGER NOT NULL, raft_port INTEGER, PRIMARY KEY (app, db, idx))",
    "CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS tokens (id TEXT PRIMARY KEY, role TEXT NOT NULL, hash TEXT NOT NULL UNIQUE, created_at INTEGER NOT NULL)",
    "CREATE TABLE IF NOT EXISTS members (peer_id TEXT PRIMARY KEY, node_id TEXT NOT NULL, recorded_at INTEGER NOT NULL)",
    "CREATE TABLE IF NOT EXISTS decisions (at INTEGER NOT NULL, coordinator TEXT NOT NULL, kind TEXT NOT NULL, app TEXT NOT NULL, db TEXT NOT NULL, detail TEXT NOT NULL)",
];

impl From<RqliteError> for ControlError {
    fn from(e: RqliteError) -> Self {
        ControlError::Store(e.to_string())
    }
}

#[derive(Clone)]
pub struct Store {
    pub(super) db: RqliteClient,
    /// Seals secrets at rest.
    sealing: SealKey,
    /// Writes of one database's row, which come in bursts.
    row_writes: std::sync::Arc<super::batch::WriteBatch>,
    /// Records of hibernated databases for their next wake.
    handoffs: std::sync::Arc<super::handoff::Handoffs>,
}

pub(super) fn text(v: &Value) -> String {
    v.as_str().unwrap_or_default().to_string()
}

pub(super) fn int(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

pub(super) fn corrupt(what: &str) -> ControlError {
    ControlError::Store(format!("unreadable {what} row in _system"))
}

impl Store {
    /// Opens the store and creates its tables when they are missing.
    /// Secrets that rows written by older versions hold in clear are sealed.
    pub async fn open(db: RqliteClient, sealing: SealKey) -> Result<Store> {
        db.execute(SCHEMA.iter().map(|s| Stmt::new(*s)).collect())
            .await?;
        let store = Store {
            db,
            sealing,
            row_writes: Default::default(),
            handoffs: Default::default(),
        };
        store.seal_clear_secrets().await?;
        Ok(store)
    }

    async fn seal_clear_secrets(&self) -> Result<()> {
        let r = self
            .db
            .query(Stmt::new("SELECT app, name, secret FROM databases"))
            .await?;
        let updates: Vec<Stmt> = r
            .values
            .iter()
            .filter(|row| !Sealed::is_sealed(&text(&row[2])))
            .map(|row| {
                Stmt::new(
                    "UPDATE databases SET secret = ? WHERE app = ? AND name = ? AND secret = ?",
                )
                .arg(self.seal(&text(&row[2])))
                .arg(text(&row[0]))
                .arg(text(&row[1]))
                .arg(text(&row[2]))
            })
            .collect();
        if !updates.is_empty() {
            tracing::info!(
                count = updates.len(),
                "sealing database secrets kept in clear by an older version"
            );
            self.db.execute(updates).await?;
        }
        Ok(())
    }

    fn seal(&self, secret: &str) -> String {
        self.sealing.seal(secret.as_bytes()).as_str().to_string()
    }

    pub(super) fn unseal(&self, stored: &str) -> Result<String> {
        self.sealing
            .open(&Sealed::from_text(stored))
            .and_then(|s| String::from_utf8(s).ok())
            .ok_or_else(|| {
                ControlError::Store(
                    "a database secret in _system does not open with this node's cluster key"
                        .into(),
                )
            })
    }

    /// Records a node of the cluster: it runs a `_system` member, so it
    /// holds the cluster key. Only members' peer requests are acted on.
    /// `_system` answers here and knows a leader.
    pub async fn reachable(&self) -> bool {
        self.db.ready().await
    }

    pub async fn record_member(&self, peer_id: &str, node_id: &str, now: u64) -> Result<()> {
        self.db
            .execute(vec![Stmt::new(
                "INSERT INTO members (peer_id, node_id, recorded_at) VALUES (?, ?, ?) \
                 ON CONFLICT (peer_id) DO UPDATE SET node_id = excluded.node_id",
            )
            .arg(peer_id)
            .arg(node_id)
            .arg(now)])
            .await?;
        Ok(())
    }

    /// Peer ids of the recorded members.
    pub async fn members(&self) -> Result<Vec<String>> {
        let r = self
            .db
            .query(Stmt::new("SELECT peer_id FROM members"))
            .await?;
        Ok(r.values.iter().map(|row| text(&row[0])).collect())
    }

    pub async fn insert_token(&self, id: &str, role: &Role, hash: &str, now: u64) -> Result<()> {
        self.db
            .execute(vec![Stmt::new(
                "INSERT INTO tokens (id, role, hash, created_at) VALUES (?, ?, ?, ?)",
            )
            .arg(id)
            .arg(role.to_string())
            .arg(hash)
            .arg(now)])
            .await?;
        Ok(())
    }

    /// The role of the token with this hash. A strong read: a token just
    /// made on another node works here at once.
    pub async fn token_role(&self, hash: &str) -> Result<Option<Role>> {
        let r = self
            .db
            .query(Stmt::new("SELECT role FROM tokens WHERE hash = ?").arg(hash))
            .await?;
        r.values
            .first()
            .map(|row| text(&row[0]).parse().map_err(|_| corrupt("tokens")))
            .transpose()
    }

    pub async fn tokens(&self) -> Result<Vec<TokenInfo>> {
        let r = self
            .db
            .query(Stmt::new(
                "SELECT id, role, created_at FROM tokens ORDER BY created_at, id",
            ))
            .await?;
        r.values
            .iter()
            .map(|row| {
                Ok(TokenInfo {
                    id: text(&row[0]),
                    role: text(&row[1]).parse().map_err(|_| corrupt("tokens"))?,
                    created_at: int(&row[2]),
                })
            })
            .collect()
    }

    /// Whether a token was deleted.
    pub async fn delete_token(&self, id: &str) -> Result<bool> {
        let r = self
            .db
            .execute(vec![Stmt::new("DELETE FROM tokens WHERE id = ?").arg(id)])
            .await?;
        Ok(r.first().is_some_and(|r| r.rows_affected > 0))
    }

    pub async fn app_exists(&self, app: &Name) -> Result<bool> {
        let r = self
            .db
            .query(Stmt::new("SELECT 1 FROM apps WHERE name = ?").arg(app.as_str()))
            .await?;
        Ok(!r.values.is_empty())
    }

    pub async fn insert_app(&self, app: &Name, now: u64) -> Result<()> {
        self.db
            .execute(vec![Stmt::new(
                "INSERT INTO apps (name, created_at) VALUES (?, ?)",
            )
            .arg(app.as_str())
            .arg(now)])
            .await?;
        Ok(())
    }

    pub async fn insert_key(&self, app: &Name, id: &str, hash: &str, now: u64) -> Result<()> {
        self.db
            .execute(vec![Stmt::new(
                "INSERT INTO api_keys (id, app, hash, created_at) VALUES (?, ?, ?, ?)",
            )
            .arg(id)
            .arg(app.as_str())
            .arg(hash)
            .arg(now)])
            .await?;
        Ok(())
    }

    /// `(id, created_at)` of an app's keys.
    pub async fn list_keys(&self, app: &Name) -> Result<Vec<(String, u64)>> {
        let r = self
            .db
            .query(
                Stmt::new("SELECT id, created_at FROM api_keys WHERE app = ? ORDER BY created_at")
                    .arg(app.as_str()),
            )
            .await?;
        Ok(r.values
            .iter()
            .map(|row| (text(&row[0]), int(&row[1])))
            .collect())
    }

    /// Whether a key was deleted.
    pub async fn delete_key(&self, app: &Name, id: &str) -> Result<bool> {
        let r = self
            .db
            .execute(vec![Stmt::new(
                "DELETE FROM api_keys WHERE app = ? AND id = ?",
            )
            .arg(app.as_str())
            .arg(id)])
            .await?;
        Ok(r.first().is_some_and(|r| r.rows_affected > 0))
    }

    /// `(app, id)` of the key with this hash.
    pub async fn find_key(&self, hash: &str) -> Result<Option<(Name, String)>> {
        let r = self
            .db
            .query(Stmt::new("SELECT app, id FROM api_keys WHERE hash = ?").arg(hash))
            .await?;
        match r.values.first() {
            Some(row) => Ok(Some((
                Name::new(&text(&row[0])).map_err(|_| corrupt("api_keys"))?,
                text(&row[1]),
            ))),
            None => Ok(None),
        }
    }

    /// Whether a login was deleted.
    pub async fn delete_user(&self, app: &Name, name: &str) -> Result<bool> {
        let r = self
            .db
            .execute(vec![Stmt::new(
                "DELETE FROM pg_users WHERE app = ? AND name = ?",
            )
            .arg(app.as_str())
            .arg(name)])
            .await?;
        Ok(r.first().is_some_and(|r| r.rows_affected > 0))
    }

    /// Deletes an app's row, keys and logins, and the `settings` keys
    /// given, in one transaction.
    pub async fn delete_app(&self, app: &Name, settings: &[String]) -> Result<()> {
        let mut stmts = vec![
            Stmt::new("DELETE FROM api_keys WHERE app = ?").arg(app.as_str()),
            Stmt::new("DELETE FROM pg_users WHERE app = ?").arg(app.as_str()),
            Stmt::new("DELETE FROM apps WHERE name = ?").arg(app.as_str()),
        ];
        stmts.extend(
            settings
                .iter()
                .map(|k| Stmt::new("DELETE FROM settings WHERE key = ?").arg(k.as_str())),
        );
        self.db.execute(stmts).await?;
        Ok(())
    }

    pub async fn upsert_user(&self, app: &Name, user: &UserRecord) -> Result<()> {
        self.db
            .execute(vec![Stmt::new(
                "INSERT INTO pg_users (app, name, verifier) VALUES (?, ?, ?) \
                 ON CONFLICT (app, name) DO UPDATE SET verifier = excluded.verifier",
            )
            .arg(app.as_str())
            .arg(user.name.as_str())
            .arg(user.verifier.as_str())])
            .await?;
        Ok(())
    }

    pub async fn users(&self, app: &Name) -> Result<Vec<UserRecord>> {
        let r = self
            .db
            .query(
                Stmt::new("SELECT name, verifier FROM pg_users WHERE app = ? ORDER BY name")
                    .arg(app.as_str()),
            )
            .await?;
        Ok(r.values
            .iter()
            .map(|row| UserRecord {
                name: text(&row[0]),
                verifier: text(&row[1]),
            })
            .collect())
    }

    /// Keeps a hibernated database's record, as just written, for its next
    /// wake; only while this node is the only writer of `_system`.
    pub fn hand_over(&self, rec: DatabaseRecord) {
        self.handoffs.keep(rec);
    }

    /// The record a hibernation handed over for `key`, if no write came
    /// after it.
    pub fn take_handed_over(&self, key: &DbKey) -> Option<DatabaseRecord> {
        self.handoffs.take(key)
    }

    /// Drops every handed-over record: other nodes may write `_system` now.
    pub fn forget_handed_over(&self) {
        self.handoffs.clear();
    }

    pub async fn insert_database(&self, rec: &DatabaseRecord) -> Result<()> {
        self.handoffs.forget(&rec.key);
        let mut stmts = vec![Stmt::new(
            "INSERT INTO databases (app, name, engine, replication_factor, status, reason, created_at, last_activity, last_wake_ms, secret) \
             VALUES (?, ?, ?, ?, ?, NULL, ?, ?, NULL, ?)",
        )
        .arg(rec.key.app.as_str())
        .arg(rec.key.db.as_str())
        .arg(rec.engine.as_str())
        .arg(rec.replication_factor)
        .arg(rec.status.as_str())
        .arg(rec.created_at)
        .arg(rec.last_activity)
        .arg(self.seal(&rec.secret))];
        stmts.extend(replica_inserts(&rec.key, &rec.replicas));
        self.db.execute(stmts).await?;
        Ok(())
    }

    /// Replaces where the replicas run (after a wake on other ports).
    pub async fn set_replicas(&self, key: &DbKey, replicas: &[ReplicaRecord]) -> Result<()> {
        self.handoffs.forget(key);
        let mut stmts = vec![Stmt::new("DELETE FROM replicas WHERE app = ? AND db = ?")
            .arg(key.app.as_str())
            .arg(key.db.as_str())];
        stmts.extend(replica_inserts(key, replicas));
        self.db.execute(stmts).await?;
        Ok(())
    }

    pub async fn set_status(
        &self,
        key: &DbKey,
        status: DatabaseStatus,
        reason: Option<&str>,
    ) -> Result<()> {
        self.handoffs.forget(key);
        let stmt =
            Stmt::new("UPDATE databases SET status = ?, reason = ? WHERE app = ? AND name = ?")
                .arg(status.as_str())
                .arg(reason.map(str::to_string))
                .arg(key.app.as_str())
                .arg(key.db.as_str());
        self.row_writes.execute(&self.db, stmt).await
    }

    /// A wake is done: active, with its duration and the time, in one write.
    pub async fn set_woken(&self, key: &DbKey, now: u64, wake_ms: u64) -> Result<()> {
        self.handoffs.forget(key);
        let stmt = Stmt::new(
            "UPDATE databases SET status = ?, reason = NULL, last_activity = MAX(last_activity, ?), last_wake_ms = ? WHERE app = ? AND name = ?",
        )
        .arg(DatabaseStatus::Active.as_str())
        .arg(now)
        .arg(wake_ms)
        .arg(key.app.as_str())
        .arg(key.db.as_str());
        self.row_writes.execute(&self.db, stmt).await
    }

    pub async fn set_activity(
        &self,
        key: &DbKey,
        last_activity: u64,
        last_wake_ms: Option<u64>,
    ) -> Result<()> {
        self.handoffs.forget(key);
        let stmt = Stmt::new(
            "UPDATE databases SET last_activity = MAX(last_activity, ?), last_wake_ms = COALESCE(?, last_wake_ms) WHERE app = ? AND name = ?",
        )
        .arg(last_activity)
        .arg(last_wake_ms)
        .arg(key.app.as_str())
        .arg(key.db.as_str());
        self.row_writes.execute(&self.db, stmt).await
    }

    pub async fn delete_database(&self, key: &DbKey) -> Result<()> {
        self.handoffs.forget(key);
        self.db
            .execute(vec![
                Stmt::new("DELETE FROM replicas WHERE app = ? AND db = ?")
                    .arg(key.app.as_str())
                    .arg(key.db.as_str()),
                Stmt::new("DELETE FROM databases WHERE app = ? AND name = ?")
                    .arg(key.app.as_str())
                    .arg(key.db.as_str()),
            ])
            .await?;
        Ok(())
    }

    /// Logs a coordinator's decision (placement, replacement).
    pub async fn insert_decision(
        &self,
        at: u64,
        coordinator: &str,
        kind: &str,
        key: &DbKey,
        detail: &str,
    ) -> Result<()> {
        self.db
            .execute(vec![Stmt::new(
                "INSERT INTO decisions (at, coordinator, kind, app, db, detail) VALUES (?, ?, ?, ?, ?, ?)",
            )
            .arg(at)
            .arg(coordinator)
            .arg(kind)
            .arg(key.app.as_str())
            .arg(key.db.as_str())
            .arg(detail)])
            .await?;
        Ok(())
    }

    pub async fn setting(&self, key: &str) -> Result<Option<String>> {
        let r = self
            .db
            .query(Stmt::new("SELECT value FROM settings WHERE key = ?").arg(key))
            .await?;
        Ok(r.values.first().map(|row| text(&row[0])))
    }

    pub async fn delete_setting(&self, key: &str) -> Result<()> {
        self.db
            .execute(vec![
                Stmt::new("DELETE FROM settings WHERE key = ?").arg(key)
            ])
            .await?;
        Ok(())
    }

    pub async fn set_setting(&self, key: &str, value: &str) -> Result<()> {
        self.db
            .execute(vec![Stmt::new(
                "INSERT INTO settings (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            )
            .arg(key)
            .arg(value)])
            .await?;
        Ok(())
    }
}

fn replica_inserts<'a>(
    key: &'a DbKey,
    replicas: &'a [ReplicaRecord],
) -> impl Iterator<Item = Stmt> + 'a {
    replicas.iter().map(move |r| {
        Stmt::new("INSERT INTO replicas (app, db, idx, node_id, host, port, raft_port) VALUES (?, ?, ?, ?, ?, ?, ?)")
            .arg(key.app.as_str())
            .arg(key.db.as_str())
            .arg(r.idx)
            .arg(r.node_id.as_str())
            .arg(r.host.as_str())
            .arg(r.port)
            .arg(r.raft_port)
    })
}
