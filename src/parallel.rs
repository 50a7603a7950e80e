//! [`Parallel`]: the joblib-like way to run tasks across worker processes.
//!
//! ```
//! use procjob::{Parallel, Task};
//!
//! struct Square;
//! impl Task for Square {
//!     type Input = u64;
//!     type Output = u64;
//!     type Error = String;
//!     fn run(x: u64) -> Result<u64, String> {
//!         Ok(x * x)
//!     }
//! }
//!
//! fn main() -> Result<(), procjob::Error> {
//!     procjob::init(); // first line of main: a worker process stops here
//!     let squares = Parallel::new().n_jobs(2).run::<Square, _>(0..10u64)?;
//!     assert_eq!(squares, (0..10u64).map(|x| x * x).collect::<Vec<_>>());
//!     Ok(())
//! }
//! ```
//!
//! A call draws inputs from the caller's iterator (at most `pre_dispatch`
//! batches ahead), encodes each — arrays larger than `max_nbytes` dumped
//! once to the call's temp folder and sent as file references, smaller ones
//! inline — sends batches to idle workers, and decodes the outputs as they
//! come back. The first failure stops further dispatch; batches already
//! running are awaited, so the workers stay healthy and the pool is reused
//! by the next call.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use procjob_worker::array::{self, Array, ArrayEncoder};
use procjob_worker::protocol::{
    Access, ArrayRef, Batch, FailureCause, Outcome, Payload, Request, TaskKind, TaskRequest,
};
use procjob_worker::registry::entry_offset;
use procjob_worker::Task;

use crate::error::{Error, TaskId};
use crate::pool::{PoolConfig, PoolEvent, SendError, StartMethod, Traffic, WorkerEvent, WorkerPool, WorkerReport};
use crate::scheduler::{Action, BatchSize, Event, PreDispatch, Scheduler};
use crate::store::RunFolder;
use crate::trace::{Lane, Trace};

/// joblib's default `max_nbytes`: arrays above 1 MiB are memory-mapped.
pub const DEFAULT_MAX_NBYTES: usize = 1 << 20;
/// How long an idle worker waits for work before exiting (loky's default).
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(300);

/// Progress of a call, passed to the progress callback after each batch.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Progress {
    /// Tasks completed so far.
    pub completed: u64,
    /// Tasks drawn from the input so far.
    pub submitted: u64,
    /// The number of inputs, when the iterator knows it.
    pub total: Option<u64>,
    /// Time since the call started.
    pub elapsed: Duration,
}

/// What the last call did, for reports and tests.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CallStats {
    /// What crossed the pipes during the call.
    pub traffic: Traffic,
    /// Arrays dumped to files (once each, however many tasks share them).
    pub dumped_arrays: u64,
    /// Bytes written to dump files.
    pub dumped_bytes: u64,
    /// Batches sent.
    pub batches: u64,
    /// Seconds spent starting workers.
    pub spawn_seconds: f64,
    /// Tasks re-run after their worker died.
    pub retried: u64,
    /// Workers started during the call to replace dead ones.
    pub replaced_workers: u64,
}

type ProgressFn = Box<dyn FnMut(&Progress)>;

/// Runs tasks on a pool of worker processes, like joblib's `Parallel`.
///
/// Settings mirror joblib's where they make sense; see docs/joblib.md for
/// the full mapping. The pool is started on the first call and kept warm
/// for the next ones until [`Parallel`] is dropped, or until its workers
/// have been idle for [`idle_timeout`](Parallel::idle_timeout).
pub struct Parallel {
    n_jobs: i64,
    max_nbytes: Option<usize>,
    mmap_mode: Access,
    temp_folder: Option<PathBuf>,
    batch_size: BatchSize,
    pre_dispatch: Option<PreDispatch>,
    timeout: Option<Duration>,
    retries: u32,
    idle_timeout: Option<Duration>,
    progress: Option<ProgressFn>,
    program: Option<PathBuf>,
    start_method: StartMethod,
    pool: Option<WorkerPool>,
    calls: u64,
    last: CallStats,
    trace: Option<Trace>,
}

impl Default for Parallel {
    fn default() -> Self {
        Parallel::new()
    }
}

impl std::fmt::Debug for Parallel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Parallel")
            .field("n_jobs", &self.n_jobs)
            .field("max_nbytes", &self.max_nbytes)
            .field("mmap_mode", &self.mmap_mode)
            .field("temp_folder", &self.temp_folder)
            .field("batch_size", &self.batch_size)
            .field("pre_dispatch", &self.pre_dispatch)
            .field("timeout", &self.timeout)
            .field("retries", &self.retries)
            .field("idle_timeout", &self.idle_timeout)
            .finish_non_exhaustive()
    }
}

/// Resolves joblib's `n_jobs`: positive as given, negative counting back
/// from the CPU count (-1 = all CPUs, -2 = all but one), never below 1; 0 is
/// an error.
pub fn resolve_n_jobs(n_jobs: i64, cpus: usize) -> Result<usize, Error> {
    match n_jobs {
        0 => Err(Error::Config("n_jobs = 0 is not allowed: use a positive count, or -1 for all CPUs".into())),
        n if n > 0 => Ok(n as usize),
        n => Ok((cpus as i64 + 1 + n).max(1) as usize),
    }
}

impl Parallel {
    /// A `Parallel` with joblib's defaults, except `n_jobs`, which is -1
    /// (all CPUs) rather than 1.
    pub fn new() -> Parallel {
        Parallel {
            n_jobs: -1,
            max_nbytes: Some(DEFAULT_MAX_NBYTES),
            mmap_mode: Access::ReadOnly,
            temp_folder: None,
            batch_size: BatchSize::Auto,
            pre_dispatch: None,
            timeout: None,
            retries: 0,
            idle_timeout: Some(DEFAULT_IDLE_TIMEOUT),
            progress: None,
            program: None,
            start_method: StartMethod::Spawn,
            pool: None,
            calls: 0,
            last: CallStats::default(),
            trace: None,
        }
    }

    /// Records a timeline of every worker start, batch sent, task run and
    /// reply received, to be taken with [`take_trace`](Parallel::take_trace)
    /// and written with [`Trace::to_chrome_json`].
    pub fn trace(mut self, on: bool) -> Parallel {
        self.trace = on.then(Trace::default);
        self
    }

