//! A node agent: the rank that runs a node's workers for rank 0.
//!
//! It starts each worker as a local pool does (a re-execution of this
//! program, stdin and stdout piped, the pool's secret handed over a pipe
//! of its own, SIGKILL when the agent dies), and relays bytes: what rank 0
//! sends for a worker is written to its stdin by a writer thread, and what
//! the worker writes to stdout is read by a reader thread and sent to rank
//! 0 as it comes. The reader reaps the worker when its stream ends and
//! reports how it ended. Ranks of a node other than its agent run the same
//! loop and are never asked to start anything.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use procjob_worker::secret::PoolSecret;
use procjob_worker::serve::WORKER_ENV;

use super::link::{self, Incoming, Link, Outgoing};
use super::wire::{self, Down, Exit, Key, Span, Up, TAG_CONTROL, TAG_DATA, TAG_FILE};
use crate::pool::pipes::{kill_pid, still_running, wait_or_kill, THREAD_ENV};

/// Simulates a node that does not see rank 0's files (for tests): set to
/// `no`, the agent answers every shared-filesystem probe "not the same".
const SHARED_FS_ENV: &str = "PROCJOB_MPI_SHARED_FS";

/// One worker of this node.
struct Worker {
    pid: u32,
    /// Bytes for its stdin, to the writer thread (`None`: input closed).
    input: Option<Sender<Vec<u8>>>,
    /// Set once the reader thread has reaped it.
    reaped: Arc<AtomicBool>,
    reader: Option<JoinHandle<()>>,
    /// Bytes to send back to rank 0 when it answers its n-th batch.
    write_backs: WriteBacks,
}

/// Spans of files a worker writes, by the number of the batch that writes
/// them (see `ship.rs`).
type WriteBacks = Arc<Mutex<HashMap<u64, Vec<Span>>>>;

/// Sends a control message to rank 0.
fn up(link: &Link, m: &Up) {
    let _ = link.send(Outgoing { dest: 0, tag: TAG_CONTROL, bytes: wire::encode(m) });
}

/// Runs the agent until rank 0 says the job is over, then finalises MPI and
/// exits.
pub(super) fn run() -> ! {
    outlive_the_launchers_sigterm();
    let (tx, rx) = mpsc::channel();
    let stop = AtomicBool::new(false);
    let mut workers: HashMap<Key, Worker> = HashMap::new();
    link::run(rx, &stop, |m: Incoming| {
        if m.tag == TAG_FILE {
            super::ship::receive(&m.bytes);
            return;
        }
        if m.tag == TAG_DATA {
            if let Some((key, bytes)) = Key::split(&m.bytes) {
                if let Some(input) = workers.get(&key).and_then(|w| w.input.as_ref()) {
                    let _ = input.send(bytes.to_vec());
                }
            }
            return;
        }
        let Some(down) = wire::decode::<Down>(&m.bytes) else { return };
        match down {
            Down::Start { key, secret, threads } => match start(key, &secret, threads, &tx) {
                Ok(w) => {
                    up(&tx, &Up::Started { key, pid: w.pid });
                    workers.insert(key, w);
                }
                Err(reason) => up(&tx, &Up::StartFailed { key, reason }),
            },
            Down::CloseInput { key } => {
                if let Some(w) = workers.get_mut(&key) {
                    w.input = None;
                }
            }
            Down::Kill { key } => {
                if let Some(w) = workers.get(&key) {
                    if !w.reaped.load(Ordering::SeqCst) {
                        kill_pid(w.pid);
                    }
                }
            }
            Down::Probe { path, content } => {
                let simulated_private = std::env::var(SHARED_FS_ENV).is_ok_and(|v| v == "no");
                let same = !simulated_private && std::fs::read(&path).is_ok_and(|c| c == content);
                up(&tx, &Up::Probed { same });
            }
            Down::MakeFolder { path } => super::ship::make_folder(&path),
            Down::WriteBack { key, run, spans } => {
                if let Some(w) = workers.get(&key) {
                    w.write_backs.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(run, spans);
                }
            }
            Down::Shutdown => {
                stop_all(&mut workers);
                super::ship::remove_folders();
                up(&tx, &Up::Bye);
                stop.store(true, Ordering::SeqCst);
            }
        }
        // Forget workers that have ended (their reader has reported).
        workers.retain(|_, w| !(w.reaped.load(Ordering::SeqCst) && w.input.is_none()));
    });
    super::world::finalize();
    std::process::exit(0)
}

