//! The worker pool: start worker processes, hand them frames, hear back.
//!
//! This module is the transport seam. It knows processes, pipes and frames,
//! and nothing of tasks' meaning or of matrices: the scheduling decisions
//! are in [`crate::scheduler`] and the call logic in [`crate::parallel`].
//!
//! Each worker is a re-execution of the running binary with
//! `PROCJOB_WORKER` set; its stdin and
//! stdout are pipes. Requests are written from the thread that owns the
//! pool; one reader thread per worker reads its replies and forwards them,
//! with their inline arrays already read, on a single channel. A worker
//! never writes a reply before it has read its whole request, and the reader
//! threads drain replies continuously, so neither side can block the other
//! for good.

use std::collections::HashMap;
use std::io::{BufReader, BufWriter, Read};
use std::os::fd::AsRawFd;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use procjob_worker::array::{self, Array, ArrayError, Landing};
use procjob_worker::protocol::{
    self, ArrayRef, Batch, DecodeError, FrameKind, Hello, MemorySnapshot, Outcome, Ready, Reply, Request, Results,
    MAGIC, PROTOCOL_VERSION,
};
use procjob_worker::registry::BinaryId;
use procjob_worker::serve::WORKER_ENV;

use crate::error::{Error, WorkerExit, WorkerId};

/// Set by `procjob::init()`: this binary's `main` turns re-executions into
/// workers, so they need no extra arguments.
pub(crate) static INIT_CALLED: AtomicBool = AtomicBool::new(false);

/// The test-harness entry point defined by [`crate::test_support!`].
pub const HARNESS_ENTRY: &str = "__procjob_worker_entry";

/// Thread-count variables set in each worker, unless the user set them, so
/// that N workers do not each start a thread pool as wide as the machine.
pub const THREAD_ENV: [&str; 4] = ["OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "RAYON_NUM_THREADS"];

/// Bytes a worker may print before its handshake (a test harness's banner)
/// that the reader skips.
const MAX_PREAMBLE: usize = 64 * 1024;
/// How long a worker has to answer the handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long workers get to exit after their input closes, before SIGKILL.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);
/// The grace period when the coordinator was interrupted: busy workers
/// cannot notice their input closing until their task ends, so wait less.
pub const INTERRUPT_GRACE: Duration = Duration::from_millis(500);

/// How the pool starts workers.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// Number of workers.
    pub workers: usize,
    /// Workers exit after this long without work (`None`: never).
    pub idle_timeout: Option<Duration>,
    /// The executable to start; `None` for the running one.
    pub program: Option<PathBuf>,
}

/// What a reader thread reports.
#[derive(Debug)]
pub enum WorkerEvent {
    /// The handshake answer.
    Ready(Ready),
    /// A batch's results, with the arrays of its outputs (in reference
    /// order) and the bytes read.
    Results {
        /// The results.
        results: Results,
        /// The outputs' arrays.
        arrays: Vec<Result<Array, ArrayError>>,
        /// Bytes of the frame.
        bytes: u64,
        /// When the frame's prelude and payload had been read (monotonic ns).
        arrived_ns: u64,
        /// When its arrays had been read (and landed in place).
        read_ns: u64,
    },
    /// The stream ended or broke: the worker is gone or unusable.
    Lost {
        /// Why reading stopped (`None`: a clean end of stream).
        error: Option<String>,
    },
    /// The process received SIGINT or SIGTERM (see [`crate::signals`]);
    /// not from a worker.
    Interrupted {
        /// The signal.
        signal: nix::sys::signal::Signal,
    },
}

/// An event from worker `index`, generation `generation`.
#[derive(Debug)]
pub struct PoolEvent {
    /// Index of the worker.
    pub index: usize,
    /// Which process in that slot (slots are refilled when a worker dies).
    pub generation: u64,
    /// What happened.
    pub event: WorkerEvent,
}

impl PoolEvent {
    /// The event that tells a waiting pool the process was interrupted.
    pub fn interrupted(signal: nix::sys::signal::Signal) -> PoolEvent {
        PoolEvent { index: usize::MAX, generation: 0, event: WorkerEvent::Interrupted { signal } }
    }
}