    /// The timeline recorded so far (empty unless [`trace`](Parallel::trace)
    /// is on); recording goes on.
    pub fn take_trace(&mut self) -> Trace {
        self.record_starts();
        self.trace.as_mut().map(std::mem::take).unwrap_or_default()
    }

    /// Moves the pool's worker start records into the trace.
    fn record_starts(&mut self) {
        let (Some(trace), Some(pool)) = (self.trace.as_mut(), self.pool.as_mut()) else { return };
        for s in pool.take_starts() {
            let worker = Lane::Worker { index: s.index, pid: s.pid };
            trace.span(Lane::Coordinator, "spawn", format!("start worker {}", s.index), s.requested_ns, s.spawned_ns);
            trace.span(worker, "handshake", "start and handshake", s.spawned_ns, s.ready_ns);
        }
    }

    /// Number of worker processes: positive as given; negative counts back
    /// from the CPUs this process may use (-1 = all); 0 is an error at the
    /// first call. Changing it restarts the pool.
    pub fn n_jobs(mut self, n_jobs: i64) -> Parallel {
        if n_jobs != self.n_jobs {
            self.pool = None;
        }
        self.n_jobs = n_jobs;
        self
    }

    /// Arrays larger than this many bytes are dumped once per call to the
    /// temp folder and travel as memory maps; smaller ones travel inline.
    /// `None` sends every array inline (joblib's `max_nbytes=None`).
    /// Default 1 MiB (joblib's `'1M'`).
    pub fn max_nbytes(mut self, max_nbytes: Option<usize>) -> Parallel {
        self.max_nbytes = max_nbytes;
        self
    }

    /// How workers map dumped arrays: read-only (default, joblib's `'r'`),
    /// or copy-on-write (`'c'`: tasks may modify their view privately).
    /// Arrays already backed by a file travel with their own access, so a
    /// shared output made with [`Array::create_npy`] is written in place.
    pub fn mmap_mode(mut self, mode: Access) -> Parallel {
        self.mmap_mode = mode;
        self
    }

    /// Parent folder of the call's private temp folder for dumped arrays.
    /// Default: `PROCJOB_TEMP_FOLDER`, else /dev/shm when it has room, else
    /// the system temp dir.
    pub fn temp_folder(mut self, folder: impl Into<PathBuf>) -> Parallel {
        self.temp_folder = Some(folder.into());
        self
    }

    /// Tasks per batch: [`BatchSize::Auto`] (default) grows batches while
    /// tasks are short and shrinks them when they are long.
    pub fn batch_size(mut self, batch: BatchSize) -> Parallel {
        self.batch_size = batch;
        self
    }

    /// How many batches of inputs are drawn from the iterator ahead of the
    /// workers. Default: 2 × n_jobs batches, as joblib.
    pub fn pre_dispatch(mut self, pre_dispatch: PreDispatch) -> Parallel {
        self.pre_dispatch = Some(pre_dispatch);
        self
    }

    /// Per-task time limit. A batch of n tasks may run n × `timeout`; past
    /// that its worker is killed and the call fails with
    /// [`Error::Timeout`].
    pub fn timeout(mut self, timeout: Duration) -> Parallel {
        self.timeout = Some(timeout);
        self
    }

    /// Re-runs a task lost to a dead worker (killed by a signal, or exited
    /// mid-task) on a freshly started worker, up to `retries` times per
    /// task. A task that returns an error, panics or times out is not
    /// retried. Default 0.
    pub fn retries(mut self, retries: u32) -> Parallel {
        self.retries = retries;
        self
    }

    /// Idle workers exit after this long without work (`None`: never);
    /// the next call starts new ones. Default 300 s, as loky.
    pub fn idle_timeout(mut self, idle: Option<Duration>) -> Parallel {
        self.idle_timeout = idle;
        self.pool = None;
        self
    }

    /// Called after each batch completes, on the calling thread.
    pub fn progress(mut self, callback: impl FnMut(&Progress) + 'static) -> Parallel {
        self.progress = Some(Box::new(callback));
        self
    }

    /// How workers start: [`StartMethod::Spawn`] (default: re-execute this
    /// program) or [`StartMethod::Fork`] (fork this process; the workers
    /// read the arrays named there in place, copy-on-write, with no files).
    /// Forking is refused, with the reason, when this process has other
    /// threads. Changing it restarts the pool.
    pub fn start_method(mut self, start: StartMethod) -> Parallel {
        self.start_method = start;
        self.pool = None;
        self
    }

    /// Runs workers from another executable that speaks the protocol (such
    /// as `procjob-worker`) instead of re-executing this one. Such a worker
    /// runs only the task kinds it has registered.
    pub fn worker_program(mut self, program: impl Into<PathBuf>) -> Parallel {
        self.program = Some(program.into());
        self.pool = None;
        self
    }

    /// The number of workers calls will use.
    pub fn workers(&self) -> Result<usize, Error> {
        resolve_n_jobs(self.n_jobs, crate::pool::available_cpus())
    }

    /// The pids of the running workers (empty before the first call).
    pub fn worker_pids(&self) -> Vec<u32> {
        self.pool.as_ref().map(WorkerPool::pids).unwrap_or_default()
    }

    /// What each worker has done since the pool started.
    pub fn worker_reports(&self) -> Vec<WorkerReport> {
        self.pool.as_ref().map(WorkerPool::reports).unwrap_or_default()
    }

    /// What the last call did.
    pub fn last_call(&self) -> &CallStats {
        &self.last
    }

    /// Starts the workers now (otherwise the first call does), and returns
    /// how long that took.
    pub fn start(&mut self) -> Result<Duration, Error> {
        let t = Instant::now();
        self.pool_mut()?;
        Ok(t.elapsed())
    }

    /// Stops the workers now: closes their input, waits a short grace
    /// period, kills the rest, and reaps them all.
    pub fn shutdown(&mut self) {
        if let Some(mut pool) = self.pool.take() {
            pool.shutdown(crate::pool::SHUTDOWN_GRACE);
        }
    }

