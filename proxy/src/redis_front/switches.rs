//! Sentinel's `+switch-master` announcements, followed as they come: a
//! failover moves the front at once instead of at its next check. Each
//! sentinel is subscribed to; an announcement about the configured master
//! starts a round of checks, which still decides (the new master must
//! confirm with `ROLE`).

use std::sync::Weak;
use std::time::Duration;

use bytes::BytesMut;
use tracing::{debug, info};

use super::resp::{self, Reply};
use super::Front;

const CHANNEL: &str = "+switch-master";
/// A lost subscription is made again after this long.
const RESUBSCRIBE: Duration = Duration::from_secs(1);
/// How often a quiet subscription looks whether the front is still there.
const ALIVE_CHECK: Duration = Duration::from_secs(5);

/// Follows `sentinel`'s announcements until the front is dropped.
pub(super) async fn follow(front: Weak<Front>, sentinel: String) {
    loop {
        let Some(f) = front.upgrade() else { return };
        let subscribed = f.checker.subscribe(&sentinel, CHANNEL).await;
        let name = f.backend.master_name.clone().unwrap_or_default();
        let resolve_now = f.resolve_now.clone();
        // Not held while listening: the front goes when its server does.
        drop(f);
        match subscribed {
            Ok(mut link) => {
                let mut buf = BytesMut::new();
                loop {
                    tokio::select! {
                        reply = resp::read_reply(&mut link, &mut buf) => match reply {
                            Ok(reply) if switched(&reply, &name) => {
                                info!(%sentinel, master = %name, "sentinel announced a new master");
                                resolve_now.notify_one();
                            }
                            Ok(_) => {}
                            Err(e) => {
                                debug!(%sentinel, error = %e, "subscription to +switch-master lost");
                                break;
                            }
                        },
                        _ = tokio::time::sleep(ALIVE_CHECK) => {
                            if front.strong_count() == 0 {
                                return;
                            }
                        }
                    }
                }
            }
            Err(e) => debug!(%sentinel, error = %e, "cannot subscribe to +switch-master"),
        }
        tokio::time::sleep(RESUBSCRIBE).await;
    }
}

/// Whether `reply` announces a new address for master `name`:
/// `["message", "+switch-master", "<name> <old ip> <old port> <new ip> <new port>"]`.
fn switched(reply: &Reply, name: &str) -> bool {
    let Reply::Array(Some(items)) = reply else {
        return false;
    };
    let [kind, channel, payload] = items.as_slice() else {
        return false;
    };
    kind.text() == Some(b"message")
        && channel.text() == Some(CHANNEL.as_bytes())
        && payload.text().and_then(|p| p.split(|b| *b == b' ').next()) == Some(name.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(channel: &str, payload: &str) -> Reply {
        let bulk = |s: &str| Reply::Bulk(Some(s.as_bytes().to_vec()));
        Reply::Array(Some(vec![bulk("message"), bulk(channel), bulk(payload)]))
    }

    #[test]
    fn only_a_switch_of_our_master_counts() {
        let ours = message(CHANNEL, "mymaster 127.0.0.1 6379 127.0.0.1 6380");
        assert!(switched(&ours, "mymaster"));
        assert!(!switched(&ours, "other"));
        assert!(!switched(&ours, "mymast"));
        let elsewhere = message("+sdown", "mymaster 127.0.0.1 6379 127.0.0.1 6380");
        assert!(!switched(&elsewhere, "mymaster"));
        assert!(!switched(&Reply::Array(None), "mymaster"));
        assert!(!switched(&message(CHANNEL, ""), "mymaster"));
    }
}
