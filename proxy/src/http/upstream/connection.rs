//! Keep-alive connections to engines, plain or TLS, on which the request's
//! own task writes a request and reads its answer: no connection task to
//! hand each request to and back, one write per request. Idle connections
//! wait in a pool per address.

use std::collections::HashMap;
use std::io;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::answer::{self, Chunked, Framing, Malformed};
use crate::net::MaybeTls;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// An idle connection is closed after this long.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
const MAX_IDLE_PER_ADDR: usize = 512;
/// Bodies up to this size go out in the same write as the head.
const COPIED_BODY: usize = 16 * 1024;
const READ_CHUNK: usize = 8 * 1024;

pub(crate) struct Answer {
    pub(crate) status: hyper::StatusCode,
    pub(crate) content_type: Option<hyper::header::HeaderValue>,
    pub(crate) location: Option<String>,
    pub(crate) body: Bytes,
}

/// Why an exchange failed, which decides what is tried next.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ExchangeError {
    /// Nothing of an answer came: the engine may not have seen the request.
    #[error("no answer: {0}")]
    NoAnswer(io::Error),
    /// An answer began and then broke or was malformed.
    #[error("broken answer: {0}")]
    Broken(String),
}

impl From<Malformed> for ExchangeError {
    fn from(e: Malformed) -> Self {
        ExchangeError::Broken(e.to_string())
    }
}

pub(crate) struct Connection {
    stream: MaybeTls,
    buf: BytesMut,
}

impl Connection {
    /// Connects to `addr` (`host:port`), through TLS when `tls` is given.
    pub(crate) async fn open(addr: &str, tls: Option<&TlsConnector>) -> io::Result<Connection> {
        let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
        tcp.set_nodelay(true)?;
        let stream = match tls {
            None => MaybeTls::Plain(tcp),
            Some(connector) => {
                let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
                let host = host.trim_start_matches('[').trim_end_matches(']');
                let name = ServerName::try_from(host.to_string())
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
                let tls = tokio::time::timeout(CONNECT_TIMEOUT, connector.connect(name, tcp))
                    .await
                    .map_err(|_| {
                        io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out")
                    })??;
                MaybeTls::Tls(Box::new(tokio_rustls::TlsStream::Client(tls)))
            }
        };
        Ok(Connection {
            stream,
            buf: BytesMut::with_capacity(READ_CHUNK),
        })
    }

    /// Sends `head` then `body`, and reads the answer. Returns whether the
    /// connection can carry another request.
    pub(crate) async fn exchange(
        &mut self,
        mut head: Vec<u8>,
        body: &[u8],
        head_request: bool,
    ) -> Result<(Answer, bool), ExchangeError> {
        let sent = if body.len() <= COPIED_BODY {
            head.extend_from_slice(body);
            self.stream.write_all(&head).await
        } else {
            match self.stream.write_all(&head).await {
                Ok(()) => self.stream.write_all(body).await,
                e => e,
            }
        };
        // A no-op on plain TCP; TLS may hold the end of a record.
        let sent = match sent {
            Ok(()) => self.stream.flush().await,
            e => e,
        };
        sent.map_err(ExchangeError::NoAnswer)?;
        // Bytes left in the buffer would belong to no request.
        self.buf.clear();
        let (head, len) = loop {
            if let Some((head, len)) = answer::parse_head(&self.buf, head_request)? {
                if head.status.is_informational() {
                    let _ = self.buf.split_to(len);
                    continue;
                }
                break (head, len);
            }
            if !self.buf.is_empty() {
                self.more().await?;
                continue;
            }
            match self.fill().await {
                Ok(0) => return Err(ExchangeError::NoAnswer(io::ErrorKind::UnexpectedEof.into())),
                Err(e) => return Err(ExchangeError::NoAnswer(e)),
                Ok(_) => {}
            }
        };
        let _ = self.buf.split_to(len);
        let body = self.body(head.framing).await?;
        let reusable = head.keep_alive && self.buf.is_empty();
        Ok((
            Answer {
                status: head.status,
                content_type: head.content_type,
                location: head.location,
                body,
            },
            reusable,
        ))
    }

