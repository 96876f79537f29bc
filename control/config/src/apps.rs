//! Per-app limits (`apps:` in the configuration): how much of a node one
//! tenant may take, so that one app's burst cannot starve the others.
//! Control enforces the database count and create rate; proxies the
//! connections and the requests waiting for wakes.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The State Pillar's server plans, by the connections they carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Plan {
    /// 100 connections.
    Cx21,
    /// 200 connections.
    Cx31,
    /// 500 connections.
    Cx41,
}

impl Plan {
    pub fn max_connections(self) -> usize {
        match self {
            Plan::Cx21 => 100,
            Plan::Cx31 => 200,
            Plan::Cx41 => 500,
        }
    }
}

/// Limits as written: every field optional, an override falls back to
/// `apps.default`, which falls back to its plan, then to [`Limits::BUILT_IN`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AppLimits {
    pub plan: Option<Plan>,
    /// Databases the app may hold.
    pub max_databases: Option<u32>,
    /// Database creations per minute (API and first access alike).
    pub creates_per_minute: Option<u32>,
    /// PostgreSQL sessions of the app at one proxy.
    pub max_connections: Option<usize>,
    /// PostgreSQL sessions of one of its databases at one proxy.
    pub max_connections_per_database: Option<usize>,
    /// Requests of the app waiting for wakes at one proxy.
    pub max_waiting: Option<usize>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AppsConfig {
    pub default: AppLimits,
    /// By app name.
    pub overrides: BTreeMap<String, AppLimits>,
}

/// The limits in force for one app.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_databases: u32,
    pub creates_per_minute: u32,
    pub max_connections: usize,
    pub max_connections_per_database: usize,
    pub max_waiting: usize,
}

impl Limits {
    /// Without configuration: generous, but bounded.
    pub const BUILT_IN: Limits = Limits {
        max_databases: 100,
        creates_per_minute: 60,
        max_connections: 1_000,
        max_connections_per_database: 1_000,
        max_waiting: 10_000,
    };
}

impl AppsConfig {
    pub fn limits(&self, app: &str) -> Limits {
        let own = self.overrides.get(app);
        let pick =
            |f: fn(&AppLimits) -> Option<usize>| own.and_then(f).or_else(|| f(&self.default));
        let plan = own.and_then(|o| o.plan).or(self.default.plan);
        let built_in = Limits::BUILT_IN;
        let max_connections = pick(|l| l.max_connections)
            .or(plan.map(Plan::max_connections))
            .unwrap_or(built_in.max_connections);
        Limits {
            max_databases: pick(|l| l.max_databases.map(|n| n as usize))
                .map_or(built_in.max_databases, |n| n as u32),
            creates_per_minute: pick(|l| l.creates_per_minute.map(|n| n as usize))
                .map_or(built_in.creates_per_minute, |n| n as u32),
            max_connections,
            max_connections_per_database: pick(|l| l.max_connections_per_database)
                .unwrap_or(max_connections),
            max_waiting: pick(|l| l.max_waiting).unwrap_or(built_in.max_waiting),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_override_falls_back_to_the_default_then_its_plan_then_built_in() {
        let apps = AppsConfig {
            default: AppLimits {
                plan: Some(Plan::Cx21),
                max_databases: Some(10),
                ..AppLimits::default()
            },
            overrides: [(
                "big".to_string(),
                AppLimits {
                    plan: Some(Plan::Cx41),
                    max_waiting: Some(5),
                    ..AppLimits::default()
                },
            )]
            .into(),
        };
        let small = apps.limits("small");
        assert_eq!((small.max_databases, small.max_connections), (10, 100));
        assert_eq!(small.max_connections_per_database, 100);
        assert_eq!(
            small.creates_per_minute,
            Limits::BUILT_IN.creates_per_minute
        );
        let big = apps.limits("big");
        assert_eq!(
            (big.max_databases, big.max_connections, big.max_waiting),
            (10, 500, 5)
        );
        assert_eq!(AppsConfig::default().limits("any"), Limits::BUILT_IN);
    }
}
