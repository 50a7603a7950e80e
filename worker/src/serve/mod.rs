//! The serve loop: what a worker process does from start to exit.
//!
//! [`run_worker`] prepares the process (reads its pool secret, moves the
//! protocol off fds 0 and 1, asks for a signal when the parent dies,
//! captures panics) and then [`serve`]s: check the handshake, then read a
//! request, run its tasks under panic capture, answer, until the input
//! closes.
//!
//! ```text
//! process ─► session::serve ─► handshake ─► loop { wait ─► recv ─► read ─► run ─► reply }
//!                                                  map_cache      (fault)   budget
//! ```
//!
//! Its rooms: `process` (start-up of a spawned or forked worker),
//! `session` (the loop of one conversation), `handshake`, `read` (a
//! batch's arrays: inline, mapped, inherited), `run` (a batch's tasks under
//! panic capture), `budget` and `reply` (the answer's limits, and how it is
//! written), `map_cache` and `wait` (the mappings kept between batches, and
//! the wait for the next request), and under the `test-tasks` feature
//! `fault` (the failure tests' fault injection, called before each task).

mod budget;
#[cfg(feature = "test-tasks")]
mod fault;
mod handshake;
mod map_cache;
mod process;
mod read;
mod reply;
mod run;
mod session;
mod wait;

pub use process::{is_worker_process, run_forked_worker, run_worker, WORKER_ENV};
pub use session::{serve, ServeError};
pub use wait::AsRawFdMaybe;

#[doc(hidden)]
pub use crate::io::protocol_output_fd;