    fn pool_mut(&mut self) -> Result<&mut WorkerPool, Error> {
        refuse_recursive_spawn();
        let workers = self.workers()?;
        if self.pool.as_ref().is_some_and(|p| p.size() != workers) {
            self.pool = None;
        }
        let pool = self.pool.get_or_insert_with(|| {
            WorkerPool::new(PoolConfig {
                workers,
                // A forked worker that idled out could not be forked again
                // once this process has threads: keep them.
                idle_timeout: match self.start_method {
                    StartMethod::Fork { .. } => None,
                    StartMethod::Spawn => self.idle_timeout,
                },
                program: self.program.clone(),
                start: self.start_method.clone(),
            })
        });
        pool.ensure_started()?;
        self.record_starts();
        Ok(self.pool.as_mut().expect("just started"))
    }

    /// Runs task `T` on every input; returns the outputs in input order,
    /// or the first failure.
    pub fn run<T: Task, I>(&mut self, inputs: I) -> Result<Vec<T::Output>, Error>
    where
        I: IntoIterator<Item = T::Input>,
    {
        // Completion order, placed by index: no reordering buffer. Sized
        // up front when the input says how long it is, so the slots are not
        // reallocated (and their pages faulted in again) as they fill.
        let inputs = inputs.into_iter();
        let mut out: Vec<Option<T::Output>> = Vec::with_capacity(inputs.size_hint().0);
        for result in self.run_unordered::<T, I::IntoIter>(inputs)? {
            let (index, output) = result?;
            let index = index as usize;
            if index >= out.len() {
                out.resize_with(index + 1, || None);
            }
            out[index] = Some(output);
        }
        Ok(out.into_iter().map(|o| o.expect("every task of a successful call has an output")).collect())
    }

    /// Runs task `T` on every input, yielding outputs in input order as
    /// they become available.
    pub fn run_iter<T: Task, I>(&mut self, inputs: I) -> Result<Ordered<'_, T, I::IntoIter>, Error>
    where
        I: IntoIterator<Item = T::Input>,
    {
        Ok(Ordered { call: self.call::<T, I>(inputs)?, next: 0, buffer: BTreeMap::new() })
    }

    /// Runs task `T` on every input, yielding `(input index, output)` in
    /// the order tasks complete.
    pub fn run_unordered<T: Task, I>(&mut self, inputs: I) -> Result<Unordered<'_, T, I::IntoIter>, Error>
    where
        I: IntoIterator<Item = T::Input>,
    {
        Ok(Unordered { call: self.call::<T, I>(inputs)? })
    }

    /// Runs task `T` on every input like [`run_unordered`](Parallel::run_unordered),
    /// and writes the first array of each task's output straight into rows
    /// `rows_of(index)` of `out` as it comes off the pipe: no buffer the
    /// size of the block, no copy to stack it. The output then holds a view
    /// of those rows instead of its own array.
    ///
    /// `out` must be a read-write file-backed array (made with
    /// [`Array::create_npy`]); the row ranges of different tasks must not
    /// overlap; an output array whose dtype or shape does not match its rows
    /// is received as usual instead.
    pub fn run_unordered_into<T: Task, I>(
        &mut self,
        inputs: I,
        out: &Array,
        rows_of: impl FnMut(u64) -> std::ops::Range<usize> + 'static,
    ) -> Result<Unordered<'_, T, I::IntoIter>, Error>
    where
        I: IntoIterator<Item = T::Input>,
    {
        let file = match out.open_for_landing() {
            Some(Ok(file)) => std::sync::Arc::new(file),
            Some(Err(e)) => return Err(Error::Config(format!("cannot open the output array's file: {e}"))),
            None => {
                return Err(Error::Config(
                    "run_unordered_into needs a read-write file-backed output (Array::create_npy)".into(),
                ))
            }
        };
        let mut call = self.call::<T, I>(inputs)?;
        call.landing = Some(LandingPlan { file, out: out.clone(), rows_of: Box::new(rows_of) });
        Ok(Unordered { call })
    }

    fn call<T: Task, I>(&mut self, inputs: I) -> Result<Call<'_, T, I::IntoIter>, Error>
    where
        I: IntoIterator<Item = T::Input>,
    {
        let started = Instant::now();
        let spawn = Instant::now();
        self.pool_mut()?;
        let spawn_seconds = spawn.elapsed().as_secs_f64();
        self.calls += 1;
        let workers = self.workers()?;
        let pre_dispatch = self.pre_dispatch.unwrap_or(PreDispatch::Batches(2 * workers));
        let scheduler = Scheduler::new(workers, self.batch_size, pre_dispatch);
        let mut encoder = CallEncoder::new(self.max_nbytes, self.mmap_mode, self.temp_folder.clone());
        if let StartMethod::Fork { inherit } = &self.start_method {
            encoder.inherited = inherit.iter().map(Array::storage_id).collect();
        }
        let traffic_before = self.pool.as_ref().map(WorkerPool::traffic).unwrap_or_default();
        self.last = CallStats { spawn_seconds, ..CallStats::default() };
        if let Some(signal) = crate::signals::received() {
            return Err(Error::Interrupted { signal });
        }
        let call = self.calls;
        Ok(Call {
            parallel: self,
            inputs: inputs.into_iter(),
            call,
            scheduler,
            encoder,
            scratch: Vec::new(),
            queue: VecDeque::new(),
            in_flight: (0..workers).map(|_| None).collect(),
            ready: VecDeque::new(),
            failure: None,
            attempts: HashMap::new(),
            interrupted: false,
            joining: vec![None; workers],
            resent: std::collections::HashSet::new(),
            pulled: 0,
            completed: 0,
            started,
            traffic_before,
            finished: false,
            landing: None,
            next_action: None,
        })
    }
}

/// A worker in the pool was asked to start more workers: its `main` did
/// not call `procjob::init()`. Fail loudly instead of recursing.
fn refuse_recursive_spawn() {
    if procjob_worker::serve::is_worker_process() {
        eprintln!(
            "procjob: this process was started as a procjob worker, but it did not become one: \
             call procjob::init() as the first line of main (in a test or bench file, add \
             procjob::test_support!()). Refusing to start workers recursively."
        );
        std::process::exit(101);
    }
}

/// Inputs drawn (and encoded) at a time before the calling thread looks
/// for answers again.
const PULL_CHUNK: usize = 1024;

