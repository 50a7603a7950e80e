//! Starting the real `procjob-worker` binary and talking to it with the
//! crate's own encoder: a handshake, then batches, its peak memory, then
//! its exit status.
#![allow(dead_code)] // each test file uses a part

use std::io::{BufReader, Read, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use procjob_worker::array::{self, Array, InlineEncoder, Placement};
use procjob_worker::protocol::{
    self, Batch, FrameKind, Hello, MemorySnapshot, Outcome, Reply, Request, Results, TaskFailure, TaskKind,
    TaskRequest, PROTOCOL_VERSION,
};
use procjob_worker::secret::PoolSecret;

/// The longest a test may talk to one worker: a failsafe that kills a
/// hung worker so the test fails instead of hanging, never a wait.
const FAILSAFE: Duration = Duration::from_secs(120);

/// A running worker.
pub struct Worker {
    child: Child,
    /// The secret it was started with, which its handshake must carry.
    secret: PoolSecret,
    input: Option<ChildStdin>,
    output: BufReader<ChildStdout>,
    stderr: Option<std::thread::JoinHandle<String>>,
    stop_watchdog: Option<mpsc::Sender<()>>,
}

/// A frame's arrays as read: each, or why it could not be had.
pub type FrameArrays = Vec<Result<Array, array::ArrayError>>;

/// How a worker ended.
#[derive(Debug)]
pub struct Exit {
    pub code: Option<i32>,
    pub signal: Option<i32>,
    pub stderr: String,
}

impl Worker {
    /// Starts `procjob-worker` and completes the handshake.
    pub fn start() -> Worker {
        Worker::start_idle(0)
    }

    /// Starts `procjob-worker` and completes a handshake that asks it to
    /// exit after `idle_ms` milliseconds without a request (0: never).
    pub fn start_idle(idle_ms: u64) -> Worker {
        let mut w = Worker::spawn();
        let mut hello = w.hello();
        if let Request::Hello(h) = &mut hello {
            h.idle_timeout_ms = idle_ms;
        }
        w.send_message(&hello, &[]);
        let ready = protocol::recv::<_, Reply>(&mut w.output, FrameKind::Reply).expect("no answer to Hello");
        assert!(matches!(ready.message, Reply::Ready(_)), "{:?}", ready.message);
        w
    }

    /// The handshake this worker accepts: its secret, and the system's
    /// temp folder (where the tests' files are) as the folder it may map.
    pub fn hello(&self) -> Request {
        let temp = std::env::temp_dir().canonicalize().expect("the temp folder");
        Request::Hello(Hello {
            protocol: PROTOCOL_VERSION,
            worker_index: 0,
            binary: Default::default(),
            idle_timeout_ms: 0,
            reuse_lent_pages: false,
            secret: self.secret.clone(),
            folders: vec![temp],
        })
    }

    /// Starts `procjob-worker`, handing it a fresh pool secret, and sends
    /// nothing.
    pub fn spawn() -> Worker {
        let secret = PoolSecret::generate().expect("a pool secret");
        let mut command = Command::new(env!("CARGO_BIN_EXE_procjob-worker"));
        command.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let pipe = secret.hand_to(&mut command).expect("the secret's pipe");
        let mut child = command.spawn().expect("cannot start procjob-worker");
        drop(pipe);
        let pid = child.id() as i32;
        let (stop, stopped) = mpsc::channel::<()>();
        std::thread::spawn(move || {
            if let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(FAILSAFE) {
                eprintln!("failsafe: killing worker {pid} after {FAILSAFE:?}");
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
            }
        });
        let mut err = child.stderr.take().unwrap();
        let stderr = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = err.read_to_string(&mut s);
            s
        });
        Worker {
            secret,
            input: child.stdin.take(),
            output: BufReader::new(child.stdout.take().unwrap()),
            child,
            stderr: Some(stderr),
            stop_watchdog: Some(stop),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The worker's peak resident set size so far (`VmHWM` in
    /// `/proc/PID/status`), bytes. (Not `wait4`'s `ru_maxrss`: Linux
    /// counts into it the memory of the test process the worker was
    /// forked from before it ran `exec`.)
    pub fn peak_rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).expect("the worker is gone");
        let line = status.lines().find(|l| l.starts_with("VmHWM:")).expect("no VmHWM");
        line["VmHWM:".len()..].trim().trim_end_matches("kB").trim().parse::<u64>().expect("VmHWM in kB") * 1024
    }

    /// Writes one request frame with `inline`'s bytes as its bulk.
    pub fn send_message(&mut self, message: &Request, inline: &[Array]) {
        let bulk: Vec<&[u8]> = inline.iter().map(Array::as_bytes).collect();
        let input = self.input.as_mut().expect("stdin closed");
        protocol::send(input, FrameKind::Request, message, &bulk).expect("cannot send a frame");
    }

    /// Sends a batch without waiting for its answer.
    pub fn send(&mut self, batch: &Batch, inline: &[Array]) {
        self.send_message(&Request::Run(batch.clone()), inline);
    }

    /// Writes raw bytes into the worker's input.
    pub fn send_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        let input = self.input.as_mut().expect("stdin closed");
        input.write_all(bytes)?;
        input.flush()
    }

    /// Sends a batch and reads its `Results` and their inline arrays.
    pub fn run(&mut self, batch: &Batch, inline: &[Array]) -> (Results, Vec<Array>) {
        self.send(batch, inline);
        self.results()
    }

    /// Sends a batch and reads its `Results` and their inline arrays, and
    /// not the memory snapshot that may follow.
    pub fn results_alone_of(&mut self, batch: &Batch, inline: &[Array]) -> (Results, Vec<Array>) {
        self.send(batch, inline);
        self.results_alone()
    }

    /// Reads one `Results` reply and its inline arrays, and the memory
    /// snapshot that follows it when it says one does.
    pub fn results(&mut self) -> (Results, Vec<Array>) {
        let (results, arrays) = self.results_alone();
        if results.memory_follows {
            self.memory();
        }
        (results, arrays)
    }

    /// Reads one `Results` reply and its inline arrays, and not the memory
    /// snapshot that may follow.
    pub fn results_alone(&mut self) -> (Results, Vec<Array>) {
        let frame = protocol::recv::<_, Reply>(&mut self.output, FrameKind::Reply).expect("no reply");
        self.arrays_of(frame)
    }

    /// Reads the next frame's head (prelude and payload), not its arrays.
    pub fn frame(&mut self) -> protocol::Frame<Reply> {
        protocol::recv::<_, Reply>(&mut self.output, FrameKind::Reply).expect("no reply")
    }

    /// Whether the worker's output ends within `limit` (with no frame
    /// before the end).
    pub fn output_ends_within(&mut self, limit: Duration) -> bool {
        use std::io::BufRead;
        use std::os::fd::AsFd;
        if self.output.buffer().is_empty() {
            let mut fds = [nix::poll::PollFd::new(self.output.get_ref().as_fd(), nix::poll::PollFlags::POLLIN)];
            let ms = u16::try_from(limit.as_millis()).unwrap_or(u16::MAX);
            if nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(ms)).unwrap_or(0) == 0 {
                return false;
            }
        }
        let _ = self.output.fill_buf();
        matches!(protocol::recv::<_, Reply>(&mut self.output, FrameKind::Reply), Err(protocol::DecodeError::Closed))
    }

    /// The arrays of a `Results` frame whose head was read.
    pub fn arrays_of(&mut self, frame: protocol::Frame<Reply>) -> (Results, Vec<Array>) {
        let (frame, arrays) = self.try_arrays_of(frame);
        let arrays = arrays.expect("cannot read the reply's arrays");
        let arrays = arrays.into_iter().collect::<Result<Vec<_>, _>>().expect("an array of the reply");
        match frame.message {
            Reply::Results(r) => (r, arrays),
            other => panic!("expected Results, got {other:?}"),
        }
    }

    /// Reads the arrays of a frame whose head was read, or why they cannot
    /// be read.
    pub fn try_arrays_of(
        &mut self,
        frame: protocol::Frame<Reply>,
    ) -> (protocol::Frame<Reply>, Result<FrameArrays, protocol::DecodeError>) {
        // The worker is this process's child: its lent results are read
        // out of its memory, as the coordinator does.
        let lender = array::Lender::new(self.child.id());
        let arrays = array::read_arrays(
            &mut self.output,
            frame.message.array_refs(),
            frame.bulk_len,
            Some(&lender),
            &mut |_, _| Placement::Own,
        );
        (frame, arrays)
    }

    /// Reads a `Reply::Memory`, which carries no bulk.
    pub fn memory(&mut self) -> MemorySnapshot {
        let frame = protocol::recv::<_, Reply>(&mut self.output, FrameKind::Reply).expect("no reply");
        assert_eq!(frame.bulk_len, 0, "a memory snapshot with bulk");
        match frame.message {
            Reply::Memory(m) => m,
            other => panic!("expected Memory, got {other:?}"),
        }
    }

    /// Closes the worker's input and waits for it to exit.
    pub fn finish(mut self) -> Exit {
        drop(self.input.take());
        let pid = self.child.id() as libc::pid_t;
        let mut status = 0;
        // SAFETY: waits for our own child, writing into a live local.
        let waited = unsafe { libc::waitpid(pid, &mut status, 0) };
        assert_eq!(waited, pid, "waitpid: {}", std::io::Error::last_os_error());
        drop(self.stop_watchdog.take());
        let stderr = self.stderr.take().map(|t| t.join().unwrap_or_default()).unwrap_or_default();
        Exit {
            code: libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status)),
            signal: libc::WIFSIGNALED(status).then(|| libc::WTERMSIG(status)),
            stderr,
        }
    }
}

/// A batch of call `call` running `kind` on each of `inputs`, encoded with
/// the crate's encoder (owned arrays inline, mapped ones as file
/// references), and the arrays whose bytes form its bulk.
pub fn batch_of<T: serde::Serialize>(kind: &str, call: u64, inputs: &[T]) -> (Batch, Vec<Array>) {
    let mut inline = Vec::new();
    let tasks = inputs
        .iter()
        .enumerate()
        .map(|(i, input)| {
            let mut encoder = InlineEncoder::default();
            let (input, arrays) = array::encode_with(input, &mut encoder).expect("cannot encode an input");
            inline.extend(encoder.inline);
            TaskRequest { index: i as u64, input, arrays }
        })
        .collect();
    let kind = TaskKind { name: kind.to_string(), entry: None };
    (Batch { call, kind, tasks, timestamps: false, shared: None }, inline)
}

/// The failure of an outcome that must have failed.
pub fn failure(outcome: &Outcome) -> &TaskFailure {
    match outcome {
        Outcome::Failed(f) => f,
        Outcome::Ok { .. } => panic!("the task succeeded"),
    }
}
