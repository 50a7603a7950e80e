//! The worker pool: start workers, hand them frames, hear back.
//!
//! ```text
//!   Parallel / scheduler                      workers
//!        │ send(i, batch)                        ▲
//!        ▼                                       │ frames
//!   WorkerPool ── slots, generations, ──► dyn Transport ── Pipes: processes + pipes
//!        ▲        traffic, memory,               │         (fake one in tests)
//!        │        secret, folders                │
//!        └──────── next_event() ◄── channel ◄────┘ reader threads: PoolEvents
//! ```
//!
//! The pool knows slots and frames, and nothing of tasks' meaning or of
//! matrices: the scheduling decisions are in [`crate::scheduler`] and the
//! call logic in [`crate::parallel`]. How workers are reached is a
//! [`Transport`]'s business: today [`pipes`]' processes and pipes.

pub(crate) mod cluster;
mod memory;
mod pipes;
mod transport;

#[cfg(test)]
mod fake;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use procjob_worker::array::{Array, ArrayError, Landing};
use procjob_worker::protocol::{Hello, MemorySnapshot, Ready, Request, Results, PROTOCOL_VERSION};
use procjob_worker::registry::BinaryId;
use procjob_worker::secret::PoolSecret;

use crate::error::{Error, WorkerExit, WorkerId};
use memory::MemoryBoard;

pub use pipes::{available_cpus, thread_count};
pub(crate) use pipes::{mark_serving, serving_as_worker, start_failure, INIT_CALLED};
pub(crate) use transport::{Capabilities, Transport};

/// How long a worker has to answer the handshake.
pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long workers get to exit after their input closes, before SIGKILL.
pub(crate) const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);
/// The grace period when the coordinator was interrupted: busy workers
/// cannot notice their input closing until their task ends, so wait less.
pub(crate) const INTERRUPT_GRACE: Duration = Duration::from_millis(500);

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

/// The worker in a slot, as the pool knows it.
struct SlotWorker {
    pid: u32,
    requested_ns: u64,
    spawned_ns: u64,
    ready: bool,
    /// How many of the pool's folders it has been told of.
    folders_sent: usize,
}

/// A slot of the pool and the worker in it, if any.
struct Slot {
    generation: u64,
    worker: Option<SlotWorker>,
    /// Tasks this slot's workers have completed, for reports.
    tasks: u64,
    /// Pid of the last worker in it (0: none yet).
    last_pid: u32,
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
///
/// # Why a memory-mapped block shows in USS
///
/// `peak.uss` is the kernel's `Private_Clean + Private_Dirty`, and the
/// kernel calls a page *private* when only one process maps it, whatever
/// kind of memory it is. An array dumped by the coordinator (which wrote the
/// file and does not map it) and mapped by a single worker is made of
/// page-cache (or `/dev/shm`) pages that only that worker maps: they count
/// as its `Private_Clean`, so its USS grows by the block although nothing
/// was copied. Once a second worker maps the same pages, they move to
/// `Shared_Clean` and out of both USS figures; PSS (`peak.pss`) splits them
/// between the processes instead. A copy shows as `Private_Dirty`: an
/// inline array read into the worker's heap, or the pages a task wrote
/// through a copy-on-write map (`mmap_mode` `'c'`). So, to tell a map from
/// a copy, read PSS across workers, or the dirty part of USS, not USS
/// alone.
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
pub(crate) type Landings = Arc<Mutex<HashMap<u64, Landing>>>;

/// What the reader threads share with the pool: where output arrays land,
/// and the memory snapshots that follow answers.
#[derive(Clone, Default)]
pub(crate) struct ReaderShared {
    /// Where output arrays land.
    pub(crate) landings: Landings,
    /// The memory snapshots that follow answers.
    pub(crate) memory: Arc<MemoryBoard>,
}

/// How long a report waits for memory snapshots still on their way: they
/// follow their answers within milliseconds, unless the worker was stopped.
const MEMORY_WAIT: Duration = Duration::from_secs(5);

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

/// A batch carrying at least this much bulk is written together with the
/// batches sent right after it, one thread per worker
/// ([`WorkerPool::send_many`]).
pub(crate) const CONCURRENT_SEND_BYTES: usize = 1 << 20;

/// A pool of workers, reached through a transport (see the module docs).
pub struct WorkerPool {
    idle_timeout: Option<Duration>,
    slots: Vec<Slot>,
    events: Receiver<PoolEvent>,
    traffic: Traffic,
    readers: ReaderShared,
    starts: Vec<StartRecord>,
    /// What every worker's handshake proves: drawn when the first worker
    /// starts, handed to each out of band (see [`procjob_worker::secret`]).
    secret: Option<PoolSecret>,
    /// The folders workers may map files from (canonical), in the order
    /// they were named; each worker is told of them once.
    folders: Vec<PathBuf>,
    transport: Box<dyn Transport>,
    _interrupts: crate::lifecycle::Waker,
}

impl std::fmt::Debug for WorkerPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerPool").field("workers", &self.slots.len()).field("traffic", &self.traffic).finish()
    }
}

