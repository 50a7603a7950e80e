//! Running a batch's tasks, in order, each under panic capture: find the
//! code the batch's kind names, refuse inputs poisoned by an earlier SIGBUS,
//! run, and admit each outcome to the reply's budget.

use std::cell::RefCell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;

use super::budget::ReplyBudget;
use crate::array::{Array, ArrayError};
use crate::protocol::{self, Batch, FailureCause, Outcome, TaskReply};
use crate::registry::Registry;
use crate::task::{ErasedEntry, ErasedOutcome, Shared};

/// Runs the tasks of `batch` on their `arrays` (in bulk order), with the
/// entry found in `registry` or, when the coordinator is this same
/// executable (`same_binary`), by entry descriptor. Returns one reply per
/// task and the arrays whose bytes follow the reply inline. `shared` is the
/// call's shared value, for the tasks that read one.
pub(super) fn run_batch(
    registry: &Registry,
    same_binary: bool,
    batch: &Batch,
    arrays: Vec<Result<Array, ArrayError>>,
    shared: &mut Shared,
) -> (Vec<TaskReply>, Vec<Array>) {
    let mut arrays = arrays.into_iter();
    let mut replies = Vec::with_capacity(batch.tasks.len());
    let mut inline: Vec<Array> = Vec::new();
    let entry = resolve(registry, same_binary, &batch.kind);
    // One clock read per task, and only when asked: a task starts when
    // the one before it finished (what lies between is a few pointer
    // moves).
    let clock = || if batch.timestamps { crate::clock::monotonic_ns() } else { 0 };
    let mut started_ns = clock();
    let mut budget = ReplyBudget::default();
    let first_index = batch.tasks.first().map(|t| t.index);
    for task in &batch.tasks {
        let mine: Vec<Result<Array, ArrayError>> = match task.arrays.len() {
            0 => Vec::new(),
            n => arrays.by_ref().take(n).collect(),
        };
        let result = match poisoned_input(&mine) {
            Some(path) => ErasedOutcome::failed(
                FailureCause::Setup,
                format!(
                    "{} shrank while an earlier task of this batch read it; \
                     a mapped file must not be truncated while tasks use it",
                    path.display()
                ),
            ),
            None => match (&entry, first_index) {
                // The same message for every task of the batch: in full
                // once, then a pointer to it (a kind name repeated per
                // task made a 73 KB request take 253 MB).
                (Err(_), Some(first)) if first != task.index => ErasedOutcome::failed(
                    FailureCause::Setup,
                    format!("task kind '{}' is not known to this worker (see task {first})", batch.kind.name),
                ),
                _ => match unspill(&task.input, mine) {
                    Ok((Some(file), mine)) => match spilled_input(&file) {
                        Ok(input) => run_one(&entry, &batch.kind.name, input, mine, shared),
                        Err(reason) => ErasedOutcome::failed(FailureCause::Setup, reason),
                    },
                    Ok((None, mine)) => run_one(&entry, &batch.kind.name, &task.input, mine, shared),
                    Err(reason) => ErasedOutcome::failed(FailureCause::Setup, reason),
                },
            },
        };
        let result = fail_on_faults(task.index, result);
        let finished_ns = clock();
        let result = budget.admit(task.index, result);
        replies.push(TaskReply { index: task.index, started_ns, finished_ns, outcome: result.outcome });
        inline.extend(result.inline);
        started_ns = finished_ns;
    }
    (replies, inline)
}

/// A task's arrays as read or mapped: each, or why it cannot be had.
pub(super) type TaskArrays = Vec<Result<Array, ArrayError>>;

/// Splits off a task's spilled input: an input too large for a frame
/// travels as the task's last array, a file the worker maps, with an empty
/// payload in its place (an empty encoding cannot refer to an array, so the
/// pair is unambiguous). See docs/protocol.md, "Spilled inputs".
pub(super) fn unspill(input: &[u8], mut arrays: TaskArrays) -> Result<(Option<Array>, TaskArrays), String> {
    if !input.is_empty() || arrays.is_empty() {
        return Ok((None, arrays));
    }
    match arrays.pop() {
        Some(Ok(file)) => Ok((Some(file), arrays)),
        Some(Err(e)) => Err(format!("cannot read the task's spilled input: {e}")),
        None => Ok((None, arrays)),
    }
}

/// The encoded input in a spilled input's array: a little-endian `u64`
/// length, then that many bytes (checked against the array's size).
pub(super) fn spilled_input(file: &Array) -> Result<&[u8], String> {
    let bytes = file.as_bytes();
    let (len, rest) = bytes.split_first_chunk::<8>().ok_or("the task's spilled input is shorter than its length")?;
    let len = u64::from_le_bytes(*len);
    usize::try_from(len)
        .ok()
        .and_then(|len| rest.get(..len))
        .ok_or_else(|| format!("the task's spilled input says {len} bytes but holds {}", rest.len()))
}

thread_local! {
    static LAST_PANIC: RefCell<Option<(String, Option<String>)>> = const { RefCell::new(None) };
}

