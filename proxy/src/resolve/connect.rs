//! The connect step every front shares: connect on the route at hand; when
//! that fails in a way a stale route explains, forget the route, resolve it
//! again (which wakes the database) and connect again; a database caught
//! while it stops or starts is tried again, with pauses, up to
//! `wake_timeout`.

use std::time::{Duration, Instant};

use rouse_control_api::DbKey;
use tracing::debug;

use super::{ControlApi, Resolver, Target};
use crate::error::ProxyError;
use crate::metrics::STALE_ROUTE_RETRIES;

impl<C: ControlApi> Resolver<C> {
    /// Connects to `key`'s database with `connect`, starting from `target`,
    /// the route just resolved. When that fails in a way `stale` says an
    /// outdated route explains (the database hibernated or moved while this
    /// proxy missed the news, or is stopping right now), the route is
    /// forgotten and resolved again, which wakes the database, and
    /// `connect` tries again, until `wake_timeout`. A client then waits
    /// inside its connect instead of seeing the stale route.
    pub(crate) async fn connect_with_wake<T, E, Fut>(
        &self,
        key: &DbKey,
        target: Target,
        protocol: &'static str,
        stale: impl Fn(&E) -> bool,
        resolve_error: impl Fn(ProxyError) -> E,
        mut connect: impl FnMut(Target) -> Fut,
    ) -> std::result::Result<T, E>
    where
        Fut: std::future::Future<Output = std::result::Result<T, E>>,
    {
        let (wake_timeout, _) = *self.bounds.lock().expect("bounds poisoned");
        let deadline = Instant::now() + wake_timeout;
        let mut pause = Duration::ZERO;
        let mut result = connect(target).await;
        while let Err(e) = &result {
            if !stale(e) || Instant::now() + pause >= deadline {
                break;
            }
            // The first retry at once (a missed event); later ones wait for
            // a database that is still stopping.
            tokio::time::sleep(pause).await;
            pause = (pause * 2).clamp(Duration::from_millis(50), Duration::from_secs(1));
            self.invalidate(key);
            STALE_ROUTE_RETRIES.counter([protocol.into()]).increment(1);
            debug!(database = %key, "route looked stale: resolving it again");
            let target = self.target(key).await.map_err(&resolve_error)?;
            result = connect(target).await;
        }
        result
    }
}
