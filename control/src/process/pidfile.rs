//! The pid file beside each engine process: its pid, its start time and its
//! command line, so that a restarted daemon can tell the very process it
//! started (pids are reused; a start time and command line are not) and
//! adopt it instead of starting it again.

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::path::Path;

/// Writes `pid`, its start time and its command line: `<pid> <start>` on
/// the first line, then the arguments, each ended by a NUL.
pub fn write(path: &Path, pid: u32) {
    let started = start_time(pid).unwrap_or(0);
    let mut out = format!("{pid} {started}\n").into_bytes();
    for arg in settled_command_line(pid) {
        out.extend(arg.into_vec());
        out.push(0);
    }
    let _ = std::fs::write(path, out);
}

/// Empties the file of a process that was stopped. Emptied rather than
/// removed: the next start writes it again, and a storm of wakes would
/// otherwise have the filesystem free and allocate an inode for each.
pub fn clear(path: &Path) {
    let _ = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|f| f.set_len(0));
}

/// The pid the file names, if that process still runs as the one written:
/// the same start time and the same command line. A pid file of the older
/// format (the pid alone) names nothing adoptable.
pub fn live(path: &Path) -> Option<u32> {
    let raw = std::fs::read(path).ok()?;
    let newline = raw.iter().position(|b| *b == b'\n')?;
    let first = std::str::from_utf8(&raw[..newline]).ok()?;
    let mut fields = first.split_whitespace();
    let pid: u32 = fields.next()?.parse().ok()?;
    let started: u64 = fields.next()?.parse().ok()?;
    let args = split_args(&raw[newline + 1..]);
    let same = pid > 0
        && !args.is_empty()
        && start_time(pid) == Some(started)
        && command_line(pid) == args;
    same.then_some(pid)
}

/// The pid in a pid file of any format, to stop what an earlier daemon left.
pub fn pid(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path)
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Field 22 of `/proc/<pid>/stat`: clock ticks after boot at which the
/// process started. The command name (field 2) may hold spaces and
/// parentheses, so fields are counted after its closing parenthesis.
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    // `rest` starts at field 3 (state); field 22 is 19 further on.
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// The command line of a process just started. `posix_spawn` returns as
/// soon as the child has its new address space, a moment before the
/// kernel has put the new program's arguments in it: until then the
/// command line reads empty, and a pid file written from it would name
/// nothing adoptable.
fn settled_command_line(pid: u32) -> Vec<OsString> {
    for _ in 0..100 {
        let args = command_line(pid);
        if !args.is_empty() {
            return args;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    Vec::new()
}

/// The process's argument vector, as `/proc/<pid>/cmdline` holds it.
pub fn command_line(pid: u32) -> Vec<OsString> {
    split_args(&std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default())
}

fn split_args(raw: &[u8]) -> Vec<OsString> {
    raw.split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| OsString::from_vec(a.to_vec()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_running_process_is_recognised_and_a_reused_pid_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("node-0.pid");
        let me = std::process::id();
        write(&file, me);
        assert_eq!(live(&file), Some(me));
        assert_eq!(pid(&file), Some(me));
        let written = std::fs::read(&file).unwrap();
        let newline = written.iter().position(|b| *b == b'\n').unwrap();
        let args = &written[newline..];

        // Same pid, other start time: another process got the pid.
        let started = start_time(me).unwrap();
        let mut other = format!("{me} {}", started + 1).into_bytes();
        other.extend_from_slice(args);
        std::fs::write(&file, other).unwrap();
        assert_eq!(live(&file), None);

        // Same pid and start, other command line: not the process written.
        std::fs::write(&file, format!("{me} {started}\n/bin/other\0")).unwrap();
        assert_eq!(live(&file), None);

        // The format of daemons that wrote the pid alone: stopped, not adopted.
        std::fs::write(&file, format!("{me}\n")).unwrap();
        assert_eq!(live(&file), None);
        assert_eq!(pid(&file), Some(me));

        // Cleared at a stop: names nothing, to adopt or to stop.
        write(&file, me);
        clear(&file);
        assert_eq!((live(&file), pid(&file)), (None, None));
    }

    #[test]
    fn the_command_line_is_read_back_argument_by_argument() {
        let args = command_line(std::process::id());
        assert!(!args.is_empty());
        assert_eq!(args.len(), std::env::args_os().count());
    }

    /// A process written right after its spawn returned is adopted later:
    /// its arguments are read once its exec has set them, not while the
    /// kernel is still setting them up (an empty command line then).
    #[test]
    fn a_process_written_as_soon_as_it_is_spawned_is_recognised() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("node-0.pid");
        for _ in 0..20 {
            let mut child = std::process::Command::new("/bin/sleep")
                .arg("5")
                .spawn()
                .unwrap();
            write(&file, child.id());
            let adopted = live(&file);
            child.kill().unwrap();
            child.wait().unwrap();
            assert_eq!(adopted, Some(child.id()));
        }
    }
}