    async fn body(&mut self, framing: Framing) -> Result<Bytes, ExchangeError> {
        match framing {
            Framing::Empty => Ok(Bytes::new()),
            Framing::Length(n) => {
                while self.buf.len() < n {
                    // Not all at once: the engine may not send what it claims.
                    self.buf.reserve((n - self.buf.len()).min(1 << 20));
                    self.more().await?;
                }
                Ok(self.buf.split_to(n).freeze())
            }
            Framing::Chunked => {
                let (mut chunked, mut body) = (Chunked::default(), BytesMut::new());
                while !chunked.decode(&mut self.buf, &mut body)? {
                    self.more().await?;
                }
                Ok(body.freeze())
            }
            Framing::UntilClose => {
                while self
                    .fill()
                    .await
                    .map_err(|e| ExchangeError::Broken(e.to_string()))?
                    > 0
                {
                    if self.buf.len() > answer::MAX_BODY {
                        return Err(Malformed::BodyTooLarge.into());
                    }
                }
                Ok(self.buf.split().freeze())
            }
        }
    }

    /// More of an answer that has begun: the engine closing now breaks it.
    async fn more(&mut self) -> Result<(), ExchangeError> {
        match self.fill().await {
            Ok(0) => Err(ExchangeError::Broken("the engine closed mid-answer".into())),
            Ok(_) => Ok(()),
            Err(e) => Err(ExchangeError::Broken(e.to_string())),
        }
    }

    async fn fill(&mut self) -> io::Result<usize> {
        self.buf.reserve(READ_CHUNK);
        self.stream.read_buf(&mut self.buf).await
    }
}

/// Idle connections per engine address, newest last.
#[derive(Default)]
pub(crate) struct Pool {
    idle: Mutex<Idle>,
}

#[derive(Default)]
struct Idle {
    plain: HashMap<String, Vec<(Connection, Instant)>>,
    tls: HashMap<String, Vec<(Connection, Instant)>>,
    swept: Option<Instant>,
}

impl Idle {
    fn of(&mut self, tls: bool) -> &mut HashMap<String, Vec<(Connection, Instant)>> {
        if tls {
            &mut self.tls
        } else {
            &mut self.plain
        }
    }

    /// Closes connections idle for too long, everywhere, now and then.
    fn sweep(&mut self, now: Instant) {
        if self
            .swept
            .is_some_and(|at| now.duration_since(at) < IDLE_TIMEOUT / 4)
        {
            return;
        }
        self.swept = Some(now);
        for map in [&mut self.plain, &mut self.tls] {
            map.retain(|_, conns| {
                conns.retain(|(_, since)| now.duration_since(*since) < IDLE_TIMEOUT);
                !conns.is_empty()
            });
        }
    }
}

impl Pool {
    /// The most recently used idle connection to `addr`, if any.
    pub(crate) fn take(&self, addr: &str, tls: bool) -> Option<Connection> {
        let mut idle = self.idle.lock().expect("pool poisoned");
        let conns = idle.of(tls).get_mut(addr)?;
        let (conn, since) = conns.pop()?;
        (since.elapsed() < IDLE_TIMEOUT).then_some(conn)
    }

    pub(crate) fn put(&self, addr: &str, tls: bool, conn: Connection) {
        let now = Instant::now();
        let mut idle = self.idle.lock().expect("pool poisoned");
        idle.sweep(now);
        let conns = match idle.of(tls).get_mut(addr) {
            Some(conns) => conns,
            None => idle.of(tls).entry(addr.to_string()).or_default(),
        };
        if conns.len() >= MAX_IDLE_PER_ADDR {
            conns.remove(0);
        }
        conns.push((conn, now));
    }
}
