//! Port allocation: random in the configured range, bind-probed, and sticky
//! (a database asks for its previous port first).

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::ops::RangeInclusive;
use std::sync::Mutex;

use rand::Rng;

use crate::error::ControlError;

#[derive(Default)]
pub struct PortAllocator {
    held: Mutex<HashSet<u16>>,
}

impl PortAllocator {
    /// A free port of `range` on `host`, `preferred` when it is free.
    pub fn allocate(
        &self,
        range: RangeInclusive<u16>,
        host: IpAddr,
        preferred: Option<u16>,
    ) -> Result<u16, ControlError> {
        let mut held = self.held.lock().expect("port set poisoned");
        let usable =
            |port: u16, held: &HashSet<u16>| !held.contains(&port) && bind_probe(host, port);
        if let Some(p) = preferred.filter(|p| range.contains(p)) {
            if usable(p, &held) {
                held.insert(p);
                return Ok(p);
            }
        }
        let (start, end) = (*range.start(), *range.end());
        let len = u32::from(end - start) + 1;
        let offset = rand::rng().random_range(0..len);
        for i in 0..len {
            let port = start + ((offset + i) % len) as u16;
            if usable(port, &held) {
                held.insert(port);
                return Ok(port);
            }
        }
        Err(ControlError::PortsExhausted { start, end })
    }

    /// Marks a port taken without probing (the `_system` store's own ports).
    pub fn hold(&self, port: u16) {
        self.held.lock().expect("port set poisoned").insert(port);
    }

    /// Ports of `range` that are neither held here nor in `bound` (see
    /// [`bound_ports`]).
    pub fn free_in(&self, range: RangeInclusive<u16>, bound: &HashSet<u16>) -> u32 {
        let held = self.held.lock().expect("port set poisoned");
        range
            .filter(|p| !held.contains(p) && !bound.contains(p))
            .count() as u32
    }

    pub fn release(&self, ports: impl IntoIterator<Item = u16>) {
        let mut held = self.held.lock().expect("port set poisoned");
        for p in ports {
            held.remove(&p);
        }
    }
}

/// Whether `host:port` can be bound now.
pub fn bind_probe(host: IpAddr, port: u16) -> bool {
    TcpListener::bind(SocketAddr::new(host, port)).is_ok()
}

/// TCP ports that sockets hold on `host` or on every address, as the
/// kernel lists them: one read instead of a bind probe per port, for
/// counting what is left (allocation still probes the port it hands out).
/// Sockets in TIME_WAIT do not count: a listener binds over them.
pub fn bound_ports(host: IpAddr) -> HashSet<u16> {
    let mut bound = HashSet::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        bound.extend(text.lines().skip(1).filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (addr, port) = fields.nth(1)?.split_once(':')?;
            let state = fields.nth(1)?;
            let on_host = addr.chars().all(|c| c == '0') || kernel_addr(addr) == Some(host);
            (on_host && state != TIME_WAIT)
                .then(|| u16::from_str_radix(port, 16).ok())
                .flatten()
        }));
    }
    bound
}

/// The state column's value for TIME_WAIT.
const TIME_WAIT: &str = "06";

/// An address as `/proc/net/tcp{,6}` writes it: 32-bit words in host order.
fn kernel_addr(hex: &str) -> Option<IpAddr> {
    let words: Vec<u32> = (0..hex.len() / 8)
        .map(|i| u32::from_str_radix(hex.get(i * 8..i * 8 + 8)?, 16).ok())
        .collect::<Option<_>>()?;
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_ne_bytes()).collect();
    match bytes.len() {
        4 => Some(IpAddr::from(<[u8; 4]>::try_from(bytes).ok()?)),
        16 => {
            let v6 = std::net::Ipv6Addr::from(<[u8; 16]>::try_from(bytes).ok()?);
            Some(v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LO: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    /// A port the OS says is free now (the tests use one-port ranges so
    /// that no other process on the machine can interfere).
    fn free_port() -> u16 {
        TcpListener::bind((LO, 0))
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    #[test]
    fn never_hands_out_a_port_twice_and_reports_exhaustion() {
        let ports = PortAllocator::default();
        let p = free_port();
        assert_eq!(ports.allocate(p..=p, LO, None).unwrap(), p);
        let err = ports.allocate(p..=p, LO, None).unwrap_err();
        assert!(
            matches!(err, ControlError::PortsExhausted { start, end } if start == p && end == p)
        );
        ports.release([p]);
        assert_eq!(ports.allocate(p..=p, LO, None).unwrap(), p);
    }

    #[test]
    fn counts_bound_and_held_ports_as_taken() {
        let ports = PortAllocator::default();
        let listener = TcpListener::bind((LO, 0)).unwrap();
        let b = listener.local_addr().unwrap().port();
        let bound = bound_ports(LO);
        assert!(bound.contains(&b), "{b} is listening");
        assert_eq!(ports.free_in(b..=b, &bound), 0);
        drop(listener);
        let p = free_port();
        assert!(!bound_ports(LO).contains(&p), "{p} is free");
        assert_eq!(ports.free_in(p..=p, &bound_ports(LO)), 1);
        ports.hold(p);
        assert_eq!(ports.free_in(p..=p, &bound_ports(LO)), 0);
        // A port bound on another loopback address is free on this one
        // (unless some other process of this machine holds it there too).
        let other = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 2));
        let (_elsewhere, e) = (0..20)
            .map(|_| {
                let l = TcpListener::bind((other, 0)).unwrap();
                let e = l.local_addr().unwrap().port();
                (l, e)
            })
            .find(|(_, e)| TcpListener::bind((LO, *e)).is_ok())
            .expect("a port free on 127.0.0.1");
        assert!(bound_ports(other).contains(&e));
        assert!(!bound_ports(LO).contains(&e));
    }

    #[test]
    fn prefers_the_previous_port_and_skips_bound_ones() {
        let ports = PortAllocator::default();
        let p = free_port();
        assert_eq!(
            ports
                .allocate(p.saturating_sub(100)..=p, LO, Some(p))
                .unwrap(),
            p
        );
        let busy = TcpListener::bind((LO, 0)).unwrap();
        let b = busy.local_addr().unwrap().port();
        assert!(matches!(
            ports.allocate(b..=b, LO, Some(b)),
            Err(ControlError::PortsExhausted { .. })
        ));
    }
}
