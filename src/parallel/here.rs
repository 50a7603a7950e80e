//! Running a call's tasks in the calling process, one after another, as
//! joblib does with `n_jobs=1`: what a user wants under a debugger, and
//! what a task that itself calls [`Parallel`] gets inside a worker.
//!
//! The tasks run through the same erased entry a worker runs (the input
//! encoded, decoded, run under panic capture, the output encoded and
//! decoded), so outputs, errors and panics come back exactly as from a
//! worker. Arrays are not copied through a pipe or dumped to a file; each
//! task sees them as a worker would:
//!
//! - an owned array is handed over as it is, shared with the caller (a
//!   worker cannot write an array that came inline, nor one dumped and
//!   mapped read-only, either), except one above `max_nbytes` with
//!   `mmap_mode` copy-on-write, which a worker may write privately: the
//!   task gets a private copy of it;
//! - a file-backed array read-write or copy-on-write is mapped again, so
//!   the task's view is its own and writable, as in a worker; a read-only
//!   one is shared;
//! - output arrays likewise: an owned one the task still holds elsewhere is
//!   copied, a file reference is mapped, and the first array of each
//!   output lands in its rows of a `run_unordered_into` output.

use std::cell::{Cell, RefCell};
use std::os::unix::fs::FileExt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Instant;

use procjob_worker::array::{self, Array, ArrayEncoder};
use procjob_worker::payload::Payload;
use procjob_worker::protocol::{Access, ArrayRef, FailureCause, Outcome, TaskFailure};
use procjob_worker::task::{ErasedEntry, ErasedOutcome, Shared};

use super::builder::{CallProgress, CallStats, Parallel, Progress};
use super::call::{LandingPlan, TaskCodec};
use super::verbose::Verbose;
use crate::error::{Error, TaskId, WorkerId};

/// A call running its tasks in this process.
pub(super) struct InProcess<'p> {
    /// The settings and the stats of the call.
    parallel: &'p mut Parallel,
    /// This call's own progress callback, used instead of `parallel`'s.
    progress: CallProgress<'p>,
    /// The task's erased entry, the one a worker would run.
    entry: ErasedEntry,
    /// The next task's index.
    next: u64,
    /// Inputs left, when the iterator said exactly at the last draw.
    left: Option<u64>,
    /// When the call started.
    started: Instant,
    /// The call is over.
    done: bool,
    /// Where output arrays land, for `run_unordered_into`.
    landing: Option<LandingPlan>,
    /// The progress messages on stderr.
    verbose: Verbose,
    /// The value every task shares (`map_with`), as a worker keeps it.
    shared: Shared,
}

/// One input drawn and encoded for a run in this process.
pub(super) struct DrawnHere {
    /// The encoded input.
    pub(super) input: procjob_worker::payload::Payload,
    /// What the task does, for messages.
    pub(super) description: Option<String>,
    /// How many inputs are left, when the iterator says exactly.
    pub(super) left: Option<usize>,
}

impl<'p> InProcess<'p> {
    /// Starts a call of the task whose entry is `entry` in this process.
    pub(super) fn start(parallel: &'p mut Parallel, entry: ErasedEntry, progress: CallProgress<'p>) -> Self {
        parallel.calls += 1;
        parallel.last = CallStats { in_process: true, ..CallStats::default() };
        let verbose = Verbose::new(parallel.verbose, 1);
        InProcess {
            parallel,
            progress,
            entry,
            next: 0,
            left: None,
            started: Instant::now(),
            done: false,
            landing: None,
            verbose,
            shared: Shared::default(),
        }
    }

    /// Sets the value every task of the call shares (`map_with`): encoded
    /// and handed over as a worker would receive it, decoded by the first
    /// task that reads it.
    pub(super) fn share(
        &mut self,
        encode: impl FnOnce(&mut dyn ArrayEncoder) -> Result<(Payload, Vec<ArrayRef>), String>,
    ) -> Result<(), Error> {
        let mut encoder = HereEncoder::default();
        let encoded = encode(&mut encoder)
            .and_then(|(value, _refs)| Ok((value, encoder.finish(self.parallel.max_nbytes, self.parallel.mmap_mode)?)));
        match encoded {
            Ok((value, arrays)) => {
                self.shared.set(&value, arrays);
                Ok(())
            }
            Err(e) => Err(Error::Config(format!("cannot encode the shared value: {e}"))),
        }
    }

