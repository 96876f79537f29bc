//! The end-to-end suite, one test binary (one link, one start-up per test
//! process) with a module per area. Every test starts real servers through
//! the harness (`rouse_tests`) on free loopback ports and stops them after.

mod accounts;
mod active_placement;
mod active_set;
mod admin_console;
mod backups;
mod cluster;
mod control;
mod deploy;
mod harness;
mod idle_clients;
mod isolation;
mod monitoring;
mod nodes;
mod operations;
mod operators;
mod patroni_discovery;
mod patroni_harness;
mod pool_turns;
mod private_cluster;
mod probes;
mod proxy_http;
mod proxy_patroni;
mod proxy_pg;
mod proxy_redis_front;
mod proxy_shared;
mod restarts;
mod sql_over_http;
mod stats_page;
mod tls;
