//! A transaction pool's connections are lent in turn: a client that waits
//! for a full pool is served by the next connection given back, or by the
//! room a closed one leaves, never left to time out. Logging in needs no
//! connection of a pool that served its role before.

use std::time::Duration;

use rouse_control_api::*;
use rouse_tests::{name, Stack, APP};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_waiting_for_a_full_pool_gets_the_room_a_closed_connection_leaves() {
    // One backend connection, held by client A inside a transaction.
    let s = Stack::builder()
        .proxy(|p| p.set("pool_size", "1"))
        .start()
        .await;
    s.create("one", Engine::Postgres).await;
    s.control
        .client()
        .set_pool_mode(&name(APP), &name("one"), PoolMode::Transaction)
        .await
        .unwrap();
    let connect = || s.pg_connect("alice.shop", "wonderland", "one");
    let a = connect().await.unwrap();
    a.batch_execute("BEGIN").await.unwrap();

    // B logs in meanwhile, greeted as A was, and waits for the connection
    // with its first query, as SHOW POOLS tells.
    let b = connect().await.unwrap();
    let waiting = tokio::spawn(async move {
        b.query_one("SELECT 41 + 1", &[])
            .await
            .map(|row| row.get::<_, i32>(0))
    });
    let console = s
        .pg_connect("admin", &s.control.admin_token(), "pgbouncer")
        .await
        .unwrap();
    let cl_waiting = || async {
        let rows = console.simple_query("SHOW POOLS").await.unwrap();
        rows.iter()
            .filter_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) if r.get(0) == Some("shop_one") => {
                    r.get(3).map(|n| n.parse::<u32>().unwrap())
                }
                _ => None,
            })
            .sum::<u32>()
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while cl_waiting().await == 0 {
        assert!(tokio::time::Instant::now() < deadline, "B never waited");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A leaves inside its transaction: its connection cannot be given
    // back (it is closed), and its room goes to B, which is answered.
    drop(a);
    assert_eq!(waiting.await.unwrap().unwrap(), 42);
    assert_eq!(cl_waiting().await, 0);
}