    /// Lands the outputs' first arrays in place (`run_unordered_into`).
    pub(super) fn land_outputs(&mut self, plan: LandingPlan) {
        self.landing = Some(plan);
    }

    /// The progress to report now.
    fn progress_now(&self) -> Progress {
        Progress {
            completed: self.next,
            submitted: self.next,
            total: self.left.map(|l| self.next + l),
            elapsed: self.started.elapsed(),
        }
    }

    /// Runs the next task, whose output goes to `codec`. `None` when the
    /// inputs are exhausted; a failure once, and then `None`.
    pub(super) fn step(&mut self, codec: &mut dyn TaskCodec) -> Option<Result<(), Error>> {
        if self.done {
            return None;
        }
        if let Some(signal) = crate::signals::received() {
            return self.fail(Error::Interrupted { signal });
        }
        let index = self.next;
        let mut encoder = HereEncoder::default();
        let drawn = match codec.draw_here(index, &mut encoder) {
            None => {
                self.done = true;
                self.verbose.finish(&self.progress_now(), true);
                return None;
            }
            Some(Err(e)) => return self.fail(e),
            Some(Ok(drawn)) => drawn,
        };
        let task = TaskId { index, description: drawn.description };
        self.left = drawn.left.map(|l| l as u64);
        let arrays = match encoder.finish(self.parallel.max_nbytes, self.parallel.mmap_mode) {
            Ok(arrays) => arrays,
            Err(reason) => {
                return self.fail(Error::Codec { task, reason: format!("cannot encode the input: {reason}") })
            }
        };
        let ErasedOutcome { outcome, inline } = run_caught(self.entry, &drawn.input, arrays, &mut self.shared);
        self.next += 1;
        match outcome {
            Outcome::Ok { output, arrays: refs } => {
                let decoded = self.outputs(index, refs, inline).and_then(|a| codec.decode(index, &output, a));
                if let Err(reason) = decoded {
                    return self.fail(Error::Codec { task, reason: format!("cannot decode the output: {reason}") });
                }
            }
            Outcome::Failed(failure) => {
                let worker = WorkerId { index: 0, pid: std::process::id() };
                return self.fail(Error::task(task, worker, failure));
            }
        }
        let p = self.progress_now();
        if let Some(cb) = self.progress.as_mut() {
            cb(&p);
        } else if let Some(cb) = self.parallel.progress.as_mut() {
            cb(&p);
        }
        self.verbose.update(&p);
        Some(Ok(()))
    }

    /// Ends the call with `error`.
    fn fail(&mut self, error: Error) -> Option<Result<(), Error>> {
        self.done = true;
        self.verbose.finish(&self.progress_now(), false);
        Some(Err(error))
    }

    /// The arrays of task `index`'s output, as the coordinator would
    /// receive them from a worker.
    fn outputs(&mut self, index: u64, refs: Vec<ArrayRef>, inline: Vec<Array>) -> Result<Vec<Array>, String> {
        let mut inline = inline.into_iter();
        let mut first_inline = true;
        let mut out = Vec::with_capacity(refs.len());
        for r in refs {
            let a = match r {
                ArrayRef::Inline { .. } => {
                    let a = inline.next().ok_or("an inline output array is missing")?;
                    let landing = match (first_inline, self.landing.as_mut()) {
                        (true, Some(plan)) => Some(plan.landing(index)?),
                        _ => None,
                    };
                    first_inline = false;
                    match landing {
                        Some(l) if l.view.dtype() == a.dtype() && l.view.shape() == a.shape() => {
                            l.file.write_all_at(a.as_bytes(), l.offset).map_err(|e| {
                                format!("cannot write task {index}'s output into its rows of the output: {e}")
                            })?;
                            l.view
                        }
                        _ => own(a),
                    }
                }
                ArrayRef::File { dtype, shape, path, offset, access } => {
                    let shape: Vec<usize> = shape.iter().map(|&d| d as usize).collect();
                    array::map_file_ref(&path, dtype, &shape, offset, access).map_err(|e| e.to_string())?
                }
                ArrayRef::Inherited { .. } => return Err("an inherited array in a task's output".into()),
                ArrayRef::Lent { .. } => return Err("a lent array in a task's output in this process".into()),
            };
            out.push(a);
        }
        Ok(out)
    }
}