/// One task, encoded and waiting to be sent.
struct Encoded {
    index: u64,
    input: Payload,
    refs: Vec<ArrayRef>,
    inline: Vec<Array>,
    description: Option<String>,
}

/// When a batch of `tasks` tasks sent at `sent` is late: `tasks` × `limit`
/// later, or never when that is past what `Instant` can hold (a limit of
/// `Duration::MAX` is no limit).
fn batch_deadline(sent: Instant, limit: Duration, tasks: usize) -> Option<Instant> {
    let tasks = u32::try_from(tasks.max(1)).unwrap_or(u32::MAX);
    sent.checked_add(limit.checked_mul(tasks)?)
}

/// A batch a worker is running, kept until it is answered so it can be
/// sent again if the worker dies.
struct InFlight {
    tasks: Vec<TaskId>,
    /// The batch as sent (`Request::Run`), its inputs moved in, not copied.
    request: Request,
    /// Each task's inline arrays, in order.
    inline: Vec<Vec<Array>>,
    sent: Instant,
    deadline: Option<Instant>,
}

impl InFlight {
    /// The files the batch has its worker map, each once.
    fn mapped_files(&self) -> Vec<PathBuf> {
        let Request::Run(batch) = &self.request else { return Vec::new() };
        let mut files: Vec<PathBuf> = Vec::new();
        for r in batch.tasks.iter().flat_map(|t| &t.arrays) {
            if let ArrayRef::File { path, .. } = r {
                if !files.contains(path) {
                    files.push(path.clone());
                }
            }
        }
        files
    }

    /// The bytes of the batch's inline arrays, in order: the frame's bulk.
    fn bulk(&self) -> Vec<&[u8]> {
        self.inline.iter().flatten().map(Array::as_bytes).collect()
    }

    /// The batch's tasks as they were before sending, to queue them again.
    fn into_encoded(self) -> Vec<Encoded> {
        let Request::Run(batch) = self.request else { unreachable!("a batch in flight is a Run request") };
        batch
            .tasks
            .into_iter()
            .zip(self.inline)
            .zip(self.tasks)
            .map(|((r, inline), id)| Encoded {
                index: r.index,
                input: r.input,
                refs: r.arrays,
                inline,
                description: id.description,
            })
            .collect()
    }
}

/// The state of one call. Yields outputs in completion order.
struct Call<'p, T: Task, I: Iterator<Item = T::Input>> {
    parallel: &'p mut Parallel,
    inputs: I,
    call: u64,
    scheduler: Scheduler,
    encoder: CallEncoder,
    /// The buffer inputs are encoded into before each becomes a `Payload`.
    scratch: Vec<u8>,
    queue: VecDeque<Encoded>,
    in_flight: Vec<Option<InFlight>>,
    ready: VecDeque<(u64, T::Output)>,
    failure: Option<Error>,
    /// Times each task was sent again after its worker died.
    attempts: HashMap<u64, u32>,
    /// SIGINT or SIGTERM stopped the call.
    interrupted: bool,
    /// Replacement workers started during the call, and when their
    /// handshake is due.
    joining: Vec<Option<Instant>>,
    /// Tasks sent again because their worker idled out just as they were
    /// sent (a race that costs no retry, once per task).
    resent: std::collections::HashSet<u64>,
    pulled: u64,
    completed: u64,
    started: Instant,
    traffic_before: Traffic,
    finished: bool,
    /// Where output arrays land, for `run_unordered_into`.
    landing: Option<LandingPlan>,
    /// The scheduler's action drawn after a run of sends, to do next.
    next_action: Option<Action>,
}

/// The shared output of a `run_unordered_into` call.
struct LandingPlan {
    file: std::sync::Arc<std::fs::File>,
    out: Array,
    rows_of: Box<dyn FnMut(u64) -> std::ops::Range<usize>>,
}

impl LandingPlan {
    /// The region task `index` lands in.
    fn landing(&mut self, index: u64) -> Result<procjob_worker::array::Landing, String> {
        let rows = (self.rows_of)(index);
        let view = self.out.rows(rows).map_err(|e| format!("output rows for task {index}: {e}"))?;
        let (_, offset, _) = view.file_location().ok_or("the output is not file-backed")?;
        Ok(procjob_worker::array::Landing { file: std::sync::Arc::clone(&self.file), offset, view })
    }
}

