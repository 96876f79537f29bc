//! Hosts in network namespaces of their own, on one switch, for tests of
//! what crosses a network: a host can be cut off (its link taken down) and
//! joined again. Needs root (CAP_NET_ADMIN) and `ip` from iproute2.
//! Dropping the network removes the namespaces and the bridge.

use std::net::{IpAddr, Ipv4Addr};
use std::process::Command;

use anyhow::{ensure, Context, Result};

pub struct Network {
    /// The namespace holding the bridge (`br0`) that joins the hosts: a
    /// namespace of its own has no firewall rules to drop bridged traffic.
    switch: String,
    /// The test's link into the switch, addressed `<prefix>.254`.
    uplink: String,
    prefix: [u8; 3],
    /// Namespace names, host `i` at `<prefix>.<i + 1>`.
    hosts: Vec<String>,
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
        let net = Network {
            switch: format!("rn{id}sw"),
            uplink: format!("rv{id}up"),
            prefix,
            hosts: (0..count).map(|i| format!("rn{id}h{i}")).collect(),
        };
        // Left over by a killed run with the same id.
        net.remove();
        let sw = net.switch.as_str();
        ip(&["netns", "add", sw])?;
        ip(&["-n", sw, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", sw, "link", "set", "br0", "up"])?;
        ip(&[
            "link",
            "add",
            &net.uplink,
            "type",
            "veth",
            "peer",
            "name",
            "gw",
            "netns",
            sw,
        ])?;
        ip(&["-n", sw, "link", "set", "gw", "master", "br0", "up"])?;
        ip(&[
            "addr",
            "add",
            &format!("{}/24", net.gateway()),
            "dev",
            &net.uplink,
        ])?;
        ip(&["link", "set", &net.uplink, "up"])?;
        for (i, ns) in net.hosts.iter().enumerate() {
            let port = format!("h{i}");
            ip(&["netns", "add", ns])?;
            ip(&[
                "-n", sw, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", ns,
            ])?;
            ip(&["-n", sw, "link", "set", &port, "master", "br0", "up"])?;
            let addr = format!("{}/24", net.addr(i));
            ip(&["-n", ns, "addr", "add", &addr, "dev", "eth0"])?;
            ip(&["-n", ns, "link", "set", "eth0", "up"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(net)
    }

    fn remove(&self) {
        for ns in self.hosts.iter().chain([&self.switch]) {
            let _ = ip(&["netns", "del", ns]);
        }
        let _ = ip(&["link", "del", &self.uplink]);
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
        ip(&["-n", &self.switch, "link", "set", &format!("h{i}"), "down"])
    }

    /// Connects host `i` again.
    pub fn join(&self, i: usize) -> Result<()> {
        ip(&["-n", &self.switch, "link", "set", &format!("h{i}"), "up"])
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
        self.remove();
    }
}
