//! The contract between rouse's control daemon, its proxies and operators:
//! validated names, the JSON shapes of the control API, its error codes and
//! event stream, and an async client. Nothing in here runs processes or networks
//! beyond HTTP calls to control.

pub mod access;
pub mod backup;
pub mod client;
pub mod engine_tls;
pub mod error;
pub mod event;
pub mod name;
pub mod scram;
pub mod sealed;
pub mod types;

pub use access::{CreateToken, Role, TokenCreated, TokenInfo};
pub use backup::{BackupInfo, BackupList, RestoreRequest, Restored};
pub use client::{Client, ClientError};
pub use error::{ErrorBody, ErrorCode};
pub use name::{DbKey, Name, NameError};
pub use sealed::{SealKey, Sealed};
pub use types::*;