/// When a worker was asked for and when it was ready, for traces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StartRecord {
    /// Slot in the pool.
    pub index: usize,
    /// Its pid.
    pub pid: u32,
    /// Before the fork (monotonic ns).
    pub requested_ns: u64,
    /// After the fork and exec call returned.
    pub spawned_ns: u64,
    /// When its handshake answer was read.
    pub ready_ns: u64,
}

/// One live worker process.
struct WorkerProcess {
    requested_ns: u64,
    spawned_ns: u64,
    pid: u32,
    child: Child,
    input: Option<BufWriter<ChildStdin>>,
    reader: Option<JoinHandle<()>>,
    ready: bool,
}

/// A slot of the pool and the process in it, if any.
struct Slot {
    generation: u64,
    process: Option<WorkerProcess>,
    /// Tasks this slot's workers have completed, for reports.
    tasks: u64,
    /// Highest memory figures reported by this slot's workers.
    peak: MemorySnapshot,
}

/// Counters of what crossed the pipes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Traffic {
    /// Bytes written to workers, framing included.
    pub bytes_to_workers: u64,
    /// Bytes read from workers, framing included.
    pub bytes_from_workers: u64,
    /// Frames written to workers (handshakes included).
    pub frames_to_workers: u64,
    /// Frames read from workers (handshakes included).
    pub frames_from_workers: u64,
}

/// What one worker slot did, for reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkerReport {
    /// Index in the pool.
    pub index: usize,
    /// Pid of the current (or last) process in the slot.
    pub pid: u32,
    /// Tasks completed.
    pub tasks: u64,
    /// Highest memory figures the worker reported.
    pub peak: MemorySnapshot,
}

/// Regions of a shared output that tasks' output arrays land in directly,
/// by task index (see [`Parallel::run_unordered_into`](crate::Parallel::run_unordered_into)).
/// Reader threads take an entry when that task's result arrives.
pub type Landings = Arc<Mutex<HashMap<u64, Landing>>>;

/// A pool of worker processes.
pub struct WorkerPool {
    config: PoolConfig,
    slots: Vec<Slot>,
    last_pids: Vec<u32>,
    events: Receiver<PoolEvent>,
    events_tx: Sender<PoolEvent>,
    traffic: Traffic,
    landings: Landings,
    starts: Vec<StartRecord>,
    _interrupts: crate::signals::Listener,
}

impl WorkerPool {
    /// A pool of `config.workers` slots; no process is started yet.
    pub fn new(config: PoolConfig) -> WorkerPool {
        let (events_tx, events) = mpsc::channel();
        let slots = (0..config.workers)
            .map(|_| Slot { generation: 0, process: None, tasks: 0, peak: MemorySnapshot::default() })
            .collect();
        WorkerPool {
            last_pids: vec![0; config.workers],
            config,
            slots,
            _interrupts: crate::signals::Listener::new(events_tx.clone()),
            events,
            events_tx,
            traffic: Traffic::default(),
            landings: Landings::default(),
            starts: Vec::new(),
        }
    }

    /// Number of worker slots.
    pub fn size(&self) -> usize {
        self.slots.len()
    }

    /// Workers that completed their handshake since the last call, for
    /// traces.
    pub fn take_starts(&mut self) -> Vec<StartRecord> {
        std::mem::take(&mut self.starts)
    }

    /// Where the outputs of the current call land, by task index.
    pub fn landings(&self) -> &Landings {
        &self.landings
    }

    /// Counters of what crossed the pipes since the pool was made.
    pub fn traffic(&self) -> Traffic {
        self.traffic
    }

    /// The pid of worker `index`, if it is running.
    pub fn pid(&self, index: usize) -> Option<u32> {
        self.slots[index].process.as_ref().map(|p| p.pid)
    }

    /// The pids of the running workers, by slot (0 for an empty slot).
    pub fn pids(&self) -> Vec<u32> {
        (0..self.size()).map(|i| self.pid(i).unwrap_or(0)).collect()
    }

