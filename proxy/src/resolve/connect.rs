//! The connect step every front shares: connect on the route at hand; when
//! that fails in a way a stale route explains, forget the route, resolve it
//! again (which wakes the database) and connect once more.

use rouse_control_api::DbKey;
use tracing::debug;

use super::{ControlApi, Resolver, Target};
use crate::error::ProxyError;
use crate::metrics::STALE_ROUTE_RETRIES;

impl<C: ControlApi> Resolver<C> {
    /// Connects to `key`'s database with `connect`, starting from `target`,
    /// the route just resolved. When that fails in a way `stale` says an
    /// outdated route explains (the database hibernated or moved while this
    /// proxy missed the news), the route is forgotten and resolved again,
    /// which wakes the database, and `connect` gets one more try. A client
    /// then waits inside its connect instead of seeing the stale route.
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
        match connect(target).await {
            Err(e) if stale(&e) => {
                self.invalidate(key);
                STALE_ROUTE_RETRIES.counter([protocol.into()]).increment(1);
                debug!(database = %key, "route looked stale: resolving it again");
                let target = self.target(key).await.map_err(resolve_error)?;
                connect(target).await
            }
            done => done,
        }
    }
}
