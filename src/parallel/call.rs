//! The call core: the state machine of one call around the [`Scheduler`]
//! and the [`WorkerPool`], with no task type in it.
//!
//! It works on tasks already encoded (payload bytes and array references,
//! see [`Encoded`]) and hands encoded outcomes (output bytes and arrays) to
//! the typed shell by task index, through [`TaskCodec`]. So this code is
//! compiled once, not once per task type; [`super::shell::Call`] is the thin
//! generic part. The core's rooms:
//!
//! - here: starting a call, the driving loop, drawing inputs, failing and
//!   finishing;
//! - [`batch`]: a task encoded and queued, a batch in flight, its deadline,
//!   where its outputs land;
//! - [`send`]: staging batches and writing them to the workers;
//! - [`retries`]: the second chances of tasks lost with their worker;
//! - [`receive`]: waiting, replies, deadlines, lost workers, retries,
//!   interrupts.

mod batch;
mod receive;
mod retries;
mod send;

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use procjob_worker::array::ArrayEncoder;
use procjob_worker::protocol::{ArrayRef, Payload, TaskKind};
use procjob_worker::Array;

use super::builder::{CallProgress, CallStats, Parallel, Progress};
use super::encoder::CallEncoder;
use super::here::{DrawnHere, InProcess};
use super::verbose::Verbose;
use crate::error::Error;
use crate::pool::{StartMethod, Traffic, WorkerPool};
use crate::scheduler::{Action, PreDispatch, Scheduler};

use batch::InFlight;
pub(super) use batch::{Encoded, LandingPlan, SharedEncoded};
use retries::Retries;

/// Inputs drawn (and encoded) at a time before the calling thread looks
/// for answers again.
const PULL_CHUNK: usize = 1024;

/// What the call core needs from the typed side of a call: inputs drawn and
/// encoded, outputs decoded and kept. The core never sees the task type.
pub(super) trait TaskCodec {
    /// Draws up to `n` inputs, numbered from `first`, encodes each with
    /// `encoder` and queues it on `queue`; stops at the first input that
    /// cannot be encoded. One call per chunk of inputs, not per input.
    fn draw(&mut self, n: usize, first: u64, encoder: &mut CallEncoder, queue: &mut VecDeque<Encoded>) -> Drawn;

    /// Decodes the output of task `index` from its bytes and arrays, and
    /// keeps it to be yielded; the error says why it cannot be decoded.
    fn decode(&mut self, index: u64, output: &[u8], arrays: Vec<Array>) -> Result<(), String>;

    /// Draws the next input, numbered `index`, and encodes it with
    /// `encoder` for a run in this process ([`InProcess`]); `None` when the
    /// inputs are exhausted. The input itself is dropped before this
    /// returns, so the arrays `encoder` kept show whether the caller still
    /// shares them.
    fn draw_here(&mut self, index: u64, encoder: &mut dyn ArrayEncoder) -> Option<Result<DrawnHere, Error>>;
}

/// How a call runs: on the pool's workers, in this process, or not at all
/// (no input).
pub(super) enum Engine<'p> {
    /// On the pool's worker processes (boxed: the core is large).
    Pool(Box<CallCore<'p>>),
    /// In this process, one task after another.
    Here(Box<InProcess<'p>>),
    /// Nothing to run: the input was empty.
    Empty,
}

impl Engine<'_> {
    /// Sets the value every task of the call shares (`map_with`), from
    /// `encode`, which serializes it with the encoder it is given.
    pub(super) fn share(
        &mut self,
        encode: impl FnOnce(&mut dyn ArrayEncoder) -> Result<(Payload, Vec<ArrayRef>), String>,
    ) -> Result<(), Error> {
        match self {
            Engine::Pool(core) => core.share(|encoder| encode(encoder)),
            Engine::Here(here) => here.share(encode),
            Engine::Empty => Ok(()),
        }
    }

    /// Takes one step of the call (see [`CallCore::step`]).
    pub(super) fn step(&mut self, codec: &mut dyn TaskCodec) -> Option<Result<(), Error>> {
        match self {
            Engine::Pool(core) => core.step(codec),
            Engine::Here(here) => here.step(codec),
            Engine::Empty => None,
        }
    }

    /// Lands the outputs' first arrays in place (`run_unordered_into`).
    pub(super) fn land_outputs(&mut self, plan: LandingPlan) {
        match self {
            Engine::Pool(core) => core.land_outputs(plan),
            Engine::Here(here) => here.land_outputs(plan),
            Engine::Empty => {}
        }
    }
}

/// What one [`TaskCodec::draw`] did.
pub(super) struct Drawn {
    /// Inputs drawn, an input that could not be encoded included.
    pub(super) count: usize,
    /// The inputs are exhausted.
    pub(super) done: bool,
    /// How many inputs are left, when the iterator says exactly.
    pub(super) left: Option<usize>,
    /// Why the last input drawn could not be encoded (it was not queued).
    pub(super) failed: Option<Error>,
}

