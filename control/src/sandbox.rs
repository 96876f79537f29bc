//! Engine processes are confined with Landlock to their own data directory:
//! read and write there, read and execute system directories and their own
//! binary, nothing else. A tenant whose SQL names another database's file
//! (`ATTACH`, `VACUUM INTO`) then gets a permission error from the kernel,
//! whatever the proxy's statement filter let through.
//!
//! The ruleset is built in the daemon; a short-lived thread enters it and
//! starts the engine ([`Sandbox::spawn`]).

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

const CREATE_RULESET_VERSION: u32 = 1;
const RULE_PATH_BENEATH: u32 = 1;

const EXECUTE: u64 = 1 << 0;
const WRITE_FILE: u64 = 1 << 1;
const READ_FILE: u64 = 1 << 2;
const READ_DIR: u64 = 1 << 3;
/// Every right of ABI 1: the thirteen lowest bits.
const ABI1_ALL: u64 = (1 << 13) - 1;
const REFER: u64 = 1 << 13;
const TRUNCATE: u64 = 1 << 14;

/// Directories every engine reads: libraries, time zones, locales, its
/// configuration. None holds tenant data unless `node.data_dir` is put
/// inside one, which [`Sandbox::new`] refuses to grant.
const SYSTEM_DIRS: &[&str] = &["/usr", "/lib", "/lib64", "/bin", "/sbin", "/etc"];
/// Devices engines open: `/dev/null` for output, randomness for keys.
const DEVICES: &[(&str, u64)] = &[
    ("/dev/null", READ_FILE | WRITE_FILE | TRUNCATE),
    ("/dev/urandom", READ_FILE),
    ("/dev/random", READ_FILE),
];

/// Kernel settings engines read: Go sizes a listener's backlog from
/// `somaxconn`, and without it falls back to 128 connections waiting to be
/// accepted, which the herd of requests held during a wake overflows (the
/// dropped connects are retried a second later).
const KERNEL_SETTINGS: &[&str] = &["/proc/sys/net/core/somaxconn"];

#[repr(C)]
struct RulesetAttr {
    handled_access_fs: u64,
}

#[repr(C, packed)]
struct PathBeneathAttr {
    allowed_access: u64,
    parent_fd: i32,
}

/// A Landlock ruleset ready to be entered by a child process.
#[derive(Debug)]
pub struct Sandbox {
    ruleset: OwnedFd,
    dir: PathBuf,
}

/// The Landlock ABI version of this kernel, or `None` without Landlock.
pub fn abi() -> Option<u32> {
    // SAFETY: a null attribute with size 0 and the version flag only asks
    // for the ABI version.
    let v = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<RulesetAttr>(),
            0usize,
            CREATE_RULESET_VERSION,
        )
    };
    (v > 0).then_some(v as u32)
}

