//! rouse's data plane. It routes each request by app namespace to that
//! app's database, holds it while the database wakes, and serves it.
//!
//! - `app`: the services the fronts share, and running them; `listeners`:
//!   the sockets they serve on
//! - `route`: which database a request is for; `auth`: which app a
//!   credential belongs to
//! - `resolve`: where a database runs, and waking it; `events`: control's
//!   news about databases and credentials
//! - `http`: the gateway API and the rqlite API; `pg`: the PostgreSQL front
//! - `patroni`: following Patroni clusters; `tcp`: plain L4 listeners to them
//! - `redis_front`: `REDIS_URL` at the proxy, always to the current master
//! - `fleet`: sessions, limits, wakes and cache shared through Redis
//! - `sql`: the statement filter (no SQL that names files or loads code)
//! - `activity`: what control is told about use; `stats`: the stats page

mod activity;
mod app;
mod auth;
mod discovery;
mod error;
mod events;
mod fleet;
#[doc(hidden)]
pub mod fuzzing;
mod health;
mod http;
mod listeners;
mod metrics;
mod net;
mod patroni;
mod pg;
mod quota;
mod redis_front;
mod reload;
mod resolve;
mod route;
mod sql;
mod stats;
mod tcp;
mod throttle;
pub mod upgrade;

pub use app::run;
pub use listeners::{check_config, worker_threads, Listeners};
/// Every metric the proxy records besides the shared ones of `rouse_runtime`.
pub use metrics::CATALOGUE as METRICS;
pub use reload::reload_on_sighup;
