//! Every metric is declared once, as a [`Metric`] in its crate's catalogue:
//! name, kind, label names and the help text Prometheus shows. Code records
//! through the declaration with the label values in the declared order, so
//! a label cannot be added at one call site and forgotten in the dashboard,
//! and the monitoring files are checked against the catalogues.

use metrics::{Counter, Gauge, Histogram, Label, SharedString};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    /// As Prometheus' `# TYPE` line says it.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

#[derive(Debug)]
pub struct Metric {
    pub name: &'static str,
    pub kind: Kind,
    pub labels: &'static [&'static str],
    pub help: &'static str,
}

impl Metric {
    pub fn counter<const N: usize>(&'static self, values: [SharedString; N]) -> Counter {
        debug_assert_eq!(self.kind, Kind::Counter, "{}", self.name);
        metrics::counter!(self.name, self.labelled(values))
    }

    pub fn gauge<const N: usize>(&'static self, values: [SharedString; N]) -> Gauge {
        debug_assert_eq!(self.kind, Kind::Gauge, "{}", self.name);
        metrics::gauge!(self.name, self.labelled(values))
    }

    pub fn histogram<const N: usize>(&'static self, values: [SharedString; N]) -> Histogram {
        debug_assert_eq!(self.kind, Kind::Histogram, "{}", self.name);
        metrics::histogram!(self.name, self.labelled(values))
    }

    fn labelled<const N: usize>(&'static self, values: [SharedString; N]) -> Vec<Label> {
        // Tests run debug builds: a call site that disagrees with the
        // declaration fails them.
        debug_assert_eq!(N, self.labels.len(), "label values of {}", self.name);
        self.labels
            .iter()
            .zip(values)
            .map(|(k, v)| Label::new(SharedString::const_str(k), v))
            .collect()
    }
}

/// Hands each metric's help text and kind to the recorder, so `/metrics`
/// explains what it exports.
pub fn describe(catalogue: &[&'static Metric]) {
    for m in catalogue {
        match m.kind {
            Kind::Counter => metrics::describe_counter!(m.name, m.help),
            Kind::Gauge => metrics::describe_gauge!(m.name, m.help),
            Kind::Histogram => metrics::describe_histogram!(m.name, m.help),
        }
    }
}

/// Recorded by both daemons.
pub const CLIENT_CONNECTIONS: Metric = Metric {
    name: "rouse_client_connections",
    kind: Kind::Gauge,
    labels: &["protocol"],
    help: "Open client connections, by protocol (http, postgres, redis, tcp, control).",
};

pub const WAKE_DURATION: Metric = Metric {
    name: "rouse_wake_duration_seconds",
    kind: Kind::Histogram,
    labels: &["engine", "phase"],
    help: "Time a wake took, split into phases: wait (a request held until its database answered), start (engine processes started), first_answer (from start to the first answered query).",
};

pub const APP_LIMIT_REFUSALS: Metric = Metric {
    name: "rouse_app_limit_refusals_total",
    kind: Kind::Counter,
    labels: &["limit"],
    help: "Requests refused by an app's limits (apps:): creates in control, sessions and waiting requests in the proxy, by limit.",
};

pub const TASK_RESTARTS: Metric = Metric {
    name: "rouse_task_restarts_total",
    kind: Kind::Counter,
    labels: &["task"],
    help: "Background loops that ended or panicked and were started again, by loop.",
};

/// The metrics of this crate, recorded by both daemons.
pub const CATALOGUE: &[&Metric] = &[
    &CLIENT_CONNECTIONS,
    &WAKE_DURATION,
    &APP_LIMIT_REFUSALS,
    &TASK_RESTARTS,
];