impl<T: Task, I: Iterator<Item = T::Input>> Call<'_, T, I> {
    fn pool(&mut self) -> &mut WorkerPool {
        self.parallel.pool.as_mut().expect("the pool exists during a call")
    }

    /// The next completed output, the call's failure, or `None` when done.
    fn next_completed(&mut self) -> Option<Result<(u64, T::Output), Error>> {
        loop {
            if let Some(out) = self.ready.pop_front() {
                return Some(Ok(out));
            }
            if self.finished {
                return None;
            }
            if let (false, Some(signal)) = (self.interrupted, crate::signals::received()) {
                self.interrupt(signal);
                continue;
            }
            match self.next_action.take().unwrap_or_else(|| self.scheduler.next_action()) {
                Action::Pull(n) => {
                    // Draw in chunks, and let an answer that is already
                    // waiting in between: its worker is idle until the
                    // scheduler sees it.
                    if let Some(event) = self.pool().next_event(Some(Duration::ZERO)) {
                        self.on_event(event);
                        continue;
                    }
                    self.pull(n.min(PULL_CHUNK));
                }
                Action::Send { worker, tasks } => {
                    self.stage(worker, tasks);
                    if self.staged_bulk(worker) < crate::pool::CONCURRENT_SEND_BYTES {
                        self.write_one(worker);
                        continue;
                    }
                    // A batch with megabytes of inputs: stage every send the
                    // scheduler has right after it (each to a different
                    // worker, which has one batch at a time), then write
                    // them at once, one thread each, so no worker waits for
                    // another's inputs to be written.
                    let mut staged = vec![worker];
                    let next = loop {
                        match self.scheduler.next_action() {
                            Action::Send { worker, tasks } => {
                                self.stage(worker, tasks);
                                staged.push(worker);
                            }
                            other => break other,
                        }
                    };
                    if staged.len() == 1 {
                        self.write_one(worker);
                    } else {
                        self.write_together(&staged);
                    }
                    // Only Send changes the scheduler; a drawn Pull, Wait or
                    // Done stays valid, unless the call failed meanwhile.
                    self.next_action = self.failure.is_none().then_some(next);
                }
                Action::Wait => self.wait(),
                Action::Done => {
                    self.finish();
                    if let Some(e) = self.failure.take() {
                        return Some(Err(e));
                    }
                }
            }
        }
    }

    fn pull(&mut self, n: usize) {
        let mut got = 0;
        let mut done = false;
        while got < n {
            let Some(input) = self.inputs.next() else {
                done = true;
                break;
            };
            let index = self.pulled;
            self.pulled += 1;
            got += 1;
            let description = T::describe(&input);
            match array::encode_with_buffer(&input, &mut self.encoder, &mut self.scratch) {
                Ok((bytes, refs)) => {
                    let inline = std::mem::take(&mut self.encoder.inline);
                    self.queue.push_back(Encoded { index, input: bytes, refs, inline, description });
                }
                Err(e) => {
                    self.fail(Error::Codec {
                        task: TaskId { index, description },
                        reason: format!("cannot encode the input: {e}"),
                    });
                    return;
                }
            }
        }
        let pool = self.parallel.pool.as_mut().expect("the pool exists during a call");
        self.encoder.allow_folders(pool);
        let (lo, hi) = self.inputs.size_hint();
        let hint = (Some(lo) == hi).then_some(lo);
        self.scheduler.pulled(got, done, hint);
    }

    /// Makes the batch of the next `n` queued tasks for `worker` and puts it
    /// in flight, to be written by [`write_one`](Self::write_one) or
    /// [`write_together`](Self::write_together). A batch whose output
    /// landings cannot be placed fails the call but is still sent, so the
    /// scheduler's count of what is in flight stays true and the call ends.
    fn stage(&mut self, worker: usize, n: usize) {
        let kind = TaskKind { name: T::name().to_string(), entry: entry_offset::<T>() };
        // The encoded inputs move into the request and stay in flight with
        // it: a batch lost to a dead worker may be sent again.
        let (mut ids, mut requests, mut inline) = (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
        for t in self.queue.drain(..n) {
            ids.push(TaskId { index: t.index, description: t.description });
            requests.push(TaskRequest { index: t.index, input: t.input, arrays: t.refs });
            inline.push(t.inline);
        }
        if let Some(plan) = self.landing.as_mut() {
            let pool = self.parallel.pool.as_ref().expect("the pool exists during a call");
            let landings = pool.landings().lock().map_err(|_| Error::Config("landing table poisoned".into()));
            let placed = landings.and_then(|mut landings| {
                ids.iter().try_for_each(|t| {
                    landings.insert(t.index, plan.landing(t.index).map_err(Error::Config)?);
                    Ok(())
                })
            });
            if let Err(e) = placed {
                self.fail(e);
            }
        }
        let sent = Instant::now();
        let deadline = self.parallel.timeout.and_then(|t| batch_deadline(sent, t, ids.len()));
        self.parallel.last.batches += 1;
        let timestamps = self.parallel.trace.is_some();
        let request = Request::Run(Batch { call: self.call, kind, tasks: requests, timestamps });
        self.in_flight[worker] = Some(InFlight { tasks: ids, request, inline, sent, deadline });
    }

    /// The bulk bytes of the batch staged for `worker`.
    fn staged_bulk(&self, worker: usize) -> usize {
        self.in_flight[worker].as_ref().map_or(0, |f| f.inline.iter().flatten().map(Array::nbytes).sum())
    }

    /// Writes the batch staged for `worker` on this thread.
    fn write_one(&mut self, worker: usize) {
        let Some(flight) = self.in_flight[worker].as_ref() else { return };
        let bulk = flight.bulk();
        let start = procjob_worker::clock::monotonic_ns();
        let pool = self.parallel.pool.as_mut().expect("the pool exists during a call");
        let result = pool.send(worker, &flight.request, &bulk);
        self.trace_send(worker, start);
        if let Err(e) = result {
            self.on_send_failed(worker, e);
        }
    }

    /// A batch could not be written to `worker`; whatever happened, it is
    /// no longer in flight, so the call cannot wait for it.
    ///
    /// - The frame could not be made (an input too large for a frame, a
    ///   message that does not encode): nothing reached the worker, which
    ///   stays; the call fails naming the batch's first task.
    /// - The worker has closed its input — its idle timeout passed just
    ///   before the batch went out, or it died: handled as lost
    ///   ([`on_lost`](Self::on_lost)), so a worker that idled out gets the
    ///   batch, which it never read, sent again on a fresh worker, and one
    ///   that died counts against the retries.
    /// - Any other write error may have left part of a frame in the pipe:
    ///   the worker is killed and the call fails.
    fn on_send_failed(&mut self, worker: usize, error: SendError) {
        match error {
            SendError::Unsendable(e) => {
                let Some(flight) = self.in_flight[worker].take() else { return };
                let tasks = flight.tasks.len();
                self.scheduler.handle(Event::BatchDone { worker, tasks, seconds: 0.0 });
                let task = flight.tasks.into_iter().next().expect("a batch has a task");
                let hint = if e.kind() == std::io::ErrorKind::InvalidInput {
                    "; large data travels as procjob::Array, which is memory-mapped above max_nbytes"
                } else {
                    ""
                };
                self.fail(Error::Codec { task, reason: format!("cannot send it to a worker: {e}{hint}") });
            }
            SendError::Broken(_) if self.pool().input_closed(worker) => self.on_lost(worker, None),
            SendError::Broken(e) => {
                self.in_flight[worker] = None;
                self.pool().kill(worker);
                self.scheduler.handle(Event::WorkerLost { worker });
                self.fail(e);
            }
        }
    }

    /// Writes the batches staged for `workers` (all different) at once, one
    /// thread each. Every one is written even if another fails.
    fn write_together(&mut self, workers: &[usize]) {
        let start = procjob_worker::clock::monotonic_ns();
        let results: Vec<(usize, Result<u64, SendError>)> = {
            let flights: Vec<(usize, &InFlight)> =
                workers.iter().filter_map(|&w| self.in_flight[w].as_ref().map(|f| (w, f))).collect();
            let bulks: Vec<Vec<&[u8]>> = flights.iter().map(|(_, f)| f.bulk()).collect();
            let frames: Vec<(usize, &Request, &[&[u8]])> =
                flights.iter().zip(&bulks).map(|((w, f), bulk)| (*w, &f.request, bulk.as_slice())).collect();
            let pool = self.parallel.pool.as_mut().expect("the pool exists during a call");
            frames.iter().map(|(w, _, _)| *w).zip(pool.send_many(&frames)).collect()
        };
        for &w in workers {
            self.trace_send(w, start);
        }
        for (w, result) in results {
            if let Err(e) = result {
                self.on_send_failed(w, e);
            }
        }
    }

    /// Records, when tracing, that the batch in flight on `worker` was
    /// written from `start` until now.
    fn trace_send(&mut self, worker: usize, start: u64) {
        let (Some(trace), Some(flight)) = (self.parallel.trace.as_mut(), self.in_flight[worker].as_ref()) else {
            return;
        };
        let ids = &flight.tasks;
        let what = match (ids.first(), ids.last()) {
            (Some(a), Some(b)) if ids.len() > 1 => format!("send tasks {}..={} to worker {worker}", a.index, b.index),
            (Some(a), _) => format!("send {a} to worker {worker}"),
            _ => format!("send to worker {worker}"),
        };
        trace.span(Lane::Coordinator, "send", what, start, procjob_worker::clock::monotonic_ns());
    }

    fn wait(&mut self) {
        let now = Instant::now();
        let deadline = self
            .in_flight
            .iter()
            .flatten()
            .filter_map(|f| f.deadline)
            .chain(self.joining.iter().flatten().copied())
            .min();
        let event = self.pool().next_event(deadline.map(|d| d.saturating_duration_since(now)));
        match event {
            Some(event) => self.on_event(event),
            None => self.on_deadline(),
        }
    }

    fn on_deadline(&mut self) {
        let now = Instant::now();
        for w in 0..self.joining.len() {
            if self.joining[w].is_some_and(|d| d <= now) {
                self.joining[w] = None;
                self.pool().kill(w);
                self.fail(Error::Start {
                    index: w,
                    reason: format!(
                        "a replacement worker did not answer its handshake within {} s",
                        crate::pool::HANDSHAKE_TIMEOUT.as_secs()
                    ),
                });
            }
        }
        // Judge the deadlines on what has arrived: answers already read, and
        // answers waiting in a pipe. When the coordinator itself was not
        // running (stopped, or starved of CPU), the workers may have
        // answered long ago.
        while let Some(event) = self.pool().next_event(Some(Duration::ZERO)) {
            self.on_event(event);
        }
        let now = Instant::now();
        let expired: Vec<usize> = (0..self.in_flight.len())
            .filter(|&w| self.in_flight[w].as_ref().and_then(|f| f.deadline).is_some_and(|d| d <= now))
            .collect();
        let limit = self.parallel.timeout.unwrap_or_default();
        for w in expired {
            if self.pool().reply_arriving(w) {
                // The worker has finished and is answering: give the answer
                // time to be read, without killing it for our own delay.
                if let Some(flight) = self.in_flight[w].as_mut() {
                    flight.deadline = batch_deadline(now, limit, 1);
                }
                continue;
            }
            let flight = self.in_flight[w].take().expect("expired batches are in flight");
            let worker = self.pool().worker_id(w);
            self.pool().kill(w);
            self.scheduler.handle(Event::WorkerLost { worker: w });
            let task = flight.tasks.into_iter().next().expect("a batch has a task");
            self.fail(Error::Timeout { task, worker, limit });
        }
    }

    fn on_event(&mut self, event: PoolEvent) {
        let w = event.index;
        match event.event {
            WorkerEvent::Results { results, arrays, arrived_ns, read_ns, .. } => {
                let Some(flight) = self.in_flight[w].take() else { return };
                if let Some(trace) = self.parallel.trace.as_mut() {
                    let pid = self.parallel.pool.as_ref().and_then(|p| p.pid(w)).unwrap_or(0);
                    let lane = Lane::Worker { index: w, pid };
                    trace.span(lane, "map", "receive and map", results.received_ns, results.mapped_ns);
                    for (reply, task) in results.tasks.iter().zip(&flight.tasks) {
                        trace.span(lane, "compute", format!("compute {task}"), reply.started_ns, reply.finished_ns);
                    }
                    trace.span(lane, "reply", "send results", results.replying_ns, arrived_ns);
                    trace.span(Lane::Coordinator, "stack", format!("receive from worker {w}"), arrived_ns, read_ns);
                }
                let seconds = flight.sent.elapsed().as_secs_f64();
                self.scheduler.handle(Event::BatchDone { worker: w, tasks: flight.tasks.len(), seconds });
                let n = results.tasks.len() as u64;
                self.pool().record_batch(w, n, results.memory);
                let worker = self.pool().worker_id(w);
                let mut arrays = arrays.into_iter();
                let mut panicked = false;
                for (reply, task) in results.tasks.into_iter().zip(flight.tasks) {
                    self.completed += 1;
                    match reply.outcome {
                        Outcome::Ok { output, arrays: refs } => {
                            let mine: Result<Vec<Array>, _> = match refs.len() {
                                0 => Ok(Vec::new()),
                                n => arrays.by_ref().take(n).collect(),
                            };
                            let decoded = mine
                                .map_err(|e| e.to_string())
                                .and_then(|a| array::decode_with::<T::Output>(&output, a).map_err(|e| e.to_string()));
                            match decoded {
                                Ok(out) if self.failure.is_none() => self.ready.push_back((reply.index, out)),
                                Ok(_) => {}
                                Err(reason) => self
                                    .fail(Error::Codec { task, reason: format!("cannot decode the output: {reason}") }),
                            }
                        }
                        Outcome::Failed(failure) => {
                            panicked |= failure.cause == FailureCause::Panic;
                            self.fail(Error::Task { task, worker, failure: Box::new(failure) });
                        }
                    }
                }
                if panicked {
                    // A panic may have left the worker's state half-updated:
                    // replace it. The other workers keep serving.
                    self.pool().reap(w); // closes its input: an idle worker exits at once
                    self.scheduler.handle(Event::WorkerLost { worker: w });
                }
                self.report_progress();
            }
            WorkerEvent::Lost { error } => self.on_lost(w, error),
            WorkerEvent::Ready(ready) => {
                self.joining[w] = None;
                if ready.protocol != procjob_worker::protocol::PROTOCOL_VERSION {
                    self.pool().kill(w);
                    self.fail(Error::Start {
                        index: w,
                        reason: format!(
                            "protocol version mismatch: coordinator speaks {}, worker {}",
                            procjob_worker::protocol::PROTOCOL_VERSION,
                            ready.protocol
                        ),
                    });
                    return;
                }
                self.pool().mark_ready(w, &ready);
                self.scheduler.handle(Event::WorkerJoined { worker: w });
            }
            WorkerEvent::Interrupted { signal } => self.interrupt(signal),
        }
    }

    /// A worker's stream ended: it died, or broke the protocol.
    fn on_lost(&mut self, w: usize, error: Option<String>) {
        let flight = self.in_flight[w].take();
        let worker = self.pool().worker_id(w);
        let exit = self.pool().reap(w);
        self.scheduler.handle(Event::WorkerLost { worker: w });
        if self.joining[w].take().is_some() {
            // A replacement died before its handshake: starting another
            // would likely fail the same way, forever.
            let reexec = self.parallel.program.is_none() && matches!(self.parallel.start_method, StartMethod::Spawn);
            self.fail(Error::Start { index: w, reason: crate::pool::start_failure(exit, error, reexec) });
            return;
        }
        let Some(flight) = flight else {
            // Died while idle (killed from outside, or its idle timeout):
            // start another, unless the call is failing anyway.
            if self.failure.is_none() {
                self.replace(w);
            }
            return;
        };
        let died = error.is_none() || matches!(exit, crate::error::WorkerExit::Signaled { .. });
        // A worker exits 0 only when its input closes or its idle timeout
        // passes; with a batch in flight, that is the idle timeout racing our
        // send. Send the batch again, once per task, without using a retry.
        let idled_out = error.is_none() && exit == crate::error::WorkerExit::Exited { code: 0 };
        if idled_out && self.failure.is_none() && flight.tasks.iter().all(|t| !self.resent.contains(&t.index)) {
            self.resent.extend(flight.tasks.iter().map(|t| t.index));
            self.send_again(w, flight.into_encoded());
            return;
        }
        let retries = self.parallel.retries;
        let retryable = died
            && self.failure.is_none()
            && !self.scheduler.is_draining()
            && flight.tasks.iter().all(|t| self.attempts.get(&t.index).copied().unwrap_or(0) < retries);
        if retryable {
            for t in &flight.tasks {
                *self.attempts.entry(t.index).or_default() += 1;
            }
            self.parallel.last.retried += flight.tasks.len() as u64;
            self.send_again(w, flight.into_encoded());
            return;
        }
        match error {
            Some(reason) if !died => {
                // Keep how it ended too: a worker that wrote a bad frame
                // usually says why on stderr and exits with a code.
                self.fail(Error::Transport { worker, reason: format!("{reason} (the worker then {exit})") })
            }
            _ => {
                let mapped = flight.mapped_files();
                self.fail(Error::WorkerDied { worker, exit, tasks: flight.tasks, mapped })
            }
        }
    }

    /// Puts a lost batch back at the front of the queue and starts a fresh
    /// worker in its slot `w`.
    fn send_again(&mut self, w: usize, encoded: Vec<Encoded>) {
        let n = encoded.len();
        for t in encoded.into_iter().rev() {
            self.queue.push_front(t);
        }
        self.scheduler.requeued(n);
        self.replace(w);
    }

    /// Starts a fresh worker in slot `w`; it joins when its handshake arrives.
    fn replace(&mut self, w: usize) {
        self.parallel.last.replaced_workers += 1;
        match self.pool().start(w) {
            Ok(()) => self.joining[w] = Some(Instant::now() + crate::pool::HANDSHAKE_TIMEOUT),
            Err(e) => self.fail(e),
        }
    }

    /// SIGINT or SIGTERM: stop every worker now (input closed, a short
    /// grace period, then SIGKILL), and fail the call without waiting for
    /// running batches.
    fn interrupt(&mut self, signal: nix::sys::signal::Signal) {
        if self.interrupted {
            return;
        }
        self.interrupted = true;
        self.pool().shutdown(crate::pool::INTERRUPT_GRACE);
        for w in 0..self.in_flight.len() {
            self.in_flight[w] = None;
            self.scheduler.handle(Event::WorkerLost { worker: w });
        }
        self.failure = Some(Error::Interrupted { signal });
        self.scheduler.drain();
        self.queue.clear();
    }

    fn report_progress(&mut self) {
        let total = match self.inputs.size_hint() {
            (lo, Some(hi)) if lo == hi => Some(self.pulled + lo as u64),
            _ => None,
        };
        let p = Progress { completed: self.completed, submitted: self.pulled, total, elapsed: self.started.elapsed() };
        if let Some(cb) = self.parallel.progress.as_mut() {
            cb(&p);
        }
    }

    fn fail(&mut self, error: Error) {
        if self.failure.is_none() {
            self.failure = Some(error);
        }
        self.scheduler.drain();
        self.queue.clear();
    }

    fn finish(&mut self) {
        if self.finished {
            return;
        }
        self.finished = true;
        let after = self.pool().traffic();
        let before = self.traffic_before;
        let stats = &mut self.parallel.last;
        stats.traffic = Traffic {
            bytes_to_workers: after.bytes_to_workers - before.bytes_to_workers,
            bytes_from_workers: after.bytes_from_workers - before.bytes_from_workers,
            frames_to_workers: after.frames_to_workers - before.frames_to_workers,
            frames_from_workers: after.frames_from_workers - before.frames_from_workers,
        };
        stats.dumped_arrays = self.encoder.dumped.len() as u64;
        stats.dumped_bytes = self.encoder.dumped_bytes;
        // Dumped files go with the call, and so do unused landings.
        if let Ok(mut l) = self.pool().landings().lock() {
            l.clear();
        }
        self.encoder.dumped.clear();
        self.encoder.folder = None;
    }
}

