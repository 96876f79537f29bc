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
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a relay");
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

async fn relay(client: TcpStream, to: String, gates: Arc<Gates>) {
    if gates.cut.load(Ordering::SeqCst) {
        return;
    }
    let Ok(server) = TcpStream::connect(&to).await else {
        return;
    };
    // A kept-alive connection may carry API calls first and the event
    // stream later: any request line for it marks the connection.
    let events = AtomicBool::new(false);
    let closed = || {
        gates.cut.load(Ordering::SeqCst)
            || (events.load(Ordering::SeqCst) && gates.events.load(Ordering::SeqCst))
    };
    let (mut client_rx, mut client_tx) = client.into_split();
    let (mut server_rx, mut server_tx) = server.into_split();
    let upstream = async {
        let mut buf = vec![0u8; 16 << 10];
        loop {
            let n = match client_rx.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if buf[..n].windows(EVENTS.len()).any(|w| w == EVENTS) {
                events.store(true, Ordering::SeqCst);
            }
            if closed() || server_tx.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    let downstream = tokio::io::copy(&mut server_rx, &mut client_tx);
    let gate = async {
        while !closed() {
            tokio::time::sleep(LOOK).await;
        }
    };
    tokio::select! { _ = upstream => {}, _ = downstream => {}, _ = gate => {} }
}

/// The request line of control's event stream.
const EVENTS: &[u8] = b"GET /api/v1/events";

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}
