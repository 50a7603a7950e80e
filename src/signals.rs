//! Opt-in handling of SIGINT and SIGTERM for programs that start workers.
//!
//! The library installs nothing by itself: a program asks with
//! [`install`], as the `procjob` binary does first thing in `main`. Then
//! SIGINT and SIGTERM are blocked in every thread and taken by one
//! dedicated thread with `sigwait`, which
//!
//! 1. records the signal ([`received`]) and wakes every pool waiting for
//!    its workers, so the call in progress fails with
//!    [`Error::Interrupted`](crate::Error::Interrupted) and unwinds
//!    normally: workers stopped (input closed, a short grace period, then
//!    SIGKILL) and reaped, temp folders removed;
//! 2. if the program has not exited [`FORCE_AFTER`] later (it was busy in a
//!    long computation of its own), or on a second signal, stops at once:
//!    SIGKILL to every live worker, reap them, remove every live run
//!    folder, and exit with 128 + the signal number.
//!
//! Workers run in their own process groups, so a terminal's Ctrl-C (sent
//! to the foreground process group) reaches only the coordinator, which
//! decides how the workers stop.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Mutex;
use std::time::Duration;

use nix::sys::signal::{SigSet, Signal};

use crate::pool::PoolEvent;

/// How long after the first signal the program may take to stop on its own.
pub const FORCE_AFTER: Duration = Duration::from_secs(2);

static INSTALLED: AtomicBool = AtomicBool::new(false);
/// Asks the watcher thread to stop (it checks every [`WATCH_TICK`]).
static STOP_WATCHER: AtomicBool = AtomicBool::new(false);
static WATCHER: Mutex<Option<std::thread::JoinHandle<()>>> = Mutex::new(None);
/// How often the watcher looks at [`STOP_WATCHER`] while no signal comes.
const WATCH_TICK: Duration = Duration::from_millis(5);
static RECEIVED: AtomicI32 = AtomicI32::new(0);
static NEXT_LISTENER: AtomicU64 = AtomicU64::new(1);
static LISTENERS: Mutex<Option<HashMap<u64, Sender<PoolEvent>>>> = Mutex::new(None);
static LIVE_PIDS: Mutex<Option<HashSet<i32>>> = Mutex::new(None);
static LIVE_FOLDERS: Mutex<Option<HashSet<PathBuf>>> = Mutex::new(None);

fn signals() -> SigSet {
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.add(Signal::SIGTERM);
    set
}

/// Takes SIGINT and SIGTERM for the whole process (see the module docs).
///
/// Call it early in `main`, before starting threads: the signals are
/// blocked in the calling thread and in threads started after it. Calling
/// it again does nothing.
pub fn install() -> std::io::Result<()> {
    if INSTALLED.swap(true, Ordering::SeqCst) {
        return Ok(());
    }
    signals().thread_block().map_err(std::io::Error::from)?;
    start_watcher()
}

fn start_watcher() -> std::io::Result<()> {
    STOP_WATCHER.store(false, Ordering::SeqCst);
    let handle = std::thread::Builder::new().name("procjob-signals".into()).spawn(watch)?;
    if let Ok(mut w) = WATCHER.lock() {
        *w = Some(handle);
    }
    Ok(())
}

/// Runs `f` with the signal thread stopped, so that, as far as procjob is
/// concerned, the process has one thread (forking requires it). SIGINT and
/// SIGTERM stay blocked meanwhile: one that arrives waits, and is taken when
/// the thread starts again after `f`.
pub fn single_threaded<R>(f: impl FnOnce() -> R) -> R {
    let handle = WATCHER.lock().ok().and_then(|mut w| w.take());
    let Some(handle) = handle else { return f() };
    STOP_WATCHER.store(true, Ordering::SeqCst);
    let _ = handle.join();
    let result = f();
    if let Err(e) = start_watcher() {
        eprintln!("procjob: warning: cannot restart the signal thread ({e}); Ctrl-C may leave workers behind");
    }
    result
}

/// Live workers of this process (started and not yet reaped).
pub fn live_workers() -> usize {
    LIVE_PIDS.lock().ok().and_then(|s| s.as_ref().map(HashSet::len)).unwrap_or(0)
}

