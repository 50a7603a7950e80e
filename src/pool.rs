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
use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Read};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use procjob_worker::array::{self, Array, ArrayError, Landing};
use procjob_worker::protocol::{
    self, ArrayRef, DecodeError, FrameKind, Hello, MemorySnapshot, Outcome, Ready, Reply, Request, Results, MAGIC,
    PROTOCOL_VERSION,
};
use procjob_worker::registry::BinaryId;
use procjob_worker::secret::{PoolSecret, SECRET_FD_ENV};
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
    /// How workers are started.
    pub start: StartMethod,
}

/// How a pool starts its workers.
#[derive(Debug, Clone, Default)]
pub enum StartMethod {
    /// Re-execute the program (Python's "spawn"): a fresh process that
    /// shares nothing with the coordinator but the pipes.
    #[default]
    Spawn,
    /// Fork the coordinator (Python's "fork"): the worker starts as a
    /// copy-on-write copy of it, and reads `inherit` in place, without
    /// files or pipes. Only while the coordinator is single-threaded.
    Fork {
        /// Arrays the workers read in place; any view of them travels as a
        /// reference of a few bytes.
        inherit: Vec<Array>,
    },
}

impl StartMethod {
    /// "spawn" or "fork".
    pub fn name(&self) -> &'static str {
        match self {
            StartMethod::Spawn => "spawn",
            StartMethod::Fork { .. } => "fork",
        }
    }
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
    input: Option<BufWriter<File>>,
    /// A second handle on its output pipe, to see whether a reply is
    /// waiting there (the reader thread owns the first).
    output: Option<File>,
    /// Set by the reader thread while it reads a frame.
    arriving: Arc<AtomicBool>,
    reader: Option<JoinHandle<()>>,
    ready: bool,
    /// How it ended, once reaped.
    exited: Option<WorkerExit>,
    /// How many of the pool's folders it has been told of.
    folders_sent: usize,
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

/// Why a batch could not be sent to a worker.
#[derive(Debug)]
pub enum SendError {
    /// The frame could not be made (its message does not encode, or it is
    /// over the frame limit): nothing was written, and the worker is as it
    /// was.
    Unsendable(std::io::Error),
    /// Writing failed, possibly part-way through the frame, or the worker
    /// is not running: its input stream is unusable.
    Broken(Error),
}

/// Writes one request frame to a worker's input (`None`: it is not running).
fn write_batch(
    input: Option<&mut BufWriter<File>>,
    worker: WorkerId,
    request: &Request,
    bulk: &[&[u8]],
) -> Result<u64, SendError> {
    let Some(input) = input else {
        return Err(SendError::Broken(Error::Transport { worker, reason: "the worker is not running".into() }));
    };
    protocol::send(input, FrameKind::Request, request, bulk).map_err(|e| match e.kind() {
        // `protocol::send` checks the message before writing a byte: it
        // fails to encode (InvalidData) or is over the limit (InvalidInput).
        std::io::ErrorKind::InvalidData | std::io::ErrorKind::InvalidInput => SendError::Unsendable(e),
        _ => SendError::Broken(Error::Transport { worker, reason: format!("cannot send a batch: {e}") }),
    })
}

