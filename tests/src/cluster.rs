//! Several `rouse-control` nodes that find each other over libp2p: the
//! first founds the cluster, the others bootstrap from it.

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::{Control, ControlBuilder};

/// Time for every node to list every other as healthy.
const CONVERGE: Duration = Duration::from_secs(30);

pub struct Cluster {
    pub nodes: Vec<Control>,
    /// The first node's libp2p address, with its peer id.
    bootstrap: String,
    /// The first node's cluster key, which every other node is given.
    key: std::path::PathBuf,
    /// The first node's tokens, valid on every node.
    tokens: std::path::PathBuf,
    node: Box<dyn Fn(u8) -> ControlBuilder + Send + Sync>,
}

impl Cluster {
    /// `count` nodes on 127.0.0.1, .2, ..., each `configure`d.
    pub async fn loopback(
        count: usize,
        configure: impl Fn(ControlBuilder) -> ControlBuilder + Send + Sync + 'static,
    ) -> Result<Cluster> {
        Cluster::start(count, move |i| {
            configure(Control::builder().host(IpAddr::V4(Ipv4Addr::new(127, 0, 0, i))))
        })
        .await
    }

    /// `count` nodes, node `i` (from 1) made by `node(i)`; returns when
    /// every node lists every other as healthy.
    pub async fn start(
        count: usize,
        node: impl Fn(u8) -> ControlBuilder + Send + Sync + 'static,
    ) -> Result<Cluster> {
        let first = node(1).start().await?;
        let me = first.client().nodes().await?.nodes.remove(0);
        let addr = me
            .addresses
            .first()
            .context("first node's libp2p address")?;
        let mut cluster = Cluster {
            bootstrap: format!("{addr}/p2p/{}", me.peer_id),
            key: first.data_dir().join("cluster.key"),
            tokens: first.tokens_dir(),
            nodes: vec![first],
            node: Box::new(node),
        };
        let rest =
            futures::future::join_all((2..=count as u8).map(|i| cluster.builder(i).start())).await;
        for node in rest {
            cluster.nodes.push(node?);
        }
        cluster.wait_healthy().await?;
        Ok(cluster)
    }

    fn builder(&self, i: u8) -> ControlBuilder {
        (self.node)(i)
            .bootstrap_peers([self.bootstrap.clone()])
            .cluster_key(&self.key)
            .tokens_in(&self.tokens)
    }

    /// One more node, the next in line.
    pub async fn add(&mut self) -> Result<()> {
        let next = self.builder(self.nodes.len() as u8 + 1).start().await?;
        self.nodes.push(next);
        self.wait_healthy().await
    }

    /// Until every node lists every node as healthy.
    pub async fn wait_healthy(&self) -> Result<()> {
        let start = Instant::now();
        loop {
            let mut ok = true;
            for n in &self.nodes {
                let list = n.client().nodes().await?.nodes;
                ok &= list.len() == self.nodes.len() && list.iter().all(|n| n.healthy);
            }
            if ok {
                return Ok(());
            }
            if start.elapsed() > CONVERGE {
                bail!("nodes not all healthy within {CONVERGE:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Index of the node that coordinates, as the first node sees it.
    pub async fn coordinator(&self) -> Result<usize> {
        let id = self.nodes[0].client().nodes().await?.coordinator;
        match self.node_ids().await?.iter().position(|n| *n == id) {
            Some(i) => Ok(i),
            None => bail!("coordinator {id:?} is none of the nodes"),
        }
    }

    /// Every node's id, in order.
    pub async fn node_ids(&self) -> Result<Vec<String>> {
        let mut ids = Vec::new();
        for i in 0..self.nodes.len() {
            ids.push(self.node_id(i).await?);
        }
        Ok(ids)
    }

    /// Node `i`'s id (index from 0).
    pub async fn node_id(&self, i: usize) -> Result<String> {
        Ok(self.nodes[i]
            .client()
            .nodes()
            .await?
            .nodes
            .remove(0)
            .node_id)
    }
}
