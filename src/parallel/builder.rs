//! [`Parallel`], the object a user configures and calls: its settings
//! (n_jobs, max_nbytes, mmap_mode, batch size, timeouts, retries, …), the
//! warm pool it keeps between calls, and what the last call did
//! ([`CallStats`]). A call itself runs in [`super::call`].

use std::path::PathBuf;
use std::time::{Duration, Instant};

use procjob_worker::protocol::Access;
use procjob_worker::{Array, Task};

use super::call::LandingPlan;
use super::encoder::DumpCache;
use super::env::{BadVariable, EnvDefaults, Setting};
use super::iter::{Ordered, Unordered};
use super::shell::Call;
use crate::error::Error;
use crate::pool::{PoolConfig, StartMethod, Traffic, WorkerPool, WorkerReport};
use crate::scheduler::{BatchSize, PreDispatch};
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

/// What the last call did, for reports and tests. Built by procjob only
/// (`CallStats::default()` for a blank one): fields may be added.
#[derive(Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
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
    /// Each worker death whose tasks were sent again, one entry per death
    /// (it may name several tasks), in order: the message the call would
    /// have failed with without retries ("worker 1 (pid 4711) was killed by
    /// SIGKILL while running task 1 …"). Kept if the call fails later.
    pub lost: Vec<String>,
    /// Workers started during the call to replace dead ones, and those
    /// retired after a panic.
    pub replaced_workers: u64,
    /// The call ran its tasks in the calling process, with no worker
    /// ([`Parallel::runs_in_process`]): nothing crossed a pipe or was
    /// dumped.
    pub in_process: bool,
}

/// The progress callback kept by a [`Parallel`]: `Send`, as `Parallel` is.
pub(super) type ProgressFn = Box<dyn FnMut(&Progress) + Send>;

/// A progress callback given for one call: it may borrow the caller's
/// locals, and need not be `Send`.
pub(super) type CallProgress<'p> = Option<&'p mut dyn FnMut(&Progress)>;

/// Runs tasks on a pool of worker processes, like joblib's `Parallel`.
///
/// Settings mirror joblib's where they make sense; see docs/joblib.md for
/// the full mapping. The pool is started on the first call and kept warm
/// for the next ones until [`Parallel`] is dropped, or until its workers
/// have been idle for [`idle_timeout`](Parallel::idle_timeout).
///
/// A `Parallel` is `Send`: it may be made on one thread and used (with its
/// warm pool) on another. Its calls take `&mut self`, so it serves one call
/// at a time.
pub struct Parallel {
    /// joblib's `n_jobs`, as given (resolved by [`resolve_n_jobs`]).
    pub(super) n_jobs: i64,
    /// Arrays above this many bytes are dumped and mapped (`None`: never).
    pub(super) max_nbytes: Option<usize>,
    /// How workers map dumped arrays.
    pub(super) mmap_mode: Access,
    /// Parent of the call's run folder, when not the default.
    pub(super) temp_folder: Option<PathBuf>,
    /// Tasks per batch.
    pub(super) batch_size: BatchSize,
    /// Batches drawn ahead of the workers (`None`: 2 × n_jobs).
    pub(super) pre_dispatch: Option<PreDispatch>,
    /// Per-task time limit.
    pub(super) timeout: Option<Duration>,
    /// Times a task lost to a dead worker is run again.
    pub(super) retries: u32,
    /// How long an idle worker waits for work before exiting.
    pub(super) idle_timeout: Option<Duration>,
    /// Called after each batch completes.
    pub(super) progress: Option<ProgressFn>,
    /// The worker executable, when not this one.
    pub(super) program: Option<PathBuf>,
    /// How workers start.
    pub(super) start_method: StartMethod,
    /// The warm pool, kept between calls.
    pub(super) pool: Option<WorkerPool>,
    /// Calls made so far (each batch names its call).
    pub(super) calls: u64,
    /// What the last call did.
    pub(super) last: CallStats,
    /// The timeline, when tracing.
    pub(super) trace: Option<Trace>,
    /// Whether calls run in this process (`None`: when there is one
    /// worker, see [`Parallel::runs_in_process`]).
    pub(super) in_process: Option<bool>,
    /// joblib's `verbose`: progress messages on stderr.
    pub(super) verbose: u32,
    /// Environment variables read by [`Parallel::new`] whose values cannot
    /// be used (and were not overridden by a setting).
    pub(super) bad_env: Vec<BadVariable>,
    /// Arrays dumped by earlier calls, reused while unchanged.
    pub(super) dumps: DumpCache,
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
            .field("in_process", &self.in_process)
            .field("verbose", &self.verbose)
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
    ///
    /// Like joblib's `parallel_config`, the environment may change two
    /// defaults, read here: `PROCJOB_N_JOBS` (an integer, or `None` for
    /// the default) and `PROCJOB_MAX_NBYTES` (bytes, or joblib's forms
    /// `100K`, `1M`, `2G`, or `None` to never dump). A setting made on the
    /// builder wins over its variable. A variable set to a value that
    /// cannot be used is not an error here (`new` cannot fail): the first
    /// call, and [`workers`](Parallel::workers) and
    /// [`start`](Parallel::start), return [`Error::Config`] naming the
    /// variable and its value, unless the setting was made on the builder.
    /// The parent of the temp folder, `PROCJOB_TEMP_FOLDER`, is checked at
    /// the start of each call on workers (see [`temp_folder`](Parallel::temp_folder)).
    pub fn new() -> Parallel {
        let env = EnvDefaults::read();
        Parallel {
            n_jobs: env.n_jobs.unwrap_or(-1),
            max_nbytes: env.max_nbytes.unwrap_or(Some(DEFAULT_MAX_NBYTES)),
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
            in_process: None,
            verbose: 0,
            bad_env: env.bad,
            dumps: DumpCache::default(),
        }
    }

