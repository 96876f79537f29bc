//! The contract between rouse's control daemon, its proxies and operators:
//! validated names, the JSON shapes of the control API, the configuration
//! file, and an async client. Nothing in here runs processes or networks
//! beyond HTTP calls to control.

pub mod access;
pub mod apps;
pub mod client;
pub mod config;
pub mod duration;
pub mod engine_tls;
pub mod event;
pub mod name;
pub mod sealed;
pub mod server;
pub mod telemetry;
pub mod types;

pub use access::{CreateToken, Role, TokenCreated, TokenInfo};
pub use client::{Client, ClientError};
pub use name::{DbKey, Name, NameError};
pub use sealed::{SealKey, Sealed};
pub use types::*;