/// Closes every worker's input, gives them two seconds to exit, kills the
/// rest, and waits for their readers (which reap them).
fn stop_all(workers: &mut HashMap<Key, Worker>) {
    for w in workers.values_mut() {
        w.input = None;
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline && workers.values().any(|w| !w.reaped.load(Ordering::SeqCst)) {
        std::thread::sleep(Duration::from_millis(5));
    }
    for w in workers.values_mut() {
        if !w.reaped.load(Ordering::SeqCst) {
            kill_pid(w.pid);
        }
        if let Some(r) = w.reader.take() {
            let _ = r.join();
        }
    }
    workers.clear();
}

/// Starts the worker for `key`, with its writer and reader threads.
fn start(key: Key, secret: &PoolSecret, threads: u32, link: &Link) -> Result<Worker, String> {
    let program = std::env::current_exe().map_err(|e| format!("cannot find the running executable: {e}"))?;
    let mut cmd = Command::new(&program);
    cmd.env(WORKER_ENV, std::process::id().to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    for var in THREAD_ENV {
        if std::env::var_os(var).is_none() {
            cmd.env(var, threads.max(1).to_string());
        }
    }
    let secret_pipe = secret.hand_to(&mut cmd).map_err(|e| format!("cannot make the secret's pipe: {e}"))?;
    // SAFETY: setpgid is async-signal-safe; nothing else runs between fork
    // and exec.
    unsafe {
        cmd.pre_exec(|| {
            nix::unistd::setpgid(nix::unistd::Pid::from_raw(0), nix::unistd::Pid::from_raw(0))
                .map_err(std::io::Error::from)
        });
    }
    let mut child = cmd.spawn().map_err(|e| format!("cannot run {}: {e}", program.display()))?;
    drop(secret_pipe);
    let pid = child.id();
    let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
        kill_pid(pid);
        let _ = wait_or_kill(pid, Duration::ZERO);
        return Err("the worker's pipes were not made".into());
    };
    drop(child);
    let (input_tx, input_rx) = mpsc::channel::<Vec<u8>>();
    let closed = link.clone();
    let writer = std::thread::Builder::new().name(format!("procjob-agent-in-{}", key.slot)).spawn(move || {
        let mut stdin = File::from(std::os::fd::OwnedFd::from(stdin));
        for chunk in input_rx {
            if stdin.write_all(&chunk).is_err() {
                up(&closed, &Up::InputClosed { key });
                break;
            }
        }
    });
    let reaped = Arc::new(AtomicBool::new(false));
    let done = Arc::clone(&reaped);
    let out = link.clone();
    let write_backs = WriteBacks::default();
    let pending = Arc::clone(&write_backs);
    let reader = std::thread::Builder::new().name(format!("procjob-agent-out-{}", key.slot)).spawn(move || {
        let mut stdout = File::from(std::os::fd::OwnedFd::from(stdout));
        let mut buf = vec![0u8; 1 << 20];
        let mut frames = Frames::default();
        let relay = |bytes: &[u8]| {
            if !bytes.is_empty() {
                let _ = out.send(Outgoing { dest: 0, tag: TAG_DATA, bytes: wire::data(key, bytes) });
            }
        };
        let mut killed_for = None;
        'read: loop {
            match stdout.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    let mut from = 0;
                    for (end, run) in frames.feed(&buf[..n]) {
                        let spans = pending.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(&run);
                        let Some(spans) = spans else { continue };
                        // The answer's last byte goes after the rows it
                        // reports, so they are in rank 0's file before
                        // rank 0 can read the answer.
                        relay(&buf[from..end - 1]);
                        from = end - 1;
                        if let Err(e) = super::ship::write_back(&out, key, &spans) {
                            // The answer must not reach rank 0 without its
                            // rows: the worker is ended, its batch fails,
                            // and its death says why.
                            killed_for = Some(format!("its node could not send rank 0 the rows it wrote ({e})"));
                            kill_pid(pid);
                            break 'read;
                        }
                    }
                    relay(&buf[from..n]);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        up(&out, &Up::Eof { key });
        // Its output closed: it is exiting (or was killed); a worker that
        // lives on past two seconds is killed.
        let grace = Duration::from_secs(2);
        let (exit, killed) = wait_or_kill(pid, grace);
        if killed && killed_for.is_none() {
            killed_for = Some(still_running(grace, "its output ended"));
        }
        done.store(true, Ordering::SeqCst);
        up(&out, &Up::Exited { key, exit: Exit::from(exit), killed_for });
    });
    match (writer, reader) {
        (Ok(_), Ok(reader)) => Ok(Worker { pid, input: Some(input_tx), reaped, reader: Some(reader), write_backs }),
        _ => {
            kill_pid(pid);
            Err("cannot start the threads that relay a worker's pipes".into())
        }
    }
}

/// Set by the signal handler of [`outlive_the_launchers_sigterm`].
static TERMINATING: AtomicBool = AtomicBool::new(false);

/// How long an agent told to end by a signal waits for rank 0 to end the
/// job itself.
const SIGNAL_GRACE: Duration = Duration::from_millis(800);

extern "C" fn on_ending_signal(_: libc::c_int) {
    TERMINATING.store(true, Ordering::SeqCst);
}

/// Ctrl-C to mpirun sends SIGTERM to every rank at once, and once a rank
/// has died of a signal the launcher SIGKILLs the others, rank 0 too,
/// before it has removed its run folder. So an agent takes SIGTERM (and
/// SIGINT, SIGHUP) and waits up to [`SIGNAL_GRACE`] for rank 0's own end
/// (which stops it normally); past that, it kills its workers and exits
/// 128 + 15 itself.
fn outlive_the_launchers_sigterm() {
    for signal in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
        // SAFETY: the handler only stores into an atomic, which is
        // async-signal-safe.
        unsafe {
            libc::signal(signal, on_ending_signal as *const () as libc::sighandler_t);
        }
    }
    let _ = std::thread::Builder::new().name("procjob-agent-signals".into()).spawn(|| {
        while !TERMINATING.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(SIGNAL_GRACE);
        // Rank 0 did not end the job: its workers die with this process
        // (their parent-death signal).
        super::ship::remove_folders();
        std::process::exit(128 + libc::SIGTERM);
    });
}

