//! procjob: a multi-process job runner in the spirit of joblib.
//!
//! A coordinator hands serializable tasks to a pool of worker processes
//! over pipes; large arrays travel as memory-mapped files instead of
//! copies; results come back in order. The worker processes are
//! re-executions of the running binary, so a program that uses procjob
//! calls [`init`] first in `main`:
//!
//! ```
//! use procjob::{Array, Parallel, Task};
//! use serde::{Deserialize, Serialize};
//!
//! /// Sums one row block of a large matrix.
//! struct RowSums;
//!
//! #[derive(Serialize, Deserialize)]
//! struct Block {
//!     rows: Array, // travels as a file reference when large
//! }
//!
//! impl Task for RowSums {
//!     type Input = Block;
//!     type Output = Vec<f64>;
//!     type Error = String;
//!     fn run(block: Block) -> Result<Vec<f64>, String> {
//!         let n = block.rows.shape()[1];
//!         let data = block.rows.as_slice::<f64>().map_err(|e| e.to_string())?;
//!         Ok(data.chunks(n).map(|row| row.iter().sum()).collect())
//!     }
//! }
//!
//! fn main() -> Result<(), procjob::Error> {
//!     procjob::init();
//!     let m = Array::from_vec(vec![1000, 1000], vec![1.0f64; 1_000_000]);
//!     let blocks = (0..10).map(|i| Block { rows: m.rows(i * 100..(i + 1) * 100).unwrap() });
//!     let sums: Vec<Vec<f64>> = Parallel::new().n_jobs(2).run::<RowSums, _>(blocks)?;
//!     assert!(sums.iter().flatten().all(|&s| s == 1000.0));
//!     Ok(())
//! }
//! ```
//!
//! # What to call, in order
//!
//! 1. [`init`], first in `main` (a test file: [`test_support!`]).
//! 2. [`Parallel::new`], with [`n_jobs`](Parallel::n_jobs),
//!    [`max_nbytes`](Parallel::max_nbytes), [`timeout`](Parallel::timeout),
//!    [`retries`](Parallel::retries) and the other settings.
//! 3. [`Parallel::run`] (ordered results), [`run_iter`](Parallel::run_iter)
//!    (streamed, in order), [`run_unordered`](Parallel::run_unordered)
//!    (as they complete), for a [`Task`] type of your own; its inputs and
//!    outputs are serde types, and the [`Array`]s in them travel as raw
//!    bytes or as memory maps.
//! 4. [`Error`] says which task, which worker and why; [`Parallel::last_call`]
//!    what the call moved.
//! 5. Optionally, [`signals::install`], so that Ctrl-C and the other
//!    signals that end a program stop the workers and remove the temp
//!    files first.
//!
//! Beyond the API: [`matmul`], the block-row matrix product job that the
//! `procjob` command line runs (its modes, inputs and runner);
//! [`run_folder`], the private temp folder of a run; [`tasks`], the task
//! kinds built in. The command line itself ([`cli`], feature `cli`, on by
//! default) is left out with `default-features = false`.
//!
//! The layers: [`procjob_worker`] holds what both sides share (wire
//! protocol, `.npy` files, arrays, tasks, kernels, the serve loop); this
//! crate holds the coordinator: the pool and its transport (processes and
//! pipes), the scheduler (dispatch decisions), `Parallel` (the API), and the
//! matmul job and command line; docs/architecture.md draws them.
#![warn(missing_docs)]
#![deny(unreachable_pub, missing_debug_implementations)]

/// `eprintln!`, but the whole line in one write: `eprintln!` writes its
/// pieces one by one to the unbuffered stderr, and a reader that forwards
/// them (mpirun, for a rank) may put its own output between them — it
/// printed its MPI_ABORT banner inside "procjob: rank 0 (host …) panicked".
macro_rules! say {
    ($($arg:tt)*) => {
        $crate::say_line(format!($($arg)*))
    };
}

/// [`say!`]'s write: `line` and a newline, in one `write` (a line under
/// the pipe's 4 KiB is not split by another writer to the same pipe).
pub(crate) fn say_line(mut line: String) {
    line.push('\n');
    let _ = std::io::Write::write_all(&mut std::io::stderr().lock(), line.as_bytes());
}

#[cfg(feature = "cli")]
pub mod cli;
mod error;
mod lifecycle;
pub mod matmul;
mod parallel;
mod pool;
pub mod run_folder;
mod scheduler;
pub mod signals;
mod trace;

