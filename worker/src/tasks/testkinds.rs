//! Task kinds that exist only for procjob's own tests (feature
//! `test-tasks`, off by default): a second well-behaved kind that proves
//! the pool and protocol are generic, and misbehaving kinds for the failure
//! tests.

use serde::{Deserialize, Serialize};

use crate::array::Array;
use crate::dtype::DType;
use crate::registry::Registry;
use crate::task::Task;

/// The environment variable that injects a fault into the matmul task (the
/// serve loop reads it before each task, see `crate::fault`):
/// `KIND@ROW` or `KIND@ROW@once=MARKER`. The block whose rows contain ROW
/// misbehaves as KIND (`kill`, `abort`, `exit`, `panic`, `error`, `hang`, `mute`,
/// `garbage`; `lent` answers with a result lent at a bad address;
/// `lent-exit`, which needs `once`, runs the block and exits once its reply
/// is sent); with `once`, only if MARKER can be created (so a retry on a
/// fresh worker succeeds).
pub const FAULT_ENV: &str = "PROCJOB_TEST_FAULT";

/// [`FAULT_ENV`] read: `KIND@ROW` or `KIND@ROW@once=MARKER`.
pub(crate) struct FaultSpec {
    pub(crate) kind: String,
    pub(crate) row: u64,
    pub(crate) marker: Option<String>,
}

/// [`FAULT_ENV`] as this process sees it: `None` when it is not set, the
/// whole value as the error when it is not `KIND@ROW[@once=MARKER]`.
pub(crate) fn fault_spec() -> Option<Result<FaultSpec, String>> {
    let spec = std::env::var(FAULT_ENV).ok()?;
    let mut parts = spec.split('@');
    let (Some(kind), Some(row)) = (parts.next(), parts.next().and_then(|r| r.parse::<u64>().ok())) else {
        return Some(Err(spec));
    };
    let marker = parts.next().and_then(|p| p.strip_prefix("once=")).map(String::from);
    Some(Ok(FaultSpec { kind: kind.to_string(), row, marker }))
}

/// Waits for the worker with this pid to exit (leaving it unreaped, for
/// its pool) when a `lent-exit` fault (see [`FAULT_ENV`]) fired in it: its
/// `once` marker holds that pid. Called before the coordinator reads the
/// results a worker lent, so that the read finds it gone, every time. Only
/// once per process (a later process given the same pid is not waited for),
/// and for at most ten seconds: a worker still alive then (blocked writing
/// a bulk larger than the pipe holds, which the tests' batches never are)
/// is read as it is, and the test that set the fault fails on its result.
pub(crate) fn outlive_lent_exit(pid: u32) {
    use std::os::fd::{AsFd, FromRawFd, OwnedFd};
    use std::sync::atomic::{AtomicBool, Ordering};
    static WAITED: AtomicBool = AtomicBool::new(false);
    let Some(marker) = fault_spec().and_then(Result::ok).filter(|s| s.kind == "lent-exit").and_then(|s| s.marker)
    else {
        return;
    };
    if !std::fs::read_to_string(marker).is_ok_and(|held| held.trim() == pid.to_string())
        || WAITED.swap(true, Ordering::SeqCst)
    {
        return;
    }
    // A pidfd turns readable when the process has exited, and waiting on
    // it reaps nothing: the pool reaps the worker later, as always.
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    let Ok(fd) = i32::try_from(fd) else { return };
    if fd < 0 {
        return;
    }
    // SAFETY: `fd` was just returned by pidfd_open and nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut fds = [nix::poll::PollFd::new(fd.as_fd(), nix::poll::PollFlags::POLLIN)];
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
        let ms = u16::try_from(left.as_millis()).unwrap_or(u16::MAX);
        match nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(ms)) {
            Err(nix::errno::Errno::EINTR) | Ok(0) => {}
            _ => return,
        }
    }
}

/// Registers every test kind.
pub fn register(r: Registry) -> Registry {
    r.with::<Checksum>().with::<Misbehave>().with::<TruncateThenRead>()
}

