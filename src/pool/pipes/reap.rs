//! Waiting for, killing and reaping worker processes by pid.

use std::time::{Duration, Instant};

use crate::error::WorkerExit;

/// Waits up to `grace` for worker `pid` to exit on its own (a worker exits
/// as soon as its input closes), then kills it; reaps it either way.
pub(crate) fn wait_or_kill(pid: u32, grace: Duration) -> WorkerExit {
    let deadline = Instant::now() + grace;
    let mut pause = Duration::from_micros(50);
    loop {
        match try_wait(pid) {
            Ok(Some(exit)) => return exit,
            Ok(None) if Instant::now() < deadline => {
                // Exiting takes microseconds to milliseconds; back off so a
                // slow exit does not spin.
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(20));
            }
            Ok(None) => {
                kill_pid(pid);
                return wait_pid(pid);
            }
            Err(_) => return WorkerExit::Unknown,
        }
    }
}

fn to_exit(status: nix::sys::wait::WaitStatus) -> Option<WorkerExit> {
    use nix::sys::wait::WaitStatus;
    match status {
        WaitStatus::Exited(_, code) => Some(WorkerExit::Exited { code }),
        WaitStatus::Signaled(_, signal, _) => Some(WorkerExit::Signaled { signal }),
        _ => None,
    }
}

/// Reaps `pid` if it has ended.
pub(super) fn try_wait(pid: u32) -> nix::Result<Option<WorkerExit>> {
    let status =
        nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid as i32), Some(nix::sys::wait::WaitPidFlag::WNOHANG))?;
    Ok(to_exit(status))
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
