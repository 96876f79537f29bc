//! TLS out of the box: a fresh proxy answers `sslmode=require` with a
//! certificate it made itself and speaks HTTPS on its HTTP port; with a
//! configured certificate clients verify it (`verify-full`), and each
//! listener can refuse clients without TLS.

use std::process::Command;

use reqwest::StatusCode;
use rouse_control_api::Engine;
use rouse_tests::{run_ok, Stack, TlsFiles, APP};
use serde_json::json;

/// psycopg's `ssl_in_use` and the answer to `SELECT 40 + 2` over `url`.
fn psycopg(url: &str) -> String {
    let script = format!(
        "import psycopg\n\
         with psycopg.connect('{url}') as c:\n\
         \x20   print(c.pgconn.ssl_in_use, c.execute('SELECT 40 + 2').fetchone()[0])\n"
    );
    run_ok(Command::new("python3").args(["-c", &script]))
        .trim()
        .to_string()
}

/// A gateway query over `scheme` with `client`: status and body.
async fn gateway(s: &Stack, client: &reqwest::Client, scheme: &str) -> (StatusCode, String) {
    let addr = s.proxy().http_addr();
    let resp = client
        .post(format!("{scheme}://{addr}/v1/database/query"))
        .bearer_auth(&s.key)
        .json(&json!({"database": "web", "sql": "SELECT 1 AS one"}))
        .send()
        .await
        .unwrap();
    (resp.status(), resp.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_proxy_speaks_tls_with_a_certificate_of_its_own() {
    let s = Stack::builder().start().await;
    s.create("main", Engine::Postgres).await;
    let url = s.pg_url("alice.shop", "wonderland", "main");
    assert_eq!(psycopg(&format!("{url}?sslmode=require")), "True 42");
    // Clients that do not ask for TLS are still served.
    assert_eq!(psycopg(&format!("{url}?sslmode=disable")), "False 42");

    // The HTTP port speaks HTTPS and plain HTTP side by side.
    let trusting = reqwest::Client::builder()
        .danger_accept_invalid_certs(true)
        .build()
        .unwrap();
    for scheme in ["https", "http"] {
        let (st, body) = gateway(&s, &trusting, scheme).await;
        assert_eq!(st, StatusCode::OK, "{scheme}: {body}");
        assert!(body.contains(r#""one":1"#), "{body}");
    }
    // It is the certificate kept in the data directory: a client that
    // pins it verifies the proxy.
    let pem = std::fs::read(s.proxy().self_signed_certificate()).unwrap();
    let pinning = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&pem).unwrap())
        .build()
        .unwrap();
    let (st, body) = gateway(&s, &pinning, "https").await;
    assert_eq!(st, StatusCode::OK, "{body}");
    let pinned = format!(
        "{url}?sslmode=verify-full&sslrootcert={}",
        s.proxy().self_signed_certificate().display()
    );
    assert_eq!(psycopg(&pinned), "True 42");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configured_certificate_is_verified_and_listeners_can_require_tls() {
    let dir = tempfile::tempdir().unwrap();
    let files = TlsFiles::make(dir.path());
    let tls = format!(
        "{{cert_file: {}, key_file: {}}}",
        files.cert.display(),
        files.key.display()
    );
    let s = Stack::builder()
        .proxy(|p| {
            p.set("tls", &tls)
                .set("postgres_require_tls", "true")
                .set("http_require_tls", "true")
        })
        .start()
        .await;
    s.create("main", Engine::Postgres).await;
    let url = s.pg_url("alice.shop", "wonderland", "main");
    let verified = format!(
        "{url}?sslmode=verify-full&sslrootcert={}",
        files.ca.display()
    );
    assert_eq!(psycopg(&verified), "True 42");

    // Without TLS: refused, saying why.
    let plain = format!("{url}?sslmode=disable");
    let out = Command::new("psql")
        .args([&plain, "-c", "SELECT 1"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("this server requires TLS"), "{stderr}");

    // HTTPS verified against the CA; plain HTTP refused with a clear answer.
    let ca = reqwest::Certificate::from_pem(&std::fs::read(&files.ca).unwrap()).unwrap();
    let verifying = reqwest::Client::builder()
        .add_root_certificate(ca)
        .build()
        .unwrap();
    let (st, body) = gateway(&s, &verifying, "https").await;
    assert_eq!(st, StatusCode::OK, "{body}");
    let (st, body) = gateway(&s, &reqwest::Client::new(), "http").await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{body}");
    let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(answer["code"], "tls_required", "{body}");
    assert!(
        !body.contains(APP),
        "nothing about the app before TLS: {body}"
    );
}
