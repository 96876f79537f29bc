//! Idle client sockets parked outside the runtime. A client that says
//! nothing still costs a task and a reactor registration (about 1.7 KiB)
//! in tokio; parked, it costs its own state and one slot here. One thread
//! waits on an epoll set of its own for any parked socket to become
//! readable (or to close), then hands socket and state back, and the
//! state's [`Resume`] puts them on the runtime again.
//!
//! Parking costs three `epoll_ctl` calls and a thread hop, so sessions
//! park only after a while without a word, never between quick requests.

use std::io;
use std::net::TcpStream;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Mutex, OnceLock};

use tracing::{error, warn};

use crate::metrics::PARKED_CLIENTS;

/// What a parked socket comes back to.
pub(crate) trait Resume: Send + 'static {
    /// Called once the socket is readable or closed, or when
    /// [`unpark`]ed; on the parking thread, so it only hands work on.
    fn resume(self: Box<Self>, socket: TcpStream);
}

/// Names one parking; a later parking in the same slot has another, so a
/// stale ticket wakes nothing. Never 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Ticket(u64);

impl Ticket {
    pub(crate) fn get(self) -> u64 {
        self.0
    }

    pub(crate) fn from_raw(raw: u64) -> Ticket {
        Ticket(raw)
    }

    fn new(index: u32, generation: u32) -> Ticket {
        Ticket((u64::from(generation) << 32) | u64::from(index))
    }

    fn index(self) -> usize {
        (self.0 & u64::from(u32::MAX)) as usize
    }

    fn generation(self) -> u32 {
        (self.0 >> 32) as u32
    }
}

struct Slot {
    /// Starts at 1 and moves on at every take, so that a ticket is never 0.
    generation: u32,
    parked: Option<(TcpStream, Box<dyn Resume>)>,
}

#[derive(Default)]
struct Slots {
    slots: Vec<Slot>,
    free: Vec<u32>,
}

struct Parker {
    epoll: OwnedFd,
    slots: Mutex<Slots>,
    gauge: metrics::Gauge,
}

static PARKER: OnceLock<Option<Parker>> = OnceLock::new();

/// The process's parker, its thread started on first use; `None` when
/// the kernel refused an epoll set (said once, then nothing parks).
fn parker() -> Option<&'static Parker> {
    PARKER
        .get_or_init(|| {
            // SAFETY: epoll_create1 takes only flags; the result is checked.
            let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
            if fd < 0 {
                error!(error = %io::Error::last_os_error(), "no epoll set: idle clients stay in the runtime");
                return None;
            }
            // SAFETY: a descriptor just created and owned by nothing else.
            let epoll = unsafe { OwnedFd::from_raw_fd(fd) };
            Some(Parker {
                epoll,
                slots: Mutex::default(),
                gauge: PARKED_CLIENTS.gauge([]),
            })
        })
        .as_ref()
        .inspect(|_| start_thread())
}

fn start_thread() {
    static STARTED: OnceLock<()> = OnceLock::new();
    STARTED.get_or_init(|| {
        let spawned = std::thread::Builder::new()
            .name("rouse-parked".into())
            .spawn(|| {
                let parker = PARKER
                    .get()
                    .and_then(Option::as_ref)
                    .expect("parker made before its thread");
                parker.wait_forever()
            });
        if let Err(e) = spawned {
            // Parked sockets then come back only through `unpark`.
            error!(error = %e, "the thread for idle clients did not start");
        }
    });
}

/// Parks `socket` with `state` until it is readable or closed. When
/// nothing can park here, `state` resumes at once and `None` is returned.
pub(crate) fn park(socket: TcpStream, state: Box<dyn Resume>) -> Option<Ticket> {
    let Some(parker) = parker() else {
        state.resume(socket);
        return None;
    };
    let fd = socket.as_raw_fd();
    let ticket = {
        let mut slots = parker.slots.lock().expect("parker poisoned");
        let index = match slots.free.pop() {
            Some(i) => i,
            None => {
                slots.slots.push(Slot {
                    generation: 1,
                    parked: None,
                });
                (slots.slots.len() - 1) as u32
            }
        };
        let slot = &mut slots.slots[index as usize];
        slot.parked = Some((socket, state));
        Ticket::new(index, slot.generation)
    };
    parker.gauge.increment(1.0);
    // In the slot before the socket is watched: the thread may take it at once.
    let mut event = libc::epoll_event {
        events: (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLONESHOT) as u32,
        u64: ticket.get(),
    };
    // SAFETY: both descriptors are open (the socket is in its slot) and
    // `event` outlives the call.
    let added = unsafe {
        libc::epoll_ctl(
            parker.epoll.as_raw_fd(),
            libc::EPOLL_CTL_ADD,
            fd,
            &mut event,
        )
    };
    if added < 0 {
        warn!(error = %io::Error::last_os_error(), "a client could not be parked");
        unpark(ticket);
        return None;
    }
    Some(ticket)
}

