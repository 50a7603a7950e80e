//! Starting workers by re-executing this program ("spawn" start method),
//! from one long-lived thread.

use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::Mutex;
use std::thread::JoinHandle;

use crate::error::WorkerExit;

/// Set by `procjob::init()`: this binary's `main` turns re-executions into
/// workers, so they need no extra arguments.
pub(crate) static INIT_CALLED: AtomicBool = AtomicBool::new(false);

/// Set when this process becomes a worker (spawned or forked) and serves
/// tasks: a `Parallel` call made from a task then runs in this process
/// instead of starting workers.
static SERVING: AtomicBool = AtomicBool::new(false);

/// Marks this process as a worker serving tasks (see [`serving_as_worker`]).
pub(crate) fn mark_serving() {
    SERVING.store(true, Ordering::Relaxed);
}

/// Whether this process is a worker serving tasks: any code running in it
/// runs inside a task.
pub(crate) fn serving_as_worker() -> bool {
    SERVING.load(Ordering::Relaxed)
}

/// The test-harness entry point defined by [`crate::test_support!`].
pub(crate) const HARNESS_ENTRY: &str = "__procjob_worker_entry";

/// Thread-count variables set in each worker, unless the user set them, so
/// that N workers do not each start a thread pool as wide as the machine.
pub(crate) const THREAD_ENV: [&str; 4] =
    ["OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "RAYON_NUM_THREADS"];

type SpawnRequest = (Command, Sender<std::io::Result<Child>>);

/// The spawner thread: its request channel and handle, while it runs.
static SPAWNER: Mutex<Option<(Sender<SpawnRequest>, JoinHandle<()>)>> = Mutex::new(None);

/// Spawns `cmd` from one thread that outlives every worker it starts.
///
/// A worker asks for SIGKILL when its parent dies (`PR_SET_PDEATHSIG`),
/// and Linux sends it when the *thread* that forked the worker exits, not
/// the process. Spawning from a short-lived thread would kill workers that
/// thread started; spawning from this one ties them to the process. It is
/// stopped only when no worker is alive ([`stop_spawner_if_idle`]).
pub(super) fn spawn_from_long_lived_thread(cmd: Command) -> std::io::Result<Child> {
    let (reply_tx, reply_rx) = mpsc::channel();
    let Ok(mut spawner) = SPAWNER.lock() else { return Err(std::io::Error::other("the spawner lock is poisoned")) };
    if spawner.is_none() {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        let handle = std::thread::Builder::new().name("procjob-spawner".into()).spawn(move || {
            for (mut cmd, reply) in rx {
                let _ = reply.send(cmd.spawn());
            }
        })?;
        *spawner = Some((tx, handle));
    }
    let (tx, _) = spawner.as_ref().expect("just started");
    match tx.send((cmd, reply_tx)) {
        Ok(()) => {
            drop(spawner);
            reply_rx.recv().unwrap_or_else(|_| Err(std::io::Error::other("the spawner thread is gone")))
        }
        Err(mpsc::SendError((mut cmd, _))) => cmd.spawn(),
    }
}

/// Stops the spawner thread if no worker is alive (so the process can be
/// single-threaded again, as forking requires).
pub(super) fn stop_spawner_if_idle() {
    if crate::lifecycle::live_workers() > 0 {
        return;
    }
    let taken = SPAWNER.lock().ok().and_then(|mut s| s.take());
    if let Some((tx, handle)) = taken {
        drop(tx);
        let _ = handle.join();
    }
}

/// Explains why a worker ended before its handshake.
pub(crate) fn start_failure(exit: WorkerExit, error: Option<String>, reexec: bool) -> String {
    let mut s = format!("it {exit} before the handshake");
    if let Some(e) = error {
        s.push_str(&format!(" ({e})"));
    }
    if reexec && !INIT_CALLED.load(Ordering::Relaxed) {
        s.push_str(&format!(
            "; a binary that starts workers must call procjob::init() first in main, \
             and a test or bench file must contain procjob::test_support!() at the top level of \
             the file, not inside a module such as `mod tests`: its workers run the test named \
             exactly `{HARNESS_ENTRY}`, which a module renames"
        ));
    }
    s
}

/// CPUs this process may use (affinity respected).
pub fn available_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}