impl<T: Task, I: Iterator<Item = T::Input>> Drop for Call<'_, T, I> {
    /// A call dropped before its end awaits its running batches, so the
    /// workers are idle and in step for the next call.
    fn drop(&mut self) {
        if !self.finished {
            self.scheduler.drain();
            self.queue.clear();
            while self.in_flight.iter().any(Option::is_some) {
                self.wait();
            }
            self.finish();
        }
    }
}

/// Outputs in input order (from [`Parallel::run_iter`]).
pub struct Ordered<'p, T: Task, I: Iterator<Item = T::Input>> {
    call: Call<'p, T, I>,
    next: u64,
    buffer: BTreeMap<u64, T::Output>,
}

impl<T: Task, I: Iterator<Item = T::Input>> Iterator for Ordered<'_, T, I> {
    type Item = Result<T::Output, Error>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(out) = self.buffer.remove(&self.next) {
                self.next += 1;
                return Some(Ok(out));
            }
            match self.call.next_completed()? {
                Ok((index, out)) => {
                    self.buffer.insert(index, out);
                }
                Err(e) => return Some(Err(e)),
            }
        }
    }
}

/// `(input index, output)` in completion order (from [`Parallel::run_unordered`]).
pub struct Unordered<'p, T: Task, I: Iterator<Item = T::Input>> {
    call: Call<'p, T, I>,
}

