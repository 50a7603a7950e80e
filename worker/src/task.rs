//! The [`Task`] trait: code that procjob can run in a worker process.
//!
//! A task is a type with an input, an output and an error, all serde
//! types, and a `run` function. Inputs and outputs may hold [`Array`]s,
//! which travel as raw bytes or file references, never element by element.
//!
//! [`Array`]: crate::array::Array

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::array::{self, Array};
use crate::protocol::{FailureCause, Outcome, TaskFailure};

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
pub type ErasedEntry = fn(&[u8], Vec<Array>) -> ErasedOutcome;

/// The erased entry point of task `T`.
pub fn entry<T: Task>(input: &[u8], arrays: Vec<Array>) -> ErasedOutcome {
    let input: T::Input = match array::decode_with(input, arrays) {
        Ok(v) => v,
        Err(e) => {
            return ErasedOutcome::failed(FailureCause::Setup, format!("cannot decode the input of {}: {e}", T::name()))
        }
    };
    match T::run(input) {
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
        Err(error) => ErasedOutcome::error(&error),
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
            outcome: Outcome::Failed(TaskFailure { cause: FailureCause::Error, message, location: None, error }),
            inline: Vec::new(),
        }
    }

    /// A failure with no typed error and no location.
    pub fn failed(cause: FailureCause, message: String) -> ErasedOutcome {
        ErasedOutcome {
            outcome: Outcome::Failed(TaskFailure { cause, message, location: None, error: None }),
            inline: Vec::new(),
        }
    }
}
