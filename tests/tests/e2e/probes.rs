//! Monitoring probes of a tenant's database (`/readyz`, `/status` through
//! the rqlite API) neither wake it nor keep it awake.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use rouse_control_api::*;
use rouse_tests::{name, Stack, APP};
use serde_json::{json, Value};

/// `GET <path>` of database `db` through the path prefix and through the
/// Host route, as a monitoring system would send it: per route, the answer
/// and the address the client used (which `/status` must name).
async fn probe(s: &Stack, db: &str, path: &str) -> Vec<(StatusCode, String, String)> {
    let url = s.proxy().url();
    let own = s.proxy().http_addr().to_string();
    let host = format!("{db}.{APP}.localhost");
    let by_prefix = (s.http.get(format!("{url}/{APP}/{db}{path}")), own);
    let by_host = (
        s.http.get(format!("{url}{path}")).header("host", &host),
        host,
    );
    let mut answers = Vec::new();
    for (req, used) in [by_prefix, by_host] {
        let resp = req.bearer_auth(&s.key).send().await.unwrap();
        answers.push((resp.status(), resp.text().await.unwrap(), used));
    }
    answers
}

async fn info(s: &Stack, db: &str) -> DatabaseInfo {
    s.control
        .client()
        .database(&name(APP), &name(db))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_neither_wake_a_database_nor_keep_it_awake() {
    let s = Stack::builder()
        .hibernation("2s")
        .proxy(|p| p.set("activity_interval", "200ms"))
        .start()
        .await;
    let (st, _) = s
        .gateway(
            "exec",
            json!({"database": "watched", "sql": "CREATE TABLE t (x)"}),
        )
        .await;
    assert_eq!(st, StatusCode::OK);

    // Running: the engine answers the probes, and they are no activity.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut answered_running = false;
    while info(&s, "watched").await.status != DatabaseStatus::Hibernating {
        assert!(
            Instant::now() < deadline,
            "probes every 200 ms kept the database awake"
        );
        for (st, body, _) in probe(&s, "watched", "/readyz").await {
            assert_eq!(st, StatusCode::OK, "{body}");
            answered_running |= body.contains("[+]leader ok");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        answered_running,
        "the running engine never answered /readyz"
    );

    // Hibernated: two minutes of probes answer from what the proxy knows.
    let slept = info(&s, "watched").await;
    let until = Instant::now() + Duration::from_secs(120);
    let mut probes = 0;
    while Instant::now() < until {
        for (st, body, _) in probe(&s, "watched", "/readyz").await {
            assert_eq!(st, StatusCode::OK, "{body}");
            assert!(body.contains("hibernating: it wakes on use"), "{body}");
        }
        for (st, body, used) in probe(&s, "watched", "/status").await {
            assert_eq!(st, StatusCode::OK, "{body}");
            let doc: Value = serde_json::from_str(&body).unwrap();
            assert_eq!(doc["rouse"]["status"], "hibernating", "{doc}");
            assert_eq!(doc["rouse"]["wakes_on_use"], true, "{doc}");
            // The proxy, never an engine, is who clients are told to use.
            assert_eq!(doc["store"]["leader"]["addr"], used, "{doc}");
        }
        probes += 4;
        let now = info(&s, "watched").await;
        assert_eq!(
            now.status,
            DatabaseStatus::Hibernating,
            "woken after {probes} probes"
        );
        assert_eq!(
            now.last_activity, slept.last_activity,
            "a probe counted as activity"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // A real request still wakes it, data intact.
    let (st, r) = s
        .gateway(
            "query",
            json!({"database": "watched", "sql": "SELECT count(*) AS n FROM t"}),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{r}");
    assert_eq!(r["items"][0]["n"], 0);
    let (st, body, _) = probe(&s, "watched", "/status").await.remove(0);
    assert_eq!(st, StatusCode::OK, "{body}");
    let doc: Value = serde_json::from_str(&body).unwrap();
    assert!(
        doc.get("rouse").is_none(),
        "a running engine answers: {doc}"
    );
    assert_eq!(doc["store"]["ready"], true, "{doc}");
}
