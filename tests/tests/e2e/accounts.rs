//! Logins and apps go away: a changed or removed Postgres login stops
//! working on every proxy within a second (and on the engine itself), and
//! deleting an app takes its databases, keys and logins with it.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use rouse_control_api::*;
use rouse_tests::{name, Stack, APP};
use serde_json::json;
use tokio_postgres::error::SqlState;

/// The SQLSTATE of a failed connect; `None` when it succeeded.
fn refusal(r: Result<tokio_postgres::Client, tokio_postgres::Error>) -> Option<SqlState> {
    r.err()
        .map(|e| e.code().cloned().unwrap_or(SqlState::CONNECTION_FAILURE))
}

/// Waits until `proxy` refuses `user`/`password` with 28P01; at most until
/// `deadline`, which is one second after the change.
async fn refused_by(s: &Stack, proxy: usize, user: &str, password: &str, deadline: Instant) {
    loop {
        match refusal(s.pg_connect_via(proxy, user, password, "main").await) {
            Some(SqlState::INVALID_PASSWORD) => return,
            other => assert!(
                Instant::now() < deadline,
                "proxy {proxy} still let {user} in a second later ({other:?})"
            ),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_changed_or_removed_login_stops_working_on_every_proxy_within_a_second() {
    let s = Stack::builder().proxies(2).start().await;
    s.create("main", Engine::Postgres).await;
    // Both proxies have the verifier cached.
    for i in 0..2 {
        let c = s
            .pg_connect_via(i, "alice.shop", "wonderland", "main")
            .await
            .unwrap();
        c.simple_query("SELECT 1").await.unwrap();
    }
    let api = s.control.client();

    // A new password: the old one is refused everywhere within a second.
    api.create_user(&name(APP), "alice", "looking-glass")
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(1);
    for i in 0..2 {
        refused_by(&s, i, "alice.shop", "wonderland", deadline).await;
        s.pg_connect_via(i, "alice.shop", "looking-glass", "main")
            .await
            .unwrap();
    }

    // Removed: refused everywhere within a second, with the same answer as
    // a wrong password.
    let session = s
        .pg_connect("alice.shop", "looking-glass", "main")
        .await
        .unwrap();
    api.delete_user(&name(APP), "alice").await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(1);
    for i in 0..2 {
        refused_by(&s, i, "alice.shop", "looking-glass", deadline).await;
    }
    // A session opened before goes on, as with PostgreSQL's own DROP ROLE.
    session.simple_query("SELECT 1").await.unwrap();
    assert!(api
        .get_user(&name(APP), "alice")
        .await
        .unwrap_err()
        .is_not_found());
    assert!(api
        .delete_user(&name(APP), "alice")
        .await
        .unwrap_err()
        .is_not_found());

    // The engine itself refuses the role too: the proxy is not the only
    // defence.
    let info = api.database(&name(APP), &name("main")).await.unwrap();
    let e = &info.endpoints[0];
    let direct = format!(
        "postgres://alice:looking-glass@{}:{}/main?sslmode=disable",
        e.host, e.port
    );
    let err = tokio_postgres::connect(&direct, tokio_postgres::NoTls)
        .await
        .err()
        .expect("the engine let a removed role in");
    assert_eq!(
        err.code(),
        Some(&SqlState::INVALID_AUTHORIZATION_SPECIFICATION),
        "{err}"
    );

    // Saved again, it works again.
    api.create_user(&name(APP), "alice", "returned")
        .await
        .unwrap();
    for i in 0..2 {
        s.pg_connect_via(i, "alice.shop", "returned", "main")
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_an_app_asks_for_its_name_and_takes_its_databases_keys_and_logins() {
    let s = Stack::builder().start().await;
    let api = s.control.client();
    s.create("notes", Engine::Rqlite).await;
    let (st, _) = s
        .rqlite("notes", "/db/execute", json!(["CREATE TABLE t (x)"]))
        .await;
    assert_eq!(st, StatusCode::OK);
    let notes = api.database(&name(APP), &name("notes")).await.unwrap();
    let data_dir = s.control.data_dir().join(format!("{APP}_notes"));
    assert!(data_dir.exists(), "{}", data_dir.display());

    // Without its name repeated: refused, nothing touched.
    for confirm in ["", "yes", "other"] {
        let err = api.delete_app(&name(APP), confirm).await.unwrap_err();
        assert!(matches!(err, ClientError::Api { status: 400, .. }), "{err}");
    }
    assert_eq!(
        api.database(&name(APP), &name("notes"))
            .await
            .unwrap()
            .status,
        notes.status
    );
    let (st, _) = s.rqlite("notes", "/db/query", json!(["SELECT 1"])).await;
    assert_eq!(st, StatusCode::OK);
    // An app's own token cannot delete it.
    let own = api.create_token(&Role::App(name(APP))).await.unwrap();
    let as_app = s.control.anonymous_client().with_token(&own.token);
    assert!(matches!(
        as_app.delete_app(&name(APP), APP).await.unwrap_err(),
        ClientError::Api { status: 403, .. }
    ));

    let deleted = api.delete_app(&name(APP), APP).await.unwrap();
    assert_eq!(deleted.databases, vec![name("notes")]);
    assert_eq!((deleted.keys, deleted.users), (1, 1));
    assert!(!data_dir.exists(), "the data stayed");
    assert!(api
        .database(&name(APP), &name("notes"))
        .await
        .unwrap_err()
        .is_not_found());
    assert!(api
        .get_user(&name(APP), "alice")
        .await
        .unwrap_err()
        .is_not_found());
    // Its key is refused by the proxy within a second.
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        let (st, _) = s.rqlite("notes", "/db/query", json!(["SELECT 1"])).await;
        if st == StatusCode::UNAUTHORIZED {
            break;
        }
        assert!(Instant::now() < deadline, "the key still works: {st}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(api
        .delete_app(&name(APP), APP)
        .await
        .unwrap_err()
        .is_not_found());
    // The name is free again, and starts empty.
    api.create_app(&name(APP)).await.unwrap();
    assert!(api
        .list_databases(Some(&name(APP)))
        .await
        .unwrap()
        .databases
        .is_empty());
}