impl WorkerPool {
    /// A pool of `config.workers` slots of worker processes on this
    /// machine; no process is started yet.
    pub fn new(config: PoolConfig) -> WorkerPool {
        // Rank 0 of an MPI job: the slots are spread over its nodes.
        #[cfg(feature = "mpi")]
        if let Some(pool) = cluster::pool_on_ranks(&config) {
            return pool;
        }
        let PoolConfig { workers, idle_timeout, program, start } = config;
        WorkerPool::with_transport(workers, idle_timeout, move |events, readers| {
            Box::new(pipes::Pipes::new(workers, program, start, events, readers))
        })
    }

    /// A pool of `workers` slots on the transport `make` returns, given the
    /// channel it reports on and what its reader threads share with the
    /// pool.
    pub(crate) fn with_transport(
        workers: usize,
        idle_timeout: Option<Duration>,
        make: impl FnOnce(Sender<PoolEvent>, ReaderShared) -> Box<dyn Transport>,
    ) -> WorkerPool {
        let (events_tx, events) = mpsc::channel();
        let readers = ReaderShared::default();
        let transport = make(events_tx.clone(), readers.clone());
        let slots = (0..workers).map(|_| Slot { generation: 0, worker: None, tasks: 0, last_pid: 0 }).collect();
        let tx = Mutex::new(events_tx);
        WorkerPool {
            idle_timeout,
            slots,
            events,
            traffic: Traffic::default(),
            readers,
            starts: Vec::new(),
            secret: None,
            folders: Vec::new(),
            transport,
            _interrupts: crate::lifecycle::Waker::new(move |signal| {
                if let Ok(tx) = tx.lock() {
                    let _ = tx.send(PoolEvent::interrupted(signal));
                }
            }),
        }
    }