    /// Forgets a bad environment variable for `setting`, set explicitly.
    fn overridden(&mut self, setting: Setting) {
        self.bad_env.retain(|b| b.setting != setting);
    }

    /// The error for the first environment variable (of `setting`, or of
    /// any) whose value cannot be used.
    fn check_env(&self, setting: Option<Setting>) -> Result<(), Error> {
        match self.bad_env.iter().find(|b| setting.is_none_or(|s| b.setting == s)) {
            Some(b) => {
                Err(Error::Config(format!("{}; fix or unset the variable, or make the setting on Parallel", b.message)))
            }
            None => Ok(()),
        }
    }

    /// Checks the folder `PROCJOB_TEMP_FOLDER` names, when it is set and no
    /// [`temp_folder`](Parallel::temp_folder) was given: at the start of a
    /// call on workers, which may dump arrays there, rather than at its
    /// first dump (where the reason would be lost in the input's encoding).
    pub(super) fn check_temp_folder(&self) -> Result<(), Error> {
        let set = std::env::var_os(crate::run_folder::TEMP_FOLDER_ENV).is_some_and(|v| !v.is_empty());
        if self.temp_folder.is_none() && set {
            crate::run_folder::choose_parent(None, 0)?;
        }
        Ok(())
    }

    /// Runs the tasks of each call in the calling process (`true`), one
    /// after another, or always on worker processes (`false`). By default
    /// a call runs in the calling process when it would have a single
    /// worker (`n_jobs(1)`, or -1 on a machine with one CPU), as joblib
    /// does with `n_jobs=1`, unless a [`timeout`](Parallel::timeout) (which
    /// needs a worker it can kill) or a
    /// [`worker_program`](Parallel::worker_program) is set; `in_process(false)`
    /// keeps one worker process for `n_jobs(1)`. See
    /// [`runs_in_process`](Parallel::runs_in_process) for what differs.
    pub fn in_process(mut self, on: bool) -> Parallel {
        self.in_process = Some(on);
        self
    }

    /// Whether the next call runs its tasks in this process rather than on
    /// worker processes: as [`in_process`](Parallel::in_process) says, and
    /// always inside a task that runs in a worker (a nested call runs
    /// sequentially in that worker, as joblib's nested calls do).
    ///
    /// In this process, the tasks run one after another on the calling
    /// thread, through the same code a worker runs: outputs, errors and
    /// panics come back as from a worker (a panic is caught, and the
    /// [`Error::Task`] names the task and, as its worker, index 0 with this
    /// process's pid). Its message and location are taken by a panic hook
    /// installed at the first such call, which hands every other panic to
    /// the hook that was there before; a hook set after it takes its place,
    /// and such panics then come back with their message only. No worker starts, nothing is dumped or sent
    /// ([`CallStats::in_process`]), and [`worker_pids`](Parallel::worker_pids)
    /// stays as it was. Arrays are handed to the task as a worker would see
    /// them, without copying what a worker could not write (see
    /// docs/joblib.md). A timeout is not enforced there, and a task that
    /// crashes takes the caller with it.
    pub fn runs_in_process(&self) -> Result<bool, Error> {
        refuse_recursive_spawn();
        self.check_env(None)?;
        let workers = self.workers()?;
        if crate::pool::serving_as_worker() {
            return Ok(true);
        }
        Ok(self.in_process.unwrap_or(workers == 1 && self.timeout.is_none() && self.program.is_none()))
    }

