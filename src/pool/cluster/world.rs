//! Joining the MPI job: who is where, the hub of rank 0, and the end.
//!
//! Every rank initialises MPI in [`crate::init`], finds its node (a
//! shared-memory split of the world, or, with `PROCJOB_MPI_NODE=rank`, a
//! node of its own: a knob to test several nodes on one machine), and tells
//! rank 0 its host, its node's agent and its CPUs. Ranks other than 0 then
//! become agents ([`super::agent`]) and never return. Rank 0 starts its
//! MPI thread, whose handler here (the hub) routes what agents send to the
//! pools' transports, and registers an exit handler that stops every agent
//! and finalises MPI, so that the job ends when rank 0's program does.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ::mpi::collective::{CommunicatorCollectives, SystemOperation};
use ::mpi::topology::{Communicator, SimpleCommunicator};
use ::mpi::Threading;
use serde::{Deserialize, Serialize};

use super::link::{self, Incoming, Link, Outgoing};
use super::wire::{self, Down, Key, Up, TAG_CONTROL, TAG_DATA, TAG_FILE, TAG_HELLO};
use crate::error::{Error, WorkerExit};

/// The MPI job as rank 0 sees it.
#[derive(Debug, Clone)]
pub struct World {
    /// The number of ranks.
    pub size: usize,
    /// The nodes, rank 0's first, then by their agent's rank.
    pub nodes: Vec<Node>,
}

/// One node of the job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// The rank that runs its workers: the lowest rank on it.
    pub agent: usize,
    /// Its host name.
    pub host: String,
    /// The CPUs its agent may use: its workers, by default.
    pub cpus: usize,
    /// Every rank on it.
    pub ranks: Vec<usize>,
}

/// What each rank tells rank 0 at start-up.
#[derive(Debug, Serialize, Deserialize)]
struct Hello {
    rank: u32,
    agent: u32,
    host: String,
    cpus: u32,
}

/// Rank 0's end of the job (see the module docs).
pub(super) struct Hub {
    pub(super) link: Link,
    pub(super) state: Mutex<HubState>,
    pub(super) changed: Condvar,
    stop: AtomicBool,
    thread: Mutex<Option<JoinHandle<()>>>,
}

/// What the hub has heard, for the transports to wait on.
#[derive(Default)]
pub(super) struct HubState {
    /// Where each remote worker's output goes: the write end of the pipe
    /// its reader thread reads.
    pub(super) streams: HashMap<Key, Arc<File>>,
    /// Answers to start requests: the pid, or why not.
    pub(super) started: HashMap<Key, Result<u32, String>>,
    /// How remote workers ended.
    pub(super) exits: HashMap<Key, WorkerExit>,
    /// Why procjob killed a remote worker, when it did on purpose (its
    /// rows could not be moved between nodes): taken when it is reaped.
    pub(super) kill_causes: HashMap<Key, String>,
    /// Remote workers whose input no longer takes bytes.
    pub(super) input_closed: HashSet<Key>,
    /// Answers to probes: rank, and whether it sees the same file.
    probes: Vec<(usize, bool)>,
    /// Agents that have left.
    byes: usize,
}

static WORLD: OnceLock<World> = OnceLock::new();
static HUB: OnceLock<Hub> = OnceLock::new();
static UNIVERSE: Mutex<Option<::mpi::environment::Universe>> = Mutex::new(None);
static BACKEND_LOCAL: AtomicBool = AtomicBool::new(false);

/// The MPI job, in rank 0 of one that has more than one rank (`None`
/// elsewhere, and after [`set_backend_local`]).
pub fn world() -> Option<&'static World> {
    if BACKEND_LOCAL.load(Ordering::Relaxed) {
        return None;
    }
    WORLD.get().filter(|w| w.size > 1)
}

/// Makes rank 0's pools local from now on (`--backend local`): the other
/// ranks wait for the end.
pub fn set_backend_local() {
    BACKEND_LOCAL.store(true, Ordering::Relaxed);
}

pub(super) fn hub() -> Option<&'static Hub> {
    HUB.get()
}

impl Hub {
    pub(super) fn lock(&self) -> MutexGuard<'_, HubState> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Sends a control message to `rank`.
    pub(super) fn send(&self, rank: usize, down: &Down) {
        let _ = self.link.send(Outgoing { dest: rank as i32, tag: TAG_CONTROL, bytes: wire::encode(down) });
    }

