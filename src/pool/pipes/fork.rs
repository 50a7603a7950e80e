//! Forking workers from this process ("fork" start method): only while it
//! has one thread, each child closing every descriptor but its own pipes.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use procjob_worker::array::Array;
use procjob_worker::secret::PoolSecret;

/// Threads of this process once threads just joined have left it: a joined
/// thread may still be counted for a few microseconds while the kernel
/// finishes its exit, so a count above 1 is read again for up to 100 ms.
pub(super) fn settled_thread_count() -> Option<usize> {
    let deadline = Instant::now() + Duration::from_millis(100);
    loop {
        let n = thread_count();
        if n == Some(1) || Instant::now() >= deadline {
            return n;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Threads of this process, from /proc/self/status.
pub fn thread_count() -> Option<usize> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status.lines().find_map(|l| l.strip_prefix("Threads:"))?.trim().parse().ok()
}

/// Forks one worker that serves on new pipes, reads `inherit` in place and
/// accepts the handshake that carries `secret`. Returns (pid, its input)
/// and its output.
pub(super) fn fork_one(inherit: &[Array], parent: i32, secret: &PoolSecret) -> std::io::Result<((u32, File), File)> {
    use nix::unistd::{fork, pipe2, ForkResult};
    let (req_read, req_write) = pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let (rep_read, rep_write) = pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    // SAFETY: the caller made sure this process has one thread, so the
    // child is a complete copy of it; the child only closes descriptors,
    // serves, and leaves with _exit.
    match unsafe { fork() }? {
        ForkResult::Child => {
            drop(req_write);
            drop(rep_read);
            close_other_fds(&[req_read.as_raw_fd(), rep_write.as_raw_fd()]);
            super::spawn::mark_serving();
            procjob_worker::serve::run_forked_worker(
                File::from(req_read),
                File::from(rep_write),
                &procjob_worker::Registry::builtin(),
                inherit,
                parent,
                secret.clone(),
            )
        }
        ForkResult::Parent { child } => Ok(((child.as_raw() as u32, File::from(req_write)), File::from(rep_read))),
    }
}

/// In a forked child: closes every descriptor but stdio and `keep`, so it
/// holds no end of another worker's pipes (which would hide their closing).
fn close_other_fds(keep: &[i32]) {
    let Ok(entries) = std::fs::read_dir("/proc/self/fd") else { return };
    let fds: Vec<i32> = entries.flatten().filter_map(|e| e.file_name().to_str()?.parse().ok()).collect();
    for fd in fds {
        if fd > 2 && !keep.contains(&fd) {
            // SAFETY: closing a descriptor number this process holds; the
            // child owns no Rust object for these (they belong to the
            // parent's copies, which the child never uses).
            unsafe { libc::close(fd) };
        }
    }
}
