//! The PostgreSQL wire as far as the proxy reads and writes it itself:
//! framing, the startup packet, the few messages of login, errors and
//! cancels, and the extended query protocol of SQL over HTTP. Everything
//! else is relayed untouched.

pub(crate) mod extended;
pub(crate) mod frame;
pub(crate) mod messages;
pub(crate) mod results;
pub(crate) mod startup;
pub(crate) mod tags;
