//! PostgreSQL data plane: pgbench through rouse, HAProxy (`mode tcp`) and
//! PgBouncer, beside the bare server, interleaved round by round.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use rouse_control_api::{CreateDatabase, Engine};
use rouse_tests::{free_port, postgres_bin_dir, Control, Proxy, RunAs, ServerProcess};

use crate::stats::table;
use crate::wake::name;

const APP: &str = "bench";
const DB: &str = "pgb";
const USER: &str = "alice";
const PASSWORD: &str = "bench-password";

struct Side {
    label: &'static str,
    port: u16,
    user: String,
}

struct Load {
    label: &'static str,
    args: &'static [&'static str],
}

const LOADS: [Load; 2] = [
    Load {
        label: "-S (select-only), 16 clients",
        args: &["-S", "-c", "16", "-j", "2"],
    },
    Load {
        label: "-S -C (connect per transaction), 8 clients",
        args: &["-S", "-C", "-c", "8", "-j", "2"],
    },
];

pub async fn run(rounds: usize, seconds: u64) -> Result<String> {
    let control = Control::builder().hibernation_timeout("0").start().await?;
    let client = control.client();
    client.create_app(&name(APP)).await?;
    let user = client.create_user(&name(APP), USER, PASSWORD).await?;
    let info = client
        .create_database(&CreateDatabase {
            app: name(APP),
            name: name(DB),
            engine: Engine::Postgres,
            replication_factor: None,
        })
        .await?;
    let pg_port = info.endpoints[0].port;
    let proxy = Proxy::builder(&control).start().await?;
    let dir = tempfile::Builder::new()
        .prefix("rouse-bench-pg-")
        .tempdir()?;
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )?;
    let pgbench = postgres_bin_dir()?.join("pgbench");
    let init = Command::new(&pgbench)
        .args(["-i", "-s", "1", "-q", &conninfo(pg_port, USER)])
        .env("PGPASSWORD", PASSWORD)
        .output()?;
    if !init.status.success() {
        bail!(
            "pgbench -i failed: {}",
            String::from_utf8_lossy(&init.stderr)
        );
    }

    let haproxy_port = free_port("127.0.0.1".parse()?);
    let _haproxy = start_haproxy(dir.path(), haproxy_port, pg_port).await?;
    let bouncer_port = free_port("127.0.0.1".parse()?);
    let _bouncer = start_pgbouncer(dir.path(), bouncer_port, pg_port, &user.scram_verifier).await?;
    let sides = [
        Side {
            label: "bare",
            port: pg_port,
            user: USER.into(),
        },
        Side {
            label: "HAProxy",
            port: haproxy_port,
            user: USER.into(),
        },
        Side {
            label: "PgBouncer",
            port: bouncer_port,
            user: USER.into(),
        },
        Side {
            label: "rouse",
            port: proxy.postgres_addr().port(),
            user: format!("{USER}.{APP}"),
        },
    ];
    let mut rows = Vec::new();
    for load in &LOADS {
        let mut tps: Vec<Vec<f64>> = sides.iter().map(|_| Vec::new()).collect();
        for _ in 0..rounds {
            for (i, side) in sides.iter().enumerate() {
                tps[i].push(pgbench_tps(&pgbench, load.args, seconds, side)?);
            }
        }
        let medians: Vec<f64> = tps
            .iter_mut()
            .map(|v| {
                v.sort_by(|a, b| a.total_cmp(b));
                v[v.len() / 2]
            })
            .collect();
        let mut row = vec![load.label.to_string()];
        row.extend(medians.iter().map(|t| format!("{t:.0}")));
        row.push(format!(
            "{:.2}× / {:.2}×",
            medians[3] / medians[1],
            medians[3] / medians[2]
        ));
        rows.push(row);
    }
    let header = [
        "pgbench",
        "bare tps",
        "HAProxy tps",
        "PgBouncer tps",
        "rouse tps",
        "rouse ÷ HAProxy / ÷ PgBouncer",
    ];
    Ok(format!(
        "PostgreSQL through rouse (session), HAProxy (mode tcp) and PgBouncer (session pooling), {seconds} s × {rounds} interleaved rounds (medians)\n\n{}",
        table(&header, &rows)
    ))
}

fn conninfo(port: u16, user: &str) -> String {
    format!("host=127.0.0.1 port={port} user={user} dbname={DB} sslmode=disable")
}

fn pgbench_tps(pgbench: &Path, args: &[&str], seconds: u64, side: &Side) -> Result<f64> {
    let out = Command::new(pgbench)
        .args(args)
        .args(["-n", "-T", &seconds.to_string()])
        .arg(conninfo(side.port, &side.user))
        .env("PGPASSWORD", PASSWORD)
        .output()
        .context("cannot run pgbench")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "pgbench via {} failed: {text}{}",
            side.label,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    text.lines()
        .find_map(|l| l.strip_prefix("tps = "))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no tps in pgbench output: {text}"))
}

async fn start_haproxy(dir: &Path, port: u16, backend: u16) -> Result<ServerProcess> {
    let cfg = dir.join("haproxy-pg.cfg");
    std::fs::write(
        &cfg,
        format!(
            "global\n  maxconn 9000\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n\
             listen postgres\n  bind 127.0.0.1:{port}\n  server pg 127.0.0.1:{backend}\n"
        ),
    )?;
    let mut cmd = Command::new("haproxy");
    cmd.arg("-db").arg("-f").arg(&cfg);
    let mut process = ServerProcess::spawn("haproxy", cmd, &dir.join("haproxy-pg.log"))?;
    process
        .wait_ready(Duration::from_secs(10), || tcp_ready(port))
        .await?;
    Ok(process)
}

async fn start_pgbouncer(
    dir: &Path,
    port: u16,
    backend: u16,
    verifier: &str,
) -> Result<ServerProcess> {
    let ini = dir.join("pgbouncer.ini");
    let users = dir.join("userlist.txt");
    std::fs::write(&users, format!("\"{USER}\" \"{verifier}\"\n"))?;
    std::fs::write(
        &ini,
        format!(
            "[databases]\n{DB} = host=127.0.0.1 port={backend} dbname={DB}\n\
             [pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\nauth_type = scram-sha-256\nauth_file = {}\n\
             pool_mode = session\nmax_client_conn = 20000\ndefault_pool_size = 20\nunix_socket_dir =\nlogfile = {}\n",
            users.display(),
            dir.join("pgbouncer-own.log").display()
        ),
    )?;
    let mut cmd = Command::new("pgbouncer");
    cmd.arg(&ini);
    // PgBouncer refuses to run as root.
    if let Some(user) = RunAs::when_root()? {
        user.chown_path(dir)?;
        user.apply(&mut cmd);
    }
    let mut process = ServerProcess::spawn("pgbouncer", cmd, &dir.join("pgbouncer.log"))?;
    process
        .wait_ready(Duration::from_secs(10), || tcp_ready(port))
        .await?;
    Ok(process)
}

async fn tcp_ready(port: u16) -> Result<()> {
    tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    Ok(())
}