impl Sandbox {
    /// A ruleset granting all rights under `own_dir` and `also` (the
    /// database's own socket and backup directories), and read and execute
    /// on the system directories and `binary`'s directory, except those
    /// that contain `data_root` (every tenant's data lies below it).
    pub fn new(
        own_dir: &Path,
        binary: &Path,
        data_root: &Path,
        also: &[PathBuf],
    ) -> io::Result<Sandbox> {
        let abi = abi().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::Unsupported,
                "this kernel has no Landlock: set control.sandbox: false to run engines unconfined",
            )
        })?;
        let mut handled = ABI1_ALL;
        if abi >= 2 {
            handled |= REFER;
        }
        if abi >= 3 {
            handled |= TRUNCATE;
        }
        let attr = RulesetAttr {
            handled_access_fs: handled,
        };
        // SAFETY: attr is a valid ruleset attribute of the size given.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_landlock_create_ruleset,
                &attr as *const RulesetAttr,
                std::mem::size_of::<RulesetAttr>(),
                0u32,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the kernel returned a new file descriptor that we own.
        let sandbox = Sandbox {
            ruleset: unsafe { OwnedFd::from_raw_fd(fd as RawFd) },
            dir: own_dir.to_path_buf(),
        };
        sandbox.allow(own_dir, handled)?;
        for dir in also {
            sandbox.allow(dir, handled)?;
        }
        let data_root = canonical(data_root);
        let binary_dir = canonical(binary).parent().map(Path::to_path_buf);
        for dir in SYSTEM_DIRS.iter().map(PathBuf::from).chain(binary_dir) {
            let dir = canonical(&dir);
            if !dir.exists() {
                continue;
            }
            if data_root.starts_with(&dir) {
                tracing::warn!(dir = %dir.display(), data_dir = %data_root.display(),
                    "not granting engines read access to a directory that holds node.data_dir");
                continue;
            }
            sandbox.allow(&dir, READ_FILE | READ_DIR | EXECUTE)?;
        }
        let files = DEVICES.iter().copied();
        for (file, rights) in files.chain(KERNEL_SETTINGS.iter().map(|s| (*s, READ_FILE))) {
            if Path::new(file).exists() {
                sandbox.allow(Path::new(file), rights & handled)?;
            }
        }
        Ok(sandbox)
    }

    /// The one directory the process may write.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn allow(&self, path: &Path, rights: u64) -> io::Result<()> {
        let cpath = CString::new(path.as_os_str().as_bytes())?;
        // SAFETY: cpath is a valid C string; O_PATH opens without reading.
        let fd = unsafe { libc::open(cpath.as_ptr(), libc::O_PATH | libc::O_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::other(format!(
                "cannot open {} for the sandbox: {}",
                path.display(),
                io::Error::last_os_error()
            )));
        }
        // SAFETY: the fd was just opened and is owned here.
        let parent = unsafe { OwnedFd::from_raw_fd(fd) };
        let attr = PathBeneathAttr {
            allowed_access: rights,
            parent_fd: parent.as_raw_fd(),
        };
        // SAFETY: a valid ruleset fd and path-beneath attribute.
        let r = unsafe {
            libc::syscall(
                libc::SYS_landlock_add_rule,
                self.ruleset.as_raw_fd(),
                RULE_PATH_BENEATH,
                &attr as *const PathBeneathAttr,
                0u32,
            )
        };
        if r < 0 {
            return Err(io::Error::other(format!(
                "cannot grant {} in the sandbox: {}",
                path.display(),
                io::Error::last_os_error()
            )));
        }
        Ok(())
    }

    /// Starts `cmd` confined. The confinement is entered by a thread of its
    /// own, which then spawns and ends: Landlock binds a thread and what it
    /// starts, so the daemon stays free, and the child needs no code of
    /// ours between fork and exec, which lets the standard library start
    /// it with `posix_spawn` instead of copying the whole daemon with
    /// `fork` (which serialises a storm of starts).
    pub async fn spawn(
        self: Arc<Self>,
        mut cmd: tokio::process::Command,
    ) -> io::Result<tokio::process::Child> {
        let runtime = tokio::runtime::Handle::current();
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("confined-spawn".into())
            .spawn(move || {
                // The child is registered with the runtime's reaper.
                let _runtime = runtime.enter();
                let _ = tx.send(self.enter().and_then(|()| cmd.spawn()));
            })?;
        rx.await
            .map_err(|_| io::Error::other("the spawning thread ended without an answer"))?
    }

    /// Confines the calling thread and everything it starts from now on.
    fn enter(&self) -> io::Result<()> {
        // SAFETY: prctl and landlock_restrict_self are plain syscalls; both
        // apply to the calling thread only.
        unsafe {
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            if libc::syscall(
                libc::SYS_landlock_restrict_self,
                self.ruleset.as_raw_fd(),
                0u32,
            ) != 0
            {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    }
}

fn canonical(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A confined `sh` reads and writes its own directory and nothing beside it.
    #[test]
    fn a_confined_process_reaches_only_its_own_directory() {
        if abi().is_none() {
            panic!("Landlock is not available on this kernel");
        }
        let root = tempfile::tempdir().unwrap();
        let own = root.path().join("shop_users");
        let other = root.path().join("shop_orders");
        std::fs::create_dir_all(&own).unwrap();
        std::fs::create_dir_all(&other).unwrap();
        std::fs::write(other.join("db.sqlite"), "secret").unwrap();
        let sandbox = Arc::new(Sandbox::new(&own, Path::new("/bin/sh"), root.path(), &[]).unwrap());
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let run = |script: &str| {
            let mut cmd = tokio::process::Command::new("/bin/sh");
            cmd.arg("-c").arg(script);
            runtime.block_on(async {
                let child = sandbox.clone().spawn(cmd).await.unwrap();
                child.wait_with_output().await.unwrap().status.success()
            })
        };
        assert!(run(&format!("echo hi > {0}/x && cat {0}/x", own.display())));
        assert!(!run(&format!("cat {}/db.sqlite", other.display())));
        assert!(!run(&format!("echo x > {}/db.sqlite", other.display())));
        assert!(!run(&format!("ls {}", root.path().display())));
        // The listen backlog setting is readable, and nothing else of the kernel's.
        assert!(run("test \"$(cat /proc/sys/net/core/somaxconn)\" -gt 0"));
        assert!(!run("cat /proc/sys/kernel/hostname"));
        assert!(!run("echo 1 > /proc/sys/net/core/somaxconn"));
        assert_eq!(
            std::fs::read_to_string(other.join("db.sqlite")).unwrap(),
            "secret"
        );
    }
}