/// How far a call has got, for progress reports.
struct Tally {
    /// Inputs drawn so far; the next input's index.
    pulled: u64,
    /// Inputs left, when the iterator knew it at the last draw.
    remaining: Option<u64>,
    /// Tasks answered so far.
    completed: u64,
    /// When the call started.
    started: Instant,
}

impl Tally {
    /// The progress to report now.
    fn progress(&self) -> Progress {
        let total = self.remaining.map(|r| self.pulled + r);
        Progress { completed: self.completed, submitted: self.pulled, total, elapsed: self.started.elapsed() }
    }
}

/// The state of one call, from its start until the scheduler says it is
/// done (or it is dropped).
pub(super) struct CallCore<'p> {
    /// The settings, the pool, the stats and the trace of the call.
    parallel: &'p mut Parallel,
    /// This call's own progress callback, used instead of `parallel`'s.
    progress: CallProgress<'p>,
    /// This call's number, named in each batch.
    call: u64,
    /// The task kind every batch runs.
    kind: TaskKind,
    /// Decides what to do next: draw, send, wait or finish.
    scheduler: Scheduler,
    /// Places the inputs' arrays (inline, dumped, by reference).
    encoder: CallEncoder,
    /// Tasks drawn and encoded, not yet sent.
    queue: VecDeque<Encoded>,
    /// The batch each worker is running, by worker index.
    in_flight: Vec<Option<InFlight>>,
    /// The call's first failure.
    failure: Option<Error>,
    /// The second chances of tasks lost with their worker.
    retries: Retries,
    /// SIGINT or SIGTERM stopped the call.
    interrupted: bool,
    /// Replacement workers started during the call, and when their
    /// handshake is due.
    joining: Vec<Option<Instant>>,
    /// Inputs drawn and tasks answered so far, for progress reports.
    tally: Tally,
    /// The pool's traffic before the call.
    traffic_before: Traffic,
    /// The call's stats are written and its files gone.
    finished: bool,
    /// Where output arrays land, for `run_unordered_into`.
    landing: Option<LandingPlan>,
    /// The scheduler's action drawn after a run of sends, to do next.
    next_action: Option<Action>,
    /// The progress messages on stderr.
    verbose: Verbose,
    /// The value every task shares (`map_with`), sent once to each worker.
    shared: Option<SharedEncoded>,
    /// By worker slot, the pid of the process last sent the shared value.
    shared_sent: Vec<Option<u32>>,
}