/// A batch carrying at least this much bulk is written together with the
/// batches sent right after it, one thread per worker
/// ([`WorkerPool::send_many`]).
pub const CONCURRENT_SEND_BYTES: usize = 1 << 20;

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
    /// What every worker's handshake proves: drawn when the first worker
    /// starts, handed to each out of band (see [`procjob_worker::secret`]).
    secret: Option<PoolSecret>,
    /// The folders workers may map files from (canonical), in the order
    /// they were named; each worker is told of them once.
    folders: Vec<PathBuf>,
    _interrupts: crate::lifecycle::Waker,
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
            _interrupts: {
                let tx = Mutex::new(events_tx.clone());
                crate::lifecycle::Waker::new(move |signal| {
                    if let Ok(tx) = tx.lock() {
                        let _ = tx.send(PoolEvent::interrupted(signal));
                    }
                })
            },
            events,
            events_tx,
            traffic: Traffic::default(),
            landings: Landings::default(),
            starts: Vec::new(),
            secret: None,
            folders: Vec::new(),
        }
    }

    /// Lets every worker map files under `folder` (absolute and canonical:
    /// a worker follows no symbolic link below it, and refuses any other
    /// file, see [`procjob_worker::confine`]). A worker is told before the
    /// next batch sent to it; one started later, in its handshake.
    pub fn allow_folder(&mut self, folder: PathBuf) {
        if !self.folders.contains(&folder) {
            self.folders.push(folder);
        }
    }

    /// Tells worker `index` of the folders named since it was last told
    /// (`Request::Allow`). A failed write is left for the batch that
    /// follows, which fails the same way and is handled there.
    fn send_allowance(&mut self, index: usize) {
        let Some(p) = self.slots[index].process.as_mut() else { return };
        let (Some(input), Some(new)) = (p.input.as_mut(), self.folders.get(p.folders_sent..)) else { return };
        if new.is_empty() {
            return;
        }
        let request = Request::Allow { folders: new.to_vec() };
        if let Ok(n) = protocol::send(input, FrameKind::Request, &request, &[]) {
            p.folders_sent = self.folders.len();
            self.traffic.bytes_to_workers += n;
            self.traffic.frames_to_workers += 1;
        }
    }

    /// The pool's secret, drawn the first time a worker starts.
    fn secret(&mut self, index: usize) -> Result<PoolSecret, Error> {
        if self.secret.is_none() {
            let secret = PoolSecret::generate()
                .map_err(|e| Error::Start { index, reason: format!("cannot draw the pool's secret: {e}") })?;
            self.secret = Some(secret);
        }
        Ok(self.secret.clone().expect("just drawn"))
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
        let waiting: Vec<usize> = (0..self.size()).filter(|&i| self.slots[i].process.is_none()).collect();
        match self.config.start {
            StartMethod::Fork { .. } if !waiting.is_empty() => self.start_forked(&waiting)?,
            _ => {
                for &index in &waiting {
                    self.start(index)?;
                }
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
                    let reexec = self.config.program.is_none() && matches!(self.config.start, StartMethod::Spawn);
                    return Err(Error::Start { index, reason: start_failure(exit, error, reexec) });
                }
                WorkerEvent::Results { .. } | WorkerEvent::Interrupted { .. } => {}
            }
        }
        Ok(())
    }

    /// Notices workers that exited while idle and empties their slots: those
    /// whose reader already reported the end of their stream, and those that
    /// have ended but whose reader has not yet seen it (the exit and the
    /// event race; sending to such a worker would fail with a broken pipe).
    fn reap_idle_exits(&mut self) {
        while let Ok(event) = self.events.try_recv() {
            if self.is_current(&event) {
                if let WorkerEvent::Lost { .. } = event.event {
                    self.reap(event.index);
                }
            }
        }
        for index in 0..self.slots.len() {
            let Some(p) = self.slots[index].process.as_mut() else { continue };
            if p.exited.is_none() {
                if let Ok(Some(exit)) = try_wait(p.pid) {
                    p.exited = Some(exit);
                    self.reap(index);
                }
            }
        }
    }

    /// Starts a worker in slot `index` (replacing nothing: the slot must be
    /// empty) and sends its handshake; its [`WorkerEvent::Ready`] arrives
    /// as an event, after which [`mark_ready`](WorkerPool::mark_ready).
    pub fn start(&mut self, index: usize) -> Result<(), Error> {
        if let StartMethod::Fork { .. } = self.config.start {
            return self.start_forked(&[index]);
        }
        let program = match &self.config.program {
            Some(p) => p.clone(),
            None => std::env::current_exe()
                .map_err(|e| Error::Start { index, reason: format!("cannot find the running executable: {e}") })?,
        };
        // The secret goes through a pipe only this child inherits, never the
        // command line or the environment (see procjob_worker::secret).
        let secret = self
            .secret(index)?
            .pipe_for_child()
            .map_err(|e| Error::Start { index, reason: format!("cannot make the secret's pipe: {e}") })?;
        let secret_fd = secret.as_raw_fd();
        let mut cmd = Command::new(&program);
        cmd.env(WORKER_ENV, std::process::id().to_string())
            .env(SECRET_FD_ENV, secret_fd.to_string())
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
        // SAFETY: fcntl, setpgid and sigprocmask are async-signal-safe;
        // nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                // The secret's pipe is close-on-exec in the coordinator, so
                // no other child inherits it; this child keeps it.
                if libc::fcntl(secret_fd, libc::F_SETFD, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
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
        drop(secret);
        let pid = child.id();
        let spawned_ns = procjob_worker::clock::monotonic_ns();
        crate::lifecycle::worker_started(pid);
        let stdin = File::from(std::os::fd::OwnedFd::from(child.stdin.take().expect("stdin was piped")));
        let stdout = File::from(std::os::fd::OwnedFd::from(child.stdout.take().expect("stdout was piped")));
        // The pool waits for and kills the worker by pid from here on.
        drop(child);
        self.attach(index, pid, stdin, stdout, requested_ns, spawned_ns)
    }

    /// Wires up a started worker: its reader thread, its input, and the
    /// handshake request.
    fn attach(
        &mut self,
        index: usize,
        pid: u32,
        stdin: File,
        stdout: File,
        requested_ns: u64,
        spawned_ns: u64,
    ) -> Result<(), Error> {
        enlarge_pipe(stdin.as_raw_fd());
        enlarge_pipe(stdout.as_raw_fd());
        let secret = self.secret(index)?;
        let slot = &mut self.slots[index];
        slot.generation += 1;
        let generation = slot.generation;
        let tx = self.events_tx.clone();
        let landings = Arc::clone(&self.landings);
        let inherited = match &self.config.start {
            StartMethod::Fork { inherit } => inherit.clone(),
            StartMethod::Spawn => Vec::new(),
        };
        let output = stdout.try_clone().ok();
        let arriving = Arc::new(AtomicBool::new(false));
        let reading = Arc::clone(&arriving);
        let reader = std::thread::Builder::new()
            .name(format!("procjob-reader-{index}"))
            .spawn(move || read_replies(index, generation, stdout, tx, landings, inherited, reading))
            .map_err(|e| Error::Start { index, reason: format!("cannot start a reader thread: {e}") })?;
        let mut input = BufWriter::with_capacity(1 << 16, stdin);
        let hello = Request::Hello(Hello {
            protocol: PROTOCOL_VERSION,
            worker_index: index as u32,
            binary: BinaryId::current(),
            idle_timeout_ms: self.config.idle_timeout.map_or(0, |d| d.as_millis().max(1) as u64),
            // Its stdout is this pipe, read by `read_replies`, which copies
            // (into its buffer, or spliced into C's file).
            reuse_lent_pages: self.config.program.is_none() || matches!(self.config.start, StartMethod::Fork { .. }),
            secret,
            folders: self.folders.clone(),
        });
        let sent = protocol::send(&mut input, FrameKind::Request, &hello, &[]);
        slot.process = Some(WorkerProcess {
            requested_ns,
            spawned_ns,
            pid,
            input: Some(input),
            output,
            arriving,
            reader: Some(reader),
            ready: false,
            exited: None,
            folders_sent: self.folders.len(),
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

    /// Forks a worker into each of `indices` (empty slots), then wires them
    /// up. All forks happen before any reader thread starts: a process may
    /// fork only while it has one thread (the child gets a copy of the
    /// forking thread alone, and locks held by any other would stay locked
    /// in it for good).
    fn start_forked(&mut self, indices: &[usize]) -> Result<(), Error> {
        let StartMethod::Fork { inherit } = &self.config.start else { unreachable!("called for fork only") };
        let inherit = inherit.clone();
        let parent = std::process::id() as i32;
        let secret = self.secret(indices.first().copied().unwrap_or(0))?;
        let mut forked = Vec::with_capacity(indices.len());
        let result = crate::signals::single_threaded(|| {
            stop_spawner_if_idle();
            let threads = settled_thread_count();
            if threads != Some(1) {
                return Err(Error::Config(format!(
                    "cannot fork workers: this process has {} threads, and fork copies only the calling one \
                     (any lock another thread holds would stay locked in the child forever); start them with \
                     --start-method spawn, or fork before starting threads",
                    threads.map_or("several".to_string(), |t| t.to_string())
                )));
            }
            for &index in indices {
                let requested_ns = procjob_worker::clock::monotonic_ns();
                let (to_child, from_child) = fork_one(&inherit, parent, &secret)
                    .map_err(|e| Error::Start { index, reason: format!("cannot fork: {e}") })?;
                let (pid, stdin, stdout) = (to_child.0, to_child.1, from_child);
                crate::lifecycle::worker_started(pid);
                forked.push((index, pid, stdin, stdout, requested_ns, procjob_worker::clock::monotonic_ns()));
            }
            Ok(())
        });
        // Wire up what was forked even if a later fork failed, so every
        // child is reaped with the pool.
        for (index, pid, stdin, stdout, requested_ns, spawned_ns) in forked {
            self.attach(index, pid, stdin, stdout, requested_ns, spawned_ns)?;
        }
        result
    }

    /// Sends a batch to worker `index`, with the bytes of its inline arrays.
    pub fn send(&mut self, index: usize, request: &Request, bulk: &[&[u8]]) -> Result<u64, SendError> {
        self.send_allowance(index);
        let worker = self.worker_id(index);
        let input = self.slots[index].process.as_mut().and_then(|p| p.input.as_mut());
        let n = write_batch(input, worker, request, bulk)?;
        self.traffic.bytes_to_workers += n;
        self.traffic.frames_to_workers += 1;
        Ok(n)
    }

    /// Writes several frames, each to a different worker, at once: one
    /// thread each, so no worker waits for another's inputs to be written
    /// (copy mode's A blocks and B). The threads end before this returns.
    pub fn send_many(&mut self, frames: &[(usize, &Request, &[&[u8]])]) -> Vec<Result<u64, SendError>> {
        for (index, _, _) in frames {
            self.send_allowance(*index);
        }
        let ids: Vec<WorkerId> = frames.iter().map(|(index, _, _)| self.worker_id(*index)).collect();
        let mut inputs: Vec<Option<&mut BufWriter<File>>> =
            self.slots.iter_mut().map(|s| s.process.as_mut().and_then(|p| p.input.as_mut())).collect();
        let results: Vec<Result<u64, SendError>> = std::thread::scope(|scope| {
            let handles: Vec<_> = frames
                .iter()
                .zip(&ids)
                .map(|((index, request, bulk), &worker)| {
                    let input = inputs.get_mut(*index).and_then(Option::take);
                    // A thread that cannot be started (a process limit)
                    // has written nothing: the batch is not sent.
                    std::thread::Builder::new()
                        .name("procjob-send".into())
                        .spawn_scoped(scope, move || write_batch(input, worker, request, bulk))
                        .map_err(|e| {
                            SendError::Unsendable(std::io::Error::new(
                                e.kind(),
                                format!("cannot start a thread to write it: {e}"),
                            ))
                        })
                })
                .collect();
            handles
                .into_iter()
                .zip(&ids)
                .map(|(h, &worker)| match h {
                    Ok(h) => h.join().unwrap_or_else(|_| {
                        Err(SendError::Broken(Error::Transport {
                            worker,
                            reason: "the thread sending a batch panicked".into(),
                        }))
                    }),
                    Err(not_started) => Err(not_started),
                })
                .collect()
        });
        for n in results.iter().flatten() {
            self.traffic.bytes_to_workers += n;
            self.traffic.frames_to_workers += 1;
        }
        results
    }

    /// Whether worker `index`'s input pipe has no reader any more: the
    /// worker has closed its input, which it does only by exiting (its idle
    /// timeout, or a crash). A write to it fails with a broken pipe.
    pub fn input_closed(&self, index: usize) -> bool {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        use std::os::fd::AsFd;
        let Some(input) = self.slots[index].process.as_ref().and_then(|p| p.input.as_ref()) else { return true };
        let mut fds = [PollFd::new(input.get_ref().as_fd(), PollFlags::POLLOUT)];
        loop {
            match poll(&mut fds, PollTimeout::ZERO) {
                Ok(_) => return fds[0].revents().is_some_and(|r| r.contains(PollFlags::POLLERR)),
                Err(nix::errno::Errno::EINTR) => continue,
                Err(_) => return false,
            }
        }
    }

    /// Whether worker `index` has begun to answer: its reply is being read,
    /// or bytes (or the end of its stream) wait in its output pipe. A batch
    /// whose deadline passed while the coordinator itself was not running
    /// (stopped by SIGSTOP or Ctrl-Z, or starved) may have its answer here.
    pub fn reply_arriving(&self, index: usize) -> bool {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        use std::os::fd::AsFd;
        let Some(p) = self.slots[index].process.as_ref() else { return false };
        if p.arriving.load(Ordering::SeqCst) {
            return true;
        }
        let Some(output) = p.output.as_ref() else { return false };
        let mut fds = [PollFd::new(output.as_fd(), PollFlags::POLLIN)];
        loop {
            match poll(&mut fds, PollTimeout::ZERO) {
                Ok(_) => {
                    let ready = PollFlags::POLLIN | PollFlags::POLLHUP | PollFlags::POLLERR;
                    return fds[0].revents().is_some_and(|r| r.intersects(ready));
                }
                Err(nix::errno::Errno::EINTR) => continue,
                Err(_) => return false,
            }
        }
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
        let exit = match p.exited {
            Some(exit) => exit,
            None => wait_or_kill(p.pid, SHUTDOWN_GRACE),
        };
        crate::lifecycle::worker_reaped(p.pid);
        if let Some(r) = p.reader.take() {
            let _ = r.join();
        }
        exit
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

    /// Kills worker `index` at once and reaps it.
    pub fn kill(&mut self, index: usize) -> WorkerExit {
        if let Some(p) = self.slots[index].process.as_ref() {
            kill_pid(p.pid);
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
                // Reaped here; `reap` below then only joins the reader.
                let exit = wait_or_kill(p.pid, left);
                p.exited = Some(exit);
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
fn spawn_from_long_lived_thread(cmd: Command) -> std::io::Result<Child> {
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
fn stop_spawner_if_idle() {
    if crate::lifecycle::live_workers() > 0 {
        return;
    }
    let taken = SPAWNER.lock().ok().and_then(|mut s| s.take());
    if let Some((tx, handle)) = taken {
        drop(tx);
        let _ = handle.join();
    }
}

/// Waits up to `grace` for worker `pid` to exit on its own (a worker exits
/// as soon as its input closes), then kills it; reaps it either way.
fn wait_or_kill(pid: u32, grace: Duration) -> WorkerExit {
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
fn try_wait(pid: u32) -> nix::Result<Option<WorkerExit>> {
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

fn kill_pid(pid: u32) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL);
}

/// Threads of this process once threads just joined have left it: a joined
/// thread may still be counted for a few microseconds while the kernel
/// finishes its exit, so a count above 1 is read again for up to 100 ms.
fn settled_thread_count() -> Option<usize> {
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
fn fork_one(inherit: &[Array], parent: i32, secret: &PoolSecret) -> std::io::Result<((u32, File), File)> {
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

/// Explains why a worker ended before its handshake.
pub(crate) fn start_failure(exit: WorkerExit, error: Option<String>, reexec: bool) -> String {
    let mut s = format!("it {exit} before the handshake");
    if let Some(e) = error {
        s.push_str(&format!(" ({e})"));
    }
    if reexec && !INIT_CALLED.load(Ordering::Relaxed) {
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
fn read_replies(
    index: usize,
    generation: u64,
    stdout: File,
    tx: Sender<PoolEvent>,
    landings: Landings,
    inherited: Vec<Array>,
    arriving: Arc<AtomicBool>,
) {
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
        // Wait for the first byte of the next frame; from then until its
        // event is sent, the worker's answer is arriving.
        let _ = r.fill_buf();
        arriving.store(true, Ordering::SeqCst);
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
            ArrayRef::Inherited { dtype, shape, index, offset } => {
                // A view of an array the worker inherited from us: ours.
                let shape: Vec<usize> = shape.iter().map(|&d| d as usize).collect();
                array::Placement::Mapped(match inherited.get(*index as usize) {
                    Some(base) => base.view_of_storage(*dtype, &shape, *offset),
                    None => Err(ArrayError::Shape(format!("no inherited array {index}"))),
                })
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
        let sent = send(WorkerEvent::Results { results, arrays, bytes, arrived_ns, read_ns });
        arriving.store(false, Ordering::SeqCst);
        if !sent {
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