    /// Names worker `index` for messages.
    pub fn worker_id(&self, index: usize) -> WorkerId {
        WorkerId { index, pid: self.pid(index).unwrap_or(self.last_pids[index]) }
    }

    /// What each slot did.
    pub fn reports(&self) -> Vec<WorkerReport> {
        (0..self.size())
            .map(|i| WorkerReport {
                index: i,
                pid: self.pid(i).unwrap_or(self.last_pids[i]),
                tasks: self.slots[i].tasks,
                peak: self.slots[i].peak,
            })
            .collect()
    }

    /// Counts a completed task and the memory figures of a batch.
    pub fn record_batch(&mut self, index: usize, tasks: u64, memory: Option<MemorySnapshot>) {
        let slot = &mut self.slots[index];
        slot.tasks += tasks;
        let Some(memory) = memory else { return };
        slot.peak.peak_rss = slot.peak.peak_rss.max(memory.peak_rss);
        slot.peak.uss = slot.peak.uss.max(memory.uss);
        slot.peak.pss = slot.peak.pss.max(memory.pss);
    }

    /// Whether an event belongs to the process now in its slot.
    pub fn is_current(&self, event: &PoolEvent) -> bool {
        self.slots.get(event.index).is_some_and(|s| s.generation == event.generation && s.process.is_some())
    }

    /// Starts every empty slot's worker and waits for all handshakes.
    /// Workers that exited while idle (idle timeout) are noticed and
    /// replaced first.
    pub fn ensure_started(&mut self) -> Result<(), Error> {
        self.reap_idle_exits();
        let mut waiting = Vec::new();
        for index in 0..self.size() {
            if self.slots[index].process.is_none() {
                self.start(index)?;
                waiting.push(index);
            }
        }
        let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
        while waiting.iter().any(|&i| self.slots[i].process.as_ref().is_some_and(|p| !p.ready)) {
            let timeout = deadline.saturating_duration_since(Instant::now());
            let event = match self.events.recv_timeout(timeout) {
                Ok(e) => e,
                Err(_) => {
                    let index = *waiting
                        .iter()
                        .find(|&&i| self.slots[i].process.as_ref().is_some_and(|p| !p.ready))
                        .expect("a worker is waiting");
                    self.kill_all();
                    return Err(Error::Start {
                        index,
                        reason: format!("no handshake within {} s", HANDSHAKE_TIMEOUT.as_secs()),
                    });
                }
            };
            if let WorkerEvent::Interrupted { signal } = event.event {
                self.shutdown(INTERRUPT_GRACE);
                return Err(Error::Interrupted { signal });
            }
            if !self.is_current(&event) {
                continue;
            }
            let index = event.index;
            match event.event {
                WorkerEvent::Ready(ready) => {
                    if ready.protocol != PROTOCOL_VERSION {
                        self.kill_all();
                        return Err(Error::Start {
                            index,
                            reason: format!(
                                "protocol version mismatch: coordinator speaks {PROTOCOL_VERSION}, worker {}",
                                ready.protocol
                            ),
                        });
                    }
                    self.mark_ready(index, &ready);
                }
                WorkerEvent::Lost { error } => {
                    let exit = self.reap(index);
                    self.kill_all();
                    return Err(Error::Start { index, reason: start_failure(exit, error) });
                }
                WorkerEvent::Results { .. } | WorkerEvent::Interrupted { .. } => {}
            }
        }
        Ok(())
    }

    /// Notices workers that exited while idle and empties their slots.
    fn reap_idle_exits(&mut self) {
        while let Ok(event) = self.events.try_recv() {
            if self.is_current(&event) {
                if let WorkerEvent::Lost { .. } = event.event {
                    self.reap(event.index);
                }
            }
        }
    }