    /// What the transport can do.
    pub fn capabilities(&self) -> Capabilities {
        self.transport.capabilities()
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
        let worker = self.worker_id(index);
        let Some(w) = self.slots[index].worker.as_mut() else { return };
        let Some(new) = self.folders.get(w.folders_sent..).filter(|new| !new.is_empty()) else { return };
        let request = Request::Allow { folders: new.to_vec() };
        if let Ok(n) = self.transport.send(index, worker, &request, &[]) {
            w.folders_sent = self.folders.len();
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
        &self.readers.landings
    }

    /// Counters of what crossed to and from the workers since the pool was
    /// made.
    pub fn traffic(&self) -> Traffic {
        self.traffic
    }

    /// The pid of worker `index`, if it is running.
    pub fn pid(&self, index: usize) -> Option<u32> {
        self.slots[index].worker.as_ref().map(|w| w.pid)
    }

    /// The pids of the running workers, in slot order. An empty slot (its
    /// worker lost and not yet replaced) is left out, never given as 0: a 0
    /// passed to `kill` would signal the caller's own process group.
    pub fn pids(&self) -> Vec<u32> {
        (0..self.size()).filter_map(|i| self.pid(i)).collect()
    }

    /// Names worker `index` for messages.
    pub fn worker_id(&self, index: usize) -> WorkerId {
        WorkerId { index, pid: self.pid(index).unwrap_or(self.slots[index].last_pid) }
    }

    /// What each slot did. Waits for memory snapshots still on their way
    /// after the last answers (up to a few seconds, for a stopped worker).
    pub fn reports(&self) -> Vec<WorkerReport> {
        (0..self.size())
            .map(|i| WorkerReport {
                index: i,
                pid: self.worker_id(i).pid,
                tasks: self.slots[i].tasks,
                peak: self.readers.memory.peak(i, MEMORY_WAIT),
            })
            .collect()
    }

    /// Counts a batch's completed tasks.
    pub fn record_batch(&mut self, index: usize, tasks: u64) {
        self.slots[index].tasks += tasks;
    }

    /// Whether an event belongs to the worker now in its slot.
    pub fn is_current(&self, event: &PoolEvent) -> bool {
        self.slots.get(event.index).is_some_and(|s| s.generation == event.generation && s.worker.is_some())
    }

    /// Starts every empty slot's worker and waits for all handshakes: those
    /// of the workers just started, and those of replacements started during
    /// an earlier call (after a panic) that had not answered when it ended.
    /// Workers that exited while idle (idle timeout) are noticed and
    /// replaced first.
    pub fn ensure_started(&mut self) -> Result<(), Error> {
        self.reap_idle_exits()?;
        let empty: Vec<usize> = (0..self.size()).filter(|&i| self.slots[i].worker.is_none()).collect();
        self.start_slots(&empty)?;
        let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
        while let Some(index) = self.first_not_ready() {
            let timeout = deadline.saturating_duration_since(Instant::now());
            let event = match self.events.recv_timeout(timeout) {
                Ok(e) => e,
                Err(_) => {
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
                    if let Err(reason) = check_protocol(&ready) {
                        self.kill_all();
                        return Err(Error::Start { index, reason });
                    }
                    self.mark_ready(index, &ready);
                }
                WorkerEvent::Lost { error } => {
                    let exit = self.reap(index);
                    self.kill_all();
                    let reexec = self.capabilities().reexecutes_program;
                    return Err(Error::Start { index, reason: start_failure(exit, error, reexec) });
                }
                WorkerEvent::Results { .. } | WorkerEvent::Interrupted { .. } => {}
            }
        }
        Ok(())
    }

    /// The first slot whose worker is running but has not answered its
    /// handshake.
    fn first_not_ready(&self) -> Option<usize> {
        (0..self.size()).find(|&i| self.slots[i].worker.as_ref().is_some_and(|w| !w.ready))
    }

    /// Notices workers that exited while idle and empties their slots: those
    /// whose stream was already reported ended, and those that have ended
    /// but whose end has not been reported yet (the exit and the event race;
    /// sending to such a worker would fail with a broken pipe). A handshake
    /// that arrived between calls (a replacement started late in the last
    /// one) is taken here, not dropped.
    fn reap_idle_exits(&mut self) -> Result<(), Error> {
        while let Ok(event) = self.events.try_recv() {
            if !self.is_current(&event) {
                continue;
            }
            match event.event {
                WorkerEvent::Lost { .. } => {
                    self.reap(event.index);
                }
                WorkerEvent::Ready(ready) => {
                    if let Err(reason) = check_protocol(&ready) {
                        self.kill_all();
                        return Err(Error::Start { index: event.index, reason });
                    }
                    self.mark_ready(event.index, &ready);
                }
                WorkerEvent::Results { .. } | WorkerEvent::Interrupted { .. } => {}
            }
        }
        for index in 0..self.slots.len() {
            if self.slots[index].worker.is_some() && self.transport.poll_exit(index).is_some() {
                self.reap(index);
            }
        }
        Ok(())
    }

    /// Starts a worker in slot `index` (replacing nothing: the slot must be
    /// empty) and sends its handshake; its [`WorkerEvent::Ready`] arrives
    /// as an event, after which [`mark_ready`](WorkerPool::mark_ready).
    pub fn start(&mut self, index: usize) -> Result<(), Error> {
        self.start_slots(&[index])
    }

    /// Starts a worker in each of the (empty) slots `indices`.
    fn start_slots(&mut self, indices: &[usize]) -> Result<(), Error> {
        if indices.is_empty() {
            return Ok(());
        }
        let secret = self.secret(indices[0])?;
        let slots: Vec<(usize, u64)> = indices
            .iter()
            .map(|&i| {
                self.slots[i].generation += 1;
                (i, self.slots[i].generation)
            })
            .collect();
        let hello = |index: usize| Hello {
            protocol: PROTOCOL_VERSION,
            worker_index: index as u32,
            binary: BinaryId::current(),
            idle_timeout_ms: self.idle_timeout.map_or(0, |d| d.as_millis().max(1) as u64),
            reuse_lent_pages: self.transport.capabilities().reads_own_replies,
            secret: secret.clone(),
            folders: self.folders.clone(),
        };
        let hellos: Vec<Hello> = indices.iter().map(|&i| hello(i)).collect();
        let by_index =
            |index: usize| hellos[indices.iter().position(|&i| i == index).expect("a slot asked for")].clone();
        let (started, failure) = self.transport.start(&slots, &by_index);
        let folders = self.folders.len();
        for s in started {
            let slot = &mut self.slots[s.index];
            slot.worker = Some(SlotWorker {
                pid: s.pid,
                requested_ns: s.requested_ns,
                spawned_ns: s.spawned_ns,
                ready: false,
                folders_sent: folders,
            });
            slot.last_pid = s.pid;
            if let Some(n) = s.hello_bytes {
                self.traffic.bytes_to_workers += n;
                self.traffic.frames_to_workers += 1;
            }
        }
        failure.map_or(Ok(()), Err)
    }

    /// Sends a batch to worker `index`, with the bytes of its inline arrays.
    pub fn send(&mut self, index: usize, request: &Request, bulk: &[&[u8]]) -> Result<u64, SendError> {
        self.send_allowance(index);
        let worker = self.worker_id(index);
        if self.slots[index].worker.is_none() {
            return Err(SendError::Broken(Error::Transport { worker, reason: "the worker is not running".into() }));
        }
        let n = self.transport.send(index, worker, request, bulk)?;
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
        let frames: Vec<(usize, WorkerId, &Request, &[&[u8]])> =
            frames.iter().map(|&(index, request, bulk)| (index, self.worker_id(index), request, bulk)).collect();
        let results = self.transport.send_many(&frames);
        for n in results.iter().flatten() {
            self.traffic.bytes_to_workers += n;
            self.traffic.frames_to_workers += 1;
        }
        results
    }

    /// Whether worker `index` no longer reads its input: it has closed it,
    /// which it does only by exiting (its idle timeout, or a crash). A
    /// write to it would fail with a broken pipe.
    pub fn input_closed(&self, index: usize) -> bool {
        self.slots[index].worker.is_none() || self.transport.input_closed(index)
    }

    /// Whether worker `index` has begun to answer: its reply is being read,
    /// or waits to be. A batch whose deadline passed while the coordinator
    /// itself was not running (stopped by SIGSTOP or Ctrl-Z, or starved) may
    /// have its answer here.
    pub fn reply_arriving(&self, index: usize) -> bool {
        self.slots[index].worker.is_some() && self.transport.reply_arriving(index)
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
        if self.slots[index].worker.take().is_none() {
            return WorkerExit::Unknown;
        }
        self.transport.stop(index, SHUTDOWN_GRACE)
    }

    /// [`reap`](WorkerPool::reap)s worker `index`, a worker the call lost,
    /// and says why procjob itself killed it, when it did (see
    /// [`Transport::kill_cause`]).
    pub fn reap_lost(&mut self, index: usize) -> (WorkerExit, Option<String>) {
        if self.slots[index].worker.is_none() {
            return (WorkerExit::Unknown, None);
        }
        let exit = self.reap(index);
        (exit, self.transport.kill_cause(index))
    }

    /// Marks worker `index` as having answered its handshake.
    pub fn mark_ready(&mut self, index: usize, ready: &Ready) {
        if let Some(w) = self.slots[index].worker.as_mut() {
            w.ready = true;
            self.starts.push(StartRecord {
                index,
                pid: w.pid,
                requested_ns: w.requested_ns,
                spawned_ns: w.spawned_ns,
                ready_ns: procjob_worker::clock::monotonic_ns(),
            });
        }
        self.readers.memory.raise(index, &ready.memory);
    }

    /// Kills worker `index` at once and reaps it.
    pub fn kill(&mut self, index: usize) -> WorkerExit {
        if self.slots[index].worker.is_some() {
            self.transport.kill(index);
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
        for i in 0..self.size() {
            if self.slots[i].worker.is_some() {
                self.transport.close_input(i);
            }
        }
        let deadline = Instant::now() + grace;
        for i in 0..self.size() {
            if self.slots[i].worker.take().is_some() {
                self.transport.stop(i, deadline.saturating_duration_since(Instant::now()));
            }
        }
    }
}

impl Drop for WorkerPool {
    fn drop(&mut self) {
        self.shutdown(SHUTDOWN_GRACE);
    }
}

/// The one place a worker's protocol version is checked: its handshake
/// answer. (Every frame's prelude carries the version too; the frame reader
/// refuses another, see `procjob_worker::protocol`.)
pub(crate) fn check_protocol(ready: &Ready) -> Result<(), String> {
    if ready.protocol == PROTOCOL_VERSION {
        Ok(())
    } else {
        Err(format!("protocol version mismatch: coordinator speaks {PROTOCOL_VERSION}, worker {}", ready.protocol))
    }
}