pub use error::{Error, TaskCause, TaskId, WorkerExit, WorkerId};
pub use parallel::{
    CallStats, IntoTaskError, Ordered, Parallel, Progress, Unordered, Wire, DEFAULT_IDLE_TIMEOUT, DEFAULT_MAX_NBYTES,
};
pub use pool::{StartMethod, Traffic, WorkerReport};
pub use procjob_worker::array::{ArrayError, Rows};
pub use procjob_worker::protocol::{Access, MemorySnapshot};
pub use procjob_worker::task::TaskError;
/// The `ndarray` crate that [`Array::view`] and [`Array::from_ndarray`]
/// speak (the `ndarray` feature), and its complex type.
#[cfg(feature = "ndarray")]
pub use procjob_worker::{ndarray, num_complex};
pub use procjob_worker::{Array, Complex, DType, Element, Task};
pub use scheduler::{BatchSize, PreDispatch};
pub use trace::{Lane, Span, Trace};

/// Internals that the project's own tests and benchmarks drive directly;
/// not part of the API.
#[doc(hidden)]
pub mod __private {
    pub use crate::parallel::resolve_n_jobs;
    pub use crate::pool::{available_cpus, thread_count, PoolConfig, PoolEvent, WorkerEvent, WorkerPool};
}

/// Makes this process a worker when it was started as one, and otherwise
/// returns at once. Call it as the first line of `main` in any binary that
/// uses [`Parallel`]: procjob starts workers by re-executing the running
/// binary, and `init` is where a re-execution stops being your program.
///
/// A binary that forgets it fails loudly in the worker ("did not call
/// procjob::init()") instead of starting workers recursively. A task that
/// itself calls [`Parallel`] is fine: in a worker, that call runs its tasks
/// sequentially in the worker ([`Parallel::runs_in_process`]).
///
/// Under an MPI launch (`mpirun`, `srun`) of a binary built with the `mpi`
/// feature, `init` also joins the job: every rank but 0 becomes a node
/// agent and never returns from it, and rank 0's pools spread their
/// workers over the nodes (see [`cluster`]).
pub fn init() {
    pool::INIT_CALLED.store(true, std::sync::atomic::Ordering::Relaxed);
    if procjob_worker::serve::is_worker_process() {
        pool::mark_serving();
        procjob_worker::serve::run_worker(&procjob_worker::Registry::builtin());
    }
    pool::cluster::init();
}

/// Whether this process was started as a procjob worker.
pub fn is_worker_process() -> bool {
    procjob_worker::serve::is_worker_process()
}

/// Lets a test or bench file run its own tasks in worker processes.
///
/// A test binary's `main` belongs to the test harness, so [`init`] cannot
/// be its first line. This macro defines a test named
/// `__procjob_worker_entry`; when procjob starts workers from a binary
/// whose `main` did not call [`init`], it runs the binary with only that
/// test selected, and the test becomes the worker. Put it once in each test
/// file that uses [`Parallel`], at the top level of the file: inside a
/// module (such as `#[cfg(test)] mod tests`) the test is named
/// `tests::__procjob_worker_entry`, the harness finds no test of the exact
/// name, and the workers exit before their handshake. In a normal run the
/// test does nothing.
#[macro_export]
macro_rules! test_support {
    () => {
        #[test]
        fn __procjob_worker_entry() {
            if $crate::is_worker_process() {
                $crate::__serve_as_worker();
            }
        }
    };
}

#[doc(hidden)]
pub fn __serve_as_worker() -> ! {
    pool::mark_serving();
    procjob_worker::serve::run_worker(&procjob_worker::Registry::builtin())
}

/// Running across the ranks of an MPI job (`mpirun -n R …`, `srun`):
/// what the launch says, and, with the `mpi` feature, the job's nodes as
/// rank 0 sees them.
pub mod cluster {
    pub use crate::pool::cluster::{bytes_between_ranks, job_cpus, launch, Launch};
    #[cfg(feature = "mpi")]
    pub use crate::pool::cluster::{probe_shared, set_backend_local, worker_places, world, Node, World};
}

/// Task kinds built into procjob.
pub mod tasks {
    pub use procjob_worker::matmul::{Dot, MatmulBlock, MatmulInput, MatmulOutput};

    use procjob_worker::{Array, Task};

    /// `A · B` in this process, with the same kernel the workers use.
    ///
    /// A result of 4 MiB to under 32 MiB, once dropped, lends its pages to
    /// the next result of the same byte size on that thread (no fresh pages
    /// to fault in and zero, as numpy's next product reuses what glibc kept
    /// of its last); [`Array::drop_spare_pages`](crate::Array::drop_spare_pages)
    /// gives them back sooner.
    pub fn dot(a: &Array, b: &Array) -> Result<Array, String> {
        Dot::run((a.clone(), b.clone()))
    }
}
