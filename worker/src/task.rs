//! The [`Task`] trait: code that procjob can run in a worker process.
//!
//! A task is a type with an input, an output and an error, all serde
//! types, and a `run` function. Inputs and outputs may hold [`Array`]s,
//! which travel as raw bytes or file references, never element by element.
//! Also here: [`TaskError`], the error any `std::error::Error` (or
//! `anyhow::Error`, or a `String`) becomes with `?`, its chain of sources
//! kept; and [`Shared`], the value every task of a call shares, kept by a
//! worker for the call.
//!
//! [`Array`]: crate::array::Array

use std::any::Any;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::array::{self, Array, ArrayError};
use crate::protocol::{FailureCause, Outcome, TaskFailure, MAX_SOURCES};

/// Code that runs in a worker process.
///
/// `run` is an associated function, not a method: a task carries no state
/// of its own beyond its input, as with joblib's `delayed(f)(args)`.
///
/// ```
/// use procjob_worker::Task;
///
/// struct Square;
/// impl Task for Square {
///     type Input = u64;
///     type Output = u64;
///     type Error = String;
///     fn run(x: u64) -> Result<u64, String> {
///         x.checked_mul(x).ok_or_else(|| format!("{x}² overflows"))
///     }
/// }
/// assert_eq!(Square::run(12), Ok(144));
/// ```
pub trait Task: 'static {
    /// What the task receives.
    type Input: Serialize + DeserializeOwned;
    /// What it returns on success.
    type Output: Serialize + DeserializeOwned;
    /// What it returns on failure; its `Display` is the message users see.
    type Error: Serialize + DeserializeOwned + std::fmt::Display;

    /// The name messages use, and the key in a worker's [`Registry`](crate::registry::Registry).
    /// Defaults to the type's path.
    fn name() -> &'static str {
        std::any::type_name::<Self>()
    }

    /// Says what a task with this input does, for messages such as "worker
    /// 1 (pid 4711) was killed by SIGKILL while running task 3 (rows
    /// 500..750)". Called in the coordinator; `None` by default.
    fn describe(_input: &Self::Input) -> Option<String> {
        None
    }

    /// Runs the task.
    fn run(input: Self::Input) -> Result<Self::Output, Self::Error>;

    /// How a worker runs the task from its encoded input: decode, [`run`](Task::run),
    /// encode. Not for implementing by hand: procjob's function tasks
    /// (`Parallel::map` and friends) replace it to reach the call's shared
    /// value and to report their error's chain of sources.
    #[doc(hidden)]
    fn __run_erased(input: &[u8], arrays: Vec<Array>, _shared: &mut Shared) -> ErasedOutcome {
        run_decoded::<Self>(input, arrays, Self::run, |_| Vec::new())
    }
}

/// What an erased task entry produces: the outcome and the arrays whose
/// bytes travel inline after it.
#[derive(Debug)]
pub struct ErasedOutcome {
    /// The outcome to report.
    pub outcome: Outcome,
    /// Arrays whose bytes follow in the reply's bulk.
    pub inline: Vec<Array>,
}

/// A task with its types erased: decode the input, run, encode the output.
/// The third argument is the call's shared value, which only function tasks
/// with a shared value read.
pub type ErasedEntry = fn(&[u8], Vec<Array>, &mut Shared) -> ErasedOutcome;

/// The erased entry point of task `T`.
pub fn entry<T: Task>(input: &[u8], arrays: Vec<Array>, shared: &mut Shared) -> ErasedOutcome {
    T::__run_erased(input, arrays, shared)
}

/// Decodes the input of task `T`, runs `run` on it, and encodes its output
/// or its error (with the chain `sources` gives for it).
pub fn run_decoded<T: Task + ?Sized>(
    input: &[u8],
    arrays: Vec<Array>,
    run: impl FnOnce(T::Input) -> Result<T::Output, T::Error>,
    sources: impl FnOnce(&T::Error) -> Vec<String>,
) -> ErasedOutcome {
    let input: T::Input = match array::decode_with(input, arrays) {
        Ok(v) => v,
        Err(e) => {
            return ErasedOutcome::failed(FailureCause::Setup, format!("cannot decode the input of {}: {e}", T::name()))
        }
    };
    match run(input) {
        Ok(output) => {
            let mut encoder = array::InlineEncoder::default();
            match array::encode_with(&output, &mut encoder) {
                Ok((output, arrays)) => {
                    ErasedOutcome { outcome: Outcome::Ok { output, arrays }, inline: encoder.inline }
                }
                Err(e) => ErasedOutcome::failed(
                    FailureCause::Setup,
                    format!("cannot encode the output of {}: {e}", T::name()),
                ),
            }
        }
        Err(error) => {
            let sources = sources(&error);
            let mut outcome = ErasedOutcome::error(&error);
            if let Outcome::Failed(f) = &mut outcome.outcome {
                f.sources = sources;
            }
            outcome
        }
    }
}

