//! CPU accounting from `/proc`: a process's, the machine's, and the
//! rqlited engines' under a data directory.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

/// CPU time (user and system, all threads) a process has used so far.
pub fn cpu_time(pid: u32) -> anyhow::Result<Duration> {
    use anyhow::Context;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name, which may hold spaces: utime and
    // stime are the 12th and 13th, in USER_HZ ticks (100 on Linux).
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .context("no command name in /proc/PID/stat")?
        .1
        .split_whitespace()
        .collect();
    let ticks = |i: usize| -> anyhow::Result<u64> {
        fields
            .get(i)
            .and_then(|f| f.parse().ok())
            .context("short /proc/PID/stat")
    };
    Ok(Duration::from_millis((ticks(11)? + ticks(12)?) * 10))
}

/// CPU time the whole machine has spent busy so far (every core; user,
/// nice, system, interrupts, steal: all but idle and I/O wait).
pub fn machine_busy() -> Duration {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks: u64 = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .enumerate()
        .take(8)
        .filter(|(i, _)| !matches!(i, 3 | 4))
        .filter_map(|(_, v)| v.parse::<u64>().ok())
        .sum();
    Duration::from_millis(ticks * 10)
}

/// CPU used so far by each rqlited serving under `dir`: pid -> (whether
/// it is control's own `_system`, CPU time).
pub fn rqlited_under(dir: &Path) -> HashMap<u32, (bool, Duration)> {
    let dir = dir.display().to_string();
    let mut out = HashMap::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmd
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if !args[0].ends_with("rqlited") || !args.iter().any(|a| a.contains(&dir)) {
            continue;
        }
        let system = args.iter().any(|a| a.contains("_system"));
        if let Ok(cpu) = cpu_time(pid) {
            out.insert(pid, (system, cpu));
        }
    }
    out
}

/// CPU the rqlited under a directory used between two [`rqlited_under`]
/// snapshots: (tenants' engines, `_system`). Engines started since count
/// whole; those stopped since are missed.
pub fn rqlited_used(
    before: &HashMap<u32, (bool, Duration)>,
    after: &HashMap<u32, (bool, Duration)>,
) -> (Duration, Duration) {
    let (mut tenants, mut system) = (Duration::ZERO, Duration::ZERO);
    for (pid, (is_system, cpu)) in after {
        let used = cpu.saturating_sub(before.get(pid).map_or(Duration::ZERO, |b| b.1));
        if *is_system {
            system += used;
        } else {
            tenants += used;
        }
    }
    (tenants, system)
}
