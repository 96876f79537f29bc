//! Hosts in network namespaces of their own, on one bridge, for tests of
//! what crosses a network: a host can be cut off (its link taken down) and
//! joined again. Needs root (CAP_NET_ADMIN) and `ip` from iproute2.
//! Dropping the network removes the namespaces and the bridge.

use std::net::{IpAddr, Ipv4Addr};
use std::process::Command;

use anyhow::{ensure, Context, Result};

pub struct Network {
    /// `rb<id>`, in the test's own namespace, addressed `<prefix>.254`.
    bridge: String,
    prefix: [u8; 3],
    /// Namespace names, host `i` at `<prefix>.<i + 1>`.
    hosts: Vec<String>,
    /// The bridge side of each host's veth pair: down = cut off.
    links: Vec<String>,
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("cannot run ip (iproute2)")?;
    ensure!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

impl Network {
    /// `count` hosts on a fresh bridge with a /24 of 198.18.0.0/15 (the
    /// range set aside for network tests) chosen from this process's id,
    /// so that parallel test processes differ.
    pub fn create(count: usize) -> Result<Network> {
        let id = std::process::id() % 512;
        let prefix = [198, 18 + (id / 256) as u8, (id % 256) as u8];
        let mut net = Network {
            bridge: format!("rb{id}"),
            prefix,
            hosts: Vec::new(),
            links: Vec::new(),
        };
        // Left over by a killed run with the same id.
        let _ = ip(&["link", "del", &net.bridge]);
        for i in 0..count {
            let _ = ip(&["netns", "del", &format!("rn{id}h{i}")]);
        }
        ip(&["link", "add", &net.bridge, "type", "bridge"])?;
        ip(&[
            "addr",
            "add",
            &format!("{}/24", net.gateway()),
            "dev",
            &net.bridge,
        ])?;
        ip(&["link", "set", &net.bridge, "up"])?;
        for i in 0..count {
            let ns = format!("rn{id}h{i}");
            let link = format!("rv{id}h{i}");
            ip(&["netns", "add", &ns])?;
            net.hosts.push(ns.clone());
            ip(&[
                "link", "add", &link, "type", "veth", "peer", "name", "eth0", "netns", &ns,
            ])?;
            net.links.push(link.clone());
            ip(&["link", "set", &link, "master", &net.bridge, "up"])?;
            let addr = format!("{}/24", net.addr(i));
            ip(&["-n", &ns, "addr", "add", &addr, "dev", "eth0"])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        }
        Ok(net)
    }

    /// The test's own address on the bridge.
    pub fn gateway(&self) -> IpAddr {
        let [a, b, c] = self.prefix;
        IpAddr::V4(Ipv4Addr::new(a, b, c, 254))
    }

    /// Host `i`'s address.
    pub fn addr(&self, i: usize) -> IpAddr {
        let [a, b, c] = self.prefix;
        IpAddr::V4(Ipv4Addr::new(a, b, c, i as u8 + 1))
    }

    /// Host `i`'s namespace name, for `ip netns exec`.
    pub fn netns(&self, i: usize) -> &str {
        &self.hosts[i]
    }

    /// Cuts host `i` off from every other host and from the test.
    pub fn cut(&self, i: usize) -> Result<()> {
        ip(&["link", "set", &self.links[i], "down"])
    }

    /// Connects host `i` again.
    pub fn join(&self, i: usize) -> Result<()> {
        ip(&["link", "set", &self.links[i], "up"])
    }

    /// `program` to run inside host `i`'s namespace.
    pub fn command(&self, i: usize, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.hosts[i], program]);
        cmd
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        for ns in &self.hosts {
            let _ = ip(&["netns", "del", ns]);
        }
        let _ = ip(&["link", "del", &self.bridge]);
    }
}
