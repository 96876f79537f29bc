//! The daemons' background loops, watched: a loop that ends or panics is
//! logged, counted and started again after a backoff; one that cannot be
//! started again (it owned a channel) is reported dead. `/healthz` fails
//! while any loop is dead, so a daemon whose work silently stopped is seen.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::task::JoinHandle;

use crate::metric::TASK_RESTARTS;

/// Named background loops of one daemon.
#[derive(Default)]
pub struct Tasks {
    /// Name → whether the loop runs.
    alive: Arc<Mutex<BTreeMap<&'static str, bool>>>,
    handles: Mutex<Vec<JoinHandle<()>>>,
}

const FIRST_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

impl Tasks {
    /// Runs `make()` for the life of the daemon, starting it again whenever
    /// it ends or panics.
    pub fn restarting<F, Fut>(&self, name: &'static str, make: F)
    where
        F: Fn() -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.set(name, true);
        let alive = self.alive.clone();
        let watcher = tokio::spawn(async move {
            let mut backoff = FIRST_BACKOFF;
            loop {
                let outcome = run_owned(make()).await;
                alive.lock().expect("tasks poisoned").insert(name, false);
                match outcome {
                    Ok(()) => {
                        tracing::error!(task = name, "background loop ended; starting it again")
                    }
                    Err(e) => {
                        tracing::error!(task = name, error = %e, "background loop failed; starting it again")
                    }
                }
                TASK_RESTARTS.counter([name.into()]).increment(1);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
                alive.lock().expect("tasks poisoned").insert(name, true);
            }
        });
        self.handles.lock().expect("tasks poisoned").push(watcher);
    }

    /// Runs `task` once; should it end before the daemon does, the daemon
    /// is unhealthy.
    pub fn once<Fut>(&self, name: &'static str, task: Fut)
    where
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.set(name, true);
        let alive = self.alive.clone();
        let watcher = tokio::spawn(async move {
            let outcome = run_owned(task).await;
            alive.lock().expect("tasks poisoned").insert(name, false);
            match outcome {
                Ok(()) => tracing::error!(task = name, "background task ended"),
                Err(e) => tracing::error!(task = name, error = %e, "background task failed"),
            }
        });
        self.handles.lock().expect("tasks poisoned").push(watcher);
    }

    /// The loops that do not run now.
    pub fn dead(&self) -> Vec<&'static str> {
        let alive = self.alive.lock().expect("tasks poisoned");
        alive
            .iter()
            .filter(|(_, up)| !**up)
            .map(|(n, _)| *n)
            .collect()
    }

    /// Stops every loop (at shutdown).
    pub fn abort_all(&self) {
        for handle in self.handles.lock().expect("tasks poisoned").drain(..) {
            handle.abort();
        }
    }

    fn set(&self, name: &'static str, up: bool) {
        self.alive.lock().expect("tasks poisoned").insert(name, up);
    }
}

/// Runs `task` on its own (so a panic is caught as an error), aborted
/// when the caller is: aborting a watcher stops what it watches.
async fn run_owned<Fut>(task: Fut) -> Result<(), tokio::task::JoinError>
where
    Fut: Future<Output = ()> + Send + 'static,
{
    struct AbortOnDrop(tokio::task::AbortHandle);
    impl Drop for AbortOnDrop {
        fn drop(&mut self) {
            self.0.abort();
        }
    }
    let handle = tokio::spawn(task);
    let _abort = AbortOnDrop(handle.abort_handle());
    handle.await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test]
    async fn a_loop_that_panics_is_started_again_and_a_lost_task_is_reported() {
        let tasks = Tasks::default();
        let runs = Arc::new(AtomicU32::new(0));
        let counted = runs.clone();
        tasks.restarting("flaky", move || {
            let runs = counted.clone();
            async move {
                if runs.fetch_add(1, Ordering::SeqCst) == 0 {
                    panic!("first run fails");
                }
                std::future::pending::<()>().await;
            }
        });
        tasks.once("short", async {});
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while runs.load(Ordering::SeqCst) < 2 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(
            runs.load(Ordering::SeqCst),
            2,
            "restarted once after the panic"
        );
        assert_eq!(tasks.dead(), vec!["short"]);
        tasks.abort_all();
    }
}
