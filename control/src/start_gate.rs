//! A bound on engine starts under way at once on this node, granted in
//! turn across apps: in a storm of wakes each app with waiting starts gets
//! the next free slot in rotation, so one app's burst cannot crowd out the
//! rest while the machine starts engines as fast as it can.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use rouse_control_api::Name;
use tokio::sync::oneshot;

pub struct StartGate {
    inner: Arc<Mutex<Inner>>,
}

struct Inner {
    free: usize,
    /// Each app's waiting starts, oldest first.
    waiting: HashMap<Name, VecDeque<oneshot::Sender<Permit>>>,
    /// Apps with waiting starts, in the order they are served.
    turn: VecDeque<Name>,
}

/// One start under way; its slot goes to the next app in turn when dropped.
pub struct Permit {
    inner: Arc<Mutex<Inner>>,
}

impl StartGate {
    pub fn new(slots: usize) -> StartGate {
        StartGate {
            inner: Arc::new(Mutex::new(Inner {
                free: slots.max(1),
                waiting: HashMap::new(),
                turn: VecDeque::new(),
            })),
        }
    }

    /// Waits for a slot for a start of one of `app`'s databases.
    pub async fn acquire(&self, app: &Name) -> Permit {
        let rx = {
            let mut inner = self.inner.lock().expect("start gate poisoned");
            if inner.free > 0 && inner.turn.is_empty() {
                inner.free -= 1;
                return Permit {
                    inner: self.inner.clone(),
                };
            }
            let (tx, rx) = oneshot::channel();
            let queue = inner.waiting.entry(app.clone()).or_default();
            queue.push_back(tx);
            if queue.len() == 1 {
                inner.turn.push_back(app.clone());
            }
            rx
        };
        // A waiter that gives up drops its receiver; a permit sent to it
        // then comes back through the sender's failed send (see `release`)
        // or, once received, through `Permit`'s own drop.
        rx.await.expect("the gate outlives its waiters")
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        release(&self.inner);
    }
}

/// Hands a freed slot to the next app in turn, skipping waiters that left.
fn release(shared: &Arc<Mutex<Inner>>) {
    let mut inner = shared.lock().expect("start gate poisoned");
    while let Some(app) = inner.turn.pop_front() {
        let queue = inner.waiting.get_mut(&app).expect("an app in turn waits");
        let tx = queue.pop_front().expect("an app in turn has a waiter");
        if queue.is_empty() {
            inner.waiting.remove(&app);
        } else {
            inner.turn.push_back(app);
        }
        let permit = Permit {
            inner: shared.clone(),
        };
        match tx.send(permit) {
            Ok(()) => return,
            // The waiter left: its permit would free the slot on drop, which
            // needs this lock; take the slot back here instead.
            Err(permit) => std::mem::forget(permit),
        }
    }
    inner.free += 1;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn app(s: &str) -> Name {
        Name::new(s).unwrap()
    }

    #[tokio::test]
    async fn a_burst_of_one_app_does_not_hold_back_another() {
        let gate = Arc::new(StartGate::new(1));
        let first = gate.acquire(&app("busy")).await;
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut waiters = Vec::new();
        // Ten starts of one app queue first, then two of another.
        for (who, n) in [("busy", 10), ("quiet", 2)] {
            for _ in 0..n {
                let (gate, order) = (gate.clone(), order.clone());
                waiters.push(tokio::spawn(async move {
                    let _permit = gate.acquire(&app(who)).await;
                    order.lock().unwrap().push(who);
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }));
                tokio::task::yield_now().await;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(first);
        for w in waiters {
            w.await.unwrap();
        }
        let order = order.lock().unwrap().clone();
        assert_eq!(order.len(), 12);
        let quiet_done = order.iter().rposition(|w| *w == "quiet").unwrap();
        assert!(quiet_done <= 3, "served in turn: {order:?}");
    }

    #[tokio::test]
    async fn a_waiter_that_gives_up_does_not_lose_the_slot() {
        let gate = StartGate::new(1);
        let held = gate.acquire(&app("a")).await;
        let gave_up =
            tokio::time::timeout(Duration::from_millis(10), gate.acquire(&app("b"))).await;
        assert!(gave_up.is_err());
        drop(held);
        tokio::time::timeout(Duration::from_secs(1), gate.acquire(&app("c")))
            .await
            .expect("the slot came back");
    }
}
