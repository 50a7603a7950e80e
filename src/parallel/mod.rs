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
//! by the next call. A stream ([`Ordered`], [`Unordered`]) dropped before
//! its end does not wait: the workers still running its tasks are killed,
//! and the next call starts fresh ones in their slots.
//!
//! A call's data flow, and the room each step lives in:
//!
//! ```text
//!    caller's inputs: T::Input                          outputs: T::Output
//!           │                                                ▲
//!  ┌────────▼─────────────── shell.rs: Call<T, I> ───────────┴────────────┐
//!  │  encode_with_buffer, arrays placed by       decode_with::<T::Output> │
//!  │  encoder.rs: CallEncoder (inline, dumped                ▲            │
//!  │  once to the run folder, or by reference)               │            │
//!  └────────┬────────────────────────────────────────────────┼────────────┘
//!           │ Encoded: bytes + array refs                    │ outputs by task
//!           │          (TaskCodec: the seam)                 │ index: bytes
//!           │                                                │ and arrays
//!  ┌────────▼────────── call.rs: CallCore, no task type ─────┴────────────┐
//!  │  queue ─► Scheduler: Pull | Send | Wait | Done                       │
//!  │  call/batch.rs: a batch in flight, its deadline, where outputs land  │
//!  │  call/send.rs: stage, write        call/receive.rs: replies, lost    │
//!  │                                    workers, retries, timeouts, ^C    │
//!  └────────┬────────────────────────────────────────────────▲────────────┘
//!           │ send / send_many                    next_event │
//!  ┌────────▼─────────────── WorkerPool (crate::pool) ───────┴────────────┐
//!  │  pipes ─► worker processes run the batches ─► replies (+ arrays)     │
//!  └──────────────────────────────────────────────────────────────────────┘
//! ```
//!
//! The rooms:
//! - `builder.rs`: [`Parallel`] and its settings, [`resolve_n_jobs`],
//!   [`CallStats`], [`Progress`]; the warm pool kept between calls.
//! - `shell.rs`: the typed shell of a call, the only code compiled once per
//!   task type: draws and encodes inputs, decodes outputs; and chooses how
//!   the call runs (`call::Engine`): on the pool, in this process
//!   (`here.rs`), or not at all for an empty input.
//! - `encoder.rs`: how the inputs' arrays travel, and the folders workers
//!   may map from.
//! - `call.rs` and `call/`: the call core, compiled once: the state machine
//!   around the scheduler and the pool, on encoded tasks and outcomes.
//! - `iter.rs`: [`Ordered`] and [`Unordered`], the iterators a call is read
//!   through.
//! - `here.rs`: a call run in the calling process (`n_jobs(1)`, and a call
//!   nested in a task), through the same erased entry a worker runs.
//! - `verbose.rs`: joblib's `verbose` progress messages on stderr.
//! - `env.rs`: defaults from `PROCJOB_N_JOBS` and `PROCJOB_MAX_NBYTES`.
//! - `map.rs` and `map/`: plain functions as tasks ([`Parallel::map`] and
//!   its kin), each function its own monomorphised [`Task`](crate::Task).

mod builder;
mod call;
mod encoder;
mod env;
mod here;
mod iter;
mod map;
mod shell;
mod verbose;

pub use builder::{resolve_n_jobs, CallStats, Parallel, Progress, DEFAULT_IDLE_TIMEOUT, DEFAULT_MAX_NBYTES};
pub use iter::{Ordered, Unordered};
pub use map::{IntoTaskError, Wire};
