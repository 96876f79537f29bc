//! Memory as the kernel accounts it: what a process and its children use
//! (proportional set size, so PostgreSQL's shared buffers count once across
//! its backends), and what the machine has left.

/// Bytes `pid` and its children (one level: PostgreSQL's backends) use.
pub fn tree_memory(pid: u32) -> u64 {
    let children =
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    std::iter::once(pid)
        .chain(children.split_whitespace().filter_map(|c| c.parse().ok()))
        .map(memory)
        .sum()
}

/// A process's proportional set size, else its resident set size.
fn memory(pid: u32) -> u64 {
    let kib = |file: &str, field: &str| {
        std::fs::read_to_string(format!("/proc/{pid}/{file}"))
            .ok()?
            .lines()
            .find_map(|l| l.strip_prefix(field))?
            .split_whitespace()
            .next()?
            .parse::<u64>()
            .ok()
    };
    kib("smaps_rollup", "Pss:")
        .or_else(|| kib("status", "VmRSS:"))
        .unwrap_or(0)
        * 1024
}

/// `MemAvailable` of `/proc/meminfo`, in bytes.
pub fn memory_available() -> u64 {
    meminfo("MemAvailable:")
}

/// `MemTotal` of `/proc/meminfo`, in bytes.
pub fn memory_total() -> u64 {
    meminfo("MemTotal:")
}

fn meminfo(field: &str) -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix(field))?
                .split_whitespace()
                .next()?
                .parse::<u64>()
                .ok()
        })
        .unwrap_or(0)
        * 1024
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_uses_memory_and_the_machine_has_some() {
        let mine = tree_memory(std::process::id());
        assert!(mine > 1024 * 1024, "{mine}");
        assert!(memory_available() > mine);
        assert_eq!(
            tree_memory(u32::MAX),
            0,
            "a process that does not exist uses nothing"
        );
    }
}
