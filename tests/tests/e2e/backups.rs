//! Backups and restores against real engines, a real destination directory
//! and a real S3-compatible server (moto): what was acknowledged before a
//! backup comes back, and nothing else is touched on the way.

use std::time::Duration;

use rouse_control_api::*;
use rouse_tests::{name, pids_mentioning, Control, ControlBuilder, APP, S3};

use crate::control::{create_req, db_dir, read_rows, with_app, write_row};

const BUCKET: &str = "rouse-backups";

async fn rows(client: &Client, db: &str) -> Vec<String> {
    let info = client.wake(&name(APP), &name(db)).await.unwrap();
    let mut rows = read_rows(&info).await.unwrap_or_default();
    rows.sort();
    rows
}

fn numbered(n: usize) -> Vec<String> {
    let mut v: Vec<String> = (0..n).map(|i| format!("row-{i:03}")).collect();
    v.sort();
    v
}

async fn write_numbered(info: &DatabaseInfo, range: std::ops::Range<usize>) {
    for i in range {
        write_row(info, &format!("row-{i:03}")).await.unwrap();
    }
}

/// A control that never hibernates on its own (`builder`'s other settings
/// kept), with the app and its database `db`.
async fn with_database(
    builder: ControlBuilder,
    db: &str,
    engine: Engine,
) -> (Control, Client, DatabaseInfo) {
    let control = builder.hibernation_timeout("0").start().await.unwrap();
    let client = with_app(&control).await;
    if engine == Engine::Postgres {
        client
            .create_user(&name(APP), "alice", "wonderland")
            .await
            .unwrap();
    }
    let info = client
        .create_database(&create_req(db, engine, None))
        .await
        .unwrap();
    (control, client, info)
}

