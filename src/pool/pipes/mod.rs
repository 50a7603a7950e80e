//! Worker processes on this machine, reached through pipes: the transport
//! procjob runs on today.
//!
//! Each worker is a re-execution of the running binary with
//! `PROCJOB_WORKER` set (or, with the fork start method, a fork of this
//! process); its stdin and stdout are pipes. Requests are written from the
//! thread that owns the pool; one reader thread per worker reads its
//! replies and forwards them, with their inline arrays already read (or
//! their lent ones copied out of the worker's memory), on the pool's
//! channel, and itself writes the worker's `Lending` requests (the input is
//! behind a lock). A worker never writes a reply before it has read its
//! whole request, and the reader threads drain replies continuously, so
//! neither side can block the other for good. A reader's `Lending` write
//! cannot wait behind a batch either: the pool sends a worker its next
//! batch only once the reader has forwarded the last answer, which it does
//! after that write, so the worker's input is empty and unlocked then (one
//! batch in flight per worker; a pool that sent a second one ahead would
//! have to send `Lending` with its batches instead).

mod fork;
mod reader;
mod reap;
mod spawn;

use std::fs::File;
use std::io::BufWriter;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use procjob_worker::protocol::{self, FrameKind, Hello, Request};
use procjob_worker::secret::SECRET_FD_ENV;
use procjob_worker::serve::WORKER_ENV;

use super::transport::{Capabilities, Started, Transport};
use super::{PoolEvent, ReaderShared, SendError, StartMethod};
use crate::error::{Error, WorkerExit, WorkerId};

pub use fork::thread_count;
#[cfg(feature = "mpi")]
pub(crate) use reader::read_replies;
#[cfg(feature = "mpi")]
pub(crate) use reap::{kill_pid, wait_or_kill};
pub use spawn::available_cpus;
use spawn::HARNESS_ENTRY;
pub(crate) use spawn::{mark_serving, serving_as_worker, start_failure, INIT_CALLED, THREAD_ENV};

/// A worker's input pipe: written by the thread that owns the pool, and by
/// the worker's reader thread to acknowledge the results it was lent
/// (`Request::Lending`), which holds only a weak reference: dropping this
/// one closes the pipe.
type Input = Arc<Mutex<BufWriter<File>>>;

/// One live worker process.
struct Process {
    pid: u32,
    input: Option<Input>,
    /// A second handle on its output pipe, to see whether a reply is
    /// waiting there (the reader thread owns the first).
    output: Option<File>,
    /// Set by the reader thread while it reads a frame.
    arriving: Arc<AtomicBool>,
    reader: Option<JoinHandle<()>>,
    /// How it ended, once reaped.
    exited: Option<WorkerExit>,
}

/// Worker processes on this machine, with a pipe each way.
pub(crate) struct Pipes {
    /// The executable to start; `None` for the running one.
    program: Option<PathBuf>,
    start: StartMethod,
    events: Sender<PoolEvent>,
    readers: ReaderShared,
    processes: Vec<Option<Process>>,
    /// Whether workers may lend results by address (not when
    /// `PROCJOB_LEND=0`).
    lend: bool,
    /// Why `stop` had to kill the worker of a slot, when it did
    /// ([`Transport::kill_cause`]).
    kill_causes: std::collections::HashMap<usize, String>,
}

impl Pipes {
    /// `workers` slots, started as `start` says, reporting on `events`;
    /// their reader threads share `readers` with the pool.
    pub(crate) fn new(
        workers: usize,
        program: Option<PathBuf>,
        start: StartMethod,
        events: Sender<PoolEvent>,
        readers: ReaderShared,
    ) -> Pipes {
        let lend = std::env::var_os(reader::LEND_ENV).is_none_or(|v| v != "0");
        Pipes {
            program,
            start,
            events,
            readers,
            processes: (0..workers).map(|_| None).collect(),
            lend,
            kill_causes: Default::default(),
        }
    }

