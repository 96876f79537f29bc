//! Transaction pooling: backend connections per (database, role), lent to a
//! client from the first message of a transaction until ReadyForQuery says
//! idle. Named prepared statements keep working: the proxy remembers each
//! client's Parse and, when a statement is used on a backend that does not
//! have it (or has another statement by that name), prepares it there first
//! and hides the extra ParseComplete/CloseComplete from the client.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::AsyncWriteExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

mod lend;
mod pipeline;
mod session_state;
mod statements;
mod stats;

use session_state::leaves_session_state;
pub(crate) use statements::Statements;

use super::backend::BackendSession;
use super::clients::BackendKey;
use super::error::{closed, PgError};
use super::proto::frame::{has_frame, read_frame, FrameError};
use super::proto::messages;
use super::proto::tags::{backend, error_field, frontend};
use super::scram::Verifier;
use super::traffic::Meter;
use crate::net::MaybeTls;

/// Largest message relayed in transaction mode (PostgreSQL's own limit is 1 GB).
const MAX_MESSAGE: usize = 256 << 20;
/// How long a client waits for a free backend connection.
const CHECKOUT_TIMEOUT: Duration = Duration::from_secs(30);
/// A transaction whose backend went away before the client heard anything
/// is sent again on another one, at most this many times.
const MAX_REPLAYS: u32 = 6;

/// How long pooled backend connections live (PgBouncer's names).
#[derive(Debug, Clone, Copy)]
pub(crate) struct PoolTimes {
    /// An idle connection is closed after this long unused.
    pub(crate) server_idle_timeout: Duration,
    /// A connection is closed when it comes back after living this long.
    pub(crate) server_lifetime: Duration,
}

/// One backend connection of a pool.
pub(crate) struct Pooled {
    session: BackendSession,
    /// Named statements prepared on it: name -> the Parse body that made it.
    prepared: HashMap<String, Bytes>,
    /// The current lease left session state behind (a `SET`, a temporary
    /// table, a session advisory lock...): reset before the next client.
    dirty: bool,
    born: Instant,
    idle_since: Instant,
    _permit: OwnedSemaphorePermit,
}

impl Pooled {
    /// Still fit to lend: neither idle nor alive too long, and nothing
    /// arrived on it unasked. A backend that was stopped (a hibernation, a
    /// restart) sends FATAL and closes; such a connection is dropped here,
    /// so no client ever gets it.
    fn usable(&self, times: &PoolTimes) -> bool {
        let mut byte = [0u8; 1];
        let quiet = matches!(
            self.session.stream.try_read(&mut byte),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock
        );
        quiet
            && self.session.buf.is_empty()
            && self.idle_since.elapsed() < times.server_idle_timeout
            && self.born.elapsed() < times.server_lifetime
    }

    /// `DISCARD ALL`, its answers kept from the client: session settings,
    /// temporary tables, advisory locks, prepared statements and cursors go.
    async fn reset(&mut self) -> Result<(), PgError> {
        let s = &mut self.session;
        s.stream
            .write_all(&messages::query("DISCARD ALL"))
            .await
            .map_err(|e| PgError::Backend(e.to_string()))?;
        loop {
            let frame = read_frame(&mut s.stream, &mut s.buf, true, MAX_MESSAGE)
                .await
                .map_err(|e| PgError::Backend(e.to_string()))?;
            match frame[0] {
                backend::ERROR_RESPONSE => {
                    return Err(PgError::Backend("DISCARD ALL failed".into()))
                }
                backend::READY_FOR_QUERY => break,
                _ => {}
            }
        }
        self.prepared.clear();
        self.dirty = false;
        Ok(())
    }
}

pub(crate) struct Pool {
    role: String,
    database: String,
    /// Backends of the read-only port: `default_transaction_read_only`.
    read_only: bool,
    verifier: Arc<Verifier>,
    /// A key proven by a client of this role: what logs new backends in.
    client_key: Mutex<[u8; 32]>,
    /// Idle connections keep their permit: permits bound all connections.
    idle: Mutex<lend::Idle>,
    permits: Arc<Semaphore>,
    size: usize,
    times: PoolTimes,
    /// The last checkout: a pool nobody uses is dropped.
    last_used: Mutex<Instant>,
    /// ParameterStatus messages of the first backend, sent to each client.
    greeting: Mutex<Vec<BytesMut>>,
    /// Clients waiting for a connection.
    waiting: std::sync::atomic::AtomicUsize,
    /// Where the last checkout went: where the lent connections are.
    last_addr: Mutex<Option<SocketAddr>>,
    /// Connections made before this are closed, not reused (RECONNECT).
    retired_before: Mutex<Option<Instant>>,
}