    /// Starts a worker in slot `index` (replacing nothing: the slot must be
    /// empty) and sends its handshake; its [`WorkerEvent::Ready`] arrives
    /// as an event, after which [`mark_ready`](WorkerPool::mark_ready).
    pub fn start(&mut self, index: usize) -> Result<(), Error> {
        let program = match &self.config.program {
            Some(p) => p.clone(),
            None => std::env::current_exe()
                .map_err(|e| Error::Start { index, reason: format!("cannot find the running executable: {e}") })?,
        };
        let mut cmd = Command::new(&program);
        cmd.env(WORKER_ENV, std::process::id().to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if self.config.program.is_none() && !INIT_CALLED.load(Ordering::Relaxed) {
            // Not a binary whose main calls procjob::init(): a test or bench
            // harness. Ask it to run only the entry that test_support! defines.
            cmd.args([HARNESS_ENTRY, "--exact", "--nocapture", "--test-threads=1", "-q"]);
        }
        let threads = (available_cpus() / self.size().max(1)).max(1).to_string();
        for var in THREAD_ENV {
            if std::env::var_os(var).is_none() {
                cmd.env(var, &threads);
            }
        }
        // SAFETY: setpgid and sigprocmask are async-signal-safe; nothing
        // else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                // Own process group: a terminal's Ctrl-C reaches the
                // coordinator, which decides how workers stop.
                nix::unistd::setpgid(nix::unistd::Pid::from_raw(0), nix::unistd::Pid::from_raw(0))
                    .map_err(std::io::Error::from)?;
                // Signals the coordinator blocked (see crate::signals) would
                // stay blocked across exec; a worker takes them as usual.
                nix::sys::signal::sigprocmask(
                    nix::sys::signal::SigmaskHow::SIG_SETMASK,
                    Some(&nix::sys::signal::SigSet::empty()),
                    None,
                )
                .map_err(std::io::Error::from)
            });
        }
        let requested_ns = procjob_worker::clock::monotonic_ns();
        let mut child = spawn_from_long_lived_thread(cmd)
            .map_err(|e| Error::Start { index, reason: format!("cannot run {}: {e}", program.display()) })?;
        let pid = child.id();
        let spawned_ns = procjob_worker::clock::monotonic_ns();
        crate::signals::worker_started(pid);
        let stdin = child.stdin.take().expect("stdin was piped");
        let stdout = child.stdout.take().expect("stdout was piped");
        enlarge_pipe(stdin.as_raw_fd());
        enlarge_pipe(stdout.as_raw_fd());
        let slot = &mut self.slots[index];
        slot.generation += 1;
        let generation = slot.generation;
        let tx = self.events_tx.clone();
        let landings = Arc::clone(&self.landings);
        let reader = std::thread::Builder::new()
            .name(format!("procjob-reader-{index}"))
            .spawn(move || read_replies(index, generation, stdout, tx, landings))
            .map_err(|e| Error::Start { index, reason: format!("cannot start a reader thread: {e}") })?;
        let mut input = BufWriter::with_capacity(1 << 16, stdin);
        let hello = Request::Hello(Hello {
            protocol: PROTOCOL_VERSION,
            worker_index: index as u32,
            binary: BinaryId::current(),
            idle_timeout_ms: self.config.idle_timeout.map_or(0, |d| d.as_millis().max(1) as u64),
        });
        let sent = protocol::send(&mut input, FrameKind::Request, &hello, &[]);
        slot.process = Some(WorkerProcess {
            requested_ns,
            spawned_ns,
            pid,
            child,
            input: Some(input),
            reader: Some(reader),
            ready: false,
        });
        self.last_pids[index] = pid;
        match sent {
            Ok(n) => {
                self.traffic.bytes_to_workers += n;
                self.traffic.frames_to_workers += 1;
                Ok(())
            }
            // The worker died at once; its reader reports how.
            Err(_) => Ok(()),
        }
    }

    /// Sends a batch to worker `index`, with the bytes of its inline arrays.
    pub fn send(&mut self, index: usize, batch: Batch, bulk: &[&[u8]]) -> Result<u64, Error> {
        let worker = self.worker_id(index);
        let Some(input) = self.slots[index].process.as_mut().and_then(|p| p.input.as_mut()) else {
            return Err(Error::Transport { worker, reason: "the worker is not running".into() });
        };
        let n = protocol::send(input, FrameKind::Request, &Request::Run(batch), bulk)
            .map_err(|e| Error::Transport { worker, reason: format!("cannot send a batch: {e}") })?;
        self.traffic.bytes_to_workers += n;
        self.traffic.frames_to_workers += 1;
        Ok(n)
    }

    /// Waits for the next event from any worker, up to `timeout`
    /// (`None`: forever). Stale events (from replaced processes) are skipped.
    pub fn next_event(&mut self, timeout: Option<Duration>) -> Option<PoolEvent> {
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            let event = match deadline {
                None => self.events.recv().ok()?,
                Some(d) => match self.events.recv_timeout(d.saturating_duration_since(Instant::now())) {
                    Ok(e) => e,
                    Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => return None,
                },
            };
            if let WorkerEvent::Interrupted { .. } = event.event {
                return Some(event);
            }
            if !self.is_current(&event) {
                continue;
            }
            if let WorkerEvent::Results { bytes, .. } = &event.event {
                self.traffic.bytes_from_workers += bytes;
                self.traffic.frames_from_workers += 1;
            }
            return Some(event);
        }
    }

    /// Waits for worker `index` to end (killing it if its stream closed but
    /// it lives on) and empties its slot. Returns how it ended.
    pub fn reap(&mut self, index: usize) -> WorkerExit {
        let Some(mut p) = self.slots[index].process.take() else { return WorkerExit::Unknown };
        drop(p.input.take());
        let status = match p.child.try_wait() {
            Ok(Some(s)) => Some(s),
            _ => wait_or_kill(&mut p.child, SHUTDOWN_GRACE),
        };
        crate::signals::worker_reaped(p.pid);
        if let Some(r) = p.reader.take() {
            let _ = r.join();
        }
        match status {
            Some(s) => match (s.code(), s.signal()) {
                (Some(code), _) => WorkerExit::Exited { code },
                (None, Some(sig)) => nix::sys::signal::Signal::try_from(sig)
                    .map_or(WorkerExit::Unknown, |signal| WorkerExit::Signaled { signal }),
                _ => WorkerExit::Unknown,
            },
            None => WorkerExit::Unknown,
        }
    }

    /// Marks worker `index` as having answered its handshake.
    pub fn mark_ready(&mut self, index: usize, ready: &Ready) {
        if let Some(p) = self.slots[index].process.as_mut() {
            p.ready = true;
            self.starts.push(StartRecord {
                index,
                pid: p.pid,
                requested_ns: p.requested_ns,
                spawned_ns: p.spawned_ns,
                ready_ns: procjob_worker::clock::monotonic_ns(),
            });
        }
        self.record_batch(index, 0, Some(ready.memory));
    }

    /// Stops worker `index` politely (closes its input; it exits at once
    /// when idle) and reaps it.
    pub fn retire(&mut self, index: usize) -> WorkerExit {
        self.reap(index)
    }

    /// Kills worker `index` at once and reaps it.
    pub fn kill(&mut self, index: usize) -> WorkerExit {
        if let Some(p) = self.slots[index].process.as_mut() {
            let _ = p.child.kill();
        }
        self.reap(index)
    }

    /// Kills every worker at once and reaps them.
    pub fn kill_all(&mut self) {
        for i in 0..self.size() {
            self.kill(i);
        }
    }

    /// Stops every worker: closes their input, waits up to `grace` for
    /// them to exit, kills the rest, and reaps all.
    pub fn shutdown(&mut self, grace: Duration) {
        for slot in &mut self.slots {
            if let Some(p) = slot.process.as_mut() {
                drop(p.input.take());
            }
        }
        let deadline = Instant::now() + grace;
        for i in 0..self.size() {
            if let Some(p) = self.slots[i].process.as_mut() {
                let left = deadline.saturating_duration_since(Instant::now());
                if wait_or_kill(&mut p.child, left).is_none() {
                    let _ = p.child.kill();
                }
            }
            self.reap(i);
        }
    }
}