/// Truncates the file its input array maps to 0 bytes, then sums the
/// array: every page it reads after the first lies past the file's end, so
/// without the worker's SIGBUS guard the read kills the process. Makes a
/// SIGBUS mid-task deterministic for the tests.
#[derive(Debug)]
pub struct TruncateThenRead;

impl Task for TruncateThenRead {
    type Input = Array;
    type Output = f64;
    type Error = String;

    fn name() -> &'static str {
        "test.truncate_then_read"
    }

    fn run(a: Array) -> Result<f64, String> {
        let (path, _, _) = a.file_location().ok_or("the input is not a mapped file")?;
        std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .and_then(|f| f.set_len(0))
            .map_err(|e| format!("cannot truncate {}: {e}", path.display()))?;
        Ok(a.as_slice::<f64>().map_err(|e| e.to_string())?.iter().sum())
    }
}

/// Sums an array's elements as f64 and reports its shape: a second task
/// kind, unknown to the pool and protocol, that runs through both unchanged.
#[derive(Debug)]
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
    /// Whether a product's result dropped on the thread that ran the task
    /// would be kept for the next one (never on a worker's serve loop,
    /// whose results may still be read from a pipe or by address).
    pub recycles_dropped: bool,
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
            other => return Err(format!("test.checksum sums i64, f64 or f32 arrays, not {other}")),
        };
        Ok(ChecksumOutput {
            sum,
            shape: a.shape().to_vec(),
            pid: std::process::id(),
            recycles_dropped: crate::array::recycles_here(),
        })
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
    /// Never return (after saying so on stderr, so tests can wait for it).
    Hang,
    /// Write garbage into the protocol stream, then exit.
    Garbage,
    /// Close the protocol stream, then never return: a worker that lives
    /// on with its output gone, which procjob must kill.
    Mute,
    /// Return far more than a frame may carry.
    TooMuch,
    /// Return an error whose message is this many bytes long.
    LongError(u32),
}

/// A task that misbehaves as told.
#[derive(Debug)]
pub struct Misbehave;

impl Task for Misbehave {
    type Input = (u64, Misbehavior);
    type Output = Vec<u64>;
    type Error = String;

    fn name() -> &'static str {
        "test.misbehave"
    }

    fn describe(input: &(u64, Misbehavior)) -> Option<String> {
        Some(format!("{:?} {}", input.1, input.0))
    }

    fn run((value, how): (u64, Misbehavior)) -> Result<Vec<u64>, String> {
        match how {
            Misbehavior::Behave => Ok(vec![value]),
            Misbehavior::Error => Err(format!("value {value} is not welcome")),
            Misbehavior::Panic => panic!("task {value} panicked on purpose"),
            Misbehavior::Kill => {
                let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
                unreachable!("SIGKILL cannot be caught")
            }
            Misbehavior::Abort => std::process::abort(),
            Misbehavior::Exit => std::process::exit(7),
            Misbehavior::Hang => {
                eprintln!("procjob-test: hanging in pid {}", std::process::id());
                loop {
                    std::thread::park();
                }
            }
            Misbehavior::Mute => {
                // SAFETY: closing a descriptor this process owns; nothing
                // else writes to it while the task runs.
                unsafe { libc::close(crate::io::protocol_output_fd()) };
                loop {
                    std::thread::park();
                }
            }
            Misbehavior::Garbage => {
                let fd = crate::io::protocol_output_fd();
                let junk = b"this is not a procjob frame\n";
                // SAFETY: writing a byte buffer to a descriptor this process owns.
                unsafe { libc::write(fd, junk.as_ptr().cast(), junk.len()) };
                std::process::exit(0)
            }
            // 10 M varints of ≥ 8 bytes: over the 64 MiB payload limit.
            Misbehavior::TooMuch => Ok(vec![u64::MAX; 10 << 20]),
            Misbehavior::LongError(len) => Err("e".repeat(len as usize)),
        }
    }
}
