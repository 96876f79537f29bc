//! The PostgreSQL wire as far as the proxy reads and writes it itself:
//! framing, the startup packet, and the few messages of login, errors and
//! cancels. Everything else is relayed untouched.

pub(crate) mod frame;
pub(crate) mod messages;
pub(crate) mod results;
pub(crate) mod startup;
pub(crate) mod tags;