impl Drop for InProcess<'_> {
    /// A stream dropped before its end: no task is running, so there is
    /// nothing to stop but the progress line.
    fn drop(&mut self) {
        if !self.done {
            self.verbose.finish(&self.progress_now(), false);
        }
    }
}

/// `a` as a worker's reply would bring it: owned by the caller alone.
fn own(a: Array) -> Array {
    if a.is_unshared() || a.is_mapped() {
        a
    } else {
        a.to_owned_array()
    }
}

/// Hands the arrays of an input to a task in this process (see the module
/// docs), in encoding order.
#[derive(Default)]
struct HereEncoder {
    /// The arrays, each as the task will see it, or why it cannot be.
    arrays: Vec<Result<Array, String>>,
}

impl ArrayEncoder for HereEncoder {
    fn encode(&mut self, a: &Array) -> Result<ArrayRef, String> {
        let seen = match a.file_location() {
            // A worker maps its own view of such a file: so does the task.
            Some((path, offset, access)) if access != Access::ReadOnly => {
                array::map_file_ref(path, a.dtype(), a.shape(), offset, access).map_err(|e| e.to_string())
            }
            _ => Ok(a.clone()),
        };
        self.arrays.push(seen);
        Ok(array::inline_ref(a))
    }
}

impl HereEncoder {
    /// The arrays once the input is gone: an owned array a worker would
    /// get as a copy-on-write map is copied, unless the caller no longer
    /// holds it.
    fn finish(self, max_nbytes: Option<usize>, mmap_mode: Access) -> Result<Vec<Array>, String> {
        self.arrays
            .into_iter()
            .map(|a| {
                let a = a?;
                let dumped = !a.is_mapped() && max_nbytes.is_some_and(|m| a.nbytes() > m);
                Ok(if dumped && mmap_mode == Access::CopyOnWrite { own(a) } else { a })
            })
            .collect()
    }
}

thread_local! {
    /// Tasks running in this process on this thread (nested calls count).
    static RUNNING: Cell<u32> = const { Cell::new(0) };
    /// The last panic of a task running here: message and location.
    static CAUGHT: RefCell<Option<(String, Option<String>)>> = const { RefCell::new(None) };
}

/// Runs `entry` on an input under panic capture: a panic becomes the
/// task's failure, with its message and location, as in a worker, and is
/// not printed.
fn run_caught(entry: ErasedEntry, input: &[u8], arrays: Vec<Array>, shared: &mut Shared) -> ErasedOutcome {
    install_capture();
    RUNNING.with(|r| r.set(r.get() + 1));
    let result = catch_unwind(AssertUnwindSafe(|| entry(input, arrays, shared)));
    RUNNING.with(|r| r.set(r.get() - 1));
    match result {
        Ok(outcome) => outcome,
        Err(payload) => {
            let (message, location) = CAUGHT.with(|c| c.borrow_mut().take()).unwrap_or_else(|| {
                let m = payload
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| payload.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "panic with a non-string payload".into());
                (m, None)
            });
            let failure =
                TaskFailure { cause: FailureCause::Panic, message, location, error: None, sources: Vec::new() };
            ErasedOutcome { outcome: Outcome::Failed(failure), inline: Vec::new() }
        }
    }
}

/// Installs, once, a panic hook that records the panics of tasks running
/// here and hands every other panic to the hook that was there before.
fn install_capture() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if RUNNING.with(Cell::get) == 0 {
                return previous(info);
            }
            let message = if let Some(s) = info.payload().downcast_ref::<&str>() {
                (*s).to_string()
            } else if let Some(s) = info.payload().downcast_ref::<String>() {
                s.clone()
            } else {
                "panic with a non-string payload".to_string()
            };
            let location = info.location().map(|l| format!("{}:{}:{}", l.file(), l.line(), l.column()));
            CAUGHT.with(|c| *c.borrow_mut() = Some((message, location)));
        }));
    });
}