    /// Waits until `done` holds of the state, or `timeout` passes; returns
    /// the state either way.
    pub(super) fn wait_for(
        &self,
        timeout: Duration,
        mut done: impl FnMut(&HubState) -> bool,
    ) -> MutexGuard<'_, HubState> {
        test_panic(0, "while its program waits for other ranks");
        let deadline = Instant::now() + timeout;
        let mut state = self.lock();
        while !done(&state) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            state = match self.changed.wait_timeout(state, left) {
                Ok((s, _)) => s,
                Err(p) => p.into_inner().0,
            };
        }
        state
    }

    /// What an agent sent (on the MPI thread).
    fn handle(&self, m: Incoming) {
        if m.tag == TAG_DATA {
            let Some((key, bytes)) = Key::split(&m.bytes) else { return };
            let stream = self.lock().streams.get(&key).cloned();
            if let Some(stream) = stream {
                // The reader thread drains this pipe continuously; if it
                // has gone (its worker was stopped), the write fails and
                // the bytes are of no use anyway.
                let _ = (&*stream).write_all(bytes);
            }
            return;
        }
        if m.tag == TAG_FILE {
            if let Err((why, worker)) = super::ship::land(&m.bytes) {
                // Its rows are not here: its reader sees its stream end
                // before the answer, and its agent kills it, so its batch
                // fails as a worker's death does (and `--retries` runs it
                // again), the death saying why. Closing the stream alone
                // left a live, idle worker, which exited 0 when reaped: the
                // call then failed as a broken stream, never retried.
                match worker {
                    Some(key) => {
                        // The kill first: once the stream is closed the call
                        // may reap the worker at once, and its agent must see
                        // the kill before the closed input, or the worker
                        // exits 0.
                        self.send(m.source as usize, &Down::Kill { key });
                        let mut state = self.lock();
                        state.kill_causes.insert(key, format!("rank 0 could not take the rows it sent back ({why})"));
                        state.streams.remove(&key);
                    }
                    None => say!("procjob: error: from rank {}: {why}", m.source),
                }
            }
            return;
        }
        let Some(up) = wire::decode::<Up>(&m.bytes) else { return };
        let mut state = self.lock();
        match up {
            Up::Started { key, pid } => {
                state.started.insert(key, Ok(pid));
            }
            Up::StartFailed { key, reason } => {
                state.started.insert(key, Err(reason));
            }
            Up::Eof { key } => {
                // The reader sees the end of its stream.
                state.streams.remove(&key);
                state.input_closed.insert(key);
            }
            Up::InputClosed { key } => {
                state.input_closed.insert(key);
            }
            Up::Exited { key, exit, killed_for } => {
                state.exits.insert(key, exit.into());
                if let Some(why) = killed_for {
                    state.kill_causes.insert(key, why);
                }
                state.input_closed.insert(key);
                state.streams.remove(&key);
            }
            Up::Probed { same } => state.probes.push((m.source as usize, same)),
            Up::Bye => state.byes += 1,
        }
        drop(state);
        self.changed.notify_all();
    }
}