fn api_code(e: &ClientError) -> Option<ErrorCode> {
    match e {
        ClientError::Api { code, .. } => Some(*code),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_rqlite_backup_brings_back_every_row_after_the_data_is_lost() {
    let (mut control, client, info) =
        with_database(Control::builder(), "ledger", Engine::Rqlite).await;
    write_numbered(&info, 0..40).await;
    let backup = client.backup(&name(APP), &name("ledger")).await.unwrap();
    assert_eq!(backup.engine, Engine::Rqlite);
    assert_eq!(backup.reason, "manual");
    assert!(backup.sha256.is_some() && backup.size > 0, "{backup:?}");
    // Written after the backup: not part of it.
    write_numbered(&info, 40..45).await;

    // The node loses everything: control and engine killed, data deleted.
    control.kill();
    let dir = db_dir(&control, "ledger");
    for pid in pids_mentioning(&dir) {
        let _ = std::process::Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status();
    }
    std::fs::remove_dir_all(&dir).unwrap();
    control.restart().await.unwrap();

    let restored = client
        .restore(&name(APP), &name("ledger"), &RestoreRequest::default())
        .await
        .unwrap_or_else(|e| panic!("{e}; control's log ends with:\n{}", control.log_tail(40)));
    assert_eq!(restored.backup, backup.id);
    assert_eq!(rows(&client, "ledger").await, numbered(40));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hibernation_backs_up_once_and_an_unchanged_database_is_not_stored_again() {
    let (control, client, info) = with_database(Control::builder(), "sleepy", Engine::Rqlite).await;
    write_numbered(&info, 0..3).await;
    let (app, db) = (name(APP), name("sleepy"));
    client.hibernate(&app, &db, false).await.unwrap();
    let list = client.backups(&app, &db).await.unwrap().backups;
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0].reason, "hibernate");
    let status = client.database(&app, &db).await.unwrap();
    assert_eq!(
        status.last_backup,
        Some(list[0].time_ms),
        "shown with the database"
    );

    // Woken and put to sleep again without a write: nothing new is stored,
    // and a manual backup of the sleeping database is the same backup.
    client.wake(&app, &db).await.unwrap();
    client.hibernate(&app, &db, false).await.unwrap();
    let again = client.backup(&app, &db).await.unwrap();
    assert_eq!(again.id, list[0].id);
    assert_eq!(client.backups(&app, &db).await.unwrap().backups.len(), 1);
    let stored = std::fs::read_dir(
        control
            .data_dir()
            .join("backups/rqlite")
            .join(APP)
            .join("sleepy"),
    )
    .unwrap()
    .count();
    assert_eq!(stored, 2, "one data file and its manifest");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_as_a_new_name_leaves_the_original_and_data_is_never_overwritten_unasked() {
    let (control, client, info) = with_database(Control::builder(), "orig", Engine::Rqlite).await;
    write_numbered(&info, 0..5).await;
    let (app, orig) = (name(APP), name("orig"));
    let backup = client.backup(&app, &orig).await.unwrap();
    write_numbered(&info, 5..8).await;

    let copy = client
        .restore(
            &app,
            &orig,
            &RestoreRequest {
                as_name: Some(name("copy")),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(
        (copy.backup.as_str(), copy.database.name.as_str()),
        (backup.id.as_str(), "copy")
    );
    assert_eq!(rows(&client, "copy").await, numbered(5));
    assert_eq!(
        rows(&client, "orig").await,
        numbered(8),
        "the original is untouched"
    );

    let refused = client
        .restore(&app, &orig, &RestoreRequest::default())
        .await
        .unwrap_err();
    assert_eq!(api_code(&refused), Some(ErrorCode::HasData), "{refused}");
    assert_eq!(rows(&client, "orig").await, numbered(8));
    client
        .restore(
            &app,
            &orig,
            &RestoreRequest {
                backup: Some(backup.id.clone()),
                force: true,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(rows(&client, "orig").await, numbered(5));

    // Dropped, its backups stay: it comes back under its name.
    client.drop_database(&app, &orig).await.unwrap();
    assert_eq!(client.backups(&app, &orig).await.unwrap().backups.len(), 1);
    client
        .restore(&app, &orig, &RestoreRequest::default())
        .await
        .unwrap();
    assert_eq!(rows(&client, "orig").await, numbered(5));

    // Another app's token sees none of it.
    client.create_app(&name("other")).await.unwrap();
    let other = control.anonymous_client().with_token(
        client
            .create_token(&Role::App(name("other")))
            .await
            .unwrap()
            .token,
    );
    let e = other.backups(&app, &orig).await.unwrap_err();
    assert_eq!(api_code(&e), Some(ErrorCode::Forbidden), "{e}");
    let e = other
        .restore(
            &app,
            &orig,
            &RestoreRequest {
                as_name: Some(name("stolen")),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert_eq!(api_code(&e), Some(ErrorCode::Forbidden), "{e}");
    let bad = client
        .restore(
            &app,
            &orig,
            &RestoreRequest {
                backup: Some("../../etc".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert_eq!(api_code(&bad), Some(ErrorCode::BadRequest), "{bad}");
    // Bodies the typed client cannot send: a target name that is a path,
    // a time that is not one, an unknown field. Each a clear 400.
    let url = format!("{}/api/v1/databases/{APP}/orig/restore", control.api_url());
    for body in [
        serde_json::json!({"as": "../../etc"}),
        serde_json::json!({"as": "other_app"}),
        serde_json::json!({"time": "yesterday"}),
        serde_json::json!({"backup": 7, "overwrite": true}),
    ] {
        let resp = rouse_tests::http_client()
            .post(&url)
            .bearer_auth(control.admin_token())
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 400, "{body}");
    }
    assert_eq!(
        rows(&client, "orig").await,
        numbered(5),
        "nothing was touched"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_keeps_the_newest_and_a_schedule_saves_what_changed() {
    let builder = Control::builder()
        .env("ROUSE_BACKUPS__KEEP", "2")
        .env("ROUSE_BACKUPS__INTERVAL", "1s");
    let (_control, client, info) = with_database(builder, "busy", Engine::Rqlite).await;
    let (app, db) = (name(APP), name("busy"));
    // The schedule saves a database that changed...
    write_numbered(&info, 0..1).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let first = loop {
        let list = client.backups(&app, &db).await.unwrap().backups;
        if let Some(b) = list.iter().find(|b| b.reason == "scheduled") {
            break b.clone();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no scheduled backup: {list:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // ... and retention keeps only the newest two of what follows.
    let mut made = vec![first.id];
    for i in 1..4 {
        write_numbered(&info, i..i + 1).await;
        made.push(client.backup(&app, &db).await.unwrap().id);
    }
    let left: Vec<String> = client
        .backups(&app, &db)
        .await
        .unwrap()
        .backups
        .into_iter()
        .map(|b| b.id)
        .collect();
    assert!(left.len() <= 3, "{left:?}");
    assert_eq!(
        left[left.len() - 2..],
        made[made.len() - 2..],
        "the newest two stay"
    );
    assert!(
        !left.contains(&made[0]) && !left.contains(&made[1]),
        "{left:?} / {made:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backups_in_s3_restore_on_another_node_and_a_corrupted_one_is_refused() {
    let s3 = S3::start(BUCKET).await.unwrap();
    let in_s3 = || s3.backing_up(Control::builder(), BUCKET, "tenants");
    let (_first, client, info) = with_database(in_s3(), "shared", Engine::Rqlite).await;
    write_numbered(&info, 0..12).await;
    let (app, db) = (name(APP), name("shared"));
    let backup = client.backup(&app, &db).await.unwrap();
    let keys = s3.keys(BUCKET, "tenants/").await.unwrap();
    assert!(
        keys.contains(&format!(
            "tenants/rqlite/{APP}/shared/{}.sqlite.gz",
            backup.id
        )),
        "{keys:?}; {}",
        s3.log_tail(20)
    );

    // A second node, with its own metadata, restores from the same bucket.
    let second = in_s3().hibernation_timeout("0").start().await.unwrap();
    let other = with_app(&second).await;
    let listed = other.backups(&app, &db).await.unwrap().backups;
    assert_eq!(
        listed.iter().map(|b| &b.id).collect::<Vec<_>>(),
        vec![&backup.id]
    );
    other
        .restore(&app, &db, &RestoreRequest::default())
        .await
        .unwrap();
    assert_eq!(rows(&other, "shared").await, numbered(12));

    // One flipped byte in the stored file: refused, nothing created.
    let object = format!("tenants/rqlite/{APP}/shared/{}.sqlite.gz", backup.id);
    let mut bytes = s3.get(BUCKET, &object).await.unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    s3.put(BUCKET, &object, bytes).await.unwrap();
    let e = other
        .restore(
            &app,
            &db,
            &RestoreRequest {
                as_name: Some(name("victim")),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert_eq!(api_code(&e), Some(ErrorCode::BackupCorrupt), "{e}");
    let missing = other.database(&app, &name("victim")).await.unwrap_err();
    assert!(missing.is_not_found(), "{missing}");
    assert_eq!(rows(&other, "shared").await, numbered(12));

    // The store gone: a clear refusal that names no host path or bucket layout.
    drop(s3);
    let e = other.backup(&app, &db).await.unwrap_err();
    assert_eq!(api_code(&e), Some(ErrorCode::BackupFailed), "{e}");
    let said = e.to_string();
    assert!(
        !said.contains("/tmp") && !said.contains("tenants/"),
        "{said}"
    );
}

/// The rows of the Postgres database `db`, sorted.
async fn pg_rows(client: &Client, db: &str) -> Vec<String> {
    let info = client.wake(&name(APP), &name(db)).await.unwrap();
    let mut rows = read_rows(&info).await.unwrap();
    rows.sort();
    rows
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restores_to_a_point_in_time_from_s3_and_into_a_new_name() {
    let s3 = S3::start(BUCKET).await.unwrap();
    let (control, client, info) = with_database(
        s3.backing_up(Control::builder(), BUCKET, "pg"),
        "orders",
        Engine::Postgres,
    )
    .await;
    let (app, db) = (name(APP), name("orders"));
    for v in ["before-1", "before-2"] {
        write_row(&info, v).await.unwrap();
    }
    let base = client
        .backup(&app, &db)
        .await
        .unwrap_or_else(|e| panic!("{e}; control's log ends with:\n{}", control.log_tail(30)));
    assert_eq!(
        (base.engine, base.kind.as_str()),
        (Engine::Postgres, "full"),
        "{base:?}"
    );
    write_row(&info, "before-3").await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let point = backup_time_now();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    write_row(&info, "after-1").await.unwrap();

    // Into a new name, the newest state: every row, the original untouched.
    let copy = client
        .restore(
            &app,
            &db,
            &RestoreRequest {
                as_name: Some(name("orders-copy")),
                ..Default::default()
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{e}; control's log ends with:\n{}", control.log_tail(40)));
    assert_eq!(copy.database.name.as_str(), "orders-copy");
    let all = vec!["after-1", "before-1", "before-2", "before-3"];
    assert_eq!(pg_rows(&client, "orders-copy").await, all);
    assert_eq!(pg_rows(&client, "orders").await, all);

    // In place, to the point in time: what came before it, nothing after.
    let refused = client
        .restore(
            &app,
            &db,
            &RestoreRequest {
                time: Some(point.clone()),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert_eq!(api_code(&refused), Some(ErrorCode::HasData), "{refused}");
    client
        .restore(
            &app,
            &db,
            &RestoreRequest {
                time: Some(point),
                force: true,
                ..Default::default()
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{e}; control's log ends with:\n{}", control.log_tail(40)));
    assert_eq!(
        pg_rows(&client, "orders").await,
        vec!["before-1", "before-2", "before-3"]
    );
    assert_eq!(
        pg_rows(&client, "orders-copy").await,
        all,
        "the copy is its own database"
    );
    let keys = s3.keys(BUCKET, "pg/postgres/").await.unwrap();
    assert!(keys.iter().any(|k| k.contains("/archive/db/")), "{keys:?}");
    let listed = client.backups(&app, &db).await.unwrap();
    assert!(
        listed.recoverable_from.is_some() && listed.backups.len() >= 2,
        "{listed:?}"
    );
}

/// Whether a PostgreSQL repository under `repo` (one per system
/// identifier) has its archive made.
fn archive_info_exists(repo: &std::path::Path) -> bool {
    std::fs::read_dir(repo)
        .into_iter()
        .flatten()
        .flatten()
        .any(|system| system.path().join("archive/db/archive.info").exists())
}

/// Now, as RFC 3339.
fn backup_time_now() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_backup_in_a_directory_restores_as_it_finished_into_a_sandboxed_copy() {
    let (control, client, info) =
        with_database(Control::builder(), "ledger", Engine::Postgres).await;
    let (app, db) = (name(APP), name("ledger"));
    // Its repository is made right after the create: WAL is archived
    // before the first backup.
    let repo = control
        .data_dir()
        .join("backups/postgres")
        .join(APP)
        .join("ledger");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !archive_info_exists(&repo) {
        assert!(
            std::time::Instant::now() < deadline,
            "no repository in {}",
            repo.display()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    write_row(&info, "kept").await.unwrap();
    let made = client.backup(&app, &db).await.unwrap();
    write_row(&info, "later").await.unwrap();
    // The copy's engine reads WAL from the original's repository through
    // its sandbox, and stops at the end of the backup it was given.
    let request = RestoreRequest {
        backup: Some(made.id.clone()),
        as_name: Some(name("ledger-copy")),
        ..Default::default()
    };
    client
        .restore(&app, &db, &request)
        .await
        .unwrap_or_else(|e| panic!("{e}; control's log ends with:\n{}", control.log_tail(30)));
    assert_eq!(pg_rows(&client, "ledger-copy").await, vec!["kept"]);
    assert_eq!(pg_rows(&client, "ledger").await, vec!["kept", "later"]);
    let repos = control.data_dir().join("backups/postgres").join(APP);
    assert!(repos.join("ledger").is_dir() && repos.join("ledger-copy").is_dir());
}