impl<T: Task, I: Iterator<Item = T::Input>> Iterator for Unordered<'_, T, I> {
    type Item = Result<(u64, T::Output), Error>;

    fn next(&mut self) -> Option<Self::Item> {
        self.call.next_completed()
    }
}

/// Decides how each array of a call travels: mapped arrays by reference,
/// owned arrays above `max_nbytes` dumped once and then by reference, the
/// rest inline.
struct CallEncoder {
    max_nbytes: Option<usize>,
    mmap_mode: Access,
    temp_parent: Option<PathBuf>,
    folder: Option<RunFolder>,
    /// Storage id → (dump file, data offset, the array kept alive so its
    /// id is not reused during the call).
    dumped: HashMap<usize, (PathBuf, u64, Array)>,
    dumped_bytes: u64,
    inline: Vec<Array>,
    /// Storage ids of the arrays forked workers inherited, by index.
    inherited: Vec<usize>,
    /// The run folder's canonical path, once made.
    folder_path: Option<PathBuf>,
    /// The folders of the files this call refers to (canonical), each
    /// once, in order; the first `folders_allowed` were handed to the pool.
    folders: Vec<PathBuf>,
    folders_allowed: usize,
}

impl CallEncoder {
    fn new(max_nbytes: Option<usize>, mmap_mode: Access, temp_parent: Option<PathBuf>) -> CallEncoder {
        CallEncoder {
            max_nbytes,
            mmap_mode,
            temp_parent,
            folder: None,
            dumped: HashMap::new(),
            dumped_bytes: 0,
            inline: Vec::new(),
            inherited: Vec::new(),
            folder_path: None,
            folders: Vec::new(),
            folders_allowed: 0,
        }
    }

