//! Waiting for, killing and reaping worker processes by pid.

use std::time::{Duration, Instant};

use crate::error::WorkerExit;

/// Waits up to `grace` for worker `pid` to exit on its own (a worker exits
/// as soon as its input closes), then kills it; reaps it either way. Returns
/// how it ended and whether it had to be killed.
pub(crate) fn wait_or_kill(pid: u32, grace: Duration) -> (WorkerExit, bool) {
    let ended = wait_or_kill_unreaped(pid, grace);
    reap(pid);
    ended
}

/// [`wait_or_kill`], leaving the ended worker unreaped (a zombie), so that
/// its pid stays its own — nothing else can be given it — until [`reap`]:
/// its reader may still be copying results out of its memory by pid.
pub(super) fn wait_or_kill_unreaped(pid: u32, grace: Duration) -> (WorkerExit, bool) {
    let deadline = Instant::now() + grace;
    let mut pause = Duration::from_micros(50);
    loop {
        match peek_exit(pid, false) {
            Ok(Some(exit)) => return (exit, false),
            Ok(None) if Instant::now() < deadline => {
                // Exiting takes microseconds to milliseconds; back off so a
                // slow exit does not spin.
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(20));
            }
            Ok(None) => {
                kill_pid(pid);
                let exit = loop {
                    match peek_exit(pid, true) {
                        Ok(Some(exit)) => break exit,
                        Ok(None) | Err(nix::errno::Errno::EINTR) => {}
                        Err(_) => break WorkerExit::Unknown,
                    }
                };
                return (exit, true);
            }
            Err(_) => return (WorkerExit::Unknown, false),
        }
    }
}

/// How `pid` ended, if it has (waiting for it when `block`), leaving it
/// unreaped (`WNOWAIT`).
pub(super) fn peek_exit(pid: u32, block: bool) -> nix::Result<Option<WorkerExit>> {
    use nix::sys::wait::WaitPidFlag;
    let mut flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT;
    if !block {
        flags |= WaitPidFlag::WNOHANG;
    }
    let status = nix::sys::wait::waitid(nix::sys::wait::Id::Pid(nix::unistd::Pid::from_raw(pid as i32)), flags)?;
    Ok(to_exit(status))
}

/// Reaps `pid`, which has ended (an error — it was reaped already — is
/// ignored).
pub(super) fn reap(pid: u32) {
    let _ = wait_pid(pid);
}

fn to_exit(status: nix::sys::wait::WaitStatus) -> Option<WorkerExit> {
    use nix::sys::wait::WaitStatus;
    match status {
        WaitStatus::Exited(_, code) => Some(WorkerExit::Exited { code }),
        WaitStatus::Signaled(_, signal, _) => Some(WorkerExit::Signaled { signal }),
        _ => None,
    }
}

/// Waits for `pid` to end and reaps it.
fn wait_pid(pid: u32) -> WorkerExit {
    loop {
        match nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid as i32), None) {
            Ok(status) => {
                if let Some(exit) = to_exit(status) {
                    return exit;
                }
            }
            Err(nix::errno::Errno::EINTR) => {}
            Err(_) => return WorkerExit::Unknown,
        }
    }
}

pub(crate) fn kill_pid(pid: u32) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL);
}