impl<'p> CallCore<'p> {
    /// Starts a call of tasks of `kind` on `parallel`'s pool (starting the
    /// pool if need be), and resets its stats. `progress`, when given, is
    /// called instead of `parallel`'s callback.
    pub(super) fn start(
        parallel: &'p mut Parallel,
        kind: TaskKind,
        progress: CallProgress<'p>,
    ) -> Result<CallCore<'p>, Error> {
        let started = Instant::now();
        let spawn = Instant::now();
        parallel.pool_mut()?;
        let spawn_seconds = spawn.elapsed().as_secs_f64();
        parallel.calls += 1;
        let workers = parallel.workers()?;
        let pre_dispatch = parallel.pre_dispatch.unwrap_or(PreDispatch::Batches(2 * workers));
        let scheduler = Scheduler::new(workers, parallel.batch_size, pre_dispatch);
        let dumps = std::mem::take(&mut parallel.dumps);
        let mut encoder =
            CallEncoder::new(parallel.max_nbytes, parallel.mmap_mode, parallel.temp_folder.clone(), dumps);
        if let StartMethod::Fork { inherit } = &parallel.start_method {
            encoder.inherit(inherit);
        }
        let traffic_before = parallel.pool.as_ref().map(WorkerPool::traffic).unwrap_or_default();
        parallel.last = CallStats { spawn_seconds, ..CallStats::default() };
        if let Some(signal) = crate::signals::received() {
            return Err(Error::Interrupted { signal });
        }
        let call = parallel.calls;
        let verbose = Verbose::new(parallel.verbose, workers);
        Ok(CallCore {
            parallel,
            progress,
            call,
            kind,
            scheduler,
            encoder,
            queue: VecDeque::new(),
            in_flight: (0..workers).map(|_| None).collect(),
            failure: None,
            retries: Retries::default(),
            interrupted: false,
            joining: vec![None; workers],
            tally: Tally { pulled: 0, remaining: None, completed: 0, started },
            traffic_before,
            finished: false,
            landing: None,
            next_action: None,
            verbose,
            shared: None,
            shared_sent: vec![None; workers],
        })
    }

    /// Lands the outputs' first arrays in place (`run_unordered_into`).
    pub(super) fn land_outputs(&mut self, plan: LandingPlan) {
        self.landing = Some(plan);
    }

    /// Sets the value every task of the call shares, placing its arrays
    /// with the call's encoder (an array above `max_nbytes` is dumped once,
    /// and an encoding over 1 MiB spilled to a file, like an input's); it
    /// goes to each worker with its first batch.
    pub(super) fn share(
        &mut self,
        encode: impl FnOnce(&mut CallEncoder) -> Result<(Payload, Vec<ArrayRef>), String>,
    ) -> Result<(), Error> {
        let (value, refs) = encode(&mut self.encoder)
            .and_then(|(value, refs)| self.encoder.place_input(value, refs))
            .map_err(|e| Error::Config(format!("cannot encode the shared value: {e}")))?;
        let inline = self.encoder.take_inline();
        let pool = self.parallel.pool.as_mut().expect("the pool exists during a call");
        self.encoder.allow_folders(pool);
        self.shared = Some(SharedEncoded { value, refs, inline });
        Ok(())
    }

    /// The pool, which exists for the whole call.
    fn pool(&mut self) -> &mut WorkerPool {
        self.parallel.pool.as_mut().expect("the pool exists during a call")
    }

    /// Takes one step of the call: draws inputs, sends batches, or waits
    /// for an event, whose outputs go to `codec`. `None` when the call is
    /// over; its failure once, at its end.
    pub(super) fn step(&mut self, codec: &mut dyn TaskCodec) -> Option<Result<(), Error>> {
        if self.finished {
            return None;
        }
        if let (false, Some(signal)) = (self.interrupted, crate::signals::received()) {
            self.interrupt(signal);
            return Some(Ok(()));
        }
        match self.next_action.take().unwrap_or_else(|| self.scheduler.next_action()) {
            Action::Pull(n) => {
                // Draw in chunks, and let an answer that is already
                // waiting in between: its worker is idle until the
                // scheduler sees it.
                if let Some(event) = self.pool().next_event(Some(Duration::ZERO)) {
                    self.on_event(event, codec);
                    return Some(Ok(()));
                }
                self.pull(n.min(PULL_CHUNK), codec);
            }
            Action::Send { worker, tasks } => self.send(worker, tasks),
            Action::Wait => self.wait(codec),
            Action::Done => {
                self.finish();
                if let Some(e) = self.failure.take() {
                    return Some(Err(e));
                }
            }
        }
        Some(Ok(()))
    }

    /// Draws and encodes up to `n` inputs into the queue.
    fn pull(&mut self, n: usize, codec: &mut dyn TaskCodec) {
        let drawn = codec.draw(n, self.tally.pulled, &mut self.encoder, &mut self.queue);
        self.tally.pulled += drawn.count as u64;
        self.tally.remaining = drawn.left.map(|left| left as u64);
        if let Some(e) = drawn.failed {
            self.fail(e);
            return;
        }
        let pool = self.parallel.pool.as_mut().expect("the pool exists during a call");
        self.encoder.allow_folders(pool);
        self.scheduler.pulled(drawn.count, drawn.done, drawn.left);
    }

    /// Calls the call's progress callback, else the `Parallel`'s, if any.
    fn report_progress(&mut self) {
        let p = self.tally.progress();
        if let Some(cb) = self.progress.as_mut() {
            cb(&p);
        } else if let Some(cb) = self.parallel.progress.as_mut() {
            cb(&p);
        }
        self.verbose.update(&p);
    }

    /// Keeps the call's first failure, and stops further dispatch: batches
    /// already running are awaited.
    fn fail(&mut self, error: Error) {
        if self.failure.is_none() {
            self.failure = Some(error);
        }
        self.scheduler.drain();
        self.queue.clear();
    }

    /// Writes the call's stats, and removes its files; once.
    fn finish(&mut self) {
        if self.finished {
            return;
        }
        self.finished = true;
        // Reached by the scheduler's Done (or a drop, which ended the
        // messages first): complete unless failed.
        let complete = self.failure.is_none();
        self.verbose.finish(&self.tally.progress(), complete);
        let after = self.pool().traffic();
        let before = self.traffic_before;
        let stats = &mut self.parallel.last;
        stats.traffic = Traffic {
            bytes_to_workers: after.bytes_to_workers - before.bytes_to_workers,
            bytes_from_workers: after.bytes_from_workers - before.bytes_from_workers,
            frames_to_workers: after.frames_to_workers - before.frames_to_workers,
            frames_from_workers: after.frames_from_workers - before.frames_from_workers,
        };
        let (dumped_arrays, dumped_bytes) = self.encoder.dumped();
        stats.dumped_arrays = dumped_arrays;
        stats.dumped_bytes = dumped_bytes;
        // Dumped files go with the call, and so do unused landings.
        if let Ok(mut l) = self.pool().landings().lock() {
            l.clear();
        }
        self.parallel.dumps = self.encoder.close();
    }
}

impl Drop for CallCore<'_> {
    /// A call dropped before its end stops at once, without waiting for
    /// tasks whose outputs nobody will read: the tasks not yet sent are
    /// discarded, and each worker still running one of its batches is
    /// killed and reaped. Their slots stay empty until the next call starts
    /// fresh workers in them; idle workers stay warm.
    fn drop(&mut self) {
        if !self.finished {
            self.verbose.finish(&self.tally.progress(), false);
            self.scheduler.drain();
            self.queue.clear();
            for w in 0..self.in_flight.len() {
                if self.in_flight[w].take().is_some() {
                    self.pool().kill(w);
                }
            }
            self.finish();
        }
    }
}
