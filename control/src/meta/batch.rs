//! Writes that share one request, and so one Raft entry and one fsync of
//! `_system`, with the others made at the same moment. A storm of wakes
//! writes every woken database's record; one at a time, each write is a
//! round of HTTP, Raft and disk that the starting engines wait behind.
//! Every write still waits for its own outcome.

use std::sync::Mutex;

use tokio::sync::oneshot;

use crate::error::{ControlError, Result};
use crate::rqlite::{RqliteClient, Stmt};

/// The most statements one request carries.
const MAX_BATCH: usize = 256;

type Outcome = std::result::Result<(), String>;

#[derive(Default)]
pub(super) struct WriteBatch {
    queue: Mutex<Vec<(Stmt, oneshot::Sender<Outcome>)>>,
    /// Held by whoever sends the queued writes.
    sending: tokio::sync::Mutex<()>,
}

impl WriteBatch {
    /// Runs `stmt` in one transaction with whatever other writes are
    /// queued: the first writer to find nobody sending sends them all.
    pub(super) async fn execute(&self, db: &RqliteClient, stmt: Stmt) -> Result<()> {
        let (done, mut outcome) = oneshot::channel();
        self.queue
            .lock()
            .expect("write queue poisoned")
            .push((stmt, done));
        loop {
            let sending = tokio::select! {
                biased;
                result = &mut outcome => {
                    return result
                        .unwrap_or_else(|_| Err("the write was lost".into()))
                        .map_err(ControlError::Store);
                }
                sending = self.sending.lock() => sending,
            };
            let batch: Vec<_> = {
                let mut queue = self.queue.lock().expect("write queue poisoned");
                let n = queue.len().min(MAX_BATCH);
                queue.drain(..n).collect()
            };
            // Sent by a task of its own: a caller that gives up must not
            // take the others' outcome with it.
            let db = db.clone();
            let sent = tokio::spawn(async move {
                let (stmts, dones): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
                let result = match stmts.is_empty() {
                    true => Ok(()),
                    false => db.execute(stmts).await.map(drop).map_err(|e| e.to_string()),
                };
                for done in dones {
                    let _ = done.send(result.clone());
                }
            });
            let _ = sent.await;
            drop(sending);
        }
    }
}
