//! The seam between the pool and the way it reaches its workers.
//!
//! [`WorkerPool`](super::WorkerPool) keeps the slots, generations, traffic,
//! memory figures, the pool's secret and the folders workers may map; a
//! [`Transport`] starts the workers, carries frames to them, reports what
//! they say, and stops them. [`Pipes`](super::pipes::Pipes) — worker
//! processes on this machine, re-executed or forked, with a pipe each way —
//! is one transport; the pool's unit tests run on a fake one that starts no
//! process, and a transport over MPI ranks can be another.
//!
//! A transport reports by sending [`PoolEvent`](super::PoolEvent)s, tagged
//! with the slot and generation it was given at start, on the channel it
//! was made with; the pool drops the events of generations it has replaced.

use std::time::Duration;

use procjob_worker::protocol::{Hello, Request};

use super::SendError;
use crate::error::{Error, WorkerExit, WorkerId};

/// What a transport can do, so that callers need not know which one runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// Workers can be forked from this process, inheriting its memory.
    pub fork: bool,
    /// One worker can be killed on its own (the others go on).
    pub kill_one: bool,
    /// A slot whose worker died can be given a fresh worker.
    pub restart_one: bool,
    /// Workers see this process's files (run folders, mapped arrays) at
    /// the same paths.
    pub shared_filesystem: bool,
    /// A worker's replies are read by this process's own readers, which
    /// copy every byte out of the pipe: the worker may reuse pages it lent
    /// the pipe ([`Hello::reuse_lent_pages`]).
    pub reads_own_replies: bool,
    /// Workers are re-executions of the running program, which must call
    /// `procjob::init()` first (said when one fails before its handshake).
    pub reexecutes_program: bool,
}

/// A worker the transport started in a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Started {
    /// The slot.
    pub index: usize,
    /// Its process id.
    pub pid: u32,
    /// When it was asked for (monotonic ns).
    pub requested_ns: u64,
    /// When the system had started it.
    pub spawned_ns: u64,
    /// Bytes of the handshake written to it (`None`: the write failed; the
    /// worker is gone, and its loss is reported as an event).
    pub hello_bytes: Option<u64>,
}

/// A way of reaching workers (see the module docs). `Send`, so that a
/// pool, and the `Parallel` that owns it, can move to another thread.
pub(crate) trait Transport: Send {
    /// What it can do.
    fn capabilities(&self) -> Capabilities;

    /// Starts a worker in each of `slots` (a slot index and the generation
    /// its events carry), and sends each the handshake `hello(index)`; the
    /// answer arrives as an event. Returns the workers started, and the
    /// first failure: those started before it are returned too, so that
    /// every one is stopped with the pool.
    fn start(&mut self, slots: &[(usize, u64)], hello: &dyn Fn(usize) -> Hello) -> (Vec<Started>, Option<Error>);

    /// Writes one frame, with the bytes of its inline arrays, to worker
    /// `index` (`worker` names it in errors).
    fn send(&mut self, index: usize, worker: WorkerId, request: &Request, bulk: &[&[u8]]) -> Result<u64, SendError>;

    /// Writes several frames, each to a different worker, at once.
    fn send_many(&mut self, frames: &[(usize, WorkerId, &Request, &[&[u8]])]) -> Vec<Result<u64, SendError>>;

    /// Whether worker `index` no longer reads its input (it has exited, or
    /// is not there): a frame written to it would fail.
    fn input_closed(&self, index: usize) -> bool;

    /// Whether worker `index`'s answer has begun to arrive (being read, or
    /// waiting to be): it has finished what it was sent, however late the
    /// caller looks.
    fn reply_arriving(&self, index: usize) -> bool;

    /// How worker `index` ended, if it has (without waiting); it is then
    /// reaped, and [`stop`](Transport::stop) returns the same.
    fn poll_exit(&mut self, index: usize) -> Option<WorkerExit>;

    /// Closes worker `index`'s input: a worker exits when it sees that.
    fn close_input(&mut self, index: usize);

    /// Kills worker `index` at once (it is reaped by [`stop`](Transport::stop)).
    fn kill(&mut self, index: usize);

    /// Stops worker `index`: closes its input, waits up to `grace` for it to
    /// exit, kills it if it has not, reaps it, and lets go of everything
    /// that served it. Returns how it ended.
    fn stop(&mut self, index: usize, grace: Duration) -> WorkerExit;

    /// Why procjob itself killed worker `index`, which [`stop`](Transport::stop)
    /// has just reaped, when it did without being asked to: it was still
    /// running `grace` after its input was closed, or (on a cluster) its
    /// rows could not be moved between nodes. A [`kill`](Transport::kill)
    /// the caller ordered (a timeout's) has no cause here: the caller knows
    /// it. Taken, so asked once, right after that `stop`.
    fn kill_cause(&mut self, _index: usize) -> Option<String> {
        None
    }
}
