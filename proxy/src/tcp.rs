//! Plain `tcp` listeners: bytes as they are (TLS included) to a Patroni
//! cluster's leader or to its replicas, what an HAProxy `mode tcp` listen
//! block with `option httpchk GET /primary` does. A connection made during
//! a failover waits for the new leader; one whose member loses its role is
//! closed.

use std::future::Future;
use std::sync::Arc;

use rouse_config::MemberRole;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::metrics::REQUESTS;
use crate::net::{accept_forever, Connections};
use crate::patroni::Cluster;

/// Serves `listener`; each connection goes to the cluster `cluster` holds
/// when it arrives (a reload may replace it).
pub(crate) async fn serve(
    listener: TcpListener,
    cluster: watch::Receiver<Arc<Cluster>>,
    role: MemberRole,
    connections: Arc<Connections>,
    stop: impl Future<Output = ()>,
) {
    accept_forever(listener, "tcp", connections, stop, move |mut client, peer, open| {
        let cluster = cluster.borrow().clone();
        async move {
            let _open = open;
            let outcome = |o: &'static str| {
                REQUESTS.counter(["".into(), cluster.name().to_string().into(), "tcp".into(), o.into()])
                    .increment(1)
            };
            let (mut backend, pick) = match cluster.connect(role, TcpStream::connect).await {
                Ok(c) => c,
                Err(e) => {
                    warn!(%peer, error = %e, "tcp connection dropped");
                    outcome("backend");
                    return;
                }
            };
            outcome("ok");
            let _ = backend.set_nodelay(true);
            tokio::select! {
                relayed = tokio::io::copy_bidirectional(&mut client, &mut backend) => {
                    debug!(%peer, result = ?relayed, "tcp session ended");
                }
                _ = cluster.lost(pick) => {
                    info!(%peer, cluster = %cluster.name(), member = pick.member, "member lost its role: session closed");
                    let _ = client.shutdown().await;
                }
            }
        }
    })
    .await
}
