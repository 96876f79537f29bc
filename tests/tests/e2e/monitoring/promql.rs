//! PromQL as far as the monitoring files need it: which metrics and labels
//! an expression uses, and whether each is one rouse declares.

use std::collections::{BTreeMap, BTreeSet};

use rouse_runtime::metric::Kind;

use super::Metric;

#[derive(Debug, Default)]
pub(super) struct Uses {
    /// Each selector's metric name and the label names of its matchers.
    pub(super) selectors: Vec<(String, Vec<String>)>,
    /// Labels of `by`, `without`, `on`, `ignoring`, `group_left/right`.
    pub(super) grouping: Vec<String>,
}

const AGGREGATIONS: [&str; 14] = [
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "limitk",
    "limit_ratio",
];
const GROUPING: [&str; 6] = [
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];
const KEYWORDS: [&str; 8] = [
    "and", "or", "unless", "bool", "offset", "atan2", "inf", "nan",
];

fn is_ident_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_' || c == ':'
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

pub(super) fn promql(expr: &str) -> Uses {
    let chars: Vec<char> = expr.chars().collect();
    let mut uses = Uses::default();
    let mut i = 0;
    // The selector a following `{` belongs to.
    let mut attach: Option<usize> = None;
    let skip_ws = |mut i: usize| {
        while i < chars.len() && chars[i].is_whitespace() {
            i += 1;
        }
        i
    };
    let ident_at = |mut i: usize| {
        let start = i;
        while i < chars.len() && is_ident(chars[i]) {
            i += 1;
        }
        (chars[start..i].iter().collect::<String>(), i)
    };
    let skip_string = |i: usize| {
        let quote = chars[i];
        let mut j = i + 1;
        while chars[j] != quote {
            j += if chars[j] == '\\' { 2 } else { 1 };
        }
        j + 1
    };
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
            continue;
        }
        if c == '"' || c == '\'' || c == '`' {
            i = skip_string(i);
            attach = None;
        } else if c == '#' {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c == '[' {
            while chars[i] != ']' {
                i += 1;
            }
            i += 1;
            attach = None;
        } else if c == '{' {
            let target =
                attach.unwrap_or_else(|| panic!("a selector without a metric name: {expr}"));
            i += 1;
            loop {
                i = skip_ws(i);
                if chars[i] == '}' {
                    i += 1;
                    break;
                }
                if chars[i] == ',' {
                    i += 1;
                    continue;
                }
                let (label, j) = ident_at(i);
                assert!(!label.is_empty(), "bad matcher in {expr}");
                uses.selectors[target].1.push(label);
                i = skip_ws(j);
                while matches!(chars[i], '=' | '!' | '~') {
                    i += 1;
                }
                i = skip_string(skip_ws(i));
            }
            attach = None;
        } else if c.is_ascii_digit()
            || (c == '.' && chars.get(i + 1).is_some_and(char::is_ascii_digit))
        {
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                i += 1;
            }
            attach = None;
        } else if c == '$' {
            // A Grafana variable outside a string, e.g. `$__rate_interval`.
            let (_, j) = ident_at(i + 1);
            i = j;
            attach = None;
        } else if is_ident_start(c) {
            let (word, j) = ident_at(i);
            i = j;
            attach = None;
            let next = skip_ws(i);
            if GROUPING.contains(&word.as_str()) {
                if chars.get(next) == Some(&'(') {
                    let close = next + chars[next..].iter().position(|&c| c == ')').unwrap();
                    let list: String = chars[next + 1..close].iter().collect();
                    uses.grouping.extend(
                        list.split(',')
                            .map(str::trim)
                            .filter(|l| !l.is_empty())
                            .map(String::from),
                    );
                    i = close + 1;
                }
            } else if KEYWORDS.contains(&word.as_str())
                || AGGREGATIONS.contains(&word.as_str())
                || chars.get(next) == Some(&'(')
            {
                // An operator or a function.
            } else {
                uses.selectors.push((word, Vec::new()));
                attach = Some(uses.selectors.len() - 1);
            }
        } else {
            i += 1;
            attach = None;
        }
    }
    uses
}

/// Whether `name` (as an expression uses it) is exported, and with which
/// labels: histograms as `_bucket` (with `le`), `_sum` and `_count`;
/// Prometheus' own `up`; every series also carries `job` and `instance`.
pub(super) fn labels_of(
    name: &str,
    exported: &BTreeMap<String, Metric>,
) -> Result<BTreeSet<String>, String> {
    let mut labels: BTreeSet<String> = ["job", "instance"].map(String::from).into();
    if name == "up" {
        return Ok(labels);
    }
    if let Some(m) = exported.get(name) {
        if m.kind == Kind::Histogram {
            return Err(format!(
                "{name} is a histogram: use {name}_bucket, _sum or _count"
            ));
        }
        labels.extend(m.labels.iter().cloned());
        return Ok(labels);
    }
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(m) = name
            .strip_suffix(suffix)
            .and_then(|base| exported.get(base))
            .filter(|m| m.kind == Kind::Histogram)
        {
            labels.extend(m.labels.iter().cloned());
            if suffix == "_bucket" {
                labels.insert("le".into());
            }
            return Ok(labels);
        }
    }
    Err(format!("{name} is not exported by rouse"))
}

/// Problems of one expression; `used` collects the metric names.
pub(super) fn check_expr(
    what: &str,
    expr: &str,
    exported: &BTreeMap<String, Metric>,
    used: &mut BTreeSet<String>,
) -> Vec<String> {
    let uses = promql(expr);
    let mut problems = Vec::new();
    if uses.selectors.is_empty() {
        problems.push(format!("{what}: no metric in `{expr}`"));
    }
    let mut all_labels = BTreeSet::new();
    for (metric, labels) in &uses.selectors {
        used.insert(metric.clone());
        match labels_of(metric, exported) {
            Ok(known) => {
                for l in labels {
                    if !known.contains(l) {
                        problems.push(format!("{what}: {metric} has no label {l}"));
                    }
                }
                all_labels.extend(known);
            }
            Err(e) => problems.push(format!("{what}: {e}")),
        }
    }
    for l in &uses.grouping {
        if !all_labels.is_empty() && !all_labels.contains(l) {
            problems.push(format!(
                "{what}: groups by {l}, which none of its metrics has"
            ));
        }
    }
    problems
}