impl Drop for WorkerPool {
    fn drop(&mut self) {
        self.shutdown(SHUTDOWN_GRACE);
    }
}

/// Spawns `cmd` from one thread that lives as long as the process.
///
/// A worker asks for SIGKILL when its parent dies (`PR_SET_PDEATHSIG`),
/// and Linux sends it when the *thread* that forked the worker exits, not
/// the process. Spawning from a short-lived thread would kill workers that
/// thread started; spawning from this one ties them to the process.
fn spawn_from_long_lived_thread(cmd: Command) -> std::io::Result<Child> {
    type Request = (Command, Sender<std::io::Result<Child>>);
    static SPAWNER: std::sync::OnceLock<std::sync::Mutex<Sender<Request>>> = std::sync::OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Request>();
        // If the thread cannot start, the channel is closed and callers
        // below spawn directly.
        let _ = std::thread::Builder::new().name("procjob-spawner".into()).spawn(move || {
            for (mut cmd, reply) in rx {
                let _ = reply.send(cmd.spawn());
            }
        });
        std::sync::Mutex::new(tx)
    });
    let (reply_tx, reply_rx) = mpsc::channel();
    let Ok(tx) = spawner.lock() else { return Err(std::io::Error::other("the spawner lock is poisoned")) };
    match tx.send((cmd, reply_tx)) {
        Ok(()) => {
            drop(tx);
            reply_rx.recv().unwrap_or_else(|_| Err(std::io::Error::other("the spawner thread is gone")))
        }
        // No spawner thread: spawn here.
        Err(mpsc::SendError((mut cmd, _))) => cmd.spawn(),
    }
}