/// Hands a parked socket back now, as if it had become readable (KILL
/// does, so a parked session ends at once). A stale ticket does nothing.
pub(crate) fn unpark(ticket: Ticket) {
    if let Some((socket, state)) = parker().and_then(|p| p.take(ticket)) {
        state.resume(socket);
    }
}

/// How many sockets are parked.
#[cfg(test)]
fn parked() -> usize {
    PARKER
        .get()
        .and_then(Option::as_ref)
        .map(|p| {
            let slots = p.slots.lock().expect("parker poisoned");
            slots.slots.len() - slots.free.len()
        })
        .unwrap_or(0)
}

impl Parker {
    /// Takes the socket and state of `ticket` out of the set.
    fn take(&self, ticket: Ticket) -> Option<(TcpStream, Box<dyn Resume>)> {
        let taken = {
            let mut slots = self.slots.lock().expect("parker poisoned");
            let slot = slots.slots.get_mut(ticket.index())?;
            if slot.generation != ticket.generation() || slot.parked.is_none() {
                return None;
            }
            slot.generation = slot.generation.checked_add(1).unwrap_or(1);
            let taken = slot.parked.take();
            slots.free.push(ticket.index() as u32);
            taken
        }?;
        self.gauge.decrement(1.0);
        self.forget(taken.0.as_raw_fd());
        Some(taken)
    }

    /// Takes `fd` out of the epoll set (it may still be armed when
    /// unparked); the runtime registers it again.
    fn forget(&self, fd: RawFd) {
        // SAFETY: both descriptors are open; DEL ignores the event pointer.
        unsafe {
            libc::epoll_ctl(
                self.epoll.as_raw_fd(),
                libc::EPOLL_CTL_DEL,
                fd,
                std::ptr::null_mut(),
            )
        };
    }

    fn wait_forever(&self) -> ! {
        let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
        loop {
            // SAFETY: `events` has room for the count given.
            let n = unsafe {
                libc::epoll_wait(
                    self.epoll.as_raw_fd(),
                    events.as_mut_ptr(),
                    events.len() as i32,
                    -1,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    error!(error = %e, "waiting for parked clients failed");
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
                continue;
            }
            for event in &events[..n as usize] {
                if let Some((socket, state)) = self.take(Ticket(event.u64)) {
                    state.resume(socket);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpListener;
    use std::sync::mpsc;
    use std::time::Duration;

    /// Sends its name and the socket back when resumed.
    struct Back(&'static str, mpsc::Sender<(&'static str, TcpStream)>);

    impl Resume for Back {
        fn resume(self: Box<Self>, socket: TcpStream) {
            let _ = self.1.send((self.0, socket));
        }
    }

    fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        server.set_nonblocking(true).unwrap();
        (client, server)
    }

    const SOON: Duration = Duration::from_secs(5);
    const QUIET: Duration = Duration::from_millis(200);

    #[test]
    fn a_parked_socket_comes_back_when_its_peer_writes_or_leaves_and_not_before() {
        let (tx, rx) = mpsc::channel();
        let (mut talker, server) = pair();
        let (leaver, quiet_server) = pair();
        park(server, Box::new(Back("talker", tx.clone()))).unwrap();
        park(quiet_server, Box::new(Back("leaver", tx))).unwrap();
        assert!(rx.recv_timeout(QUIET).is_err(), "nothing was sent yet");
        assert!(parked() >= 2);

        talker.write_all(b"Q").unwrap();
        let (name, mut socket) = rx.recv_timeout(SOON).unwrap();
        assert_eq!(name, "talker");
        let mut byte = [0u8; 1];
        socket.set_nonblocking(false).unwrap();
        socket.read_exact(&mut byte).unwrap();
        assert_eq!(&byte, b"Q", "the byte is still there to read");

        drop(leaver);
        let (name, _) = rx.recv_timeout(SOON).unwrap();
        assert_eq!(name, "leaver");
    }

    #[test]
    fn unpark_hands_back_at_once_and_a_stale_ticket_wakes_nothing() {
        let (tx, rx) = mpsc::channel();
        let (_peer, server) = pair();
        let ticket = park(server, Box::new(Back("first", tx.clone()))).unwrap();
        unpark(ticket);
        let (name, socket) = rx.recv_timeout(SOON).unwrap();
        assert_eq!(name, "first");

        // Parked again, likely in the same slot: the old ticket is spent.
        let again = park(socket, Box::new(Back("second", tx))).unwrap();
        assert_ne!(again, ticket);
        unpark(ticket);
        assert!(
            rx.recv_timeout(QUIET).is_err(),
            "a stale ticket woke a session"
        );
        unpark(again);
        assert_eq!(rx.recv_timeout(SOON).unwrap().0, "second");
    }
}
