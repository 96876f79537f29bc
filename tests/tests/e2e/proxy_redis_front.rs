//! The Redis front in front of real Redis servers: Sentinel mode through a
//! failover, a static list through a role swap made by hand, a client
//! waiting for a master, passwords on servers and sentinels, and TLS
//! towards the servers.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use rouse_tests::{redis_cli, Control, Proxy, Redis, Sentinel, TlsFiles};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

const MASTER: &str = "rouse-main";

/// Polls `check` until it yields a value, failing with `what` after `timeout`.
async fn until<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: not within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The port of the server a new connection through `addr` reaches.
async fn served_port(addr: SocketAddr, password: Option<&str>) -> u16 {
    let info = redis_cli(addr, password, &["INFO", "server"])
        .await
        .unwrap();
    info.lines()
        .find_map(|l| l.trim().strip_prefix("tcp_port:"))
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no tcp_port in INFO server: {info}"))
}

/// Whether the proxy's metrics say `member` is (1) or is not (0) the master.
async fn master_gauge(proxy: &Proxy, member: SocketAddr) -> Option<f64> {
    let series =
        format!("rouse_backend_up{{cluster=\"redis\",member=\"{member}\",role=\"master\"}} ");
    let text = proxy.metrics().await.unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(&series)?.trim().parse().ok())
}

