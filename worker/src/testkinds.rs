//! Task kinds that exist only for procjob's own tests (feature
//! `test-tasks`, off by default): a second well-behaved kind that proves
//! the pool and protocol are generic, and misbehaving kinds for the failure
//! tests.

use serde::{Deserialize, Serialize};

use crate::array::Array;
use crate::dtype::DType;
use crate::registry::Registry;
use crate::task::Task;

/// Registers every test kind.
pub fn register(r: Registry) -> Registry {
    r.with::<Checksum>().with::<Misbehave>()
}

/// Sums an array's elements as f64 and reports its shape: a second task
/// kind, unknown to the pool and protocol, that runs through both unchanged.
pub struct Checksum;

/// What [`Checksum`] returns.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChecksumOutput {
    /// Sum of the elements, as f64.
    pub sum: f64,
    /// The array's shape.
    pub shape: Vec<usize>,
    /// The worker's pid.
    pub pid: u32,
}

impl Task for Checksum {
    type Input = Array;
    type Output = ChecksumOutput;
    type Error = String;

    fn name() -> &'static str {
        "test.checksum"
    }

    fn run(a: Array) -> Result<ChecksumOutput, String> {
        let sum = match a.dtype() {
            DType::I64 => a.as_slice::<i64>().map_err(|e| e.to_string())?.iter().map(|&x| x as f64).sum(),
            DType::F64 => a.as_slice::<f64>().map_err(|e| e.to_string())?.iter().sum(),
            DType::F32 => a.as_slice::<f32>().map_err(|e| e.to_string())?.iter().map(|&x| f64::from(x)).sum(),
        };
        Ok(ChecksumOutput { sum, shape: a.shape().to_vec(), pid: std::process::id() })
    }
}

/// How a [`Misbehave`] task misbehaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Misbehavior {
    /// Return the input: behave.
    Behave,
    /// Return an error.
    Error,
    /// Panic.
    Panic,
    /// Kill the worker with SIGKILL.
    Kill,
    /// Abort the process (SIGABRT).
    Abort,
    /// Exit with code 7.
    Exit,
    /// Never return.
    Hang,
}

/// A task that misbehaves as told.
pub struct Misbehave;

impl Task for Misbehave {
    type Input = (u64, Misbehavior);
    type Output = u64;
    type Error = String;

    fn name() -> &'static str {
        "test.misbehave"
    }

    fn describe(input: &(u64, Misbehavior)) -> Option<String> {
        Some(format!("{:?} {}", input.1, input.0))
    }

    fn run((value, how): (u64, Misbehavior)) -> Result<u64, String> {
        match how {
            Misbehavior::Behave => Ok(value),
            Misbehavior::Error => Err(format!("value {value} is not welcome")),
            Misbehavior::Panic => panic!("task {value} panicked on purpose"),
            Misbehavior::Kill => {
                let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
                unreachable!("SIGKILL cannot be caught")
            }
            Misbehavior::Abort => std::process::abort(),
            Misbehavior::Exit => std::process::exit(7),
            Misbehavior::Hang => loop {
                std::thread::park();
            },
        }
    }
}