/// Sets up this rank's part of the job (see the module docs). Ranks other
/// than 0 never return.
pub(super) fn init() {
    // The threads MPI starts in MPI_Init (and this module's own) inherit
    // the calling thread's signal mask: they must not take the signals
    // that end a program, or one would end rank 0 at once, with none of
    // procjob's cleaning up (see crate::signals). The main thread's own
    // mask is restored after.
    let ending = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT, libc::SIGUSR1, libc::SIGUSR2];
    let old = block_signals(&ending);
    let initialized = ::mpi::initialize_with_threading(Threading::Serialized);
    let Some((universe, threading)) = initialized else {
        restore_signals(&old);
        return;
    };
    install_panic_hook();
    let world = SimpleCommunicator::world();
    let (rank, size) = (world.rank(), world.size());
    if threading < Threading::Serialized {
        say!("procjob: error: the MPI library gives {threading:?} threads support; procjob needs Serialized");
        world.abort(2);
    }
    let own_node = std::env::var("PROCJOB_MPI_NODE").is_ok_and(|v| v == "rank");
    let agent = if own_node {
        rank
    } else {
        let node = world.split_shared(rank);
        let mut lowest = rank;
        node.all_reduce_into(&rank, &mut lowest, SystemOperation::min());
        lowest
    };
    let host = ::mpi::environment::processor_name().unwrap_or_else(|_| "?".into());
    let cpus = crate::pool::available_cpus();
    if let Ok(mut u) = UNIVERSE.lock() {
        *u = Some(universe);
    }
    if rank != 0 {
        // An agent ends on the launcher's SIGTERM as any process does; its
        // workers follow it (their parent-death signal).
        restore_signals(&old);
        let hello = Hello { rank: rank as u32, agent: agent as u32, host: host.clone(), cpus: cpus as u32 };
        link::send_now(0, TAG_HELLO, &wire::encode(&hello));
        super::agent::run();
    }
    let mut hellos = vec![Hello { rank: 0, agent: 0, host, cpus: cpus as u32 }];
    for _ in 1..size {
        if let Some(h) = wire::decode::<Hello>(&link::receive_now(TAG_HELLO).bytes) {
            hellos.push(h);
        }
    }
    hellos.sort_by_key(|h| h.rank);
    let mut nodes: Vec<Node> = Vec::new();
    for h in &hellos {
        match nodes.iter_mut().find(|n| n.agent == h.agent as usize) {
            Some(n) => n.ranks.push(h.rank as usize),
            None => nodes.push(Node {
                agent: h.agent as usize,
                host: h.host.clone(),
                cpus: (h.cpus as usize).max(1),
                ranks: vec![h.rank as usize],
            }),
        }
    }
    let _ = WORLD.set(World { size: size as usize, nodes });
    let (tx, rx) = std::sync::mpsc::channel();
    let hub = Hub {
        link: tx,
        state: Mutex::new(HubState::default()),
        changed: Condvar::new(),
        stop: AtomicBool::new(false),
        thread: Mutex::new(None),
    };
    if HUB.set(hub).is_err() {
        return;
    }
    let hub = HUB.get().expect("just set");
    let thread = std::thread::Builder::new()
        .name("procjob-mpi".into())
        .spawn(move || link::run(rx, &hub.stop, |m| hub.handle(m)));
    match thread {
        Ok(t) => {
            if let Ok(mut slot) = hub.thread.lock() {
                *slot = Some(t);
            }
        }
        Err(e) => {
            say!("procjob: error: cannot start the MPI thread: {e}");
            world.abort(2);
        }
    }
    restore_signals(&old);
    // mpirun SIGKILLs every rank about a second after it forwards a Ctrl-C
    // as SIGTERM: rank 0 removes its run folders as the signal comes.
    crate::lifecycle::remove_folders_first();
    // SAFETY: `finish` is an `extern "C" fn()` that never unwinds (it
    // catches nothing that can panic across the boundary: every step is
    // infallible or ignores errors).
    unsafe {
        libc::atexit(finish);
    }
}

/// How long rank 0 waits at the end for the agents to stop their workers.
const GOODBYE_TIMEOUT: Duration = Duration::from_secs(10);

/// Rank 0's exit handler: stops every agent, then the MPI thread, then
/// finalises MPI.
extern "C" fn finish() {
    let Some(hub) = HUB.get() else { return };
    let size = WORLD.get().map_or(1, |w| w.size);
    for rank in 1..size {
        hub.send(rank, &Down::Shutdown);
    }
    drop(hub.wait_for(GOODBYE_TIMEOUT, |s| s.byes + 1 >= size));
    hub.stop.store(true, Ordering::SeqCst);
    if let Some(t) = hub.thread.lock().ok().and_then(|mut t| t.take()) {
        let _ = t.join();
    }
    // Dropping the universe finalises MPI.
    if let Ok(mut u) = UNIVERSE.lock() {
        drop(u.take());
    }
}

/// A panic on any rank aborts the whole job (`MPI_Abort`): otherwise the
/// other ranks would wait for it for ever. `MPI_Abort` ends this process
/// without running destructors, so the hook first does what a signal's
/// stop does ([`crate::signals`]): kills this rank's workers and removes
/// its run folders (an agent's: the folders it made for shipped files). The launcher then ends the other ranks (SIGTERM, on
/// which they clean up as on Ctrl-C). A panic that procjob catches (a task
/// running in this process) never reaches this hook.
fn install_panic_hook() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        previous(info);
        let rank = SimpleCommunicator::world().rank();
        say!(
            "procjob: rank {rank} (host {}) panicked; aborting the MPI job",
            ::mpi::environment::processor_name().unwrap_or_default()
        );
        // No new worker from now on (one being started is killed).
        let _ = crate::lifecycle::claim_stop();
        for pid in crate::lifecycle::live_pids() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        }
        for folder in crate::lifecycle::live_folders() {
            let _ = std::fs::remove_dir_all(folder);
        }
        // An agent's copies of rank 0's files on its node.
        super::ship::remove_folders_without_waiting();
        SimpleCommunicator::world().abort(101);
    }));
}

