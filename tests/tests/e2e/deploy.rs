//! The deployment files: the systemd units pass `systemd-analyze verify`
//! with the real binaries at their `ExecStart=` paths, and every rouse
//! configuration shipped in `configs/`, `deploy/` (files and the `rouse.yaml`
//! embedded in Kubernetes ConfigMaps) and the HAProxy migration guide passes
//! `rouse-proxy check-config`, which loads the whole file (every section,
//! unknown keys refused); a bad one is refused with file, line and key.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anyhow::{ensure, Context, Result};

/// The sections a rouse configuration consists of.
const SECTIONS: [&str; 6] = ["node", "database", "discovery", "control", "proxy", "redis"];

/// The installed path of the binaries, as the units name them.
const INSTALLED_BIN_DIR: &str = "/usr/local/bin/";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lies inside the workspace")
        .to_path_buf()
}

/// `$ROUSE_PROXY_BIN`, else `rouse-proxy` of the cargo target directory this
/// test was built in: the way `rouse_tests::control_bin` finds control.
fn proxy_bin() -> Result<PathBuf> {
    let bin = match std::env::var_os("ROUSE_PROXY_BIN") {
        Some(bin) => PathBuf::from(bin),
        None => {
            let exe = std::env::current_exe()?;
            let mut dir = exe.parent().context("executable without a directory")?;
            if dir.ends_with("deps") {
                dir = dir.parent().unwrap_or(dir);
            }
            dir.join("rouse-proxy")
        }
    };
    ensure!(
        bin.is_file(),
        "{} does not exist: run `cargo build --workspace --bins` or set ROUSE_PROXY_BIN",
        bin.display()
    );
    Ok(bin)
}

/// A command without the caller's `ROUSE_*` and `REDIS_URL` variables, which
/// would override keys of the file under test.
fn clean_command(program: &Path) -> Command {
    let mut cmd = Command::new(program);
    for (var, _) in std::env::vars_os() {
        let name = var.to_string_lossy();
        if name.starts_with("ROUSE_") || name == "REDIS_URL" {
            cmd.env_remove(&var);
        }
    }
    cmd
}

fn check_config(proxy: &Path, config: &Path) -> Result<Output> {
    clean_command(proxy)
        .arg("--config")
        .arg(config)
        .arg("check-config")
        .output()
        .with_context(|| format!("cannot run {}", proxy.display()))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Checks `config` and returns the effective settings `check-config` prints.
fn accepted(proxy: &Path, config: &Path, what: &str) -> Result<serde_json::Value> {
    let out = check_config(proxy, config)?;
    ensure!(
        out.status.success(),
        "{what} is refused ({}): {}",
        out.status,
        text(&out.stderr)
    );
    let effective: serde_json::Value = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "{what}: check-config printed no JSON: {}",
            text(&out.stdout)
        )
    })?;
    ensure!(
        effective.get("proxy").is_some(),
        "{what}: no proxy section in {effective}"
    );
    Ok(effective)
}

/// The top-level keys of a YAML document (lines that start with a key).
fn top_level_keys(yaml: &str) -> Vec<&str> {
    yaml.lines()
        .filter(|l| l.starts_with(|c: char| c.is_ascii_alphabetic()))
        .filter_map(|l| l.split_once(':').map(|(key, _)| key.trim()))
        .collect()
}

/// A file whose top-level keys are all sections of a rouse configuration.
fn is_rouse_config(yaml: &str) -> bool {
    let keys = top_level_keys(yaml);
    !keys.is_empty() && keys.iter().all(|k| SECTIONS.contains(k))
}

/// The literal blocks `rouse.yaml: |` of a Kubernetes manifest (ConfigMap
/// data), without their indentation.
fn embedded_configs(manifest: &str) -> Vec<String> {
    let lines: Vec<&str> = manifest.lines().collect();
    let mut blocks = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let trimmed = line.trim_start();
        if !matches!(
            trimmed.trim_end(),
            "rouse.yaml: |" | "rouse.yaml: |-" | "rouse.yaml: |+"
        ) {
            continue;
        }
        let key_indent = line.len() - trimmed.len();
        let body: Vec<&str> = lines[i + 1..]
            .iter()
            .take_while(|l| l.trim().is_empty() || l.len() - l.trim_start().len() > key_indent)
            .copied()
            .collect();
        let indent = body
            .iter()
            .find(|l| !l.trim().is_empty())
            .map_or(0, |l| l.len() - l.trim_start().len());
        let block = body
            .iter()
            .map(|l| l.get(indent..).unwrap_or("").trim_end())
            .collect::<Vec<_>>()
            .join("\n");
        blocks.push(block + "\n");
    }
    blocks
}

