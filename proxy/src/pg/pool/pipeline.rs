//! A pipeline the proxy runs itself on a pooled connection (SQL over
//! HTTP): the statements go out in one write, the answers are gathered
//! until ReadyForQuery, and the connection goes back to the pool as clean
//! as a relayed transaction leaves it.

use std::time::Duration;

use tokio::io::AsyncWriteExt;

use super::session_state::leaves_session_state;
use super::{Pool, Pooled, MAX_MESSAGE};
use crate::pg::error::PgError;
use crate::pg::proto::extended::{Collector, Finished};
use crate::pg::proto::frame::{read_frame, typed};
use crate::pg::proto::messages;
use crate::pg::proto::tags::{backend, error_field};

impl Pool {
    /// Sends `frames` (ending in Sync) on `b` and gathers the answers, at
    /// most `limit` bytes of rows, within `timeout`. A transaction the
    /// statements left open or failed is rolled back before `b` goes back;
    /// a connection that went wrong is closed instead.
    pub(crate) async fn run_pipeline(
        &self,
        mut b: Pooled,
        frames: &[u8],
        sql: &[&str],
        limit: usize,
        timeout: Duration,
    ) -> Result<Finished, PgError> {
        b.dirty |= sql.iter().any(|s| leaves_session_state(s));
        let finished = tokio::time::timeout(timeout, exchange(&mut b, frames, limit))
            .await
            .map_err(|_| PgError::Backend("the statements did not finish in time".into()))??;
        b.dirty |= finished.settings_changed;
        if finished.status != backend::IDLE {
            let rolled_back = exchange(&mut b, &messages::query("ROLLBACK"), 0).await?;
            if rolled_back.status != backend::IDLE {
                return Ok(finished);
            }
        }
        if !b.dirty || b.reset().await.is_ok() {
            self.checkin(b);
        }
        Ok(finished)
    }
}

/// Writes `frames` and reads until ReadyForQuery. A backend that was
/// gone before it answered anything (stopped, restarted: it says FATAL
/// and closes) is `Unreachable`, which the caller may try again elsewhere.
async fn exchange(b: &mut Pooled, frames: &[u8], limit: usize) -> Result<Finished, PgError> {
    let s = &mut b.session;
    let mut collector = Collector::new(limit);
    let mut heard = false;
    let gone = |heard: bool, e: String| match heard {
        false => PgError::Unreachable(format!("backend gone: {e}")),
        true => PgError::Backend(format!("backend connection lost: {e}")),
    };
    if let Err(e) = s.stream.write_all(frames).await {
        return Err(gone(false, e.to_string()));
    }
    loop {
        let frame = read_frame(&mut s.stream, &mut s.buf, true, MAX_MESSAGE)
            .await
            .map_err(|e| gone(heard, e.to_string()))?;
        if !heard
            && frame[0] == backend::ERROR_RESPONSE
            && messages::error_field(&frame, error_field::SEVERITY_V) == Some(b"FATAL")
        {
            return Err(gone(false, "the backend ended the session".into()));
        }
        heard = true;
        let (tag, body) = typed(frame);
        if let Some(finished) = collector
            .feed(tag, &body)
            .map_err(|e| PgError::Backend(e.to_string()))?
        {
            return Ok(finished);
        }
    }
}