/// Records each panic's message and location for the reply instead of
/// printing it: the coordinator shows it, with the task it belongs to.
pub(super) fn install_panic_capture() {
    std::panic::set_hook(Box::new(|info| {
        let message = if let Some(s) = info.payload().downcast_ref::<&str>() {
            (*s).to_string()
        } else if let Some(s) = info.payload().downcast_ref::<String>() {
            s.clone()
        } else {
            "panic with a non-string payload".to_string()
        };
        let location = info.location().map(|l| format!("{}:{}:{}", l.file(), l.line(), l.column()));
        LAST_PANIC.with(|p| *p.borrow_mut() = Some((message, location)));
    }));
}

/// The mapped file behind the first of a task's arrays in which a SIGBUS
/// was absorbed (by an earlier task of the batch): its pages read as zeros
/// now, so the task must not run on it.
fn poisoned_input(arrays: &[Result<Array, ArrayError>]) -> Option<PathBuf> {
    arrays
        .iter()
        .flatten()
        .find(|a| a.is_poisoned())
        .map(|a| a.file_location().map_or_else(PathBuf::new, |l| l.0.into()))
}

/// Replaces a task's outcome with a failure naming the file when a SIGBUS
/// was absorbed while it ran (see `crate::sigbus`): it read zeros where a
/// truncated file's bytes were, so its result is wrong whatever it says.
fn fail_on_faults(index: u64, result: ErasedOutcome) -> ErasedOutcome {
    let faults = crate::sigbus::take_faults();
    if faults.is_empty() {
        return result;
    }
    let files: Vec<String> = faults
        .iter()
        .map(|f| match std::fs::metadata(&f.path) {
            Ok(m) if m.len() < f.mapped_len => {
                format!(
                    "{} shrank while task {index} read it ({} bytes when mapped, {} now)",
                    f.path.display(),
                    f.mapped_len,
                    m.len()
                )
            }
            _ => format!(
                "{} could not be read while task {index} read it (SIGBUS: truncated, or an I/O error)",
                f.path.display()
            ),
        })
        .collect();
    ErasedOutcome::failed(
        FailureCause::Setup,
        format!("{}; a mapped file must not be truncated while tasks use it", files.join("; ")),
    )
}

/// Finds the code a task kind names: by entry descriptor when this worker
/// is the coordinator's own executable (exact: a name could be shadowed by
/// a user task called "matmul"), else by name in the registry. An offset
/// that does not name a descriptor of that kind is refused, never called
/// ([`crate::entry::resolve`]).
fn resolve(registry: &Registry, same_binary: bool, kind: &protocol::TaskKind) -> Result<ErasedEntry, String> {
    match (same_binary, kind.entry, registry.get(&kind.name)) {
        (true, Some(offset), _) => crate::entry::resolve(offset, &kind.name)
            .map_err(|e| format!("task kind '{}' was refused: not a task entry of this executable ({e})", kind.name)),
        (_, _, Some(entry)) => Ok(entry),
        (_, _, None) => Err(format!(
            "task kind '{}' is not known to this worker (it is not the coordinator's executable, and knows only: {})",
            kind.name,
            registry.names().join(", ")
        )),
    }
}

/// Runs one task of kind `kind` under panic capture; under the
/// `test-tasks` feature, a fault the failure tests inject takes the task's
/// place (`super::fault`).
fn run_one(
    entry: &Result<ErasedEntry, String>,
    kind: &str,
    input: &[u8],
    arrays: Vec<Result<Array, ArrayError>>,
    shared: &mut Shared,
) -> ErasedOutcome {
    // Most tiny tasks have no arrays: skip the fallible collect for them.
    let arrays: Vec<Array> = match arrays.is_empty() {
        true => Vec::new(),
        false => match arrays.into_iter().collect() {
            Ok(a) => a,
            Err(e) => return ErasedOutcome::failed(FailureCause::Setup, e.to_string()),
        },
    };
    let entry = match entry {
        Ok(entry) => *entry,
        Err(message) => return ErasedOutcome::failed(FailureCause::Setup, message.clone()),
    };
    let run = move || {
        #[cfg(feature = "test-tasks")]
        if let Some(fault) = super::fault::before_task(kind, input) {
            return fault;
        }
        #[cfg(not(feature = "test-tasks"))]
        let _ = kind;
        entry(input, arrays, shared)
    };
    match catch_unwind(AssertUnwindSafe(run)) {
        Ok(outcome) => outcome,
        Err(payload) => {
            let (message, location) = LAST_PANIC.with(|p| p.borrow_mut().take()).unwrap_or_else(|| {
                let m = payload
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| payload.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "panic".into());
                (m, None)
            });
            ErasedOutcome {
                outcome: Outcome::Failed(protocol::TaskFailure {
                    cause: FailureCause::Panic,
                    message,
                    location,
                    error: None,
                    sources: Vec::new(),
                }),
                inline: Vec::new(),
            }
        }
    }
}
