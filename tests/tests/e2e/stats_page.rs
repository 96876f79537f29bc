//! The stats page in a real browser (headless Chromium): it renders, it
//! follows a database from hibernating to active, and the run leaves a
//! screenshot behind.

use std::path::{Path, PathBuf};
use std::process::Command;

use rouse_control_api::*;
use rouse_tests::{name, run_ok, Stack, APP};

fn chromium() -> PathBuf {
    std::env::var_os("CHROMIUM").map_or_else(|| "chromium".into(), PathBuf::from)
}

/// Chromium's flags for a throwaway headless run (as root it needs no sandbox).
fn headless(profile: &Path) -> Command {
    let mut cmd = Command::new(chromium());
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--hide-scrollbars",
        "--window-size=1366,860",
        "--virtual-time-budget=4000",
    ])
    .arg(format!("--user-data-dir={}", profile.display()));
    cmd
}

/// The page as the browser rendered it, after its script ran.
fn rendered(url: &str, profile: &Path) -> String {
    run_ok(headless(profile).arg("--dump-dom").arg(url))
}

/// The status badge of a database's row in the rendered page.
fn status_of(dom: &str, db: &str) -> String {
    let row = dom
        .split(&format!("data-db=\"{APP}/{db}\""))
        .nth(1)
        .unwrap_or_else(|| panic!("no row for {db} in:\n{dom}"));
    let row = &row[..row.find("</tr>").unwrap_or(row.len())];
    let cell = row.split("class=\"status\"").nth(1).unwrap_or_default();
    let badge = cell.split('>').nth(2).unwrap_or_default();
    badge.split('<').next().unwrap_or_default().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stats_page_follows_a_database_from_hibernating_to_active() {
    let s = Stack::builder().proxies(0).start().await;
    for db in ["board", "ledger"] {
        s.create(db, Engine::Rqlite).await;
    }
    s.control
        .client()
        .hibernate(&name(APP), &name("board"), true)
        .await
        .unwrap();
    // The proxy starts on databases that are already there.
    let proxy = s.proxy_builder().start().await.unwrap();
    let page = format!("http://{}/", proxy.stats_addr());
    let profile = tempfile::tempdir().unwrap();

    let dom = rendered(&page, profile.path());
    assert!(dom.contains("Databases"), "{dom}");
    assert_eq!(status_of(&dom, "board"), "hibernating");
    assert_eq!(status_of(&dom, "ledger"), "active");
    // The capacity section: this node holds two databases, one running.
    let node_id = s.control.client().capacity().await.unwrap().nodes[0]
        .node_id
        .clone();
    let capacity = dom
        .split(&format!("<td>{node_id}</td>"))
        .nth(1)
        .unwrap_or_else(|| panic!("no capacity row for {node_id} in:\n{dom}"));
    let row = &capacity[..capacity.find("</tr>").unwrap()];
    assert!(row.contains("2 / "), "two databases held: {row}");
    assert!(row.contains("by max_databases"), "{row}");

    // A request wakes the database; the page shows it active, and the wake.
    let resp = reqwest::Client::new()
        .post(format!("{}/{APP}/board/db/query", proxy.url()))
        .bearer_auth(&s.key)
        .json(&serde_json::json!(["SELECT 1"]))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), reqwest::StatusCode::OK);
    let dom = rendered(&page, profile.path());
    assert_eq!(status_of(&dom, "board"), "active");
    assert!(
        dom.contains("1 wakes · p50"),
        "no wake in the chart:\n{dom}"
    );

    let shot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("stats-page.png");
    let _ = std::fs::remove_file(&shot);
    run_ok(
        headless(profile.path())
            .arg(format!("--screenshot={}", shot.display()))
            .arg(&page),
    );
    let png = std::fs::read(&shot).unwrap();
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "no real screenshot"
    );
    println!("stats page screenshot: {}", shot.display());
}