async fn redis_rs(addr: SocketAddr) -> redis::aio::MultiplexedConnection {
    redis::Client::open(format!("redis://{addr}/"))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

async fn set(con: &mut redis::aio::MultiplexedConnection, key: &str, value: &str) {
    let () = redis::cmd("SET")
        .arg(key)
        .arg(value)
        .query_async(con)
        .await
        .unwrap();
}

async fn get(con: &mut redis::aio::MultiplexedConnection, key: &str) -> Option<String> {
    redis::cmd("GET").arg(key).query_async(con).await.unwrap()
}

/// Waits until the connection's next command fails: the proxy closed it.
async fn closed(con: &mut redis::aio::MultiplexedConnection) {
    until("the old session closes", Duration::from_secs(15), || {
        let mut con = con.clone();
        async move {
            let ping: redis::RedisResult<String> = redis::cmd("PING").query_async(&mut con).await;
            ping.is_err().then_some(())
        }
    })
    .await
}

fn sentinel_list(sentinels: &[Sentinel]) -> String {
    sentinels
        .iter()
        .map(|s| s.addr().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// A master and its replica.
async fn master_and_replica() -> (Redis, Redis) {
    let master = Redis::start().await.unwrap();
    let replica = Redis::builder()
        .replica_of(master.addr())
        .start()
        .await
        .unwrap();
    (master, replica)
}

/// A master, its replica and three sentinels watching them, behind a proxy
/// that checks every `check_interval`.
struct SentinelSetup {
    master: Redis,
    replica: Redis,
    sentinels: Vec<Sentinel>,
    proxy: Proxy,
    _control: Control,
}

impl SentinelSetup {
    async fn start(check_interval: &str) -> SentinelSetup {
        let (master, replica) = master_and_replica().await;
        let sentinels = Sentinel::start_many(3, || Sentinel::builder(MASTER, master.addr()))
            .await
            .unwrap();
        for s in &sentinels {
            s.wait_for_peers(1, 2).await.unwrap();
        }
        let control = Control::builder().start().await.unwrap();
        let proxy = Proxy::builder(&control)
            .redis_backend(&format!(
                "{{sentinels: [{}], master_name: {MASTER}, check_interval: {check_interval}}}",
                sentinel_list(&sentinels)
            ))
            .start()
            .await
            .unwrap();
        SentinelSetup {
            master,
            replica,
            sentinels,
            proxy,
            _control: control,
        }
    }

    /// A failover as an operator starts one, until the sentinels name the
    /// replica.
    async fn failover(&self) {
        until(
            "the sentinel accepts the failover",
            Duration::from_secs(30),
            || async {
                let out = self.sentinels[0]
                    .cli(&["SENTINEL", "failover", MASTER])
                    .await
                    .unwrap();
                (out == "OK").then_some(())
            },
        )
        .await;
        until(
            "the sentinels name the replica",
            Duration::from_secs(30),
            || async {
                (self.sentinels[1].master_addr().await.ok() == Some(self.replica.addr()))
                    .then_some(())
            },
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_failover_moves_clients_to_the_new_master() {
    let s = SentinelSetup::start("200ms").await;
    let (master, replica, proxy) = (&s.master, &s.replica, &s.proxy);
    let front = proxy.redis_addr();

    // redis-cli and redis-rs through the proxy reach the master.
    assert_eq!(
        redis_cli(front, None, &["SET", "greeting", "hello"])
            .await
            .unwrap(),
        "OK"
    );
    assert_eq!(
        redis_cli(front, None, &["GET", "greeting"]).await.unwrap(),
        "hello"
    );
    let mut con = redis_rs(front).await;
    set(&mut con, "from-rs", "1").await;
    assert_eq!(get(&mut con, "from-rs").await.as_deref(), Some("1"));
    assert_eq!(served_port(front, None).await, master.addr().port());
    assert_eq!(master_gauge(proxy, master.addr()).await, Some(1.0));

    // A failover, as an operator starts one.
    s.failover().await;

    // The session on the old master is closed; clients that reconnect
    // land on the former replica, now the master.
    closed(&mut con).await;
    until(
        "the proxy reaches the new master",
        Duration::from_secs(10),
        || async { (served_port(front, None).await == replica.addr().port()).then_some(()) },
    )
    .await;
    let role = redis_cli(front, None, &["ROLE"]).await.unwrap();
    assert!(role.starts_with("master"), "{role}");
    let info = redis_cli(front, None, &["INFO", "replication"])
        .await
        .unwrap();
    assert!(info.contains("role:master"), "{info}");
    let mut con = redis_rs(front).await;
    assert_eq!(get(&mut con, "from-rs").await.as_deref(), Some("1"));
    set(&mut con, "after", "failover").await;
    assert_eq!(
        replica.cli(&["GET", "after"]).await.unwrap(),
        "failover",
        "a write through the proxy is on the new master"
    );
    assert_eq!(
        redis_cli(front, None, &["GET", "greeting"]).await.unwrap(),
        "hello"
    );
    assert_eq!(master_gauge(proxy, replica.addr()).await, Some(1.0));
    assert_eq!(master_gauge(proxy, master.addr()).await, Some(0.0));
    let metrics = proxy.metrics().await.unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("rouse_requests_total")
                && l.contains("protocol=\"redis\"")
                && l.contains("outcome=\"ok\"")),
        "{metrics}"
    );
}

/// With checks an hour apart, only Sentinel's `+switch-master`
/// announcement can tell the front that the master moved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sentinel_announcement_moves_the_front_before_its_next_check() {
    let s = SentinelSetup::start("1h").await;
    let front = s.proxy.redis_addr();
    assert_eq!(served_port(front, None).await, s.master.addr().port());
    s.failover().await;
    // The old master still answers (as a replica now): nothing but the
    // announcement sends the front to look again.
    until(
        "the proxy reaches the new master",
        Duration::from_secs(10),
        || async { (served_port(front, None).await == s.replica.addr().port()).then_some(()) },
    )
    .await;
    let role = redis_cli(front, None, &["ROLE"]).await.unwrap();
    assert!(role.starts_with("master"), "{role}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn static_servers_pick_the_master_and_follow_a_manual_swap() {
    let (master, replica) = master_and_replica().await;
    let control = Control::builder().start().await.unwrap();
    // The replica first: order must not matter, roles do.
    let proxy = Proxy::builder(&control)
        .redis_backend(&format!(
            "{{servers: [{}, {}], check_interval: 200ms}}",
            replica.addr(),
            master.addr()
        ))
        .start()
        .await
        .unwrap();
    let front = proxy.redis_addr();
    assert_eq!(served_port(front, None).await, master.addr().port());
    let mut con = redis_rs(front).await;
    set(&mut con, "k", "before").await;

    replica.cli(&["REPLICAOF", "NO", "ONE"]).await.unwrap();
    master
        .cli(&["REPLICAOF", "127.0.0.1", &replica.addr().port().to_string()])
        .await
        .unwrap();

    closed(&mut con).await;
    let mut con = redis_rs(front).await;
    assert_eq!(served_port(front, None).await, replica.addr().port());
    assert_eq!(get(&mut con, "k").await.as_deref(), Some("before"));
    set(&mut con, "k", "after").await;
    assert_eq!(replica.cli(&["GET", "k"]).await.unwrap(), "after");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_waits_for_a_master_instead_of_being_refused() {
    let (_master, replica) = master_and_replica().await;
    let control = Control::builder().start().await.unwrap();
    // Only the replica is listed: no master until it is promoted.
    let proxy = Proxy::builder(&control)
        .redis_backend(&format!(
            "{{servers: [{}], check_interval: 200ms}}",
            replica.addr()
        ))
        .start()
        .await
        .unwrap();
    let mut client = tokio::net::TcpStream::connect(proxy.redis_addr())
        .await
        .unwrap();
    client.write_all(b"PING\r\n").await.unwrap();
    let waiting = tokio::spawn(async move {
        let mut answer = [0; 7];
        client.read_exact(&mut answer).await.map(|_| answer)
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!waiting.is_finished(), "the client is held, not refused");
    replica.cli(&["REPLICAOF", "NO", "ONE"]).await.unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("the held client is served once there is a master")
        .unwrap()
        .unwrap();
    assert_eq!(&answer, b"+PONG\r\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checks_authenticate_to_servers_and_sentinels() {
    const SERVERS: &str = "server-secret";
    const SENTINELS: &str = "sentinel-secret";
    let master = Redis::builder().password(SERVERS).start().await.unwrap();
    let _replica = Redis::builder()
        .replica_of(master.addr())
        .password(SERVERS)
        .start()
        .await
        .unwrap();
    let sentinels = Sentinel::start_many(3, || {
        Sentinel::builder(MASTER, master.addr())
            .auth_pass(SERVERS)
            .requirepass(SENTINELS)
    })
    .await
    .unwrap();
    let control = Control::builder().start().await.unwrap();
    let backend = |password: &str| {
        format!(
            "{{sentinels: [{}], master_name: {MASTER}, password: {password}, sentinel_password: {SENTINELS}, check_interval: 200ms}}",
            sentinel_list(&sentinels)
        )
    };
    let proxy = Proxy::builder(&control)
        .redis_backend(&backend(SERVERS))
        .start()
        .await
        .unwrap();
    let front = proxy.redis_addr();
    // Clients authenticate themselves, through the proxy.
    let set = redis_cli(front, Some(SERVERS), &["SET", "k", "v"])
        .await
        .unwrap();
    assert_eq!(set, "OK");
    assert_eq!(
        served_port(front, Some(SERVERS)).await,
        master.addr().port()
    );
    let refused = redis_cli(front, None, &["GET", "k"]).await.unwrap();
    assert!(refused.contains("NOAUTH"), "{refused}");
    assert_eq!(master_gauge(&proxy, master.addr()).await, Some(1.0));

    // With the wrong server password, the master never passes its check,
    // and the log says why.
    let wrong = Proxy::builder(&control)
        .redis_backend(&backend("not-the-password"))
        .start()
        .await
        .unwrap();
    until(
        "the failed checks are logged",
        Duration::from_secs(10),
        || async { wrong.log_tail(50).contains("WRONGPASS").then_some(()) },
    )
    .await;
    assert_ne!(master_gauge(&wrong, master.addr()).await, Some(1.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_towards_the_servers() {
    let dir = tempfile::tempdir().unwrap();
    let files = TlsFiles::make(dir.path());
    let master = Redis::builder().tls(files.clone()).start().await.unwrap();
    let tls_addr = master.tls_addr().unwrap();
    let control = Control::builder().start().await.unwrap();
    // Only the TLS port is listed: checks and clients both cross TLS.
    let proxy = Proxy::builder(&control)
        .redis_backend(&format!(
            "{{servers: [{tls_addr}], tls_ca_file: {}, check_interval: 200ms}}",
            files.ca.display()
        ))
        .start()
        .await
        .unwrap();
    let front = proxy.redis_addr();
    assert_eq!(
        redis_cli(front, None, &["SET", "k", "secure"])
            .await
            .unwrap(),
        "OK"
    );
    assert_eq!(master.cli(&["GET", "k"]).await.unwrap(), "secure");
    assert_eq!(master_gauge(&proxy, tls_addr).await, Some(1.0));
}