impl Pool {
    pub(crate) fn new(
        role: &str,
        database: &str,
        verifier: Arc<Verifier>,
        client_key: [u8; 32],
        size: usize,
        times: PoolTimes,
        read_only: bool,
    ) -> Pool {
        Pool {
            role: role.to_string(),
            database: database.to_string(),
            read_only,
            verifier,
            client_key: Mutex::new(client_key),
            idle: Default::default(),
            permits: Arc::new(Semaphore::new(size)),
            size,
            times,
            last_used: Mutex::new(Instant::now()),
            greeting: Mutex::new(Vec::new()),
            waiting: Default::default(),
            last_addr: Mutex::new(None),
            retired_before: Mutex::new(None),
        }
    }

    /// Accepts a newly proven key (the password may have changed).
    pub(crate) fn renew(&self, verifier: &Verifier, client_key: [u8; 32]) -> bool {
        if *verifier != *self.verifier {
            return false;
        }
        *self.client_key.lock().expect("pool poisoned") = client_key;
        true
    }

    pub(crate) fn greeting(&self) -> Vec<BytesMut> {
        self.greeting.lock().expect("pool poisoned").clone()
    }
}

/// A response the client must not see, because the proxy caused it.
struct Hidden {
    /// The batch (count of Syncs/Queries before it) it belongs to.
    batch: u64,
    hide: bool,
}

/// How a lease ended.
enum Leased {
    /// The transaction is over; the client goes on.
    Done,
    /// The client left.
    ClientLeft,
    /// The backend went away before the client heard anything of this
    /// transaction (its database was stopped or restarted): the client's
    /// messages, to be sent again on another backend.
    Again(Vec<BytesMut>),
}

/// Serves a client's next transaction: reads its first message, then
/// lends a backend connection (from `addr`, told when the last one was
/// stale) until ReadyForQuery says idle. A transaction whose backend was
/// gone before the client heard anything is sent again on another.
/// `false` once the client has left.
pub(crate) async fn next_transaction<'a>(
    client: &mut MaybeTls,
    cbuf: &mut BytesMut,
    pool: &Pool,
    addr: impl Fn(bool) -> futures::future::BoxFuture<'a, Result<SocketAddr, PgError>>,
    cancel: &Mutex<Option<Arc<BackendKey>>>,
    meter: &mut Meter,
    statements: &mut Statements,
) -> Result<bool, PgError> {
    let mut frame = match read_frame(client, cbuf, true, MAX_MESSAGE).await {
        Ok(f) => f,
        Err(FrameError::Closed) => return Ok(false),
        Err(e) => return Err(e.into()),
    };
    if frame[0] == frontend::TERMINATE {
        return Ok(false);
    }
    let mut replays = 0;
    loop {
        // Boxed: a transaction's state lives on the heap while it runs.
        let lease = Lease {
            client: &mut *client,
            cbuf: &mut *cbuf,
            pool,
            cancel,
            statements: &mut *statements,
            meter: &mut *meter,
        };
        match Box::pin(lease.run(addr(replays > 0).await?, frame)).await? {
            Leased::Done => return Ok(true),
            Leased::ClientLeft => return Ok(false),
            Leased::Again(_) if replays == MAX_REPLAYS => {
                return Err(PgError::Backend(
                    "the database connection was lost and could not be made again".into(),
                ))
            }
            Leased::Again(mut sent) => {
                replays += 1;
                // Its database is stopping or starting: give it a moment.
                tokio::time::sleep(Duration::from_millis(50 << replays.min(4))).await;
                // The first message opens the lease again; the others
                // are read again from the client's buffer.
                let mut rest = BytesMut::new();
                for f in sent.drain(1..) {
                    rest.extend_from_slice(&f);
                }
                rest.extend_from_slice(cbuf);
                *cbuf = rest;
                frame = sent.pop().expect("a lease starts with a message");
            }
        }
    }
}

/// One backend connection lent to a client, from the first message of a
/// transaction until ReadyForQuery says idle.
struct Lease<'a> {
    client: &'a mut MaybeTls,
    cbuf: &'a mut BytesMut,
    pool: &'a Pool,
    cancel: &'a Mutex<Option<Arc<BackendKey>>>,
    /// The client's named statements: name -> its Parse message.
    statements: &'a mut Statements,
    meter: &'a mut Meter,
}

