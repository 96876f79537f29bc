//! The monitoring files in `deploy/monitoring/`: the Grafana dashboard and
//! the Prometheus alerting rules parse, and every metric and label their
//! expressions use is one that rouse declares. What is exported comes from
//! the metric catalogues of the crates (every metric with its kind, labels
//! and help, also those that only appear after rare events such as a Redis
//! fallback), checked against the `/metrics` of a real control and proxy
//! after a few requests and a wake, and against what DESIGN.md promises.
//!
//! Where `promtool` is installed, `promtool check rules` validates the
//! rules as well.

mod promql;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use rouse_control_api::{CreateDatabase, Engine, Name};
use rouse_runtime::metric::Kind;

use promql::{check_expr, labels_of, promql};
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
        .chain(rouse_proxy::METRICS)
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
    let rules = serde_norway::from_str::<Value>(&read(&monitoring("alerts.yml")))
        .expect("alerts.yml parses");
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
    let config = serde_norway::from_str::<Value>(&read(&monitoring("prometheus.yml")))
        .expect("prometheus.yml parses");
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
    let exported = catalogue();
    // Recording goes through the catalogues: no metric macro elsewhere.
    let mut files = Vec::new();
    for dir in ["proxy/src", "control"] {
        rust_files(&repo().join(dir), &mut files);
    }
    let declared_at = repo().join("control/runtime/src/metric.rs");
    for file in files.iter().filter(|f| **f != declared_at) {
        let text = read(file);
        for name in ["counter!(", "gauge!(", "histogram!("] {
            assert!(
                !text.contains(&format!("metrics::{name}")),
                "{}: records a metric past the catalogue ({name}...))",
                file.display()
            );
        }
    }
    // What DESIGN.md promises operators, with its labels.
    for (name, labels) in [
        (
            "rouse_requests_total",
            &["app", "db", "protocol", "outcome"][..],
        ),
        ("rouse_request_duration_seconds", &[]),
        ("rouse_wake_duration_seconds", &["engine"]),
        ("rouse_waiting_requests", &["db"]),
        ("rouse_backend_up", &["cluster", "member", "role"]),
        ("rouse_databases", &["status"]),
        ("rouse_client_connections", &["protocol"]),
        ("rouse_redis_fallback_total", &[]),
    ] {
        let Some(declared) = exported.get(name) else {
            panic!("no catalogue declares {name}, which DESIGN.md promises");
        };
        for label in labels {
            assert!(
                declared.labels.contains(*label),
                "{name} lacks the label {label} that DESIGN.md promises"
            );
        }
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
                panic!("{process} exports {name}, which no catalogue declares");
            };
            assert_eq!(kind, m.kind.as_str(), "{process}: kind of {name}");
            assert!(
                labels.is_subset(&m.labels),
                "{process}: {name} has labels {labels:?}, its declaration {:?}",
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
