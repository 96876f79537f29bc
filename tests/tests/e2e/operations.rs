//! Operating the proxy: configuration reloads (SIGHUP) under load from wrk
//! and pgbench drop nothing, a bad configuration is refused while the
//! running one stays, and a reloaded limit takes effect.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use rouse_control_api::*;
use rouse_tests::{metric, postgres_bin_dir, run_ok, Control, Proxy, Stack, APP};

fn hangup(proxy: &Proxy) {
    // SAFETY: kill(2) with a pid we started; no memory is involved.
    let rc = unsafe { libc::kill(proxy.pid() as libc::pid_t, libc::SIGHUP) };
    assert_eq!(rc, 0, "cannot signal the proxy");
}

/// The proxy's config file with `extra` lines added under `proxy:`.
fn rewrite(config: &PathBuf, original: &str, extra: &str) {
    let text = original.replacen("proxy:\n", &format!("proxy:\n{extra}"), 1);
    std::fs::write(config, text).unwrap();
}

/// An rqlite database `live` and a PostgreSQL database `orders`, for the load.
async fn live_and_orders(s: &Stack) {
    s.create("live", Engine::Rqlite).await;
    s.create("orders", Engine::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_under_load_drop_nothing_and_a_bad_config_is_refused() {
    let s = Stack::builder().start().await;
    live_and_orders(&s).await;
    let (proxy, key) = (s.proxy(), &s.key);
    let config = proxy.dir().join("proxy.yaml");
    let original = std::fs::read_to_string(&config).unwrap();
    let reloads = |result: &str| {
        let url = format!("http://{}/metrics", proxy.stats_addr());
        let series = format!("rouse_config_reloads_total{{result=\"{result}\"}}");
        async move { metric(&url, &series).await }
    };

    // Load: wrk on the rqlite API, pgbench on the PostgreSQL port.
    let conninfo = format!(
        "host=127.0.0.1 port={} user=alice.{APP} dbname=orders sslmode=disable",
        proxy.postgres_addr().port()
    );
    let pgbench = postgres_bin_dir().unwrap().join("pgbench");
    run_ok(
        Command::new(&pgbench)
            .args(["-i", "-s", "1", "-q", &conninfo])
            .env("PGPASSWORD", "wonderland"),
    );
    let bench = Command::new(&pgbench)
        .args(["-S", "-c", "4", "-j", "2", "-T", "8", "-n", &conninfo])
        .env("PGPASSWORD", "wonderland")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let wrk = Command::new("wrk")
        .args(["-t", "2", "-c", "16", "-d", "8s"])
        .args(["-H", &format!("Authorization: Bearer {key}")])
        .arg(format!("{}/{APP}/live/db/query?q=SELECT%201", proxy.url()))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();

    // Reloads during the load, each changing something that applies at once.
    tokio::time::sleep(Duration::from_secs(1)).await;
    for i in 0..5 {
        rewrite(
            &config,
            &original,
            &format!("  wake_timeout: {}s\n", 20 + i),
        );
        hangup(proxy);
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    // A configuration with a mistake is refused; the proxy goes on.
    std::fs::write(&config, format!("{original}  wake_timeuot: 5s\n")).unwrap();
    hangup(proxy);
    tokio::time::sleep(Duration::from_millis(500)).await;

    let wrk = wrk.wait_with_output().unwrap();
    let wrk_out = String::from_utf8_lossy(&wrk.stdout);
    assert!(wrk.status.success(), "{wrk_out}");
    assert!(wrk_out.contains("Requests/sec"), "{wrk_out}");
    assert!(
        !wrk_out.contains("Non-2xx") && !wrk_out.contains("Socket errors"),
        "HTTP requests failed during reloads:\n{wrk_out}"
    );
    let bench = bench.wait_with_output().unwrap();
    let bench_out = String::from_utf8_lossy(&bench.stdout);
    assert!(
        bench.status.success(),
        "{bench_out}{}",
        String::from_utf8_lossy(&bench.stderr)
    );
    assert!(
        bench_out.contains("number of failed transactions: 0"),
        "{bench_out}"
    );
    assert_eq!(reloads("applied").await, 5.0);
    assert_eq!(reloads("refused").await, 1.0);

    // A limit added by a reload holds at once.
    rewrite(
        &config,
        &original,
        "  rate_limits: {http: {per_app: {rate: 0.5, burst: 1}}}\n",
    );
    hangup(proxy);
    let http = reqwest::Client::new();
    let mut limited = false;
    for _ in 0..50 {
        let status = http
            .post(format!("{}/{APP}/live/db/query", proxy.url()))
            .bearer_auth(key)
            .json(&serde_json::json!(["SELECT 1"]))
            .send()
            .await
            .unwrap()
            .status();
        if status == reqwest::StatusCode::TOO_MANY_REQUESTS {
            limited = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(limited, "the reloaded rate limit never applied");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_upgrade_under_load_refuses_no_connection_and_drains_sessions() {
    let mut s = Stack::builder()
        .proxy(|p| p.set("drain_grace", "3s"))
        .start()
        .await;
    live_and_orders(&s).await;
    let (proxy, key) = (&mut s.proxies[0], &s.key);
    let old_pid = proxy.pid();
    let pg_url = format!(
        "postgres://alice.{APP}:wonderland@{}/orders?sslmode=disable",
        proxy.postgres_addr()
    );
    let connect = |url: String| async move {
        let (c, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
        tokio::spawn(conn);
        Ok::<_, tokio_postgres::Error>(c)
    };
    // A long session, opened before the upgrade.
    let long = connect(pg_url.clone()).await.unwrap();

    // New connections all through the upgrade: HTTP without keep-alive, and
    // PostgreSQL connects.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let failures = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let served = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut load = Vec::new();
    for worker in 0..4 {
        let (stop, failures, served) = (stop.clone(), failures.clone(), served.clone());
        let (url, key, pg_url) = (
            format!("{}/{APP}/live/db/query", proxy.url()),
            key.clone(),
            pg_url.clone(),
        );
        load.push(tokio::spawn(async move {
            let http = reqwest::Client::builder()
                .pool_max_idle_per_host(0)
                .build()
                .unwrap();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let outcome = if worker % 2 == 0 {
                    match http
                        .post(&url)
                        .bearer_auth(&key)
                        .json(&serde_json::json!(["SELECT 1"]))
                        .send()
                        .await
                    {
                        Ok(r) if r.status().is_success() => Ok(()),
                        Ok(r) => Err(format!("HTTP {}", r.status())),
                        Err(e) => Err(format!("HTTP: {e}")),
                    }
                } else {
                    match connect(pg_url.clone()).await {
                        Ok(c) => c
                            .simple_query("SELECT 1")
                            .await
                            .map(drop)
                            .map_err(|e| format!("query: {e}")),
                        Err(e) => Err(format!("connect: {e}")),
                    }
                };
                match outcome {
                    Ok(()) => {
                        served.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    Err(e) => failures.lock().unwrap().push(e),
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    proxy.upgrade().unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    // The old process still serves its open session while it drains.
    long.simple_query("SELECT 1").await.unwrap();
    assert!(
        !proxy.replaced_exited(),
        "the old process did not wait for its session"
    );
    // New connections land on the new process.
    let stats: serde_json::Value =
        reqwest::get(format!("http://{}/stats.json", proxy.stats_addr()))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
    assert!(
        stats["proxy"]["id"]
            .as_str()
            .unwrap()
            .ends_with(&format!("-{}", proxy.pid())),
        "{stats}"
    );
    // After the grace the old process is gone, and its session with it.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !proxy.replaced_exited() {
        assert!(
            std::time::Instant::now() < deadline,
            "the old process never exited"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(long.simple_query("SELECT 1").await.is_err());
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for l in load {
        l.await.unwrap();
    }
    let failures = failures.lock().unwrap();
    assert!(
        failures.is_empty(),
        "{} of {} connections failed across the upgrade (old pid {old_pid}): {:?}",
        failures.len(),
        served.load(std::sync::atomic::Ordering::Relaxed),
        &failures[..failures.len().min(5)]
    );
    assert!(served.load(std::sync::atomic::Ordering::Relaxed) > 20);
}

/// Connects to the upgrade socket as user `postgres` and prints how many
/// file descriptors and bytes it was handed.
const FOREIGN_TAKER: &str = r#"
import array, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(5)
s.connect(sys.argv[1])
try:
    data, anc, _, _ = s.recvmsg(65536, socket.CMSG_SPACE(256 * 4))
except socket.timeout:
    data, anc = b"", []
fds = sum(len(d) // 4 for (_, t, d) in anc if t == socket.SCM_RIGHTS)
print(fds, len(data))
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_proxys_own_user_may_take_its_sockets() {
    let control = Control::builder().start().await.unwrap();
    let mut proxy = Proxy::builder(&control)
        .set("drain_grace", "1s")
        .start()
        .await
        .unwrap();
    let socket = proxy.dir().join("upgrade.sock");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode();
    assert_eq!(
        mode & 0o777,
        0o600,
        "the socket file is the proxy user's alone"
    );

    // With the file opened to everyone, the peer's uid still keeps
    // another user out. Switching users needs root, as CI runs.
    // SAFETY: geteuid(2) has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "run as root: this test switches users"
    );
    std::fs::set_permissions(proxy.dir(), std::fs::Permissions::from_mode(0o711)).unwrap();
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let out = run_ok(
        Command::new("runuser")
            .args([
                "-u",
                "postgres",
                "--",
                "/usr/bin/python3",
                "-c",
                FOREIGN_TAKER,
            ])
            .arg(&socket),
    );
    assert_eq!(out.trim(), "0 0", "another user was handed the sockets");
    let refused = metric(
        &format!("http://{}/metrics", proxy.stats_addr()),
        "rouse_upgrade_refusals_total",
    )
    .await;
    assert_eq!(refused, 1.0);

    // The proxy's own user still upgrades it.
    let old = proxy.pid();
    proxy.upgrade().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !proxy.replaced_exited() {
        assert!(
            std::time::Instant::now() < deadline,
            "the upgrade never finished"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_ne!(proxy.pid(), old);
    let health = reqwest::get(format!("http://{}/healthz", proxy.stats_addr()))
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
}
