//! The `databases` and `replicas` tables read back as records: one
//! database, an app's, all of them (through Raft, or from this member's own
//! copy for background scans), and the counts creates and placement need.

use std::collections::{HashMap, HashSet};

use rouse_control_api::{DatabaseStatus, DbKey, Name};
use serde_json::Value;

use super::store::{corrupt, int, text, Store};
use crate::error::Result;
use crate::model::{DatabaseRecord, ReplicaRecord};
use crate::rqlite::{Level, Stmt};

/// Which databases a read is about.
enum Which<'a> {
    Key(&'a DbKey),
    App(&'a Name),
    Status(DatabaseStatus),
    All,
}

fn db_key(app: &Value, name: &Value) -> Result<DbKey> {
    Ok(DbKey::new(
        Name::new(&text(app)).map_err(|_| corrupt("databases"))?,
        Name::new(&text(name)).map_err(|_| corrupt("databases"))?,
    ))
}

impl Store {
    /// One database, through Raft: what decisions about it start from.
    pub async fn database(&self, key: &DbKey) -> Result<Option<DatabaseRecord>> {
        let mut found = self.databases_where(Which::Key(key), Level::Strong).await?;
        Ok(found.pop())
    }

    /// One database as the `_system` leader has it: for status answers,
    /// which cost no Raft entry (a wake storm asks for hundreds at once).
    pub async fn database_status(&self, key: &DbKey) -> Result<Option<DatabaseRecord>> {
        let mut found = self.databases_where(Which::Key(key), Level::Leader).await?;
        Ok(found.pop())
    }

    pub async fn databases(&self, app: Option<&Name>) -> Result<Vec<DatabaseRecord>> {
        let which = app.map_or(Which::All, Which::App);
        self.databases_where(which, Level::Strong).await
    }

    /// Every database (or those with `status`) as this node's copy of
    /// `_system` has them: for background scans, which must not cost a
    /// Raft round per turn.
    pub async fn databases_local(
        &self,
        status: Option<DatabaseStatus>,
    ) -> Result<Vec<DatabaseRecord>> {
        let which = status.map_or(Which::All, Which::Status);
        self.databases_where(which, Level::Local).await
    }

    /// Which of `keys` name databases (this node's copy of `_system`).
    pub async fn existing(&self, keys: &[DbKey]) -> Result<HashSet<DbKey>> {
        let mut out = HashSet::new();
        for chunk in keys.chunks(400) {
            let values = vec!["(?, ?)"; chunk.len()].join(", ");
            let stmt = chunk.iter().fold(
                Stmt::new(format!(
                    "SELECT app, name FROM databases WHERE (app, name) IN (VALUES {values})"
                )),
                |stmt, k| stmt.arg(k.app.as_str()).arg(k.db.as_str()),
            );
            for row in self.db.query_local(stmt).await?.values {
                out.insert(db_key(&row[0], &row[1])?);
            }
        }
        Ok(out)
    }

    /// How many databases there are, and how many of them are `app`'s.
    pub async fn count(&self, app: &Name) -> Result<(u32, u32)> {
        let r = self
            .db
            .query(
                Stmt::new("SELECT COUNT(*), COALESCE(SUM(app = ?), 0) FROM databases")
                    .arg(app.as_str()),
            )
            .await?;
        let row = r.values.first().ok_or_else(|| corrupt("count"))?;
        Ok((int(&row[0]) as u32, int(&row[1]) as u32))
    }

    /// Per node, how many databases it holds a replica of.
    pub async fn load(&self) -> Result<HashMap<String, u32>> {
        let r = self
            .db
            .query(Stmt::new(
                "SELECT node_id, COUNT(DISTINCT app || '_' || db) FROM replicas GROUP BY node_id",
            ))
            .await?;
        Ok(r.values
            .iter()
            .map(|row| (text(&row[0]), int(&row[1]) as u32))
            .collect())
    }

    async fn databases_where(&self, which: Which<'_>, level: Level) -> Result<Vec<DatabaseRecord>> {
        const COLS: &str = "SELECT app, name, engine, replication_factor, status, reason, created_at, last_activity, last_wake_ms, secret FROM databases d";
        const RCOLS: &str = "SELECT app, db, idx, node_id, host, port, raft_port FROM replicas r";
        let (dbs, reps) = match which {
            Which::Key(k) => (
                Stmt::new(format!("{COLS} WHERE app = ? AND name = ?"))
                    .arg(k.app.as_str())
                    .arg(k.db.as_str()),
                Stmt::new(format!("{RCOLS} WHERE app = ? AND db = ? ORDER BY idx"))
                    .arg(k.app.as_str())
                    .arg(k.db.as_str()),
            ),
            Which::App(a) => (
                Stmt::new(format!("{COLS} WHERE app = ? ORDER BY name")).arg(a.as_str()),
                Stmt::new(format!("{RCOLS} WHERE app = ? ORDER BY db, idx")).arg(a.as_str()),
            ),
            Which::Status(st) => (
                Stmt::new(format!("{COLS} WHERE status = ? ORDER BY app, name")).arg(st.as_str()),
                Stmt::new(format!(
                    "{RCOLS} WHERE EXISTS (SELECT 1 FROM databases d WHERE d.app = r.app AND d.name = r.db AND d.status = ?) ORDER BY app, db, idx"
                ))
                .arg(st.as_str()),
            ),
            Which::All => (
                Stmt::new(format!("{COLS} ORDER BY app, name")),
                Stmt::new(format!("{RCOLS} ORDER BY app, db, idx")),
            ),
        };
        // Both in one request: one Raft entry, one snapshot of both tables.
        let [dbs, reps] = <[_; 2]>::try_from(self.db.read(vec![dbs, reps], level).await?)
            .expect("one result per statement");
        let mut replicas: HashMap<DbKey, Vec<ReplicaRecord>> = HashMap::new();
        for r in &reps.values {
            replicas
                .entry(db_key(&r[0], &r[1])?)
                .or_default()
                .push(ReplicaRecord {
                    idx: int(&r[2]) as u32,
                    node_id: text(&r[3]),
                    host: text(&r[4]),
                    port: int(&r[5]) as u16,
                    raft_port: r[6].as_u64().map(|p| p as u16),
                });
        }
        let mut out = Vec::with_capacity(dbs.values.len());
        for row in &dbs.values {
            let key = db_key(&row[0], &row[1])?;
            out.push(DatabaseRecord {
                engine: text(&row[2]).parse().map_err(|_| corrupt("databases"))?,
                replication_factor: int(&row[3]) as u32,
                status: text(&row[4]).parse().map_err(|_| corrupt("databases"))?,
                reason: row[5].as_str().map(str::to_string),
                created_at: int(&row[6]),
                last_activity: int(&row[7]),
                last_wake_ms: row[8].as_u64(),
                secret: self.unseal(&text(&row[9]))?,
                replicas: replicas.remove(&key).unwrap_or_default(),
                key,
            });
        }
        Ok(out)
    }
}
