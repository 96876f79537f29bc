//! SHOW STATS, SHOW STATS_TOTALS and SHOW STATS_AVERAGES in PgBouncer's
//! (1.23) column layout: per database, totals since the proxy started and
//! averages over the last period; times in microseconds.

use super::super::traffic::{Totals, Traffic};
use super::show::{text, Table};

const STATS: &[&str] = &[
    "database",
    "total_server_assignment_count",
    "total_xact_count",
    "total_query_count",
    "total_received",
    "total_sent",
    "total_xact_time",
    "total_query_time",
    "total_wait_time",
    "avg_server_assignment_count",
    "avg_xact_count",
    "avg_query_count",
    "avg_recv",
    "avg_sent",
    "avg_xact_time",
    "avg_query_time",
    "avg_wait_time",
];
/// SHOW STATS_TOTALS and SHOW STATS_AVERAGES.
const SPLIT: &[&str] = &[
    "database",
    "server_assignment_count",
    "xact_count",
    "query_count",
    "bytes_received",
    "bytes_sent",
    "xact_time",
    "query_time",
    "wait_time",
];

/// Which of the three tables.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub(crate) enum StatsTable {
    Both,
    Totals,
    Averages,
}

fn numbers(t: &Totals) -> [u64; 8] {
    [
        t.assignments,
        t.xacts,
        t.queries,
        t.received,
        t.sent,
        t.xact_us,
        t.query_us,
        t.wait_us,
    ]
}

pub(super) fn table(traffic: &Traffic, which: StatsTable) -> Table {
    let rows = traffic
        .stats()
        .iter()
        .map(|(key, t, a)| {
            let numbers: Vec<u64> = match which {
                StatsTable::Both => numbers(t).into_iter().chain(numbers(a)).collect(),
                StatsTable::Totals => numbers(t).to_vec(),
                StatsTable::Averages => numbers(a).to_vec(),
            };
            std::iter::once(text(key.internal()))
                .chain(numbers.into_iter().map(text))
                .collect()
        })
        .collect();
    let columns = match which {
        StatsTable::Both => STATS,
        StatsTable::Totals | StatsTable::Averages => SPLIT,
    };
    (columns, rows)
}
