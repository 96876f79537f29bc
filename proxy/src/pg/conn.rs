//! A client connection, plain or TLS (after an SSLRequest answered `S`).

pub use crate::stream::Stream as Conn;
