//! Session mode: a client and its own backend connection, byte for byte,
//! until either side leaves or, on a Patroni member, the member loses its
//! role (HAProxy's `on-marked-down shutdown-sessions`).

use std::sync::Arc;

use rouse_control_api::DbKey;
use tokio::io::AsyncWriteExt;
use tracing::{debug, info};

use super::backend::BackendSession;
use super::proto::messages;
use super::traffic::{Meter, Metered};
use crate::net::MaybeTls;
use crate::patroni::{Cluster, Pick};

/// Relays a session-mode client and its own backend connection byte for
/// byte, until either side leaves or the backend's member loses its role.
pub(super) async fn relay_session(
    client: &mut MaybeTls,
    early: &[u8],
    backend: &mut BackendSession,
    member: Option<&(Arc<Cluster>, Pick)>,
    key: &DbKey,
    meter: &mut Meter,
) {
    meter.assigned(std::time::Duration::ZERO);
    // Whatever either side sent early goes first, then bytes flow as they
    // are, counted on their way.
    let relay = async {
        let mut metered = Metered::new(&mut backend.stream, meter);
        if !backend.buf.is_empty() {
            metered.backend_bytes(&backend.buf);
            client.write_all(&backend.buf).await?;
        }
        if !early.is_empty() {
            metered.meter.asked(early.len());
            metered.inner.write_all(early).await?;
        }
        tokio::io::copy_bidirectional(client, &mut metered).await
    };
    let lost = async {
        match member {
            Some((cluster, pick)) => cluster.lost(*pick).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        relayed = relay => if let Err(e) = relayed {
            debug!(database = %key, error = %e, "postgres session ended");
        },
        _ = lost => {
            info!(database = %key, "the member lost its role: session closed");
            let _ = client
                .write_all(&messages::fatal(
                    "57P01",
                    "terminating connection: the database server changed role (failover)",
                ))
                .await;
        }
    }
}