impl Lease<'_> {
    /// Serves the transaction that `frame` opens.
    async fn run(self, addr: SocketAddr, frame: BytesMut) -> Result<Leased, PgError> {
        let Lease {
            client,
            cbuf,
            pool,
            cancel,
            statements,
            meter,
        } = self;
        let asked_at = Instant::now();
        let mut leased = match pool.checkout(addr).await {
            Ok(b) => {
                meter.assigned(asked_at.elapsed());
                b
            }
            Err(PgError::Unreachable(_)) => return Ok(Leased::Again(vec![frame])),
            Err(e) => return Err(e),
        };
        // The client's messages until it hears the first answer: what is
        // sent again should this backend turn out to be gone.
        let mut unanswered: Option<Vec<BytesMut>> = Some(Vec::new());
        let gone = |unanswered: &mut Option<Vec<BytesMut>>, e: String| match unanswered.take() {
            Some(sent) => Ok(Leased::Again(sent)),
            None => Err(PgError::Backend(e)),
        };
        *cancel.lock().expect("cancel poisoned") = Some(leased.session.key.clone());
        let b = &mut leased;
        let mut responses: VecDeque<Hidden> = VecDeque::new();
        let (mut batches_sent, mut batches_done) = (0u64, 0u64);
        // Messages are gathered while more whole ones are buffered, then
        // written at once: one write for a pipelined batch, not one each.
        let (mut to_backend, mut to_client) = (BytesMut::new(), BytesMut::new());
        let mut frame = Some(frame);
        loop {
            if let Some(f) = frame.take() {
                meter.asked(f.len());
                let f = forward(
                    f,
                    b,
                    statements,
                    &mut responses,
                    &mut batches_sent,
                    &mut to_backend,
                );
                if let Some(sent) = unanswered.as_mut() {
                    sent.push(f);
                }
                if has_frame(cbuf, true, MAX_MESSAGE) {
                    frame = Some(read_frame(client, cbuf, true, MAX_MESSAGE).await?);
                    if frame.as_ref().is_some_and(|f| f[0] == frontend::TERMINATE) {
                        return Ok(Leased::ClientLeft);
                    }
                    continue;
                }
                if let Err(e) = b.session.stream.write_all(&to_backend).await {
                    return gone(&mut unanswered, e.to_string());
                }
                to_backend.clear();
            }
            tokio::select! {
                read = read_frame(client, cbuf, true, MAX_MESSAGE) => {
                    match read {
                        Ok(f) if f[0] != frontend::TERMINATE => frame = Some(f),
                        // The client left mid-transaction: its backend cannot be reused.
                        _ => return Ok(Leased::ClientLeft),
                    };
                }
                read = read_frame(&mut b.session.stream, &mut b.session.buf, true, MAX_MESSAGE) => {
                    let frame = match read {
                        Ok(frame) => frame,
                        Err(e) => return gone(&mut unanswered, e.to_string()),
                    };
                    meter.answered(frame.len());
                    // A backend that is being stopped says FATAL, then closes.
                    if frame[0] == backend::ERROR_RESPONSE
                        && unanswered.is_some()
                        && messages::error_field(&frame, error_field::SEVERITY_V) == Some(b"FATAL")
                    {
                        return gone(&mut unanswered, "the backend ended the session".into());
                    }
                    match frame[0] {
                        backend::PARSE_COMPLETE | backend::CLOSE_COMPLETE => {
                            let hide = responses.pop_front().is_some_and(|r| r.hide);
                            if !hide {
                                to_client.extend_from_slice(&frame);
                            }
                        }
                        backend::ERROR_RESPONSE => {
                            // What was prepared in this batch may not have been.
                            b.prepared.clear();
                            to_client.extend_from_slice(&frame);
                        }
                        backend::PARAMETER_STATUS => {
                            // A reported setting changed: it must not reach the next client.
                            b.dirty = true;
                            to_client.extend_from_slice(&frame);
                        }
                        backend::READY_FOR_QUERY => {
                            batches_done += 1;
                            // Responses of messages skipped after an error never come.
                            while responses.front().is_some_and(|r| r.batch < batches_done) {
                                responses.pop_front();
                            }
                            let status = frame.get(5).copied().unwrap_or(backend::IDLE);
                            meter.ready(status);
                            let in_transaction = status != backend::IDLE;
                            to_client.extend_from_slice(&frame);
                            if batches_done == batches_sent && !in_transaction {
                                *cancel.lock().expect("cancel poisoned") = None;
                                send(client, &to_client).await?;
                                break;
                            }
                        }
                        _ => to_client.extend_from_slice(&frame),
                    }
                    if !has_frame(&b.session.buf, true, MAX_MESSAGE) {
                        // Once the client heard something, nothing is sent again.
                        unanswered = None;
                        send(client, &to_client).await?;
                        to_client.clear();
                    }
                }
            }
        }
        // A backend that cannot be reset is closed, not reused.
        if !leased.dirty || leased.reset().await.is_ok() {
            pool.checkin(leased);
        }
        Ok(Leased::Done)
    }
}

