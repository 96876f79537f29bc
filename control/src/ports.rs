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

    /// Ports of `range` that are neither held here nor bound by anything
    /// else on `host` (each one probed).
    pub fn free_in(&self, range: RangeInclusive<u16>, host: IpAddr) -> u32 {
        let held = self.held.lock().expect("port set poisoned").clone();
        range
            .filter(|p| !held.contains(p) && bind_probe(host, *p))
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