/// The ```yaml blocks of a Markdown file that are rouse configurations.
fn markdown_configs(markdown: &str) -> Vec<String> {
    markdown
        .split("```yaml\n")
        .skip(1)
        .filter_map(|rest| rest.split_once("```").map(|(block, _)| block.to_string()))
        .filter(|block| is_rouse_config(block))
        .collect()
}

fn files_under(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            files_under(&path, out)?;
        } else {
            out.push(path);
        }
    }
    out.sort();
    Ok(())
}

fn is_yaml(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml")
    )
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))
}

/// (name for messages, file to check) of every shipped configuration;
/// embedded ones are written to `scratch`.
fn shipped_configs(scratch: &Path) -> Result<Vec<(String, PathBuf)>> {
    let root = repo();
    let mut configs = Vec::new();
    let mut files = Vec::new();
    files_under(&root.join("configs"), &mut files)?;
    files_under(&root.join("deploy"), &mut files)?;
    for path in files.into_iter().filter(|p| is_yaml(p)) {
        let name = path
            .strip_prefix(&root)
            .unwrap_or(&path)
            .display()
            .to_string();
        let yaml = read(&path)?;
        if path.starts_with(root.join("configs")) || is_rouse_config(&yaml) {
            configs.push((name, path));
            continue;
        }
        for (i, block) in embedded_configs(&yaml).into_iter().enumerate() {
            let file = scratch.join(format!("{}-{i}.yaml", name.replace('/', "_")));
            std::fs::write(&file, block)?;
            configs.push((format!("{name} (embedded rouse.yaml #{i})"), file));
        }
    }
    let guide = root.join("docs/haproxy-migration.md");
    for (i, block) in markdown_configs(&read(&guide)?).into_iter().enumerate() {
        let file = scratch.join(format!("haproxy-migration-{i}.yaml"));
        std::fs::write(&file, block)?;
        configs.push((format!("docs/haproxy-migration.md (yaml block #{i})"), file));
    }
    Ok(configs)
}

#[test]
fn every_shipped_config_passes_check_config() -> Result<()> {
    let proxy = proxy_bin()?;
    let scratch = tempfile::tempdir()?;
    let configs = shipped_configs(scratch.path())?;
    let names: Vec<&str> = configs.iter().map(|(name, _)| name.as_str()).collect();
    // The discovery itself must not go blind: these are known to exist.
    for expected in [
        "configs/local.yaml",
        "configs/node.yaml",
        "configs/patroni.yaml",
        "configs/sidecar.yaml",
        "deploy/compose/rouse.yaml",
        "deploy/container/rouse.yaml",
        "deploy/kubernetes/control.yaml (embedded rouse.yaml #0)",
        "deploy/kubernetes/sidecar.yaml (embedded rouse.yaml #0)",
        "docs/haproxy-migration.md (yaml block #0)",
    ] {
        ensure!(
            names.contains(&expected),
            "{expected} was not found among {names:?}"
        );
    }
    let mut failures = Vec::new();
    for (name, file) in &configs {
        if let Err(e) = accepted(&proxy, file, name) {
            failures.push(format!("{e:#}"));
        }
    }
    ensure!(failures.is_empty(), "{}", failures.join("\n"));
    Ok(())
}

#[test]
fn a_bad_config_is_refused_with_file_line_and_key() -> Result<()> {
    let proxy = proxy_bin()?;
    let dir = tempfile::tempdir()?;
    let cases = [
        // An HAProxy habit carried over: unknown keys are refused, not ignored.
        (
            "proxy:\n  patroni:\n    check_interval: 3s\n    inter: 3s\n",
            4,
            "proxy.patroni.inter",
            "unknown field `inter`",
        ),
        // A key of the control section: the proxy checks the whole file.
        (
            "node:\n  data_dir: /var/lib/rouse\ncontrol:\n  api_addr: 0.0.0.0:8001\n  runas: postgres\n",
            5,
            "control.runas",
            "unknown field `runas`",
        ),
        // A value of the wrong kind.
        (
            "proxy:\n  tcp_listeners:\n    - {addr: \"0.0.0.0:5000\", cluster: pillar, role: leader}\n",
            3,
            "proxy.tcp_listeners[0].role",
            "unknown variant `leader`",
        ),
    ];
    for (i, (yaml, line, key, message)) in cases.into_iter().enumerate() {
        let file = dir.path().join(format!("bad-{i}.yaml"));
        std::fs::write(&file, yaml)?;
        let out = check_config(&proxy, &file)?;
        let stderr = text(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{yaml} was not refused: {stderr}"
        );
        let expected = format!("{}:{line}: key `{key}`", file.display());
        assert!(
            stderr.contains(&expected) && stderr.contains(message),
            "{yaml}: expected `{expected}` and `{message}` in: {stderr}"
        );
    }

    // Checks that are not about one key still name the file.
    let file = dir.path().join("stray-listener.yaml");
    std::fs::write(
        &file,
        "proxy:\n  tcp_listeners:\n    - {addr: \"0.0.0.0:5000\", cluster: nope, role: primary}\n",
    )?;
    let out = check_config(&proxy, &file)?;
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(&file.display().to_string()) && stderr.contains("cluster nope"),
        "{stderr}"
    );
    Ok(())
}