    /// Re-executes the program as the worker of slot `index`.
    fn spawn(&mut self, index: usize, generation: u64, hello: Hello) -> Result<Started, Error> {
        let workers = self.processes.len();
        let program = match &self.program {
            Some(p) => p.clone(),
            None => std::env::current_exe()
                .map_err(|e| Error::Start { index, reason: format!("cannot find the running executable: {e}") })?,
        };
        // The secret goes through a pipe only this child inherits, never the
        // command line or the environment (see procjob_worker::secret).
        let secret = hello
            .secret
            .pipe_for_child()
            .map_err(|e| Error::Start { index, reason: format!("cannot make the secret's pipe: {e}") })?;
        let secret_fd = secret.as_raw_fd();
        let mut cmd = Command::new(&program);
        cmd.env(WORKER_ENV, std::process::id().to_string())
            .env(SECRET_FD_ENV, secret_fd.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if self.program.is_none() && !INIT_CALLED.load(Ordering::Relaxed) {
            // Not a binary whose main calls procjob::init(): a test or bench
            // harness. Ask it to run only the entry that test_support! defines.
            cmd.args([HARNESS_ENTRY, "--exact", "--nocapture", "--test-threads=1", "-q"]);
        }
        let threads = (available_cpus() / workers.max(1)).max(1).to_string();
        for var in THREAD_ENV {
            if std::env::var_os(var).is_none() {
                cmd.env(var, &threads);
            }
        }
        // SAFETY: fcntl, setpgid and sigprocmask are async-signal-safe;
        // nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                // The secret's pipe is close-on-exec in the coordinator, so
                // no other child inherits it; this child keeps it.
                if libc::fcntl(secret_fd, libc::F_SETFD, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // Own process group: a terminal's Ctrl-C reaches the
                // coordinator, which decides how workers stop.
                nix::unistd::setpgid(nix::unistd::Pid::from_raw(0), nix::unistd::Pid::from_raw(0))
                    .map_err(std::io::Error::from)?;
                // Signals the coordinator blocked (see crate::signals) would
                // stay blocked across exec; a worker takes them as usual.
                nix::sys::signal::sigprocmask(
                    nix::sys::signal::SigmaskHow::SIG_SETMASK,
                    Some(&nix::sys::signal::SigSet::empty()),
                    None,
                )
                .map_err(std::io::Error::from)
            });
        }
        let requested_ns = procjob_worker::clock::monotonic_ns();
        let mut child = spawn::spawn_from_long_lived_thread(cmd)
            .map_err(|e| Error::Start { index, reason: format!("cannot run {}: {e}", program.display()) })?;
        drop(secret);
        let pid = child.id();
        let spawned_ns = procjob_worker::clock::monotonic_ns();
        crate::lifecycle::worker_started(pid);
        let stdin = File::from(std::os::fd::OwnedFd::from(child.stdin.take().expect("stdin was piped")));
        let stdout = File::from(std::os::fd::OwnedFd::from(child.stdout.take().expect("stdout was piped")));
        // The pool waits for and kills the worker by pid from here on.
        drop(child);
        self.attach(index, generation, pid, stdin, stdout, hello, requested_ns, spawned_ns)
    }

    /// Wires up a started worker: its reader thread, its input, and the
    /// handshake request.
    #[expect(clippy::too_many_arguments, reason = "one worker's parts, each used once")]
    fn attach(
        &mut self,
        index: usize,
        generation: u64,
        pid: u32,
        stdin: File,
        stdout: File,
        hello: Hello,
        requested_ns: u64,
        spawned_ns: u64,
    ) -> Result<Started, Error> {
        enlarge_pipe(stdin.as_raw_fd());
        enlarge_pipe(stdout.as_raw_fd());
        let tx = self.events.clone();
        let readers = self.readers.clone();
        let inherited = match &self.start {
            StartMethod::Fork { inherit } => inherit.clone(),
            StartMethod::Spawn => Vec::new(),
        };
        let output = stdout.try_clone().ok();
        let arriving = Arc::new(AtomicBool::new(false));
        let reading = Arc::clone(&arriving);
        let input: Input = Arc::new(Mutex::new(BufWriter::with_capacity(1 << 16, stdin)));
        // The worker is this process's child: its results may be read out
        // of its memory, and its reader tells it when they have been.
        let lend = self.lend.then(|| reader::Lending { pid, input: Arc::downgrade(&input) });
        let reader = std::thread::Builder::new()
            .name(format!("procjob-reader-{index}"))
            .spawn(move || reader::read_replies(index, generation, stdout, tx, readers, inherited, reading, lend));
        let reader = match reader {
            Ok(reader) => reader,
            Err(e) => {
                // Not wired up: stop it here, so nothing is left behind.
                drop(input);
                reap::kill_pid(pid);
                let _ = reap::wait_or_kill(pid, Duration::ZERO);
                crate::lifecycle::worker_reaped(pid);
                return Err(Error::Start { index, reason: format!("cannot start a reader thread: {e}") });
            }
        };
        let sent = protocol::send(&mut *lock(&input), FrameKind::Request, &Request::Hello(hello), &[]);
        self.processes[index] =
            Some(Process { pid, input: Some(input), output, arriving, reader: Some(reader), exited: None });
        // A failed write: the worker died at once; its reader reports how.
        Ok(Started { index, pid, requested_ns, spawned_ns, hello_bytes: sent.ok() })
    }

    /// Forks a worker into each of `slots` (empty), then wires them up. All
    /// forks happen before any reader thread starts: a process may fork
    /// only while it has one thread (the child gets a copy of the forking
    /// thread alone, and locks held by any other would stay locked in it for
    /// good).
    fn start_forked(
        &mut self,
        slots: &[(usize, u64)],
        hello: &dyn Fn(usize) -> Hello,
    ) -> (Vec<Started>, Option<Error>) {
        let StartMethod::Fork { inherit } = &self.start else { unreachable!("called for fork only") };
        let inherit = inherit.clone();
        let parent = std::process::id() as i32;
        let hellos: Vec<Hello> = slots.iter().map(|&(index, _)| hello(index)).collect();
        let mut forked = Vec::with_capacity(slots.len());
        let result = crate::signals::single_threaded(|| {
            spawn::stop_spawner_if_idle();
            let threads = fork::settled_thread_count();
            if threads != Some(1) {
                return Err(Error::Config(format!(
                    "cannot fork workers: this process has {} threads, and fork copies only the calling one \
                     (any lock another thread holds would stay locked in the child forever); start them with \
                     --start-method spawn, or fork before starting threads",
                    threads.map_or("several".to_string(), |t| t.to_string())
                )));
            }
            for (&(index, generation), hello) in slots.iter().zip(&hellos) {
                let requested_ns = procjob_worker::clock::monotonic_ns();
                let (to_child, from_child) = fork::fork_one(&inherit, parent, &hello.secret)
                    .map_err(|e| Error::Start { index, reason: format!("cannot fork: {e}") })?;
                let (pid, stdin, stdout) = (to_child.0, to_child.1, from_child);
                crate::lifecycle::worker_started(pid);
                let spawned_ns = procjob_worker::clock::monotonic_ns();
                forked.push((index, generation, pid, stdin, stdout, requested_ns, spawned_ns));
            }
            Ok(())
        });
        // Wire up what was forked even if a later fork failed, so every
        // child is stopped with the pool.
        let mut started = Vec::with_capacity(forked.len());
        let mut failure = result.err();
        for ((index, generation, pid, stdin, stdout, requested_ns, spawned_ns), hello) in forked.into_iter().zip(hellos)
        {
            match self.attach(index, generation, pid, stdin, stdout, hello, requested_ns, spawned_ns) {
                Ok(s) => started.push(s),
                Err(e) => {
                    failure.get_or_insert(e);
                }
            }
        }
        (started, failure)
    }

    fn input(&self, index: usize) -> Option<&Input> {
        self.processes.get(index)?.as_ref()?.input.as_ref()
    }
}