    /// Notes the folder of a file reference, which workers must be allowed
    /// to map from (see [`procjob_worker::confine`]). The path is canonical:
    /// `Array::open_npy`/`create_npy` and the run folder make it so.
    fn note_folder(&mut self, r: &ArrayRef) {
        let ArrayRef::File { path, .. } = r else { return };
        let Some(folder) = path.parent() else { return };
        if !self.folders.iter().any(|f| f == folder) {
            self.folders.push(folder.to_path_buf());
        }
    }

    /// Hands the folders noted since the last time to the pool, which tells
    /// each worker once.
    fn allow_folders(&mut self, pool: &mut WorkerPool) {
        for folder in &self.folders[self.folders_allowed..] {
            pool.allow_folder(folder.clone());
        }
        self.folders_allowed = self.folders.len();
    }

    /// Dumps the whole storage of `a` (once per call) and returns the file
    /// and the byte offset of its data.
    fn dump(&mut self, a: &Array) -> Result<(PathBuf, u64), String> {
        if let Some((path, data_offset, _)) = self.dumped.get(&a.storage_id()) {
            return Ok((path.clone(), *data_offset));
        }
        let (bytes, _) = a.storage_bytes();
        if self.folder.is_none() {
            let folder =
                RunFolder::create(self.temp_parent.as_deref(), bytes.len() as u64).map_err(|e| e.to_string())?;
            // Workers follow no symbolic link below the folders they are
            // given, and compare paths with them: name it canonically.
            let canonical = std::fs::canonicalize(folder.path())
                .map_err(|e| format!("cannot resolve the run folder {}: {e}", folder.path().display()))?;
            self.folder = Some(folder);
            self.folder_path = Some(canonical);
        }
        let folder = self.folder_path.as_ref().expect("just made");
        let path = folder.join(format!("arg-{}.npy", self.dumped.len()));
        let elements = bytes.len() / a.dtype().size();
        let header = procjob_worker::npy::write(&path, a.dtype(), &[elements], bytes).map_err(|e| e.to_string())?;
        self.dumped_bytes += bytes.len() as u64;
        let data_offset = header.data_offset as u64;
        self.dumped.insert(a.storage_id(), (path.clone(), data_offset, a.clone()));
        Ok((path, data_offset))
    }
}

impl ArrayEncoder for CallEncoder {
    fn encode(&mut self, a: &Array) -> Result<ArrayRef, String> {
        if let Some(index) = self.inherited.iter().position(|&id| id == a.storage_id()) {
            return Ok(ArrayRef::Inherited {
                dtype: a.dtype(),
                shape: a.shape().iter().map(|&d| d as u64).collect(),
                index: index as u32,
                offset: a.storage_bytes().1 as u64,
            });
        }
        if let Some(r) = array::file_ref(a) {
            self.note_folder(&r);
            return Ok(r);
        }
        if self.max_nbytes.is_some_and(|max| a.nbytes() > max) {
            let (path, data_offset) = self.dump(a)?;
            let (_, view_offset) = a.storage_bytes();
            let r = ArrayRef::File {
                dtype: a.dtype(),
                shape: a.shape().iter().map(|&d| d as u64).collect(),
                path,
                offset: data_offset + view_offset as u64,
                access: self.mmap_mode,
            };
            self.note_folder(&r);
            return Ok(r);
        }
        self.inline.push(a.clone());
        Ok(array::inline_ref(a))
    }
}