/// The compose stack names Patroni members by IP address: the addresses of
/// its rouse.yaml and register.sh are the fixed ones of its network.
#[test]
fn compose_addresses_agree() -> Result<()> {
    let proxy = proxy_bin()?;
    let compose_dir = repo().join("deploy/compose");
    let config = accepted(
        &proxy,
        &compose_dir.join("rouse.yaml"),
        "deploy/compose/rouse.yaml",
    )?;
    let compose = read(&compose_dir.join("docker-compose.yml"))?;
    let register = read(&compose_dir.join("register.sh"))?;
    let members = config["proxy"]["patroni_clusters"][0]["members"]
        .as_array()
        .context("no members in deploy/compose/rouse.yaml")?;
    ensure!(members.len() == 3, "{members:?}");
    for member in members {
        let name = member["name"].as_str().context("member without name")?;
        let addr = member["addr"].as_str().context("member without addr")?;
        let ip = addr.split(':').next().unwrap_or_default();
        ensure!(
            compose.contains(&format!("ipv4_address: {ip}}}")),
            "{name} {addr}: no service of docker-compose.yml has address {ip}"
        );
        ensure!(
            register.contains(&format!("--member {name}={addr},")),
            "{name} {addr}: register.sh registers another address"
        );
    }
    for port in ["5000", "5001", "5433", "6379", "7000"] {
        ensure!(
            compose.contains(&format!("\"127.0.0.1:{port}:{port}\"")),
            "docker-compose.yml does not publish the proxy's port {port}"
        );
    }
    Ok(())
}

/// The Kubernetes sidecar's probes reach the stats port of its embedded config.
#[test]
fn sidecar_probes_reach_the_stats_port() -> Result<()> {
    let proxy = proxy_bin()?;
    let scratch = tempfile::tempdir()?;
    let manifest = read(&repo().join("deploy/kubernetes/sidecar.yaml"))?;
    let embedded = embedded_configs(&manifest);
    ensure!(embedded.len() == 1, "{} embedded configs", embedded.len());
    let file = scratch.path().join("sidecar.yaml");
    std::fs::write(&file, &embedded[0])?;
    let config = accepted(&proxy, &file, "the sidecar's ConfigMap")?;
    let stats: std::net::SocketAddr = config["proxy"]["stats_addr"]
        .as_str()
        .context("no stats_addr")?
        .parse()?;
    ensure!(
        stats.ip().is_unspecified(),
        "the kubelet probes the pod's address, but the stats port listens on {stats}"
    );
    ensure!(
        manifest.contains(&format!("containerPort: {}", stats.port())),
        "no containerPort {} for the probes",
        stats.port()
    );
    ensure!(manifest.contains("path: /healthz"), "no /healthz probe");
    Ok(())
}

/// Every object of the Kubernetes manifests is valid against the API's
/// schema (strict: no unknown fields), for the oldest version they need
/// (native sidecars: 1.29).
#[test]
fn kubernetes_manifests_match_the_api_schema() -> Result<()> {
    let dir = repo().join("deploy/kubernetes");
    let out = Command::new("python3")
        .args(["-m", "kubernetes_validate", "-k", "1.29.0", "--strict"])
        .arg(dir.join("control.yaml"))
        .arg(dir.join("sidecar.yaml"))
        .output()
        .context("run kubernetes-validate (installed by deploy/install-deps.sh)")?;
    let report = format!("{}{}", text(&out.stdout), text(&out.stderr));
    ensure!(out.status.success(), "{report}");
    ensure!(
        report.matches("passed for resource").count() == 7,
        "{report}"
    );
    Ok(())
}

/// The argument list of a unit's `ExecStart=`, the binary first.
fn exec_start(unit: &str) -> Vec<&str> {
    unit.lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .map(|l| l.split_whitespace().collect())
        .unwrap_or_default()
}

