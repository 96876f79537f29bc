//! The monitoring files in `deploy/monitoring/`: the Grafana dashboard and
//! the Prometheus alerting rules parse, and every metric and label their
//! expressions use is one that rouse exports. What is exported comes from
//! two places that are checked against each other: the
//! `metrics::counter!/gauge!/histogram!` calls in the sources (every metric
//! with its kind and labels, also those that only appear after rare events
//! such as a Redis fallback), and the `/metrics` of a real control and proxy
//! after a few requests and a wake.
//!
//! The rules are YAML and the tests crate has no YAML parser, so the test
//! reads them with a small block-style YAML reader that refuses whatever it
//! does not understand (flow collections, anchors, tabs); where `promtool`
//! is installed, `promtool check rules` validates them as well.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use rouse_control_api::{CreateDatabase, Engine, Name};
use rouse_runtime::metric::Kind;
use rouse_tests::{Control, Proxy};
use serde_json::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lies inside the workspace")
        .to_path_buf()
}

fn monitoring(file: &str) -> PathBuf {
    repo().join("deploy/monitoring").join(file)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

// ---------------------------------------------------------------------------
// What the sources export.

#[derive(Debug)]
struct Metric {
    kind: Kind,
    labels: BTreeSet<String>,
}

/// Every metric the daemons declare in their catalogues.
fn catalogue() -> BTreeMap<String, Metric> {
    rouse_runtime::metric::CATALOGUE
        .iter()
        .chain(rouse_control::METRICS)
        .map(|m| {
            let labels = m.labels.iter().map(|l| l.to_string()).collect();
            (
                m.name.to_string(),
                Metric {
                    kind: m.kind,
                    labels,
                },
            )
        })
        .collect()
}

/// Every metric recorded by a `metrics::` macro in the `.rs` files under
/// `dirs`, with the label names of all its call sites.
fn source_metrics(dirs: &[PathBuf]) -> BTreeMap<String, Metric> {
    let mut files = Vec::new();
    for dir in dirs {
        rust_files(dir, &mut files);
    }
    assert!(!files.is_empty(), "no sources under {dirs:?}");
    let mut out: BTreeMap<String, Metric> = BTreeMap::new();
    for file in files {
        let text = read(&file);
        for (macro_name, kind) in [
            ("counter!(", Kind::Counter),
            ("gauge!(", Kind::Gauge),
            ("histogram!(", Kind::Histogram),
        ] {
            for (at, _) in text.match_indices(macro_name) {
                let args = macro_args(&text[at + macro_name.len()..]);
                let literals = string_literals(args);
                let Some((name, _)) = literals.first() else {
                    // A name that is not a literal would escape this test.
                    panic!(
                        "{}: {macro_name}...) without a literal metric name",
                        file.display()
                    );
                };
                let labels = literals
                    .iter()
                    .filter(|(_, followed_by_arrow)| *followed_by_arrow)
                    .map(|(l, _)| l.clone());
                let entry = out.entry(name.clone()).or_insert_with(|| Metric {
                    kind,
                    labels: BTreeSet::new(),
                });
                assert_eq!(
                    entry.kind,
                    kind,
                    "{name} is recorded as two kinds of metric ({})",
                    file.display()
                );
                entry.labels.extend(labels);
            }
        }
    }
    out
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        if path.is_dir() {
            if !path.ends_with("target") {
                rust_files(&path, out);
            }
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The text up to the `)` that closes a macro call's argument list.
fn macro_args(text: &str) -> &str {
    let mut depth = 0;
    let mut in_string = false;
    let mut escaped = false;
    for (i, c) in text.char_indices() {
        if in_string {
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match c {
            '"' => in_string = true,
            '(' => depth += 1,
            ')' if depth == 0 => return &text[..i],
            ')' => depth -= 1,
            _ => {}
        }
    }
    panic!("unterminated macro call: {text:.80}")
}

/// The string literals of a macro's arguments, each with whether `=>`
/// follows it (a label name) or not (the metric name, or a label value).
fn string_literals(args: &str) -> Vec<(String, bool)> {
    let mut out = Vec::new();
    let mut rest = args;
    while let Some(start) = rest.find('"') {
        let body = &rest[start + 1..];
        let end = body.find('"').expect("unterminated string literal");
        let literal = body[..end].to_string();
        rest = &body[end + 1..];
        out.push((literal, rest.trim_start().starts_with("=>")));
    }
    out
}

// ---------------------------------------------------------------------------
// What a running process exports.

/// Metric name → (kind, label names of its series) in Prometheus text.
fn exposition(text: &str) -> BTreeMap<String, (String, BTreeSet<String>)> {
    let mut out: BTreeMap<String, (String, BTreeSet<String>)> = BTreeMap::new();
    for line in text.lines() {
        if let Some(t) = line.strip_prefix("# TYPE ") {
            let mut parts = t.split_whitespace();
            let (name, kind) = (parts.next().unwrap(), parts.next().unwrap());
            out.insert(name.to_string(), (kind.to_string(), BTreeSet::new()));
            continue;
        }
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let name_end = line.find(['{', ' ']).expect("a series line");
        let series = &line[..name_end];
        let base = out
            .keys()
            .filter(|n| series.starts_with(n.as_str()))
            .max_by_key(|n| n.len())
            .unwrap_or_else(|| panic!("series without a # TYPE line: {line}"))
            .clone();
        if line[name_end..].starts_with('{') {
            let labels = &line[name_end + 1..line.rfind('}').unwrap()];
            for (label, _) in split_label_pairs(labels) {
                if label != "le" && label != "quantile" {
                    out.get_mut(&base).unwrap().1.insert(label);
                }
            }
        }
    }
    out
}

/// `a="x",b="y,z"` → [(a, x), (b, y,z)].
fn split_label_pairs(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = s;
    while let Some(eq) = rest.find('=') {
        let label = rest[..eq].trim().trim_start_matches(',').trim().to_string();
        let value_and_more = &rest[eq + 1..];
        assert!(value_and_more.starts_with('"'), "bad labels: {s}");
        let mut end = 1;
        let bytes = value_and_more.as_bytes();
        while bytes[end] != b'"' {
            end += if bytes[end] == b'\\' { 2 } else { 1 };
        }
        out.push((label, value_and_more[1..end].to_string()));
        rest = &value_and_more[end + 1..];
    }
    out
}

// ---------------------------------------------------------------------------
// PromQL: which metrics and labels an expression uses.

#[derive(Debug, Default)]
struct Uses {
    /// Each selector's metric name and the label names of its matchers.
    selectors: Vec<(String, Vec<String>)>,
    /// Labels of `by`, `without`, `on`, `ignoring`, `group_left/right`.
    grouping: Vec<String>,
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

fn promql(expr: &str) -> Uses {
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
fn labels_of(name: &str, exported: &BTreeMap<String, Metric>) -> Result<BTreeSet<String>, String> {
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
fn check_expr(
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

// ---------------------------------------------------------------------------
// A block-style YAML subset: mappings, sequences, plain and quoted scalars,
// literal and folded block scalars, comments. Scalars stay strings.

struct YamlReader {
    /// (indent, content without the indent) per line; `None` for blank or
    /// comment-only lines.
    lines: Vec<Option<(usize, String)>>,
    raw: Vec<String>,
    pos: usize,
}

fn parse_yaml(text: &str) -> Result<Value, String> {
    let raw: Vec<String> = text.lines().map(String::from).collect();
    let mut lines = Vec::new();
    for (n, line) in raw.iter().enumerate() {
        let content = line.trim_start_matches(' ');
        if content.starts_with('\t') {
            return Err(format!("line {}: tab indentation", n + 1));
        }
        if content.is_empty() || content.starts_with('#') {
            lines.push(None);
        } else {
            lines.push(Some((line.len() - content.len(), content.to_string())));
        }
    }
    let mut r = YamlReader { lines, raw, pos: 0 };
    let value = r.node(0)?;
    r.skip_blank();
    if r.pos < r.lines.len() {
        return Err(format!("line {}: unexpected content", r.pos + 1));
    }
    Ok(value)
}

impl YamlReader {
    fn skip_blank(&mut self) {
        while self.pos < self.lines.len() && self.lines[self.pos].is_none() {
            self.pos += 1;
        }
    }

    fn current(&mut self) -> Option<(usize, String)> {
        self.skip_blank();
        self.lines.get(self.pos).cloned().flatten()
    }

    /// The node starting at the current line, indented at least `min`.
    fn node(&mut self, min: usize) -> Result<Value, String> {
        let Some((indent, content)) = self.current() else {
            return Ok(Value::Null);
        };
        if indent < min {
            return Ok(Value::Null);
        }
        if content == "-" || content.starts_with("- ") {
            self.sequence(indent)
        } else if key_of(&content).is_some() {
            self.mapping(indent)
        } else {
            Err(format!(
                "line {}: a scalar where a block was expected",
                self.pos + 1
            ))
        }
    }

    fn sequence(&mut self, indent: usize) -> Result<Value, String> {
        let mut items = Vec::new();
        while let Some((i, content)) = self.current() {
            if i != indent || !(content == "-" || content.starts_with("- ")) {
                break;
            }
            let rest = content[1..].trim_start();
            if rest.is_empty() {
                self.pos += 1;
                items.push(self.node(indent + 1)?);
            } else if key_of(rest).is_some() {
                // `- key: value`: a mapping indented where its first key is.
                let at = indent + (content.len() - rest.len());
                self.lines[self.pos] = Some((at, rest.to_string()));
                items.push(self.mapping(at)?);
            } else {
                self.pos += 1;
                items.push(scalar(rest).map_err(|e| format!("line {}: {e}", self.pos))?);
            }
        }
        Ok(Value::Array(items))
    }

    fn mapping(&mut self, indent: usize) -> Result<Value, String> {
        let mut map = serde_json::Map::new();
        while let Some((i, content)) = self.current() {
            if i < indent {
                break;
            }
            let line = self.pos + 1;
            if i > indent || content.starts_with("- ") {
                return Err(format!("line {line}: bad indentation"));
            }
            let (key, rest) = key_of(&content).ok_or(format!("line {line}: expected `key:`"))?;
            self.pos += 1;
            let value = match rest.as_str() {
                "" => match self.current() {
                    // A sequence may sit at its key's indentation.
                    Some((j, c)) if j == indent && (c == "-" || c.starts_with("- ")) => {
                        self.sequence(indent)?
                    }
                    _ => self.node(indent + 1)?,
                },
                "|" | "|-" | ">" | ">-" => self.block_scalar(indent, &rest),
                _ => scalar(&rest).map_err(|e| format!("line {line}: {e}"))?,
            };
            if map.insert(key.clone(), value).is_some() {
                return Err(format!("line {line}: duplicate key {key}"));
            }
        }
        Ok(Value::Object(map))
    }

    /// The lines indented deeper than `indent`, blank ones included.
    fn block_scalar(&mut self, indent: usize, style: &str) -> Value {
        let mut body: Vec<String> = Vec::new();
        let mut block_indent = None;
        while self.pos < self.raw.len() {
            match &self.lines[self.pos] {
                Some((i, _)) if *i <= indent => break,
                Some((i, _)) => {
                    let at = *block_indent.get_or_insert(*i);
                    body.push(self.raw[self.pos].get(at..).unwrap_or("").to_string());
                }
                None => body.push(
                    self.raw[self.pos]
                        .get(block_indent.unwrap_or(usize::MAX)..)
                        .unwrap_or("")
                        .to_string(),
                ),
            }
            self.pos += 1;
        }
        while body.last().is_some_and(|l| l.trim().is_empty()) {
            body.pop();
        }
        let mut text = if style.starts_with('>') {
            body.join(" ")
        } else {
            body.join("\n")
        };
        if !style.ends_with('-') {
            text.push('\n');
        }
        Value::String(text)
    }
}

/// `key: rest` → (key, rest) for a plain key.
fn key_of(content: &str) -> Option<(String, String)> {
    let colon = content
        .find(": ")
        .or_else(|| content.ends_with(':').then(|| content.len() - 1))?;
    let key = &content[..colon];
    (!key.is_empty() && key.chars().all(|c| is_ident(c) || c == '-' || c == '.'))
        .then(|| (key.to_string(), content[colon + 1..].trim().to_string()))
}

fn scalar(s: &str) -> Result<Value, String> {
    let s = s.trim();
    if let Some(body) = s.strip_prefix('"') {
        let mut out = String::new();
        let mut chars = body.chars();
        loop {
            match chars.next().ok_or("unterminated double-quoted string")? {
                '"' => break,
                '\\' => out.push(match chars.next().ok_or("bad escape")? {
                    'n' => '\n',
                    't' => '\t',
                    c @ ('"' | '\\' | '/') => c,
                    c => return Err(format!("unsupported escape \\{c}")),
                }),
                c => out.push(c),
            }
        }
        let rest = chars.as_str().trim();
        if !(rest.is_empty() || rest.starts_with('#')) {
            return Err(format!("text after a quoted string: {rest}"));
        }
        return Ok(Value::String(out));
    }
    if let Some(body) = s.strip_prefix('\'') {
        let end = body.replace("''", "\u{0}");
        let close = end.find('\'').ok_or("unterminated single-quoted string")?;
        return Ok(Value::String(end[..close].replace('\u{0}', "'")));
    }
    if s.starts_with(['[', '{', '&', '*', '!', '|', '>', '%', '@', '`']) {
        return Err(format!("unsupported YAML: {s}"));
    }
    let plain = match s.find(" #") {
        Some(at) => &s[..at],
        None => s,
    };
    Ok(Value::String(plain.trim_end().to_string()))
}

// ---------------------------------------------------------------------------

/// Expressions, each with where it is (`panel "..."`, `alert ...`).
type Exprs = Vec<(String, String)>;

/// Every expression of the dashboard (panels and rows' panels) with where
/// it is, and the `label_values(...)` queries of its variables.
fn dashboard_exprs(dashboard: &Value) -> (Exprs, Exprs) {
    let mut exprs = Vec::new();
    let mut panels: Vec<&Value> = Vec::new();
    for p in dashboard["panels"].as_array().expect("panels") {
        panels.push(p);
        panels.extend(p["panels"].as_array().into_iter().flatten());
    }
    for p in panels {
        if p["type"] == "row" {
            continue;
        }
        let title = p["title"].as_str().expect("panel title");
        let targets = p["targets"]
            .as_array()
            .unwrap_or_else(|| panic!("{title}: no targets"));
        assert!(!targets.is_empty(), "{title}: no targets");
        for t in targets {
            let expr = t["expr"]
                .as_str()
                .unwrap_or_else(|| panic!("{title}: target without expr"));
            exprs.push((format!("panel {title:?}"), expr.to_string()));
        }
    }
    let mut variables = Vec::new();
    for v in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if v["type"] != "query" {
            continue;
        }
        let name = v["name"].as_str().unwrap();
        let query = v["query"]["query"]
            .as_str()
            .or(v["query"].as_str())
            .unwrap_or_else(|| panic!("variable {name} without a query"));
        variables.push((format!("variable {name}"), query.to_string()));
    }
    (exprs, variables)
}

#[test]
fn dashboard_is_importable() {
    let dashboard: Value =
        serde_json::from_str(&read(&monitoring("grafana-dashboard.json"))).expect("valid JSON");
    let inputs = dashboard["__inputs"].as_array().expect("__inputs");
    assert!(
        inputs
            .iter()
            .any(|i| i["name"] == "DS_PROMETHEUS" && i["pluginId"] == "prometheus"),
        "the data source is the input DS_PROMETHEUS: {inputs:?}"
    );
    assert!(dashboard["title"].is_string() && dashboard["uid"].is_string());
    let mut ids = BTreeSet::new();
    for p in dashboard["panels"].as_array().unwrap() {
        let title = p["title"].as_str().unwrap_or_default();
        assert!(
            ids.insert(p["id"].as_u64().expect("panel id")),
            "duplicate panel id: {title}"
        );
        let pos = &p["gridPos"];
        assert!(
            ["h", "w", "x", "y"].iter().all(|k| pos[k].is_u64()),
            "{title}: gridPos {pos}"
        );
        assert!(
            pos["x"].as_u64().unwrap() + pos["w"].as_u64().unwrap() <= 24,
            "{title}: wider than the grid"
        );
        if p["type"] != "row" {
            assert_eq!(p["datasource"]["uid"], "${DS_PROMETHEUS}", "{title}");
            for t in p["targets"].as_array().unwrap() {
                assert_eq!(t["datasource"]["uid"], "${DS_PROMETHEUS}", "{title}");
            }
        }
    }
    for v in dashboard["templating"]["list"].as_array().unwrap() {
        if v["type"] == "query" {
            assert_eq!(
                v["datasource"]["uid"], "${DS_PROMETHEUS}",
                "variable {}",
                v["name"]
            );
        }
    }
}

/// The alerting rules: groups of rules with alert, expr, a severity and a
/// summary; every alert name once.
fn alert_rules() -> Exprs {
    let rules = parse_yaml(&read(&monitoring("alerts.yml"))).expect("alerts.yml parses");
    let mut names = BTreeSet::new();
    let mut out = Vec::new();
    for group in rules["groups"].as_array().expect("groups") {
        let group_name = group["name"].as_str().expect("group name");
        for rule in group["rules"].as_array().expect("rules") {
            let name = rule["alert"]
                .as_str()
                .unwrap_or_else(|| panic!("{group_name}: a rule without `alert`"));
            assert!(names.insert(name.to_string()), "alert {name} twice");
            let expr = rule["expr"]
                .as_str()
                .unwrap_or_else(|| panic!("{name}: no expr"));
            let severity = rule["labels"]["severity"].as_str().unwrap_or_default();
            assert!(
                ["critical", "warning", "info"].contains(&severity),
                "{name}: severity {severity:?}"
            );
            assert!(
                rule["annotations"]["summary"].is_string(),
                "{name}: no summary"
            );
            if let Some(d) = rule.get("for") {
                let d = d.as_str().unwrap();
                assert!(
                    d.len() > 1
                        && d[..d.len() - 1].parse::<u32>().is_ok()
                        && d.ends_with(['s', 'm', 'h']),
                    "{name}: for {d:?}"
                );
            }
            for key in rule.as_object().unwrap().keys() {
                assert!(
                    [
                        "alert",
                        "expr",
                        "for",
                        "labels",
                        "annotations",
                        "keep_firing_for"
                    ]
                    .contains(&key.as_str()),
                    "{name}: unknown key {key}"
                );
            }
            out.push((format!("alert {name}"), expr.to_string()));
        }
    }
    assert!(!out.is_empty());
    out
}

#[test]
fn alert_rules_parse() {
    let rules = alert_rules();
    // The scrape jobs the rules name are those of the example configuration.
    let config = parse_yaml(&read(&monitoring("prometheus.yml"))).expect("prometheus.yml parses");
    assert_eq!(config["rule_files"], serde_json::json!(["alerts.yml"]));
    let jobs: BTreeSet<&str> = config["scrape_configs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["job_name"].as_str().unwrap())
        .collect();
    for (what, expr) in &rules {
        for (at, _) in expr.match_indices("job=\"") {
            let job = expr[at + 5..].split('"').next().unwrap();
            assert!(
                jobs.contains(job),
                "{what}: job {job:?} is not in prometheus.yml ({jobs:?})"
            );
        }
    }
    match std::process::Command::new("promtool")
        .args(["check", "rules"])
        .arg(monitoring("alerts.yml"))
        .output()
    {
        Ok(out) => assert!(
            out.status.success(),
            "promtool check rules: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(_) => eprintln!("promtool is not installed: alerts.yml checked by this test only"),
    }
}

#[test]
fn yaml_subset() {
    let v = parse_yaml(
        "# c\na:\n  - name: x\n    list:\n    - 1\n    - \"two # not a comment\"\n  - b: 'it''s'\n    c: |\n      line 1\n\n      line 3\n    d: >-\n      folded\n      text\ne: plain # comment\n",
    )
    .unwrap();
    assert_eq!(
        v,
        serde_json::json!({
            "a": [
                {"name": "x", "list": ["1", "two # not a comment"]},
                {"b": "it's", "c": "line 1\n\nline 3\n", "d": "folded text"}
            ],
            "e": "plain"
        })
    );
    assert!(parse_yaml("a: [1, 2]\n").is_err());
    assert!(parse_yaml("a:\n\tb: 1\n").is_err());
    assert!(parse_yaml("a: 1\na: 2\n").is_err());
}

#[test]
fn promql_uses() {
    let u = promql(
        r#"sum by (app, db) (rate(rouse_requests_total{outcome=~"backend|x", app="a{b}"}[$__rate_interval]))
             / on (app) group_left sum(rate(rouse_requests_total[5m])) > 0.05 and up{job="p"} == bool 1"#,
    );
    assert_eq!(
        u.selectors,
        [
            (
                "rouse_requests_total".to_string(),
                vec!["outcome".to_string(), "app".to_string()]
            ),
            ("rouse_requests_total".to_string(), vec![]),
            ("up".to_string(), vec!["job".to_string()]),
        ]
    );
    assert_eq!(u.grouping, ["app", "db", "app"]);
}

#[tokio::test]
async fn monitoring_uses_only_exported_metrics() {
    let mut exported = catalogue();
    for (name, m) in source_metrics(&[repo().join("proxy/src")]) {
        if let Some(declared) = exported.get(&name) {
            assert_eq!(
                declared.kind, m.kind,
                "{name}: kind in the sources and the catalogue"
            );
            assert!(
                m.labels.is_subset(&declared.labels),
                "{name}: labels {:?} in the sources, {:?} declared",
                m.labels,
                declared.labels
            );
        } else {
            exported.insert(name, m);
        }
    }
    for core in [
        "rouse_requests_total",
        "rouse_request_duration_seconds",
        "rouse_wake_duration_seconds",
        "rouse_backend_up",
        "rouse_databases",
        "rouse_client_connections",
        "rouse_redis_fallback_total",
    ] {
        assert!(
            exported.contains_key(core),
            "the source scan misses {core}: {exported:?}"
        );
    }

    // A control and a proxy that served requests, refused one and woke a
    // database: their /metrics must agree with the sources.
    let control = Control::builder()
        .hibernation_timeout("0")
        .start()
        .await
        .unwrap();
    let client = control.client();
    let app = Name::new("mon").unwrap();
    let db = Name::new("metrics").unwrap();
    client.create_app(&app).await.unwrap();
    let key = client.create_key(&app).await.unwrap().key;
    client
        .create_database(&CreateDatabase {
            app: app.clone(),
            name: db.clone(),
            engine: Engine::Rqlite,
            replication_factor: Some(1),
            patroni: None,
        })
        .await
        .unwrap();
    let proxy = Proxy::builder(&control).start().await.unwrap();
    let http = reqwest::Client::new();
    let url = format!("{}/mon/metrics/db/query", proxy.url());
    let query = |key: String| {
        let (http, url) = (http.clone(), url.clone());
        async move {
            http.post(url)
                .header("Authorization", format!("ApiKey {key}"))
                .json(&serde_json::json!(["SELECT 1"]))
                .send()
                .await
                .unwrap()
                .status()
        }
    };
    assert!(query(key.clone()).await.is_success());
    assert_eq!(
        query("ak_wrong".into()).await,
        reqwest::StatusCode::UNAUTHORIZED
    );
    client.hibernate(&app, &db, true).await.unwrap();
    assert!(query(key.clone()).await.is_success(), "through a wake");
    assert!(client
        .database(&app, &Name::new("nothing").unwrap())
        .await
        .is_err());

    let control_text = http
        .get(format!("{}/metrics", control.api_url()))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let proxy_text = proxy.metrics().await.unwrap();
    let mut seen = BTreeSet::new();
    for (process, text) in [("control", &control_text), ("proxy", &proxy_text)] {
        for (name, (kind, labels)) in exposition(text) {
            let Some(m) = exported.get(&name) else {
                panic!("{process} exports {name}, which the source scan did not find");
            };
            assert_eq!(kind, m.kind.as_str(), "{process}: kind of {name}");
            assert!(
                labels.is_subset(&m.labels),
                "{process}: {name} has labels {labels:?}, the sources {:?}",
                m.labels
            );
            seen.insert(name);
        }
    }
    for expected in [
        "rouse_requests_total",
        "rouse_request_duration_seconds",
        "rouse_client_connections",
        "rouse_auth_validations_total",
        "rouse_waiting_requests",
        "rouse_wake_duration_seconds",
        "rouse_databases",
        "rouse_control_requests_total",
        "rouse_control_errors_total",
        "rouse_wake_requests_total",
    ] {
        assert!(
            seen.contains(expected),
            "{expected} is not exported after requests and a wake:\n{proxy_text}\n{control_text}"
        );
    }

    // Every expression of the dashboard and the rules.
    let dashboard: Value =
        serde_json::from_str(&read(&monitoring("grafana-dashboard.json"))).unwrap();
    let (panels, variables) = dashboard_exprs(&dashboard);
    let mut problems = Vec::new();
    let mut used = BTreeSet::new();
    for (what, expr) in panels.iter().chain(&alert_rules()) {
        problems.extend(check_expr(what, expr, &exported, &mut used));
    }
    for (what, query) in &variables {
        let inner = query
            .strip_prefix("label_values(")
            .and_then(|q| q.strip_suffix(')'))
            .unwrap_or_else(|| {
                panic!("{what}: only label_values(...) queries are checked: {query}")
            });
        let (selector, label) = inner.rsplit_once(',').unwrap();
        let selector_uses = promql(selector);
        problems.extend(check_expr(what, selector, &exported, &mut used));
        for (metric, _) in selector_uses.selectors {
            if labels_of(&metric, &exported).is_ok_and(|l| !l.contains(label.trim())) {
                problems.push(format!("{what}: {metric} has no label {}", label.trim()));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));

    // And the dashboard shows every metric rouse exports.
    let mut shown = BTreeSet::new();
    for (_, expr) in &panels {
        for (metric, _) in promql(expr).selectors {
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| metric.strip_suffix(s).filter(|b| exported.contains_key(*b)))
                .unwrap_or(&metric)
                .to_string();
            shown.insert(base);
        }
    }
    let missing: Vec<&String> = exported.keys().filter(|m| !shown.contains(*m)).collect();
    assert!(missing.is_empty(), "no dashboard panel shows {missing:?}");
}