/// The writer behind `input`, even if a thread panicked while writing (the
/// frame it left half-written fails the worker's read, which is reported).
pub(crate) fn lock(input: &Mutex<BufWriter<File>>) -> std::sync::MutexGuard<'_, BufWriter<File>> {
    input.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Transport for Pipes {
    fn capabilities(&self) -> Capabilities {
        let fork = matches!(self.start, StartMethod::Fork { .. });
        Capabilities {
            fork,
            kill_one: true,
            restart_one: true,
            shared_filesystem: true,
            // A configured worker program could relay the pipe (`pv`
            // splices pipe to pipe), keeping lent pages.
            reads_own_replies: self.program.is_none() || fork,
            reexecutes_program: self.program.is_none() && !fork,
        }
    }

    fn start(&mut self, slots: &[(usize, u64)], hello: &dyn Fn(usize) -> Hello) -> (Vec<Started>, Option<Error>) {
        if let StartMethod::Fork { .. } = self.start {
            return self.start_forked(slots, hello);
        }
        let mut started = Vec::with_capacity(slots.len());
        for &(index, generation) in slots {
            match self.spawn(index, generation, hello(index)) {
                Ok(s) => started.push(s),
                Err(e) => return (started, Some(e)),
            }
        }
        (started, None)
    }

    fn send(&mut self, index: usize, worker: WorkerId, request: &Request, bulk: &[&[u8]]) -> Result<u64, SendError> {
        write_batch(self.input(index), worker, request, bulk)
    }

    fn send_many(&mut self, frames: &[(usize, WorkerId, &Request, &[&[u8]])]) -> Vec<Result<u64, SendError>> {
        let mut inputs: Vec<Option<&Input>> =
            self.processes.iter().map(|p| p.as_ref().and_then(|p| p.input.as_ref())).collect();
        std::thread::scope(|scope| {
            let handles: Vec<_> = frames
                .iter()
                .map(|&(index, worker, request, bulk)| {
                    let input = inputs.get_mut(index).and_then(Option::take);
                    // A thread that cannot be started (a process limit)
                    // has written nothing: the batch is not sent.
                    std::thread::Builder::new()
                        .name("procjob-send".into())
                        .spawn_scoped(scope, move || write_batch(input, worker, request, bulk))
                        .map_err(|e| {
                            SendError::Unsendable(std::io::Error::new(
                                e.kind(),
                                format!("cannot start a thread to write it: {e}"),
                            ))
                        })
                })
                .collect();
            handles
                .into_iter()
                .zip(frames)
                .map(|(h, &(_, worker, _, _))| match h {
                    Ok(h) => h.join().unwrap_or_else(|_| {
                        Err(SendError::Broken(Error::Transport {
                            worker,
                            reason: "the thread sending a batch panicked".into(),
                        }))
                    }),
                    Err(not_started) => Err(not_started),
                })
                .collect()
        })
    }

    /// The worker has closed its input, which it does only by exiting (its
    /// idle timeout, or a crash): its input pipe has no reader any more.
    fn input_closed(&self, index: usize) -> bool {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        use std::os::fd::AsFd;
        let Some(input) = self.input(index) else { return true };
        let input = lock(input);
        let mut fds = [PollFd::new(input.get_ref().as_fd(), PollFlags::POLLOUT)];
        loop {
            match poll(&mut fds, PollTimeout::ZERO) {
                Ok(_) => return fds[0].revents().is_some_and(|r| r.contains(PollFlags::POLLERR)),
                Err(nix::errno::Errno::EINTR) => continue,
                Err(_) => return false,
            }
        }
    }

    /// Its reply is being read, or bytes (or the end of its stream) wait in
    /// its output pipe.
    fn reply_arriving(&self, index: usize) -> bool {
        use std::os::fd::AsFd;
        let Some(p) = self.processes[index].as_ref() else { return false };
        if p.arriving.load(Ordering::SeqCst) {
            return true;
        }
        let Some(output) = p.output.as_ref() else { return false };
        readable_now(output.as_fd())
    }

    fn poll_exit(&mut self, index: usize) -> Option<WorkerExit> {
        let p = self.processes[index].as_mut()?;
        if p.exited.is_none() {
            // Not reaped yet: its reader may still be reading by its pid
            // ([`Transport::stop`] reaps it once the reader is done).
            if let Ok(Some(exit)) = reap::peek_exit(p.pid, false) {
                p.exited = Some(exit);
            }
        }
        p.exited
    }

    fn close_input(&mut self, index: usize) {
        if let Some(p) = self.processes[index].as_mut() {
            drop(p.input.take());
        }
    }

    fn kill(&mut self, index: usize) {
        if let Some(p) = self.processes[index].as_ref() {
            if p.exited.is_none() {
                reap::kill_pid(p.pid);
            }
        }
    }

    /// Waits for the worker to end (killing it if it lives on past `grace`),
    /// joins its reader, then reaps it: until then its pid stays its own,
    /// so a reader still copying its lent results by pid reads nothing
    /// else's.
    fn stop(&mut self, index: usize, grace: Duration) -> WorkerExit {
        let Some(mut p) = self.processes[index].take() else { return WorkerExit::Unknown };
        drop(p.input.take());
        let (exit, killed) = match p.exited {
            Some(exit) => (exit, false),
            None => reap::wait_or_kill_unreaped(p.pid, grace),
        };
        match killed {
            true => self.kill_causes.insert(index, still_running(grace, INPUT_CLOSED)),
            false => self.kill_causes.remove(&index),
        };
        if let Some(r) = p.reader.take() {
            let _ = r.join();
        }
        reap::reap(p.pid);
        crate::lifecycle::worker_reaped(p.pid);
        exit
    }

    fn kill_cause(&mut self, index: usize) -> Option<String> {
        self.kill_causes.remove(&index)
    }
}

