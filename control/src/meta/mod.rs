//! The metadata: the `_system` rqlite database this daemon runs and joins
//! (`system.rs`), and its tables (`store.rs`). Nothing else in control
//! speaks to `_system`.

mod batch;
mod databases;
mod handoff;
mod store;
mod system;

pub use store::Store;
pub use system::{node_id, SystemDb};