    /// joblib's `verbose`: progress messages on stderr, such as
    /// `[Parallel(n_jobs=2)]: Done  40 out of 200 tasks | elapsed:    1.2s`.
    /// 0 (the default) writes nothing. From 1 to 9, on a terminal, one line
    /// with a bar is rewritten in place as batches complete, and ends with
    /// `finished`; when stderr is not a terminal nothing is written. From
    /// 10 up, plain lines are written, one per batch completed and one at
    /// the end, terminal or not (for logs).
    pub fn verbose(mut self, level: u32) -> Parallel {
        self.verbose = level;
        self
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
    /// from the CPUs this process may use (-1 = all), or under MPI from the
    /// CPUs of every node of the job ([`crate::cluster::job_cpus`]); 0 is an
    /// error at the first call. Changing it restarts the pool.
    pub fn n_jobs(mut self, n_jobs: i64) -> Parallel {
        if n_jobs != self.n_jobs {
            self.pool = None;
        }
        self.n_jobs = n_jobs;
        self.overridden(Setting::NJobs);
        self
    }

    /// Arrays larger than this many bytes are dumped once per call to the
    /// temp folder and travel as memory maps; smaller ones travel inline.
    /// `None` sends every array inline (joblib's `max_nbytes=None`).
    /// Default 1 MiB (joblib's `'1M'`), or `PROCJOB_MAX_NBYTES`.
    pub fn max_nbytes(mut self, max_nbytes: Option<usize>) -> Parallel {
        self.max_nbytes = max_nbytes;
        self.overridden(Setting::MaxNbytes);
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
    /// the system temp dir. A folder the variable names that cannot be used
    /// fails each call on workers (not one that
    /// [runs in this process](Parallel::runs_in_process), which dumps
    /// nothing) at its start, with an error naming the variable.
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

    /// Called after each batch of every call completes, on the calling
    /// thread. The callback is kept with the `Parallel`, so it must be
    /// `Send + 'static`; to update a local counter, give a callback to one
    /// call with [`run_with_progress`](Parallel::run_with_progress).
    pub fn progress(mut self, callback: impl FnMut(&Progress) + Send + 'static) -> Parallel {
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

    /// The number of workers calls will use (`n_jobs` resolved; a call that
    /// [runs in process](Parallel::runs_in_process) starts none).
    pub fn workers(&self) -> Result<usize, Error> {
        self.check_env(Some(Setting::NJobs))?;
        // Counting the CPUs reads cgroup files (tens of µs): only when asked.
        // Under MPI, the CPUs of every node of the job.
        let cpus = if self.n_jobs < 0 { crate::pool::cluster::job_cpus() } else { 0 };
        resolve_n_jobs(self.n_jobs, cpus)
    }

    /// The pids of the running workers, in slot order (empty before the
    /// first call); never 0, so each is safe to pass to `kill`.
    ///
    /// A worker that panicked is retired and its replacement started at
    /// once, so after a call that failed with a panic the list holds the
    /// replacement's pid in its slot. A slot whose worker was lost otherwise
    /// (killed by a timeout, died without retries left, or killed because
    /// the stream of its call was dropped mid-task) stays empty until the
    /// next call starts a worker in it, and is left out meanwhile: the list
    /// may then be shorter than [`workers`](Parallel::workers).
    /// [`worker_reports`](Parallel::worker_reports) always has one entry per
    /// slot.
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
    /// how long that took; starts none when calls
    /// [run in this process](Parallel::runs_in_process).
    pub fn start(&mut self) -> Result<Duration, Error> {
        let t = Instant::now();
        if self.runs_in_process()? {
            return Ok(Duration::ZERO);
        }
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

    /// The pool, started (or restarted, when `n_jobs` changed) if need be.
    pub(super) fn pool_mut(&mut self) -> Result<&mut WorkerPool, Error> {
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
        let inputs = inputs.into_iter();
        let capacity = inputs.size_hint().0;
        collect_in_order(Call::<T, I::IntoIter>::start(self, inputs, None)?, capacity)
    }

    /// Runs task `T` on every input like [`run`](Parallel::run), calling
    /// `progress` after each batch completes, on the calling thread, instead
    /// of the callback set with [`progress`](Parallel::progress). The
    /// callback lives only for this call: it may borrow the caller's locals
    /// (update a counter, feed a progress bar) and need not be `Send`.
    ///
    /// ```
    /// # use procjob::{Parallel, Task};
    /// # struct Square;
    /// # impl Task for Square {
    /// #     type Input = u64;
    /// #     type Output = u64;
    /// #     type Error = String;
    /// #     fn run(x: u64) -> Result<u64, String> { Ok(x * x) }
    /// # }
    /// # fn main() -> Result<(), procjob::Error> {
    /// # procjob::init();
    /// let mut done = 0;
    /// let squares = Parallel::new().n_jobs(2).run_with_progress::<Square, _>(0..10u64, |p| done = p.completed)?;
    /// assert_eq!((squares.len(), done), (10, 10));
    /// # Ok(())
    /// # }
    /// ```
    pub fn run_with_progress<T: Task, I>(
        &mut self,
        inputs: I,
        mut progress: impl FnMut(&Progress),
    ) -> Result<Vec<T::Output>, Error>
    where
        I: IntoIterator<Item = T::Input>,
    {
        let inputs = inputs.into_iter();
        let capacity = inputs.size_hint().0;
        collect_in_order(Call::<T, I::IntoIter>::start(self, inputs, Some(&mut progress))?, capacity)
    }

    /// Runs task `T` on every input, yielding outputs in input order as
    /// they become available.
    ///
    /// Dropping the stream before its end stops the call at once: inputs
    /// not yet sent are discarded, and the workers running its tasks are
    /// killed (their outputs would never be read), not awaited. The next
    /// call starts fresh workers in their slots; idle workers stay warm.
    pub fn run_iter<T: Task, I>(&mut self, inputs: I) -> Result<Ordered<'_, T, I::IntoIter>, Error>
    where
        I: IntoIterator<Item = T::Input>,
    {
        Ok(Ordered::new(self.call::<T, I>(inputs)?))
    }

    /// Runs task `T` on every input, yielding `(input index, output)` in
    /// the order tasks complete.
    ///
    /// Dropping the stream before its end stops the call at once: inputs
    /// not yet sent are discarded, and the workers running its tasks are
    /// killed (their outputs would never be read), not awaited. The next
    /// call starts fresh workers in their slots; idle workers stay warm.
    pub fn run_unordered<T: Task, I>(&mut self, inputs: I) -> Result<Unordered<'_, T, I::IntoIter>, Error>
    where
        I: IntoIterator<Item = T::Input>,
    {
        Ok(Unordered::new(self.call::<T, I>(inputs)?))
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
    /// is received as usual instead. Dropping the stream early stops the
    /// call as with [`run_unordered`](Parallel::run_unordered): rows whose
    /// tasks were running are left as they were, or partly written.
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
            Some(Err(e)) => return Err(Error::System { what: "open the output array's file".into(), source: e }),
            None => {
                return Err(Error::Config(
                    "run_unordered_into needs a read-write file-backed output (Array::create_npy)".into(),
                ))
            }
        };
        let mut call = self.call::<T, I>(inputs)?;
        call.land_outputs(LandingPlan { file, out: out.clone(), rows_of: Box::new(rows_of) });
        Ok(Unordered::new(call))
    }

    /// Starts a call of task `T` on `inputs`.
    fn call<T: Task, I>(&mut self, inputs: I) -> Result<Call<'_, T, I::IntoIter>, Error>
    where
        I: IntoIterator<Item = T::Input>,
    {
        Call::start(self, inputs.into_iter(), None)
    }
}

/// Reads `call` to its end and returns its outputs in input order, or its
/// failure. Completion order, placed by index: no reordering buffer. Sized
/// up front (`capacity`, when the input says how long it is), so the slots
/// are not reallocated (and their pages faulted in again) as they fill.
fn collect_in_order<T: Task, I: Iterator<Item = T::Input>>(
    mut call: Call<'_, T, I>,
    capacity: usize,
) -> Result<Vec<T::Output>, Error> {
    let mut out: Vec<Option<T::Output>> = Vec::with_capacity(capacity);
    while let Some(result) = call.next_completed() {
        let (index, output) = result?;
        let index = index as usize;
        if index >= out.len() {
            out.resize_with(index + 1, || None);
        }
        out[index] = Some(output);
    }
    Ok(out.into_iter().map(|o| o.expect("every task of a successful call has an output")).collect())
}

/// A worker in the pool was asked to start more workers outside a task:
/// its `main` did not call `procjob::init()` (a call inside a task runs in
/// that worker, [`Parallel::runs_in_process`]). Fail loudly instead of
/// recursing.
fn refuse_recursive_spawn() {
    if procjob_worker::serve::is_worker_process() && !crate::pool::serving_as_worker() {
        say!(
            "procjob: this process was started as a procjob worker, but it did not become one: \
             call procjob::init() as the first line of main (in a test or bench file, add \
             procjob::test_support!() at the top level of the file). Refusing to start workers recursively."
        );
        std::process::exit(101);
    }
}
