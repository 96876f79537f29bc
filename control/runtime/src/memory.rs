//! Giving freed heap back to the system. glibc's allocator keeps one arena
//! per busy thread and returns little of what a burst (a storm of wakes,
//! thousands of connections) freed, so a daemon's resident size stays at
//! its high-water mark. Trimming now and then makes it follow what is used.

use std::time::Duration;

/// How often free pages are handed back.
pub const TRIM_INTERVAL: Duration = Duration::from_secs(10);

/// Returns the free pages of every arena to the system; elsewhere than
/// glibc, nothing to do.
pub fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Caps glibc's arenas at `n`, before the runtime starts its threads: for
/// a daemon that allocates little on its hot path, fewer arenas fragment
/// less and keep the resident size near what is in use.
pub fn limit_arenas(n: i32) {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator parameter.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, n);
    }
}

/// Keeps the kernel from backing this process's memory with transparent
/// huge pages: a 2 MiB page is resident whole once a byte of it is used,
/// so a process that holds thousands of small idle sessions pays for far
/// more than it uses (mimalloc asks for huge pages where the system lets
/// it choose). Children inherit it; call it only where none are started.
pub fn no_huge_pages() {
    #[cfg(target_os = "linux")]
    // SAFETY: prctl with PR_SET_THP_DISABLE only sets a flag of this process.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
}

/// Trims every [`TRIM_INTERVAL`], for the life of the daemon.
pub async fn trim_forever() {
    let mut tick = tokio::time::interval(TRIM_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        // Off the runtime's threads: a trim of large arenas takes a moment.
        let _ = tokio::task::spawn_blocking(trim).await;
    }
}