/// Why a worker that outlived `grace` after `event` was killed.
pub(crate) fn still_running(grace: Duration, event: &str) -> String {
    let s = grace.as_secs_f64();
    let s = if s.fract() == 0.0 { format!("{s:.0}") } else { format!("{s:.1}") };
    format!("it was still running {s} s after {event}")
}

/// The event [`stop`](Transport::stop) waits after: a worker exits when it
/// sees its input close.
pub(crate) const INPUT_CLOSED: &str = "its input was closed";

/// Writes one request frame to a worker's input (`None`: it is not running).
fn write_batch(input: Option<&Input>, worker: WorkerId, request: &Request, bulk: &[&[u8]]) -> Result<u64, SendError> {
    let Some(input) = input else {
        return Err(SendError::Broken(Error::Transport { worker, reason: "the worker is not running".into() }));
    };
    protocol::send(&mut *lock(input), FrameKind::Request, request, bulk).map_err(|e| match e.kind() {
        // `protocol::send` checks the message before writing a byte: it
        // fails to encode (InvalidData) or is over the limit (InvalidInput).
        std::io::ErrorKind::InvalidData | std::io::ErrorKind::InvalidInput => SendError::Unsendable(e),
        _ => SendError::Broken(Error::Transport { worker, reason: format!("cannot send a batch: {e}") }),
    })
}

/// Grows a pipe's buffer to 1 MiB where the system allows, so large blocks
/// need fewer context switches.
fn enlarge_pipe(fd: i32) {
    #[cfg(target_os = "linux")]
    // SAFETY: F_SETPIPE_SZ on a pipe fd we own; failure only leaves the default size.
    unsafe {
        libc::fcntl(fd, libc::F_SETPIPE_SZ, 1 << 20);
    }
}

/// Whether bytes (or the end of the stream) wait on `fd` now: the reply
/// a reader thread has not taken up yet.
pub(crate) fn readable_now(fd: std::os::fd::BorrowedFd<'_>) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
    loop {
        match poll(&mut fds, PollTimeout::ZERO) {
            Ok(_) => {
                let ready = PollFlags::POLLIN | PollFlags::POLLHUP | PollFlags::POLLERR;
                return fds[0].revents().is_some_and(|r| r.intersects(ready));
            }
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => return false,
        }
    }
}
