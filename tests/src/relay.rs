//! A TCP relay between a proxy and control that a test can cut, whole or
//! only for control's event stream, to make a proxy miss what control says.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What the relay lets through.
#[derive(Default)]
struct Gates {
    /// Nothing passes; open connections are closed.
    cut: AtomicBool,
    /// `GET /api/v1/events` does not pass; its open stream is closed.
    events: AtomicBool,
}

pub struct Relay {
    addr: SocketAddr,
    gates: Arc<Gates>,
    task: tokio::task::JoinHandle<()>,
}

/// How often open connections look at the gates.
const LOOK: Duration = Duration::from_millis(20);

impl Relay {
    /// A relay on a free loopback port to `to` (`host:port`).
    pub async fn start(to: String) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind a relay");
        let addr = listener.local_addr().expect("the relay's address");
        let gates = Arc::new(Gates::default());
        let shared = gates.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(relay(client, to.clone(), shared.clone()));
            }
        });
        Relay { addr, gates, task }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Cuts (or restores) every connection.
    pub fn set_cut(&self, cut: bool) {
        self.gates.cut.store(cut, Ordering::SeqCst);
    }

    /// Cuts (or restores) control's event stream alone.
    pub fn block_events(&self, blocked: bool) {
        self.gates.events.store(blocked, Ordering::SeqCst);
    }
}

async fn relay(mut client: TcpStream, to: String, gates: Arc<Gates>) {
    if gates.cut.load(Ordering::SeqCst) {
        return;
    }
    // The request line tells an event stream from API calls.
    let mut head = vec![0u8; 64];
    let Ok(n) = client.read(&mut head).await else {
        return;
    };
    head.truncate(n);
    let events = head.starts_with(b"GET /api/v1/events");
    let closed = |gates: &Gates| {
        gates.cut.load(Ordering::SeqCst) || (events && gates.events.load(Ordering::SeqCst))
    };
    if closed(&gates) {
        return;
    }
    let Ok(mut server) = TcpStream::connect(&to).await else {
        return;
    };
    if server.write_all(&head).await.is_err() {
        return;
    }
    let relayed = tokio::io::copy_bidirectional(&mut client, &mut server);
    let gate = async {
        while !closed(&gates) {
            tokio::time::sleep(LOOK).await;
        }
    };
    tokio::select! { _ = relayed => {}, _ = gate => {} }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}