/// Waits up to `grace` for a child to exit on its own (its stdout closing
/// is the signal, seen as the reader thread ending), then kills it.
fn wait_or_kill(child: &mut Child, grace: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + grace;
    let mut pause = Duration::from_micros(50);
    loop {
        match child.try_wait() {
            Ok(Some(s)) => return Some(s),
            Ok(None) if Instant::now() < deadline => {
                // Exiting takes microseconds to milliseconds; back off so a
                // slow exit does not spin.
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(20));
            }
            Ok(None) => {
                let _ = child.kill();
                return child.wait().ok();
            }
            Err(_) => return None,
        }
    }
}

/// Explains why a worker ended before its handshake.
pub(crate) fn start_failure(exit: WorkerExit, error: Option<String>) -> String {
    let mut s = format!("it {exit} before the handshake");
    if let Some(e) = error {
        s.push_str(&format!(" ({e})"));
    }
    if !INIT_CALLED.load(Ordering::Relaxed) {
        s.push_str(
            "; a binary that starts workers must call procjob::init() first in main, \
             and a test or bench file must contain procjob::test_support!()",
        );
    }
    s
}

/// Grows a pipe's buffer to 1 MiB where the system allows, so large blocks
/// need fewer context switches.
fn enlarge_pipe(fd: i32) {
    #[cfg(target_os = "linux")]
    // SAFETY: F_SETPIPE_SZ on a pipe fd we own; failure only leaves the default size.
    unsafe {
        libc::fcntl(fd, libc::F_SETPIPE_SZ, 1 << 20);
    }
}