/// Where the frames of a worker's output stream end, and which of them
/// answer a batch ([`Reply::Results`](procjob_worker::protocol::Reply)),
/// read from each frame's prelude (see `procjob_worker::protocol`) and the
/// first byte of its payload (postcard's variant index).
#[derive(Debug, Default)]
struct Frames {
    /// The current frame's prelude and first payload byte, as far as read.
    head: Vec<u8>,
    /// Whether `head` is whole, and the frame's rest is being read.
    in_body: bool,
    /// Its bytes not read yet, once `head` is whole.
    left: u64,
    /// Whether it answers a batch.
    results: bool,
    /// Answers to batches seen so far.
    answers: u64,
}

/// The variant index of [`Reply::Results`](procjob_worker::protocol::Reply)
/// in postcard: the first byte of its payload.
const RESULTS_VARIANT: u8 = 2;

impl Frames {
    /// Reads `bytes`, the next of the stream; returns, for each answer to a
    /// batch that ends in them, the offset just past its end and its number.
    fn feed(&mut self, bytes: &[u8]) -> Vec<(usize, u64)> {
        use procjob_worker::protocol::{FrameKind, PRELUDE_LEN};
        let mut ends = Vec::new();
        let mut i = 0;
        while i < bytes.len() {
            if !self.in_body {
                let want = if self.head.len() < PRELUDE_LEN { PRELUDE_LEN } else { PRELUDE_LEN + 1 };
                let take = (want - self.head.len()).min(bytes.len() - i);
                self.head.extend_from_slice(&bytes[i..i + take]);
                i += take;
                if self.head.len() < PRELUDE_LEN {
                    continue;
                }
                let payload = u32::from_le_bytes([self.head[8], self.head[9], self.head[10], self.head[11]]) as u64;
                let mut bulk = [0u8; 8];
                bulk.copy_from_slice(&self.head[12..20]);
                let total = PRELUDE_LEN as u64 + payload + u64::from_le_bytes(bulk);
                if self.head.len() == PRELUDE_LEN && payload > 0 {
                    continue; // the payload's first byte is still to come
                }
                self.results =
                    self.head[6] == FrameKind::Reply as u8 && self.head.get(PRELUDE_LEN) == Some(&RESULTS_VARIANT);
                self.left = total - self.head.len() as u64;
                self.in_body = true;
            } else {
                let take = self.left.min((bytes.len() - i) as u64);
                self.left -= take;
                i += take as usize;
            }
            if self.in_body && self.left == 0 {
                if self.results {
                    ends.push((i, self.answers));
                    self.answers += 1;
                }
                self.head.clear();
                self.in_body = false;
            }
        }
        ends
    }
}

#[cfg(test)]
mod tests {
    use super::{Frames, RESULTS_VARIANT};
    use procjob_worker::protocol::{self, FrameKind, Ready, Reply, Results};

    fn frame(reply: &Reply) -> Vec<u8> {
        let mut out = Vec::new();
        protocol::send(&mut out, FrameKind::Reply, reply, &[]).unwrap();
        out
    }

    fn results() -> Reply {
        Reply::Results(Results {
            tasks: Vec::new(),
            memory_follows: false,
            received_ns: 1,
            mapped_ns: 2,
            replying_ns: 3,
        })
    }

    #[test]
    fn results_variant_is_the_first_payload_byte_of_an_answer() {
        let f = frame(&results());
        assert_eq!(f[protocol::PRELUDE_LEN], RESULTS_VARIANT);
    }

    #[test]
    fn frames_finds_each_answers_end_however_the_stream_is_cut() {
        let ready =
            Reply::Ready(Ready { protocol: 6, pid: 1, same_binary: true, memory: Default::default(), lend_probe: 0 });
        let stream: Vec<u8> = [frame(&ready), frame(&results()), frame(&results())].concat();
        let a = frame(&ready).len();
        let b = frame(&results()).len();
        let want = vec![(a + b, 0), (a + 2 * b, 1)];
        for cut in 1..=stream.len() {
            let mut frames = Frames::default();
            let mut got = Vec::new();
            let mut at = 0;
            for piece in stream.chunks(cut) {
                got.extend(frames.feed(piece).into_iter().map(|(end, n)| (at + end, n)));
                at += piece.len();
            }
            assert_eq!(got, want, "pieces of {cut} bytes");
        }
    }
}