/// `systemd-analyze verify`'s complaints about the units: it exits 0 on
/// unknown keys and bad values, and only reports them on stderr.
fn verify(units: &[PathBuf]) -> Result<Vec<String>> {
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .args(units)
        .output()
        .context(
            "cannot run systemd-analyze: install Debian's `systemd` package \
             (apt-get install -y systemd)",
        )?;
    let mut complaints: Vec<String> = text(&out.stderr)
        .lines()
        .chain(text(&out.stdout).lines())
        .filter(|l| l.contains("rouse"))
        .map(str::to_string)
        .collect();
    if !out.status.success() {
        complaints.push(format!(
            "systemd-analyze verify exited with {}: {}",
            out.status,
            text(&out.stderr)
        ));
    }
    Ok(complaints)
}

#[test]
fn systemd_units_verify() -> Result<()> {
    let bins = [
        ("rouse-control", rouse_tests::control_bin()?),
        ("rouse-proxy", proxy_bin()?),
    ];
    let systemd = repo().join("deploy/systemd");
    let scratch = tempfile::tempdir()?;
    let mut units = Vec::new();
    for (name, bin) in &bins {
        let unit_name = format!("{name}.service");
        let unit = read(&systemd.join(&unit_name))?;
        let installed = format!("{INSTALLED_BIN_DIR}{name}");
        let args = exec_start(&unit);
        ensure!(
            args.first() == Some(&installed.as_str()),
            "{unit_name}: ExecStart= does not start {installed}: {args:?}"
        );
        // The command line of the unit is one the binary takes.
        let help = clean_command(bin).args(&args[1..]).arg("--help").output()?;
        ensure!(
            help.status.success(),
            "{unit_name}: {} {:?} is refused: {}",
            bin.display(),
            &args[1..],
            text(&help.stderr)
        );
        // verify wants an executable at the ExecStart= path: the built one.
        let absolute = std::fs::canonicalize(bin)?;
        let unit = unit.replace(&installed, &absolute.display().to_string());
        let path = scratch.path().join(&unit_name);
        std::fs::write(&path, unit)?;
        units.push(path);
    }
    let complaints = verify(&units)?;
    ensure!(complaints.is_empty(), "{}", complaints.join("\n"));

    // The check sees mistakes: a unit with a typo does not pass.
    let broken = scratch.path().join("rouse-broken.service");
    let unit = read(&units[1])?.replace("ProtectHome=yes", "ProtectHome=yes\nProtectHomes=yes");
    std::fs::write(&broken, unit)?;
    let complaints = verify(std::slice::from_ref(&broken))?;
    ensure!(
        complaints.iter().any(|c| c.contains("ProtectHomes")),
        "a unit with an unknown key passed: {complaints:?}"
    );
    Ok(())
}

#[test]
fn sysusers_makes_the_rouse_user() -> Result<()> {
    let root = tempfile::tempdir()?;
    std::fs::create_dir(root.path().join("etc"))?;
    let out = Command::new("systemd-sysusers")
        .arg(format!("--root={}", root.path().display()))
        .arg(repo().join("deploy/systemd/rouse.sysusers"))
        .output()
        .context("cannot run systemd-sysusers: install Debian's `systemd` package")?;
    ensure!(out.status.success(), "{}", text(&out.stderr));
    let passwd = read(&root.path().join("etc/passwd"))?;
    let rouse = passwd
        .lines()
        .find(|l| l.starts_with("rouse:"))
        .with_context(|| format!("no user rouse in {passwd}"))?;
    let fields: Vec<&str> = rouse.split(':').collect();
    ensure!(
        fields.get(5) == Some(&"/var/lib/rouse"),
        "home of rouse: {rouse}"
    );
    let uid: u32 = fields.get(2).context("no uid")?.parse()?;
    ensure!(
        (1..1000).contains(&uid),
        "rouse is not a system user: {rouse}"
    );
    let group = read(&root.path().join("etc/group"))?;
    ensure!(group.lines().any(|l| l.starts_with("rouse:")), "{group}");
    Ok(())
}

#[test]
fn embedded_configs_are_extracted_as_written() {
    let manifest = "data:\n  other: x\n  rouse.yaml: |\n    proxy:\n      stats_addr: 0.0.0.0:7000\n\n    redis:\n      url: redis://r:6379\n---\nkind: Service\n";
    assert_eq!(
        embedded_configs(manifest),
        vec!["proxy:\n  stats_addr: 0.0.0.0:7000\n\nredis:\n  url: redis://r:6379\n".to_string()]
    );
    assert!(is_rouse_config("# c\nproxy:\n  a: 1\nredis: {}\n"));
    assert!(!is_rouse_config("services:\n  a: {}\n"));
    assert!(!is_rouse_config("scope: pillar\nproxy: {}\n"));
}
