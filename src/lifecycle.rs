//! What this process has alive: its worker processes, its run folders, the
//! pools waiting on their workers, and whether it is ending.
//!
//! The pool records the workers it starts and reaps, the run folder records
//! itself, and a pool subscribes a waker; [`crate::signals`] reads all of it
//! when a signal must stop everything at once. This module depends on
//! nothing else in the crate, so those three can all use it without
//! depending on each other.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Mutex, TryLockError};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

static LIVE_PIDS: Mutex<Option<HashSet<i32>>> = Mutex::new(None);
static LIVE_FOLDERS: Mutex<Option<HashSet<PathBuf>>> = Mutex::new(None);
static NEXT_WAKER: AtomicU64 = AtomicU64::new(1);
static WAKERS: Mutex<Option<HashMap<u64, WakeFn>>> = Mutex::new(None);

/// What a pool is told when a signal interrupts the process.
type WakeFn = Box<dyn Fn(Signal) + Send>;

/// Who ends the process: nobody yet (`RUNNING`), the signal thread in a
/// stop that cannot wait (`STOPPING`), or `main` through
/// [`crate::signals::exit`] (`EXITING`). The first to claim it does; the
/// other waits for the end.
static ENDING: AtomicU8 = AtomicU8::new(RUNNING);
const RUNNING: u8 = 0;
const STOPPING: u8 = 1;
const EXITING: u8 = 2;

/// How long [`live_pids`] and [`live_folders`] wait for their lock: a
/// thread parked in the SIGBUS handler may hold it for good.
const LOCK_PATIENCE: Duration = Duration::from_millis(500);

/// Records a live worker process, for a stop that cannot wait. During such
/// a stop (the pool may start a worker to replace one it killed), kills it
/// at once: it must not live on to write to a coordinator that is gone.
pub(crate) fn worker_started(pid: u32) {
    if let Ok(mut s) = LIVE_PIDS.lock() {
        s.get_or_insert_with(HashSet::new).insert(pid as i32);
    }
    // After the insert: a stop that began before it took its list of
    // workers either saw this one or is seen here.
    if is_stopping() {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGKILL);
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
pub(crate) fn folder_removed(path: &Path) {
    if let Ok(mut s) = LIVE_FOLDERS.lock() {
        if let Some(s) = s.as_mut() {
            s.remove(path);
        }
    }
}

/// Live workers of this process (started and not yet reaped).
pub(crate) fn live_workers() -> usize {
    LIVE_PIDS.lock().ok().and_then(|s| s.as_ref().map(HashSet::len)).unwrap_or(0)
}

/// The live workers' pids (waiting at most [`LOCK_PATIENCE`]).
pub(crate) fn live_pids() -> Vec<i32> {
    snapshot(&LIVE_PIDS)
}

/// The live run folders (waiting at most [`LOCK_PATIENCE`]).
pub(crate) fn live_folders() -> Vec<PathBuf> {
    snapshot(&LIVE_FOLDERS)
}

/// Whether a signal that ends the process removes the run folders at once,
/// before the program's own stop has run (see [`remove_folders_first`]).
static FOLDERS_FIRST: AtomicBool = AtomicBool::new(false);

/// From now on a signal that ends the process removes the run folders at
/// once: an MPI launcher SIGKILLs every rank about a second after it
/// forwards a Ctrl-C, which a busy program may not beat.
#[cfg_attr(not(feature = "mpi"), allow(dead_code))]
pub(crate) fn remove_folders_first() {
    FOLDERS_FIRST.store(true, Ordering::SeqCst);
}

/// See [`remove_folders_first`].
pub(crate) fn folders_go_first() -> bool {
    FOLDERS_FIRST.load(Ordering::SeqCst)
}

/// The contents of a set behind a lock, waiting at most [`LOCK_PATIENCE`]
/// for it.
fn snapshot<T: Clone>(set: &Mutex<Option<HashSet<T>>>) -> Vec<T> {
    let deadline = Instant::now() + LOCK_PATIENCE;
    loop {
        match set.try_lock() {
            Ok(s) => return s.iter().flatten().cloned().collect(),
            Err(TryLockError::Poisoned(p)) => return p.into_inner().iter().flatten().cloned().collect(),
            Err(TryLockError::WouldBlock) if Instant::now() < deadline => std::thread::yield_now(),
            Err(TryLockError::WouldBlock) => return Vec::new(),
        }
    }
}

/// A subscription to interruptions (a pool's); unsubscribes on drop.
#[derive(Debug)]
pub(crate) struct Waker(u64);

impl Waker {
    /// Calls `wake` with the signal when one interrupts the process.
    pub(crate) fn new(wake: impl Fn(Signal) + Send + 'static) -> Waker {
        let id = NEXT_WAKER.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut w) = WAKERS.lock() {
            w.get_or_insert_with(HashMap::new).insert(id, Box::new(wake));
        }
        Waker(id)
    }
}

impl Drop for Waker {
    fn drop(&mut self) {
        if let Ok(mut w) = WAKERS.lock() {
            if let Some(m) = w.as_mut() {
                m.remove(&self.0);
            }
        }
    }
}

/// Tells every subscribed pool that `signal` interrupted the process.
pub(crate) fn wake_all(signal: Signal) {
    if let Ok(wakers) = WAKERS.lock() {
        for wake in wakers.iter().flat_map(|m| m.values()) {
            wake(signal);
        }
    }
}

/// Claims the end of the process for a stop at once; `false` when `main`
/// has claimed it first (it is exiting).
pub(crate) fn claim_stop() -> bool {
    ENDING.compare_exchange(RUNNING, STOPPING, Ordering::SeqCst, Ordering::SeqCst).is_ok()
}

/// Claims the end of the process for `main`'s exit; `false` when a stop at
/// once has claimed it first.
pub(crate) fn claim_exit() -> bool {
    ENDING.compare_exchange(RUNNING, EXITING, Ordering::SeqCst, Ordering::SeqCst) != Err(STOPPING)
}

/// Whether a stop at once is under way.
pub(crate) fn is_stopping() -> bool {
    ENDING.load(Ordering::SeqCst) == STOPPING
}