/// The first SIGINT or SIGTERM received since [`install`], if any.
pub fn received() -> Option<Signal> {
    match RECEIVED.load(Ordering::SeqCst) {
        0 => None,
        n => Signal::try_from(n).ok(),
    }
}

/// The exit code for a stop by `signal`: 128 + its number (130 for SIGINT,
/// 143 for SIGTERM).
pub fn exit_code(signal: Signal) -> i32 {
    128 + signal as i32
}

fn watch() {
    let set = signals();
    let tick = libc::timespec { tv_sec: 0, tv_nsec: WATCH_TICK.as_nanos() as libc::c_long };
    let first = loop {
        if STOP_WATCHER.load(Ordering::SeqCst) {
            return;
        }
        // SAFETY: sigtimedwait reads a valid signal set and timeout and
        // writes nothing we pass (the info pointer is null).
        let got = unsafe { libc::sigtimedwait(set.as_ref(), std::ptr::null_mut(), &tick) };
        if let Ok(signal) = Signal::try_from(got) {
            break signal;
        }
    };
    RECEIVED.store(first as i32, Ordering::SeqCst);
    if let Ok(listeners) = LISTENERS.lock() {
        for tx in listeners.iter().flat_map(|m| m.values()) {
            let _ = tx.send(PoolEvent::interrupted(first));
        }
    }
    // A second signal, or no exit within FORCE_AFTER: stop at once.
    let timeout = libc::timespec { tv_sec: FORCE_AFTER.as_secs() as libc::time_t, tv_nsec: 0 };
    // SAFETY: sigtimedwait reads a valid signal set and timeout and writes
    // nothing we pass (the info pointer is null).
    let second = unsafe { libc::sigtimedwait(set.as_ref(), std::ptr::null_mut(), &timeout) };
    let signal = Signal::try_from(second).unwrap_or(first);
    stop_now(signal);
}

/// SIGKILL every live worker, reap them, remove every live run folder, and
/// exit with 128 + `signal`.
fn stop_now(signal: Signal) -> ! {
    let pids: Vec<i32> = LIVE_PIDS.lock().ok().and_then(|s| s.clone()).unwrap_or_default().into_iter().collect();
    for &pid in &pids {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
    }
    for &pid in &pids {
        let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None);
    }
    let folders: Vec<PathBuf> =
        LIVE_FOLDERS.lock().ok().and_then(|s| s.clone()).unwrap_or_default().into_iter().collect();
    for folder in folders {
        let _ = std::fs::remove_dir_all(folder);
    }
    eprintln!("procjob: stopped by {}", signal.as_str());
    // SAFETY: _exit ends the process without running destructors, which
    // may be in use by the thread that did not stop in time.
    unsafe { libc::_exit(exit_code(signal)) }
}

/// A pool's subscription to interruptions; unsubscribes on drop.
#[derive(Debug)]
pub(crate) struct Listener(u64);

impl Listener {
    /// Subscribes `tx` to interruptions.
    pub(crate) fn new(tx: Sender<PoolEvent>) -> Listener {
        let id = NEXT_LISTENER.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut l) = LISTENERS.lock() {
            l.get_or_insert_with(HashMap::new).insert(id, tx);
        }
        Listener(id)
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Ok(mut l) = LISTENERS.lock() {
            if let Some(m) = l.as_mut() {
                m.remove(&self.0);
            }
        }
    }
}

/// Records a live worker process, for a stop that cannot wait.
pub(crate) fn worker_started(pid: u32) {
    if let Ok(mut s) = LIVE_PIDS.lock() {
        s.get_or_insert_with(HashSet::new).insert(pid as i32);
    }
}

/// Forgets a reaped worker process.
pub(crate) fn worker_reaped(pid: u32) {
    if let Ok(mut s) = LIVE_PIDS.lock() {
        if let Some(s) = s.as_mut() {
            s.remove(&(pid as i32));
        }
    }
}

/// Records a live run folder, for a stop that cannot wait.
pub(crate) fn folder_created(path: PathBuf) {
    if let Ok(mut s) = LIVE_FOLDERS.lock() {
        s.get_or_insert_with(HashSet::new).insert(path);
    }
}

/// Forgets a removed run folder.
pub(crate) fn folder_removed(path: &std::path::Path) {
    if let Ok(mut s) = LIVE_FOLDERS.lock() {
        if let Some(s) = s.as_mut() {
            s.remove(path);
        }
    }
}