/// CPUs this process may use (affinity respected).
pub fn available_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The reader thread: handshake (skipping a harness's banner), then frames
/// until the stream ends.
fn read_replies(index: usize, generation: u64, stdout: ChildStdout, tx: Sender<PoolEvent>, landings: Landings) {
    let send = |event| tx.send(PoolEvent { index, generation, event }).is_ok();
    let mut stdout = stdout;
    let preamble = match skip_to_magic(&mut stdout) {
        Ok(p) => p,
        Err(error) => {
            send(WorkerEvent::Lost { error });
            return;
        }
    };
    let mut r = BufReader::with_capacity(1 << 20, stdout);
    let first = protocol::recv::<_, Reply>(&mut (&MAGIC[..]).chain(&mut r), FrameKind::Reply);
    match first {
        Ok(frame) => match frame.message {
            Reply::Ready(ready) => {
                if !send(WorkerEvent::Ready(ready)) {
                    return;
                }
            }
            Reply::Refused { reason } => {
                send(WorkerEvent::Lost { error: Some(format!("the worker refused the handshake: {reason}")) });
                return;
            }
            Reply::Results(_) => {
                send(WorkerEvent::Lost { error: Some("the worker sent results before the handshake".into()) });
                return;
            }
        },
        Err(e) => {
            let mut msg = e.to_string();
            if !preamble.is_empty() {
                msg.push_str(&format!("; it printed before: {:?}", String::from_utf8_lossy(&preamble)));
            }
            send(WorkerEvent::Lost { error: Some(msg) });
            return;
        }
    }
    loop {
        let frame = match protocol::recv::<_, Reply>(&mut r, FrameKind::Reply) {
            Ok(f) => f,
            Err(DecodeError::Closed) => {
                send(WorkerEvent::Lost { error: None });
                return;
            }
            Err(e) => {
                send(WorkerEvent::Lost { error: Some(e.to_string()) });
                return;
            }
        };
        let arrived_ns = procjob_worker::clock::monotonic_ns();
        let Reply::Results(results) = frame.message else {
            send(WorkerEvent::Lost { error: Some("the worker sent an unexpected message".into()) });
            return;
        };
        // Per array of the frame, in bulk order: its task, and whether it is
        // that task's first inline array (the one that may land in place).
        let mut owners: Vec<(u64, bool)> = Vec::new();
        let mut refs: Vec<&ArrayRef> = Vec::new();
        for t in &results.tasks {
            if let Outcome::Ok { arrays, .. } = &t.outcome {
                let mut first_inline = true;
                for a in arrays {
                    let inline = matches!(a, ArrayRef::Inline { .. });
                    owners.push((t.index, inline && first_inline));
                    first_inline &= !inline;
                    refs.push(a);
                }
            }
        }
        let arrays = array::read_arrays(&mut r, refs.iter().copied(), frame.bulk_len, &mut |position, a| match a {
            ArrayRef::File { dtype, shape, path, offset, access } => {
                let shape: Vec<usize> = shape.iter().map(|&d| d as usize).collect();
                array::Placement::Mapped(array::map_file_ref(path, *dtype, &shape, *offset, *access))
            }
            ArrayRef::Inline { .. } => {
                let (task, first) = owners[position];
                let landing = first.then(|| landings.lock().ok().and_then(|mut l| l.remove(&task))).flatten();
                landing.map_or(array::Placement::Own, array::Placement::Land)
            }
        });
        let arrays = match arrays {
            Ok(a) => a,
            Err(e) => {
                send(WorkerEvent::Lost { error: Some(e.to_string()) });
                return;
            }
        };
        let bytes = frame.header_bytes + frame.bulk_len;
        let read_ns = procjob_worker::clock::monotonic_ns();
        if !send(WorkerEvent::Results { results, arrays, bytes, arrived_ns, read_ns }) {
            return;
        }
    }
}

/// Reads, a byte at a time, until the frame magic, returning what came
/// before it. A test harness prints a banner before it runs the worker
/// entry; anything else before the handshake is unexpected and is kept for
/// the error message. Byte-wise reads stop exactly at the magic, so nothing
/// after it is consumed; they happen once per worker, on a few bytes.
fn skip_to_magic<R: Read>(r: &mut R) -> Result<Vec<u8>, Option<String>> {
    let mut seen: Vec<u8> = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match r.read(&mut byte) {
            Ok(0) => {
                let note = (!seen.is_empty()).then(|| format!("it printed: {:?}", String::from_utf8_lossy(&seen)));
                return Err(note);
            }
            Ok(_) => seen.push(byte[0]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(Some(e.to_string())),
        }
        if seen.ends_with(&MAGIC) {
            seen.truncate(seen.len() - MAGIC.len());
            return Ok(seen);
        }
        if seen.len() > MAX_PREAMBLE {
            return Err(Some(format!(
                "no handshake in the first {MAX_PREAMBLE} bytes it wrote: {:?}",
                String::from_utf8_lossy(&seen[..200])
            )));
        }
    }
}
