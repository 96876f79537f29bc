//! The harness itself: servers start, answer, and leave neither processes
//! nor ports behind.

use std::net::SocketAddr;

use rouse_tests::{
    pids_mentioning, port_is_free, rqlite_execute, rqlite_query, Postgres, Redis, Rqlited,
};
use serde_json::json;

#[tokio::test]
async fn servers_start_answer_and_leave_nothing_behind() -> anyhow::Result<()> {
    let (rqlited, postgres, redis) =
        tokio::try_join!(Rqlited::start(), Postgres::start(), Redis::start())?;

    rqlite_execute(
        &rqlited.url(),
        "CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)",
    )
    .await?;
    rqlite_execute(&rqlited.url(), "INSERT INTO t (v) VALUES ('hello')").await?;
    let rows = rqlite_query(&rqlited.http_addr().to_string(), "SELECT v FROM t").await?;
    assert_eq!(rows, vec![vec![json!("hello")]]);
    assert!(
        rqlite_execute(&rqlited.url(), "INSERT INTO missing VALUES (1)")
            .await
            .is_err()
    );

    let client = postgres
        .connect("postgres", postgres.superuser_password(), "postgres")
        .await?;
    let one: i32 = client.query_one("SELECT 1", &[]).await?.get(0);
    assert_eq!(one, 1);

    let ports = [
        rqlited.http_addr(),
        SocketAddr::from(([127, 0, 0, 1], postgres.port())),
        redis.addr(),
    ];
    let dirs =
        [rqlited.dir(), postgres.dir(), redis.dir()].map(|dir| dir.to_string_lossy().into_owned());
    drop(client);
    drop((rqlited, postgres, redis));

    for addr in ports {
        assert!(port_is_free(addr), "{addr} is still taken");
    }
    for dir in dirs {
        assert_eq!(
            pids_mentioning(&dir),
            Vec::<u32>::new(),
            "processes still run from {dir}"
        );
        assert!(
            !std::path::Path::new(&dir).exists(),
            "{dir} was not removed"
        );
    }
    Ok(())
}
