//! What both daemons share at run time and nothing else needs: serving
//! HTTP on an already-bound listener, TLS from PEM files, signals, the
//! open-file limit, logs and Prometheus metrics, and the wall clock as the
//! metadata keeps it.

pub mod clock;
pub mod error_kind;
pub mod etcd;
pub mod memory;
pub mod metric;
pub mod server;
pub mod tasks;
pub mod telemetry;