impl ErasedOutcome {
    /// The failure of a task that returned `Err(error)`: its `Display` as
    /// the message, and its postcard encoding for the coordinator to decode
    /// as the task's typed error.
    pub fn error<E: Serialize + std::fmt::Display + ?Sized>(error: &E) -> ErasedOutcome {
        let message = error.to_string();
        let error = postcard::to_stdvec(error).ok();
        ErasedOutcome {
            outcome: Outcome::Failed(TaskFailure {
                cause: FailureCause::Error,
                message,
                location: None,
                error,
                sources: Vec::new(),
            }),
            inline: Vec::new(),
        }
    }

    /// A failure with no typed error and no location.
    pub fn failed(cause: FailureCause, message: String) -> ErasedOutcome {
        ErasedOutcome {
            outcome: Outcome::Failed(TaskFailure { cause, message, location: None, error: None, sources: Vec::new() }),
            inline: Vec::new(),
        }
    }
}

/// A task's error as it travels: the `Display` of the error the task
/// returned, and of each error in its chain of sources.
///
/// Anything that converts into a `Box<dyn std::error::Error + Send + Sync>`
/// converts into a `TaskError` with `?`: every `std::error::Error`
/// (`io::Error`, [`ArrayError`], a `thiserror` enum), `anyhow::Error`,
/// `String` and `&str`. A [`Task`] may use it as its `Error`; the caller
/// then gets it back typed with `procjob::Error::task_error::<TaskError>()`.
///
/// ```
/// use procjob_worker::task::TaskError;
///
/// fn open(path: &str) -> Result<std::fs::File, TaskError> {
///     Ok(std::fs::File::open(path)?)
/// }
/// let e = open("/no/such/file").unwrap_err();
/// assert!(e.message.contains("No such file"), "{e}");
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskError {
    /// The error's `Display`.
    pub message: String,
    /// The `Display` of each error below it in its chain of sources,
    /// outermost first (at most [`MAX_SOURCES`]).
    pub sources: Vec<String>,
}

impl std::fmt::Display for TaskError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// Any error, with its chain of sources. (`TaskError` itself implements no
/// `std::error::Error`, as `anyhow::Error` does not: that is what lets this
/// conversion cover every error type.)
impl<E: Into<Box<dyn std::error::Error + Send + Sync>>> From<E> for TaskError {
    fn from(error: E) -> TaskError {
        let error: Box<dyn std::error::Error + Send + Sync> = error.into();
        let mut sources = Vec::new();
        let mut next = error.source();
        while let Some(e) = next {
            if sources.len() == MAX_SOURCES {
                break;
            }
            sources.push(e.to_string());
            next = e.source();
        }
        TaskError { message: error.to_string(), sources }
    }
}

/// `?` on an [`ArrayError`] in a task whose error is a `String`.
impl From<ArrayError> for String {
    fn from(e: ArrayError) -> String {
        e.to_string()
    }
}

/// A shared value as it arrived: its encoding and its arrays.
type Encoded = (Vec<u8>, Vec<Array>);

/// The value every task of a call shares, as a worker keeps it: its
/// encoding, received once per call, and the value decoded at its first
/// use.
#[derive(Default)]
pub struct Shared {
    /// The encoded value and its arrays, when the call has one; why it
    /// cannot be had, when its arrays could not be read or mapped.
    encoded: Option<Result<Encoded, String>>,
    /// The value decoded, for the next tasks of the call.
    decoded: Option<Box<dyn Any>>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("bytes", &self.encoded.as_ref().map(|e| e.as_ref().map(|(b, _)| b.len())))
            .field("decoded", &self.decoded.is_some())
            .finish()
    }
}

impl Shared {
    /// Keeps the shared value of a new call (not decoded yet).
    pub fn set(&mut self, value: &[u8], arrays: Vec<Array>) {
        self.encoded = Some(Ok((value.to_vec(), arrays)));
        self.decoded = None;
    }

    /// Notes that the shared value of a new call cannot be had, and why:
    /// every task that reads it fails with that reason.
    pub fn set_failed(&mut self, reason: String) {
        self.encoded = Some(Err(reason));
        self.decoded = None;
    }

    /// Forgets the shared value (the call changed).
    pub fn clear(&mut self) {
        self.encoded = None;
        self.decoded = None;
    }

    /// The shared value as an `S`, decoded on the first use in the call.
    pub fn get<S: DeserializeOwned + 'static>(&mut self) -> Result<&S, String> {
        if !self.decoded.as_ref().is_some_and(|d| d.is::<S>()) {
            let (bytes, arrays) = match &self.encoded {
                Some(Ok(encoded)) => encoded,
                Some(Err(reason)) => return Err(format!("cannot read the call's shared value: {reason}")),
                None => return Err("the call's shared value did not reach this worker".into()),
            };
            let value: S = array::decode_with(bytes, arrays.clone())
                .map_err(|e| format!("cannot decode the call's shared value: {e}"))?;
            self.decoded = Some(Box::new(value));
        }
        Ok(self.decoded.as_ref().and_then(|d| d.downcast_ref::<S>()).expect("decoded as an S just above"))
    }
}