/// For tests only: `PROCJOB_MPI_TEST_PANIC=R` makes rank R panic once
/// mid-run, to show what the panic hook does: rank 0 in its program's
/// first wait for other ranks (its main thread, while it starts workers on
/// them), an agent on the first bytes it receives for a worker (see
/// `link.rs`). Like `PROCJOB_MPI_SHARED_FS`, a knob of the test suite.
const TEST_PANIC_ENV: &str = "PROCJOB_MPI_TEST_PANIC";

/// Panics, once, when [`TEST_PANIC_ENV`] names `rank` (this rank).
pub(super) fn test_panic(rank: usize, at: &str) {
    static WHO: OnceLock<Option<usize>> = OnceLock::new();
    static FIRED: AtomicBool = AtomicBool::new(false);
    let who = *WHO.get_or_init(|| std::env::var(TEST_PANIC_ENV).ok().and_then(|v| v.trim().parse().ok()));
    if who == Some(rank) && !FIRED.swap(true, Ordering::SeqCst) {
        panic!("{TEST_PANIC_ENV}={rank}: rank {rank} panics on purpose {at}");
    }
}

/// Whether every node sees the folder `folder` of rank 0 (the same bytes
/// at the same path): then files written there are valid references on
/// every node. Rank 0 writes a file of random bytes there and asks each
/// other node's agent to read it. Returns the first node that does not see
/// it (agent rank, host), or `None` when all do.
pub fn probe_shared(folder: &Path) -> Result<Option<(usize, String)>, Error> {
    Ok(probe_nodes(folder)?.into_iter().next())
}

/// Every node that does not see the folder `folder` of rank 0, as in
/// [`probe_shared`]: (agent rank, host).
pub(super) fn probe_nodes(folder: &Path) -> Result<Vec<(usize, String)>, Error> {
    let (Some(world), Some(hub)) = (world(), hub()) else { return Ok(Vec::new()) };
    let secret = procjob_worker::secret::PoolSecret::generate()
        .map_err(|e| Error::Config(format!("cannot draw random bytes for the shared-filesystem probe: {e}")))?;
    let content = secret.as_bytes().to_vec();
    let path = folder.join(format!(".procjob-probe-{}", std::process::id()));
    std::fs::write(&path, &content).map_err(|source| Error::System {
        what: format!("write the shared-filesystem probe {}", path.display()),
        source,
    })?;
    let agents: Vec<&Node> = world.nodes.iter().filter(|n| n.agent != 0).collect();
    hub.lock().probes.clear();
    for n in &agents {
        hub.send(n.agent, &Down::Probe { path: path.clone(), content: content.clone() });
    }
    let state = hub.wait_for(Duration::from_secs(30), |s| s.probes.len() >= agents.len());
    let answers = state.probes.clone();
    drop(state);
    let _ = std::fs::remove_file(&path);
    Ok(agents
        .iter()
        .filter(|n| !answers.iter().any(|&(r, same)| r == n.agent && same))
        .map(|n| (n.agent, n.host.clone()))
        .collect())
}

/// Finalises MPI (an agent, at its end).
pub(super) fn finalize() {
    if let Ok(mut u) = UNIVERSE.lock() {
        drop(u.take());
    }
}

/// Blocks `signals` in the calling thread; returns the mask before.
fn block_signals(signals: &[i32]) -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset initialise and fill a local set;
    // pthread_sigmask reads it and writes the old mask into a local.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for &s in signals {
            libc::sigaddset(&mut set, s);
        }
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut old);
        old
    }
}

/// Sets the calling thread's signal mask back to `old`.
fn restore_signals(old: &libc::sigset_t) {
    // SAFETY: pthread_sigmask reads a valid mask; the old one is not asked for.
    unsafe {
        libc::pthread_sigmask(libc::SIG_SETMASK, old, std::ptr::null_mut());
    }
}