/// A C string at the start of `body`, and the rest.
fn cstr(body: &[u8]) -> Option<(&str, &[u8])> {
    let nul = body.iter().position(|b| *b == 0)?;
    Some((std::str::from_utf8(&body[..nul]).ok()?, &body[nul + 1..]))
}

fn close_statement(name: &str) -> BytesMut {
    messages::message(frontend::CLOSE, |b| {
        b.put_u8(frontend::STATEMENT);
        b.put_slice(name.as_bytes());
        b.put_u8(0);
    })
}

/// Writes what was gathered for the client, through TLS when there is TLS.
async fn send(client: &mut MaybeTls, gathered: &[u8]) -> Result<(), PgError> {
    client.write_all(gathered).await.map_err(closed)?;
    client.flush().await.map_err(closed)
}

/// Adds a client message for the backend to `out`, preparing the statements
/// it uses first; gives the message back.
fn forward(
    frame: BytesMut,
    b: &mut Pooled,
    statements: &mut Statements,
    responses: &mut VecDeque<Hidden>,
    batches_sent: &mut u64,
    out: &mut BytesMut,
) -> BytesMut {
    let body = &frame[5..];
    let batch = *batches_sent;
    // Makes statement `name` exist on this backend as the client prepared it.
    let mut ensure = |name: &str, out: &mut BytesMut, responses: &mut VecDeque<Hidden>| {
        let Some(parse) = statements.get(name) else {
            return;
        };
        let body = Bytes::copy_from_slice(&parse[5..]);
        if b.prepared.get(name) != Some(&body) {
            out.extend_from_slice(&close_statement(name));
            out.extend_from_slice(parse);
            responses.push_back(Hidden { batch, hide: true });
            responses.push_back(Hidden { batch, hide: true });
            b.prepared.insert(name.to_string(), body);
        }
    };
    match frame[0] {
        frontend::PARSE => {
            if let Some((_, rest)) = cstr(body) {
                b.dirty |= cstr(rest).is_some_and(|(sql, _)| leaves_session_state(sql));
            }
            let name = cstr(body).map(|(n, _)| n.to_string()).unwrap_or_default();
            if !name.is_empty() {
                // Replacing a statement of the same name on this backend.
                out.extend_from_slice(&close_statement(&name));
                responses.push_back(Hidden { batch, hide: true });
                b.prepared
                    .insert(name.clone(), Bytes::copy_from_slice(body));
                statements.insert(name, frame.clone());
            }
            responses.push_back(Hidden { batch, hide: false });
        }
        frontend::BIND => {
            if let Some((_portal, rest)) = cstr(body) {
                if let Some((stmt, _)) = cstr(rest) {
                    ensure(stmt, out, responses);
                }
            }
        }
        frontend::DESCRIBE if body.first() == Some(&frontend::STATEMENT) => {
            if let Some((stmt, _)) = cstr(&body[1..]) {
                ensure(stmt, out, responses);
            }
        }
        frontend::CLOSE => {
            if body.first() == Some(&frontend::STATEMENT) {
                if let Some((stmt, _)) = cstr(&body[1..]) {
                    statements.remove(stmt);
                    b.prepared.remove(stmt);
                }
            }
            responses.push_back(Hidden { batch, hide: false });
        }
        frontend::QUERY => {
            b.dirty |= cstr(body).is_some_and(|(sql, _)| leaves_session_state(sql));
            *batches_sent += 1
        }
        frontend::SYNC => *batches_sent += 1,
        _ => {}
    }
    out.extend_from_slice(&frame);
    frame
}
