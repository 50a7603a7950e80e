//! The serve loop: what a worker process does from start to exit.
//!
//! [`run_worker`] prepares the process (reads its pool secret, moves the
//! protocol off fds 0 and 1, asks for a signal when the parent dies,
//! captures panics) and then [`serve`]s: check the handshake, then read a
//! request, run its tasks under panic capture, answer, until the input
//! closes.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::os::fd::AsFd;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::array::{self, Array, ArrayError, FileId};
use crate::protocol::{
    self, Access, ArrayRef, DecodeError, FailureCause, FrameKind, Outcome, Ready, Reply, Request, Results, TaskReply,
    PROTOCOL_VERSION,
};
use crate::registry::Registry;
use crate::secret::{PoolSecret, SecretError};
use crate::task::{ErasedEntry, ErasedOutcome};

/// The environment variable that marks a process as a procjob worker; its
/// value is the coordinator's pid.
pub const WORKER_ENV: &str = "PROCJOB_WORKER";

/// A batch that computed this long is followed by a memory snapshot.
const SNAPSHOT_AFTER_BUSY: Duration = Duration::from_millis(1);
/// Otherwise snapshots are at least this far apart.
const SNAPSHOT_EVERY: Duration = Duration::from_millis(100);

/// Why serving stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// A frame could not be read.
    #[error("worker cannot read its input: {0}")]
    Decode(#[from] DecodeError),
    /// A reply could not be written.
    #[error("worker cannot write its output: {0}")]
    Write(#[from] std::io::Error),
    /// The conversation did not open with a handshake.
    #[error("worker expected a Hello request first")]
    NoHello,
    /// The handshake was refused.
    #[error("handshake refused: {0}")]
    Refused(String),
}

/// Whether this process was started as a procjob worker.
pub fn is_worker_process() -> bool {
    std::env::var_os(WORKER_ENV).is_some()
}

/// Turns this process into a worker: serves on stdin/stdout and exits.
/// Never returns.
pub fn run_worker(registry: &Registry) -> ! {
    let code = match prepare_and_serve(registry) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("procjob worker (pid {}): {e}", std::process::id());
            3
        }
    };
    std::process::exit(code)
}

fn prepare_and_serve(registry: &Registry) -> Result<(), ServeError> {
    // First, before anything opens a descriptor of its own.
    let secret = PoolSecret::take_inherited();
    let (input, output) = take_protocol_fds()?;
    die_with_parent(std::env::var(WORKER_ENV).ok().and_then(|v| v.parse::<i32>().ok()));
    install_panic_capture();
    crate::sigbus::install()?;
    serve(BufReader::with_capacity(1 << 16, input), output, registry, &[], &secret)
}

/// The body of a worker forked by the coordinator (start method `fork`):
/// serves on the given pipe ends, with `inherited` — arrays of the
/// coordinator that this process shares copy-on-write — resolvable by
/// [`ArrayRef::Inherited`] references, and accepting the handshake that
/// carries `secret`, its pool's (which it has in memory). Never returns.
///
/// Must be called in the child right after `fork`, while it is the only
/// thread of its process (as the coordinator was when it forked).
pub fn run_forked_worker(
    input: File,
    output: File,
    registry: &Registry,
    inherited: &[Array],
    parent: i32,
    secret: PoolSecret,
) -> ! {
    let code = match prepare_forked(parent).and_then(|()| {
        serve(BufReader::with_capacity(1 << 16, input), output, registry, inherited, &Ok(secret))
            .map_err(std::io::Error::other)
    }) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("procjob worker (pid {}): {e}", std::process::id());
            3
        }
    };
    // SAFETY: _exit ends the forked child without running the destructors
    // and exit handlers it inherited from the coordinator.
    unsafe { libc::_exit(code) }
}

/// What a forked worker does before serving: stdin from /dev/null and
/// stdout to stderr (as a spawned one), its own process group, the
/// coordinator's blocked signals unblocked, death with its parent, panics
/// captured.
fn prepare_forked(parent: i32) -> std::io::Result<()> {
    let devnull = File::open("/dev/null")?;
    nix::unistd::dup2_stdin(devnull.as_fd()).map_err(std::io::Error::from)?;
    nix::unistd::dup2_stdout(std::io::stderr().as_fd()).map_err(std::io::Error::from)?;
    nix::unistd::setpgid(nix::unistd::Pid::from_raw(0), nix::unistd::Pid::from_raw(0)).map_err(std::io::Error::from)?;
    nix::sys::signal::sigprocmask(
        nix::sys::signal::SigmaskHow::SIG_SETMASK,
        Some(&nix::sys::signal::SigSet::empty()),
        None,
    )
    .map_err(std::io::Error::from)?;
    die_with_parent(Some(parent));
    install_panic_capture();
    crate::sigbus::install()
}

/// Resolves an [`ArrayRef::Inherited`] against the arrays this forked
/// worker shares with its coordinator.
fn inherit(inherited: &[Array], r: &ArrayRef) -> Result<Array, ArrayError> {
    let ArrayRef::Inherited { dtype, index, offset, .. } = r else {
        unreachable!("only inherited references are resolved here")
    };
    let base = inherited.get(*index as usize).ok_or_else(|| {
        ArrayError::Shape(format!("inherited array {index} does not exist ({} were inherited)", inherited.len()))
    })?;
    base.view_of_storage(*dtype, &r.checked_shape()?, *offset)
}

/// Moves the protocol off fds 0 and 1: stdin becomes /dev/null and stdout
/// becomes stderr, so a task's prints and reads cannot touch the stream.
fn take_protocol_fds() -> std::io::Result<(File, File)> {
    let stdin = std::io::stdin();
    let input = stdin.as_fd().try_clone_to_owned()?;
    let stdout = std::io::stdout();
    let output = stdout.as_fd().try_clone_to_owned()?;
    let devnull = File::open("/dev/null")?;
    nix::unistd::dup2_stdin(devnull.as_fd()).map_err(std::io::Error::from)?;
    nix::unistd::dup2_stdout(std::io::stderr().as_fd()).map_err(std::io::Error::from)?;
    crate::io::set_protocol_output_fd(std::os::fd::AsRawFd::as_raw_fd(&output));
    Ok((File::from(input), File::from(output)))
}

#[doc(hidden)]
pub use crate::io::protocol_output_fd;

/// Asks the kernel for SIGKILL when the parent dies, then checks the parent
/// is still the coordinator that started us (it may have died before the
/// request took effect).
fn die_with_parent(expected: Option<i32>) {
    #[cfg(target_os = "linux")]
    {
        let _ = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL);
        if let Some(parent) = expected {
            if parent > 1 && nix::unistd::getppid().as_raw() != parent {
                std::process::exit(3);
            }
        }
    }
}

thread_local! {
    static LAST_PANIC: RefCell<Option<(String, Option<String>)>> = const { RefCell::new(None) };
}

/// Records each panic's message and location for the reply instead of
/// printing it: the coordinator shows it, with the task it belongs to.
fn install_panic_capture() {
    std::panic::set_hook(Box::new(|info| {
        let message = if let Some(s) = info.payload().downcast_ref::<&str>() {
            (*s).to_string()
        } else if let Some(s) = info.payload().downcast_ref::<String>() {
            s.clone()
        } else {
            "panic with a non-string payload".to_string()
        };
        let location = info.location().map(|l| format!("{}:{}:{}", l.file(), l.line(), l.column()));
        LAST_PANIC.with(|p| *p.borrow_mut() = Some((message, location)));
    }));
}

/// Serves requests from `input` until it closes, answering on `output`;
/// `inherited` are the arrays a forked worker shares with its coordinator.
/// The handshake must carry `secret`, the secret of the pool that started
/// this worker; without one (`Err`), every handshake is refused.
pub fn serve<R: Read + AsRawFdMaybe + AsFd, W: Write + AsFd>(
    mut input: BufReader<R>,
    output: W,
    registry: &Registry,
    inherited: &[Array],
    secret: &Result<PoolSecret, SecretError>,
) -> Result<(), ServeError> {
    let mut output = BufWriter::with_capacity(1 << 16, output);
    let hello = match protocol::recv::<_, Request>(&mut input, FrameKind::Request) {
        Ok(f) => f,
        Err(DecodeError::Closed) => return Ok(()),
        Err(e @ DecodeError::VersionMismatch { .. }) => {
            // Answer in our own version: the coordinator's reader then
            // reports the mismatch itself, with both versions.
            let _ = protocol::send(&mut output, FrameKind::Reply, &Reply::Refused { reason: e.to_string() }, &[]);
            return Err(e.into());
        }
        Err(e) => return Err(e.into()),
    };
    let Request::Hello(hello) = hello.message else { return Err(ServeError::NoHello) };
    if hello.protocol != PROTOCOL_VERSION {
        let reason =
            format!("protocol version mismatch: coordinator speaks {}, worker {PROTOCOL_VERSION}", hello.protocol);
        protocol::send(&mut output, FrameKind::Reply, &Reply::Refused { reason: reason.clone() }, &[])?;
        return Err(ServeError::Refused(reason));
    }
    if let Err(reason) = check_secret(secret, &hello.secret) {
        protocol::send(&mut output, FrameKind::Reply, &Reply::Refused { reason: reason.clone() }, &[])?;
        return Err(ServeError::Refused(reason));
    }
    let same_binary = hello.binary.is_current();
    let ready =
        Ready { protocol: PROTOCOL_VERSION, pid: std::process::id(), same_binary, memory: crate::memory::snapshot() };
    protocol::send(&mut output, FrameKind::Reply, &Reply::Ready(ready), &[])?;
    let idle = (hello.idle_timeout_ms > 0).then(|| Duration::from_millis(hello.idle_timeout_ms));
    let mut maps = MapCache::default();
    hello.folders.into_iter().for_each(|f| maps.folders.allow(f));
    let mut last_snapshot = Instant::now();
    // The large results of the last reply, which went into the pipe by
    // reference: their pages serve this batch's results once the pipe has
    // let go of them — when the coordinator says its readers copy, and the
    // output is a pipe (anything else was written by copy).
    let reuse_lent_pages = hello.reuse_lent_pages && is_pipe(output.get_ref());
    let mut sent: Vec<Array> = Vec::new();
    loop {
        if input.buffer().is_empty() && !wait_for_request(input.get_ref(), idle, &mut maps, FIRST_MAP_CHECK) {
            return Ok(()); // idle timeout: exit quietly, the pool starts another when needed
        }
        let frame = match protocol::recv_request(&mut input) {
            Ok(f) => f,
            Err(DecodeError::Closed) => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        let received_ns = crate::clock::monotonic_ns();
        let batch = match &frame.message {
            Request::Run(batch) => batch,
            Request::Allow { folders } => {
                protocol::check_bulk(frame.message.array_refs(), frame.bulk_len)?;
                folders.iter().for_each(|f| maps.folders.allow(f.clone()));
                continue;
            }
            Request::Hello(_) => return Err(ServeError::NoHello),
        };
        put_back_sent(&mut sent, output.get_ref());
        if maps.call != batch.call {
            maps.start_call(batch.call);
        }
        maps.start_batch();
        let arrays = array::read_arrays(&mut input, frame.message.array_refs(), frame.bulk_len, &mut |_, r| match r {
            ArrayRef::File { .. } => array::Placement::Mapped(maps.map(r)),
            ArrayRef::Inline { .. } => array::Placement::Own,
            ArrayRef::Inherited { .. } => array::Placement::Mapped(inherit(inherited, r)),
        })?;
        // The batch's received bytes stay alive until the memory snapshot
        // below, so it shows what the tasks held (a B copied into this worker
        // counts in its USS), not what was left after they returned.
        let received: Vec<Array> = frame
            .message
            .array_refs()
            .zip(&arrays)
            .filter_map(|(r, a)| match (r, a) {
                (ArrayRef::Inline { .. }, Ok(a)) => Some(a.clone()),
                _ => None,
            })
            .collect();
        let mut arrays = arrays.into_iter();
        let mapped_ns = crate::clock::monotonic_ns();
        let batch_started = Instant::now();
        let mut replies = Vec::with_capacity(batch.tasks.len());
        let mut inline: Vec<Array> = Vec::new();
        let entry = resolve(registry, same_binary, &batch.kind);
        // One clock read per task, and only when asked: a task starts when
        // the one before it finished (what lies between is a few pointer
        // moves).
        let clock = || if batch.timestamps { crate::clock::monotonic_ns() } else { 0 };
        let mut started_ns = clock();
        let mut budget = ReplyBudget::default();
        let first_index = batch.tasks.first().map(|t| t.index);
        for task in &batch.tasks {
            let mine: Vec<Result<Array, ArrayError>> = match task.arrays.len() {
                0 => Vec::new(),
                n => arrays.by_ref().take(n).collect(),
            };
            let result = match poisoned_input(&mine) {
                Some(path) => ErasedOutcome::failed(
                    FailureCause::Setup,
                    format!(
                        "{} shrank while an earlier task of this batch read it; \
                         a mapped file must not be truncated while tasks use it",
                        path.display()
                    ),
                ),
                None => match (&entry, first_index) {
                    // The same message for every task of the batch: in full
                    // once, then a pointer to it (a kind name repeated per
                    // task made a 73 KB request take 253 MB).
                    (Err(_), Some(first)) if first != task.index => ErasedOutcome::failed(
                        FailureCause::Setup,
                        format!("task kind '{}' is not known to this worker (see task {first})", batch.kind.name),
                    ),
                    _ => run_one(&entry, &batch.kind.name, &task.input, mine),
                },
            };
            let result = fail_on_faults(task.index, result);
            let finished_ns = clock();
            let result = budget.admit(task.index, result);
            replies.push(TaskReply { index: task.index, started_ns, finished_ns, outcome: result.outcome });
            inline.extend(result.inline);
            started_ns = finished_ns;
        }
        maps.forget_poisoned();
        Array::drop_spare_pages();
        let memory = (batch_started.elapsed() >= SNAPSHOT_AFTER_BUSY || last_snapshot.elapsed() >= SNAPSHOT_EVERY)
            .then(|| {
                last_snapshot = Instant::now();
                crate::memory::snapshot()
            });
        drop(received);
        let reply = Reply::Results(Results {
            tasks: replies,
            memory,
            received_ns,
            mapped_ns,
            replying_ns: crate::clock::monotonic_ns(),
        });
        crate::payload::with_scratch(|payload| {
            crate::payload::encode_into(&reply, payload).map_err(std::io::Error::other)?;
            if let (true, Reply::Results(mut results)) = (payload.len() > protocol::MAX_PAYLOAD, reply) {
                // Too large for one frame (the budget's estimate fell
                // short): report it as the tasks' failure rather than die,
                // so the coordinator can say which tasks — the explanation
                // once, a short pointer to it for the others.
                let message = format!(
                    "the batch's results encode to {} bytes, over the frame limit of {} bytes; \
                     return large data as procjob::Array (raw bytes, no limit) instead of serde values",
                    payload.len(),
                    protocol::MAX_PAYLOAD
                );
                let first = results.tasks.first().map_or(0, |t| t.index);
                for (i, t) in results.tasks.iter_mut().enumerate() {
                    let message = if i == 0 { message.clone() } else { ReplyBudget::dropped_message(first) };
                    t.outcome = Outcome::Failed(protocol::TaskFailure {
                        cause: FailureCause::Setup,
                        message,
                        location: None,
                        error: None,
                    });
                }
                inline.clear();
                protocol::send(&mut output, FrameKind::Reply, &Reply::Results(results), &[])
            } else {
                write_reply(&mut output, payload, &inline)
            }
        })?;
        if reuse_lent_pages {
            sent.extend(inline.into_iter().filter(Array::is_sole_owner_of_pages).take(array::SPARES_KEPT));
        }
    }
}

/// Whether a handshake's secret is the one this worker was started with;
/// if not, the reason for the refusal. Only the coordinator that started
/// the worker knows it, so this is the proof that the stream is its.
fn check_secret(expected: &Result<PoolSecret, SecretError>, carried: &PoolSecret) -> Result<(), String> {
    match expected {
        Ok(secret) if secret == carried => Ok(()),
        Ok(_) => Err("the handshake does not carry the secret of the pool that started this worker; \
                      a worker accepts frames only from the coordinator that started it"
            .into()),
        Err(e) => Err(format!(
            "this worker has no pool secret to check the handshake against: {e}; a launcher hands it \
             {} bytes through an inherited descriptor named in {} (see docs/protocol.md)",
            crate::secret::SECRET_LEN,
            crate::secret::SECRET_FD_ENV
        )),
    }
}

/// The mapped file behind the first of a task's arrays in which a SIGBUS
/// was absorbed (by an earlier task of the batch): its pages read as zeros
/// now, so the task must not run on it.
fn poisoned_input(arrays: &[Result<Array, ArrayError>]) -> Option<PathBuf> {
    arrays
        .iter()
        .flatten()
        .find(|a| a.is_poisoned())
        .map(|a| a.file_location().map_or_else(PathBuf::new, |l| l.0.into()))
}

/// Replaces a task's outcome with a failure naming the file when a SIGBUS
/// was absorbed while it ran (see `crate::sigbus`): it read zeros where a
/// truncated file's bytes were, so its result is wrong whatever it says.
fn fail_on_faults(index: u64, result: ErasedOutcome) -> ErasedOutcome {
    let faults = crate::sigbus::take_faults();
    if faults.is_empty() {
        return result;
    }
    let files: Vec<String> = faults
        .iter()
        .map(|f| match std::fs::metadata(&f.path) {
            Ok(m) if m.len() < f.mapped_len => {
                format!(
                    "{} shrank while task {index} read it ({} bytes when mapped, {} now)",
                    f.path.display(),
                    f.mapped_len,
                    m.len()
                )
            }
            _ => format!(
                "{} could not be read while task {index} read it (SIGBUS: truncated, or an I/O error)",
                f.path.display()
            ),
        })
        .collect();
    ErasedOutcome::failed(
        FailureCause::Setup,
        format!("{}; a mapped file must not be truncated while tasks use it", files.join("; ")),
    )
}

/// What a batch's reply may grow to while it is built: its payload (the
/// encoded outcomes) up to [`protocol::MAX_PAYLOAD`] and its bulk (inline
/// arrays) up to [`protocol::MAX_BULK`], the limits the reader enforces.
/// Each task's outcome is admitted with an upper bound of its encoded size;
/// from the first that would pass a limit on, outcomes are dropped as they
/// come (their arrays freed at once) and replaced by a short failure: the
/// first says why, the others point to it. So a batch of many tasks that
/// fail with long messages holds at most one frame's worth of them, not a
/// copy per task of a message that could never be sent.
#[derive(Default)]
struct ReplyBudget {
    payload: usize,
    bulk: u64,
    first_dropped: Option<u64>,
}

impl ReplyBudget {
    /// What a task's entry costs besides its outcome, at most: index and
    /// two timestamps (varints of up to 10 bytes) and tags.
    const PER_TASK: usize = 32;
    /// The `Results` fields besides the tasks, at most.
    const PER_REPLY: usize = 96;

    /// The outcome to report for task `index`: `result` when it fits.
    fn admit(&mut self, index: u64, result: ErasedOutcome) -> ErasedOutcome {
        if let Some(first) = self.first_dropped {
            return ErasedOutcome::failed(FailureCause::Setup, ReplyBudget::dropped_message(first));
        }
        let payload = Self::PER_TASK + encoded_len_bound(&result.outcome);
        let bulk: u64 = result.inline.iter().map(|a| a.nbytes() as u64).sum();
        let fits = self.payload + payload + Self::PER_REPLY <= protocol::MAX_PAYLOAD
            && self.bulk.checked_add(bulk).is_some_and(|b| b <= protocol::MAX_BULK);
        if fits {
            self.payload += payload;
            self.bulk += bulk;
            return result;
        }
        self.first_dropped = Some(index);
        ErasedOutcome::failed(
            FailureCause::Setup,
            format!(
                "the batch's reply would exceed the frame limit ({} bytes of encoded outcomes, {} bytes of arrays) \
                 with this task's outcome ({payload} bytes encoded, {bulk} bytes of arrays), so it and the later \
                 tasks' outcomes were dropped; return large data as procjob::Array (raw bytes) instead of serde \
                 values, or send smaller batches",
                protocol::MAX_PAYLOAD,
                protocol::MAX_BULK
            ),
        )
    }

    /// The short failure of a task dropped after task `first`.
    fn dropped_message(first: u64) -> String {
        format!("dropped: the batch's reply was full (see task {first})")
    }
}

/// An upper bound of an outcome's postcard encoding (every varint counted
/// at its longest): what [`ReplyBudget`] charges for it.
fn encoded_len_bound(outcome: &Outcome) -> usize {
    const VARINT: usize = 10;
    let bytes = |n: usize| VARINT + n;
    match outcome {
        Outcome::Ok { output, arrays } => {
            let refs: usize = arrays
                .iter()
                .map(|r| {
                    let (_, shape) = r.dtype_and_shape();
                    let extra = match r {
                        ArrayRef::Inline { .. } => 0,
                        ArrayRef::File { path, .. } => bytes(path.as_os_str().len()) + VARINT + 1,
                        ArrayRef::Inherited { .. } => 2 * VARINT,
                    };
                    2 + VARINT * (1 + shape.len()) + extra
                })
                .sum();
            1 + bytes(output.len()) + VARINT + refs
        }
        Outcome::Failed(f) => {
            2 + bytes(f.message.len())
                + 1
                + f.location.as_ref().map_or(0, |l| bytes(l.len()))
                + 1
                + f.error.as_ref().map_or(0, |e| bytes(e.len()))
        }
    }
}

/// Writes a reply frame whose bulk is `inline`'s bytes. Arrays that are
/// the sole owners of pages of their own (a large result block) go into the
/// pipe by reference with `vmsplice(2)` rather than copied by `write`: the
/// pipe holds the pages until the coordinator has read them, and the caller
/// does not write to them before that — it drops `inline`, or keeps the
/// arrays for [`put_back_sent`], which waits for the pipe to be empty.
/// When the output is not a pipe, the bytes are written.
fn write_reply<W: Write + AsFd>(output: &mut BufWriter<W>, payload: &[u8], inline: &[Array]) -> std::io::Result<u64> {
    let bulk: Vec<&[u8]> = inline.iter().map(Array::as_bytes).collect();
    #[cfg(target_os = "linux")]
    if inline.iter().any(Array::is_sole_owner_of_pages) {
        let bulk_len: u64 = bulk.iter().map(|b| b.len() as u64).sum();
        let prelude = protocol::encode_prelude(FrameKind::Reply, payload.len(), bulk_len);
        output.write_all(&prelude)?;
        output.write_all(payload)?;
        for (bytes, array) in bulk.iter().zip(inline) {
            if array.is_sole_owner_of_pages() {
                output.flush()?;
                if splice_into_pipe(output.get_ref(), bytes)? {
                    continue;
                }
            }
            output.write_all(bytes)?;
        }
        output.flush()?;
        return Ok(protocol::PRELUDE_LEN as u64 + payload.len() as u64 + bulk_len);
    }
    protocol::write_frame(output, FrameKind::Reply, payload, &bulk)
}

/// Puts the pages of `sent` (the last reply's large results) back for the
/// next results (`Array::try_for_overwrite`) when `output` is a pipe with
/// nothing left in it: the coordinator has read every byte of the reply, so
/// the pipe holds none of those pages any more. Otherwise drops them: a
/// pipe still holding pages keeps its own references, and anything but a
/// pipe was written by copy. Sound only because the coordinator's readers
/// copy out of the pipe — `read`, or `splice` into a file — and nothing
/// between passes its pages on by reference, as `tee` or a pipe-to-pipe
/// `splice` would ([`Hello::reuse_lent_pages`](protocol::Hello)).
fn put_back_sent(sent: &mut Vec<Array>, output: &impl AsFd) {
    if !sent.is_empty() && pipe_is_empty(output) {
        sent.drain(..).for_each(Array::put_back_pages);
    } else {
        sent.clear();
    }
}

/// Whether `fd` is a pipe (or FIFO).
fn is_pipe(fd: &impl AsFd) -> bool {
    nix::sys::stat::fstat(fd.as_fd()).is_ok_and(|st| st.st_mode & libc::S_IFMT == libc::S_IFIFO)
}

/// Whether `fd` is a pipe that holds no bytes (`FIONREAD` is 0); false
/// when that cannot be told.
fn pipe_is_empty(fd: &impl AsFd) -> bool {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        if !is_pipe(fd) {
            return false;
        }
        let mut queued: libc::c_int = 0;
        // SAFETY: FIONREAD on a pipe writes one `c_int`, through a pointer
        // to a live local of that type.
        let r = unsafe { libc::ioctl(fd.as_fd().as_raw_fd(), libc::FIONREAD, &mut queued) };
        r == 0 && queued == 0
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = fd;
        false
    }
}

/// Hands `bytes` to the pipe `fd` by reference (`vmsplice`); false, with
/// nothing sent, when `fd` is not a pipe.
#[cfg(target_os = "linux")]
fn splice_into_pipe(fd: &impl AsFd, mut bytes: &[u8]) -> std::io::Result<bool> {
    use nix::errno::Errno;
    use nix::fcntl::{vmsplice, SpliceFFlags};
    let mut first = true;
    while !bytes.is_empty() {
        match vmsplice(fd.as_fd(), &[std::io::IoSlice::new(bytes)], SpliceFFlags::empty()) {
            Ok(0) => return Err(std::io::Error::new(std::io::ErrorKind::WriteZero, "the peer stopped reading")),
            Ok(n) => bytes = &bytes[n..],
            Err(Errno::EINTR) => continue,
            Err(Errno::EINVAL | Errno::EBADF) if first => return Ok(false),
            Err(e) => return Err(e.into()),
        }
        first = false;
    }
    Ok(true)
}

/// Finds the code a task kind names: by entry descriptor when this worker
/// is the coordinator's own executable (exact: a name could be shadowed by
/// a user task called "matmul"), else by name in the registry. An offset
/// that does not name a descriptor of that kind is refused, never called
/// ([`crate::entry::resolve`]).
fn resolve(registry: &Registry, same_binary: bool, kind: &protocol::TaskKind) -> Result<ErasedEntry, String> {
    match (same_binary, kind.entry, registry.get(&kind.name)) {
        (true, Some(offset), _) => crate::entry::resolve(offset, &kind.name)
            .map_err(|e| format!("task kind '{}' was refused: not a task entry of this executable ({e})", kind.name)),
        (_, _, Some(entry)) => Ok(entry),
        (_, _, None) => Err(format!(
            "task kind '{}' is not known to this worker (it is not the coordinator's executable, and knows only: {})",
            kind.name,
            registry.names().join(", ")
        )),
    }
}

/// Runs one task of kind `kind` under panic capture; under the
/// `test-tasks` feature, a fault the failure tests inject takes the task's
/// place (`crate::fault`).
fn run_one(
    entry: &Result<ErasedEntry, String>,
    kind: &str,
    input: &[u8],
    arrays: Vec<Result<Array, ArrayError>>,
) -> ErasedOutcome {
    // Most tiny tasks have no arrays: skip the fallible collect for them.
    let arrays: Vec<Array> = match arrays.is_empty() {
        true => Vec::new(),
        false => match arrays.into_iter().collect() {
            Ok(a) => a,
            Err(e) => return ErasedOutcome::failed(FailureCause::Setup, e.to_string()),
        },
    };
    let entry = match entry {
        Ok(entry) => *entry,
        Err(message) => return ErasedOutcome::failed(FailureCause::Setup, message.clone()),
    };
    let run = move || {
        #[cfg(feature = "test-tasks")]
        if let Some(fault) = crate::fault::before_task(kind, input) {
            return fault;
        }
        #[cfg(not(feature = "test-tasks"))]
        let _ = kind;
        entry(input, arrays)
    };
    match catch_unwind(AssertUnwindSafe(run)) {
        Ok(outcome) => outcome,
        Err(payload) => {
            let (message, location) = LAST_PANIC.with(|p| p.borrow_mut().take()).unwrap_or_else(|| {
                let m = payload
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| payload.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "panic".into());
                (m, None)
            });
            ErasedOutcome {
                outcome: Outcome::Failed(protocol::TaskFailure {
                    cause: FailureCause::Panic,
                    message,
                    location,
                    error: None,
                }),
                inline: Vec::new(),
            }
        }
    }
}

/// How long a worker holding maps waits for its next request before it
/// first checks them for files deleted or replaced since (see
/// [`wait_for_request`]); it checks again after twice as long each time, up
/// to [`MAX_MAP_CHECK`].
const FIRST_MAP_CHECK: Duration = Duration::from_secs(1);
/// The longest wait between two such checks.
const MAX_MAP_CHECK: Duration = Duration::from_secs(64);

/// Waits until `input` is readable (true), or until `idle` has passed
/// without a request (false; with no `idle`, waits for ever). While it
/// waits with maps held, it lets go of those whose files were deleted or
/// replaced — a run's temp files, removed after its last call — so that
/// their pages do not live on in this worker until its next call. It first
/// checks after `first_check` ([`FIRST_MAP_CHECK`]).
fn wait_for_request(
    input: &impl AsRawFdMaybe,
    idle: Option<Duration>,
    maps: &mut MapCache,
    first_check: Duration,
) -> bool {
    let start = Instant::now();
    let mut check = first_check;
    loop {
        let left = idle.map(|d| d.saturating_sub(start.elapsed()));
        if !maps.holds_any() {
            return left.is_none_or(|left| input.wait_readable(left));
        }
        if left == Some(Duration::ZERO) {
            return false;
        }
        if input.wait_readable(left.map_or(check, |left| left.min(check))) {
            return true;
        }
        maps.forget_changed();
        check = (check * 2).min(MAX_MAP_CHECK);
    }
}

/// Read-only mappings, shared by all tasks so a file is mapped once per
/// worker, not once per task. Writable mappings are never shared: each task
/// gets its own, so it may write through it; a read-write one is lent
/// ([`Array::map_kept`]) and comes back for the next view of the same file
/// once the task's last view goes, so the same output rows every call
/// (memmap-out's `C`) are mapped and faulted in once too.
///
/// A mapping the last call used is kept for the next one while its path
/// still names the same file ([`FileId`]: same inode, same size), so
/// repeated calls over the same dumped inputs (the matmul repetitions) map
/// and fault them in once. Everything else is dropped when a new call
/// starts: files deleted or replaced since (and the memory a deleted
/// file's pages would keep), and files the last call did not use, so the
/// cache holds at most one call's inputs.
///
/// A cached mapping is reused only after its file has been checked again
/// in this batch ([`FileId`]: a file truncated since would raise SIGBUS
/// when read), once per file and batch; and never when a SIGBUS was
/// absorbed in it (`crate::sigbus`).
#[derive(Default)]
struct MapCache {
    call: u64,
    /// Counts batches, for the once-per-batch check of cached files.
    batch: u64,
    read_only: HashMap<PathBuf, Cached>,
    /// The folders the coordinator named: nothing outside them is mapped.
    folders: crate::confine::Folders,
}

/// One file's entry in [`MapCache`].
struct Cached {
    /// The mapping of the whole file.
    map: Array,
    /// Whether the current call has used it.
    used: bool,
    /// The views of it already faulted in: byte offset and length.
    faulted: array::FaultedViews,
    /// The batch ([`MapCache::batch`]) in which its file was last checked.
    checked: u64,
}

impl Cached {
    /// Whether `path` still names the file this entry maps (same inode and
    /// size).
    fn names_its_file(&self, path: &std::path::Path) -> bool {
        self.map.mapped_file_id().is_some_and(|id| FileId::of_path(path) == Some(id))
    }
}

impl MapCache {
    /// Whether any map is held between calls (read-only ones here, or a
    /// read-write one kept by [`Array::map_kept`]).
    fn holds_any(&self) -> bool {
        !self.read_only.is_empty() || Array::has_kept_maps()
    }

    /// Drops the maps, here and kept read-write ones, whose path no longer
    /// names the file they map.
    fn forget_changed(&mut self) {
        self.read_only.retain(|path, cached| cached.names_its_file(path));
        Array::forget_changed_kept_maps();
    }

    /// Starts a batch: every cached file is checked again before its map
    /// serves this batch.
    fn start_batch(&mut self) {
        self.batch += 1;
    }

    /// Drops the mappings a SIGBUS was absorbed in.
    fn forget_poisoned(&mut self) {
        self.read_only.retain(|_, cached| !cached.map.is_poisoned());
    }

    /// Starts call `call`: keeps the mappings the last call used whose
    /// files are unchanged.
    fn start_call(&mut self, call: u64) {
        self.call = call;
        self.forget_changed();
        self.read_only.retain(|_, cached| std::mem::take(&mut cached.used));
    }

    /// Maps what a file reference names, and faults its pages in at once:
    /// a task reads (or writes) all of them anyway, and one call is much
    /// cheaper than a page fault per 4 KiB. A read-only view an earlier task
    /// already faulted in (the same B every repetition) is still mapped, so
    /// it is not walked again: that cost about a millisecond for 32 MB and
    /// found nothing to do.
    fn map(&mut self, r: &ArrayRef) -> Result<Array, ArrayError> {
        let (view, fresh) = self.view(r)?;
        if fresh {
            view.prefault();
        }
        Ok(view)
    }

    /// The view a file reference names, and whether it still needs faulting
    /// in.
    fn view(&mut self, r: &ArrayRef) -> Result<(Array, bool), ArrayError> {
        let ArrayRef::File { dtype, path, offset, access, .. } = r else {
            unreachable!("only file references are mapped")
        };
        let shape = r.checked_shape()?;
        match access {
            Access::ReadWrite => return Array::map_kept(Some(&self.folders), path, *dtype, &shape, *offset),
            Access::CopyOnWrite => {
                let a = array::map_file_ref_within(Some(&self.folders), path, *dtype, &shape, *offset, *access)?;
                return Ok((a, true));
            }
            Access::ReadOnly => {}
        }
        let key = |a: &Array| (a.storage_bytes().1, a.nbytes());
        let batch = self.batch;
        if let Some(cached) = self.read_only.get_mut(path) {
            if cached.checked != batch && (cached.map.is_poisoned() || !cached.names_its_file(path)) {
                // Truncated, replaced or poisoned since: map it afresh, which
                // checks the reference against the file as it is now.
                self.read_only.remove(path);
                return self.fresh_view(path, *dtype, &shape, *offset);
            }
        }
        if let Some(cached) = self.read_only.get_mut(path) {
            cached.checked = batch;
            cached.used = true;
            let view = cached.map.view_of_storage(*dtype, &shape, *offset)?;
            let fresh = cached.faulted.first_time(key(&view));
            return Ok((view, fresh));
        }
        self.fresh_view(path, *dtype, &shape, *offset)
    }

    /// Maps a read-only file reference anew, and caches the map.
    fn fresh_view(
        &mut self,
        path: &std::path::Path,
        dtype: crate::DType,
        shape: &[usize],
        offset: u64,
    ) -> Result<(Array, bool), ArrayError> {
        let a = array::map_file_ref_within(Some(&self.folders), path, dtype, shape, offset, Access::ReadOnly)?;
        if a.is_mapped() {
            let faulted = array::FaultedViews::of((a.storage_bytes().1, a.nbytes()));
            let cached = Cached { map: a.clone(), used: true, faulted, checked: self.batch };
            self.read_only.insert(path.to_path_buf(), cached);
        }
        Ok((a, true))
    }
}

/// Readers whose readiness can be awaited (for the idle timeout).
pub trait AsRawFdMaybe {
    /// Waits until readable or `timeout` passes; true when readable (or
    /// when readiness cannot be awaited, so the caller just reads).
    fn wait_readable(&self, timeout: Duration) -> bool;
}

impl AsRawFdMaybe for File {
    fn wait_readable(&self, timeout: Duration) -> bool {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        // Rounded up: a timeout rounded down to 0 ms would return at once,
        // and a caller waiting out a deadline would spin on it.
        let ms = timeout.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32;
        let ms = PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX);
        let mut fds = [PollFd::new(self.as_fd(), PollFlags::POLLIN)];
        loop {
            match poll(&mut fds, ms) {
                Ok(0) => return false,
                Ok(_) => return true,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(_) => return true,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reply's large result goes back into service for the next result
    /// only once the pipe it went into is empty: while the pipe holds
    /// bytes, or when the output is not a pipe, its pages are dropped. (Put
    /// back, the next array of its size does not start as zeros.)
    #[cfg(target_os = "linux")]
    #[test]
    fn sent_pages_come_back_only_from_an_empty_pipe() {
        let len = crate::array::HUGE_PAGE_THRESHOLD / 8 + 1000;
        let sent = || {
            let mut a = Array::zeros(crate::DType::F64, vec![len]);
            a.as_mut_slice::<f64>().unwrap().fill(7.0);
            assert!(a.is_sole_owner_of_pages());
            vec![a]
        };
        let next_is_fresh =
            || Array::try_for_overwrite(crate::DType::F64, vec![len]).unwrap().as_bytes().iter().all(|&b| b == 0);
        let (r, w) = nix::unistd::pipe().unwrap();
        let (mut r, mut w) = (File::from(r), File::from(w));
        w.write_all(b"x").unwrap();
        put_back_sent(&mut sent(), &w);
        assert!(next_is_fresh(), "pages came back while the pipe held a byte");
        r.read_exact(&mut [0u8; 1]).unwrap();
        let mut list = sent();
        put_back_sent(&mut list, &w);
        assert!(list.is_empty());
        assert!(!next_is_fresh(), "the pages did not come back from the empty pipe");
        put_back_sent(&mut sent(), &tempfile::tempfile().unwrap());
        assert!(next_is_fresh(), "pages came back from a file");
        Array::drop_spare_pages();
    }

    /// A worker waiting for its next request lets go of the maps of files
    /// deleted since the last call (read-only ones and kept read-write
    /// ones), keeps the others, and still gives up when its idle time has
    /// passed.
    #[test]
    fn waiting_workers_let_go_of_maps_of_deleted_files() {
        let dir = tempfile::tempdir().unwrap();
        let (gone, stays, out) = (dir.path().join("gone.npy"), dir.path().join("stays.npy"), dir.path().join("c.npy"));
        for path in [&gone, &stays, &out] {
            Array::from_vec(vec![4], vec![1.0f64; 4]).save_npy(path).unwrap();
        }
        let reference =
            |path: &std::path::Path, access| array::file_ref(&Array::open_npy(path, access).unwrap()).unwrap();
        let mut maps = MapCache::default();
        maps.folders.allow(std::fs::canonicalize(dir.path()).unwrap());
        maps.start_call(1);
        drop(maps.map(&reference(&gone, Access::ReadOnly)).unwrap());
        drop(maps.map(&reference(&stays, Access::ReadOnly)).unwrap());
        drop(maps.map(&reference(&out, Access::ReadWrite)).unwrap());
        assert!(Array::has_kept_maps(), "the read-write map was not kept");
        std::fs::remove_file(&gone).unwrap();
        std::fs::remove_file(&out).unwrap();
        let (r, _w) = nix::unistd::pipe().unwrap(); // never readable
        let idle = Duration::from_millis(60);
        let started = Instant::now();
        assert!(!wait_for_request(&File::from(r), Some(idle), &mut maps, Duration::from_millis(10)));
        assert!(started.elapsed() >= idle, "gave up before its idle time");
        assert!(!maps.read_only.contains_key(&gone), "the deleted input's map is held");
        assert!(maps.read_only.contains_key(&stays), "an unchanged file's map was dropped");
        assert!(!Array::has_kept_maps(), "the deleted output's map is held");
    }

    /// An input that is never readable until its script says so, and
    /// records the timeouts it was asked to wait.
    struct Scripted {
        readable: RefCell<std::collections::VecDeque<bool>>,
        asked: RefCell<Vec<Duration>>,
    }

    impl AsRawFdMaybe for Scripted {
        fn wait_readable(&self, timeout: Duration) -> bool {
            self.asked.borrow_mut().push(timeout);
            self.readable.borrow_mut().pop_front().unwrap_or(true)
        }
    }

    /// Without an idle timeout, a worker holding maps wakes after the first
    /// check, then after twice as long, letting go of a deleted file's map
    /// at the first wake, and returns as soon as its input is readable;
    /// holding none, it does not wait at all (it blocks in `recv`).
    #[test]
    fn waiting_without_an_idle_timeout_checks_the_maps_at_doubling_intervals() {
        let dir = tempfile::tempdir().unwrap();
        let gone = dir.path().join("gone.npy");
        Array::from_vec(vec![4], vec![1.0f64; 4]).save_npy(&gone).unwrap();
        let mut maps = MapCache::default();
        maps.folders.allow(std::fs::canonicalize(dir.path()).unwrap());
        maps.start_call(1);
        drop(maps.map(&array::file_ref(&Array::open_npy(&gone, Access::ReadOnly).unwrap()).unwrap()).unwrap());
        let stays = dir.path().join("stays.npy");
        Array::from_vec(vec![4], vec![1.0f64; 4]).save_npy(&stays).unwrap();
        drop(maps.map(&array::file_ref(&Array::open_npy(&stays, Access::ReadOnly).unwrap()).unwrap()).unwrap());
        std::fs::remove_file(&gone).unwrap();
        let input = Scripted { readable: RefCell::new([false, false, true].into()), asked: RefCell::default() };
        let first = Duration::from_millis(10);
        assert!(wait_for_request(&input, None, &mut maps, first));
        assert_eq!(*input.asked.borrow(), [first, first * 2, first * 4]);
        assert!(!maps.read_only.contains_key(&gone) && maps.read_only.contains_key(&stays));
        let idle_input = Scripted { readable: RefCell::default(), asked: RefCell::default() };
        assert!(wait_for_request(&idle_input, None, &mut MapCache::default(), first));
        assert!(idle_input.asked.borrow().is_empty(), "waited with nothing to check");
    }

    /// The budget's charge for an outcome is never less than its encoding
    /// (else a reply could pass the frame limit while the budget thinks it
    /// fits).
    #[test]
    fn the_budget_never_undercharges_an_outcome() {
        let file = ArrayRef::File {
            dtype: crate::DType::F64,
            shape: vec![u64::MAX, 3],
            path: "/tmp/some/where.npy".into(),
            offset: u64::MAX,
            access: Access::CopyOnWrite,
        };
        let inherited =
            ArrayRef::Inherited { dtype: crate::DType::I64, shape: vec![7], index: u32::MAX, offset: 1 << 40 };
        let inline = ArrayRef::Inline { dtype: crate::DType::F32, shape: vec![] };
        let outcomes = [
            Outcome::Ok { output: vec![9u8; 300].into(), arrays: vec![file, inherited, inline] },
            Outcome::Ok { output: Default::default(), arrays: Vec::new() },
            Outcome::Failed(protocol::TaskFailure {
                cause: FailureCause::Panic,
                message: "m".repeat(200),
                location: Some("src/x.rs:1:2".into()),
                error: Some(vec![1; 20]),
            }),
        ];
        for outcome in outcomes {
            let reply = TaskReply { index: u64::MAX, started_ns: u64::MAX, finished_ns: u64::MAX, outcome };
            let encoded = postcard::to_stdvec(&reply).unwrap().len();
            let charged = ReplyBudget::PER_TASK + encoded_len_bound(&reply.outcome);
            assert!(charged >= encoded, "charged {charged} for {encoded} bytes: {:?}", reply.outcome);
        }
    }

    /// Once an outcome would pass the payload limit, it and every later
    /// one are dropped: the first with the explanation, the others with a
    /// pointer to it, and their arrays are let go.
    #[test]
    fn the_budget_drops_outcomes_past_the_frame_limit() {
        let mut budget = ReplyBudget::default();
        let long = |n: usize| ErasedOutcome::failed(FailureCause::Error, "x".repeat(n));
        assert!(
            matches!(budget.admit(0, long(protocol::MAX_PAYLOAD / 2)).outcome, Outcome::Failed(f) if f.message.len() == protocol::MAX_PAYLOAD / 2)
        );
        let Outcome::Failed(f) = budget.admit(1, long(protocol::MAX_PAYLOAD / 2)).outcome else { unreachable!() };
        assert!(f.message.contains("would exceed the frame limit"), "{}", f.message);
        let with_array = ErasedOutcome {
            outcome: Outcome::Ok { output: Default::default(), arrays: Vec::new() },
            inline: vec![Array::from_vec(vec![2], vec![1.0f64; 2])],
        };
        let dropped = budget.admit(2, with_array);
        assert!(dropped.inline.is_empty(), "a dropped outcome kept its arrays");
        let Outcome::Failed(f) = dropped.outcome else { unreachable!() };
        assert_eq!(f.message, "dropped: the batch's reply was full (see task 1)");
    }

    /// A cached read-only map is checked against its file in every batch
    /// that uses it: truncated in between, the reference is checked afresh
    /// against the file as it is now, and refused.
    #[test]
    fn a_cached_map_is_checked_again_in_every_batch() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.npy");
        Array::from_vec(vec![512], vec![1.0f64; 512]).save_npy(&path).unwrap();
        let reference = array::file_ref(&Array::open_npy(&path, Access::ReadOnly).unwrap()).unwrap();
        let mut maps = MapCache::default();
        maps.folders.allow(std::fs::canonicalize(dir.path()).unwrap());
        maps.start_call(1);
        maps.start_batch();
        drop(maps.map(&reference).unwrap());
        std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(0).unwrap();
        maps.start_batch();
        let err = maps.map(&reference).unwrap_err().to_string();
        assert!(err.contains("x.npy") && err.contains("the file has 0 bytes"), "{err}");
        assert!(!maps.read_only.contains_key(&path), "the stale map is still cached");
    }

    fn sum(a: &Array) -> f64 {
        a.as_slice::<f64>().unwrap().iter().sum()
    }

    /// A mapping is reused by the next call while its file is unchanged, and
    /// dropped once the file is replaced or deleted, or a call did not use it.
    #[test]
    fn mappings_outlive_calls_only_while_their_file_is_unchanged_and_used() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.npy");
        let other = dir.path().join("y.npy");
        let save =
            |path: &std::path::Path, value: f64| Array::from_vec(vec![4], vec![value; 4]).save_npy(path).unwrap();
        save(&path, 1.0);
        save(&other, 5.0);
        let reference =
            |path: &std::path::Path| array::file_ref(&Array::open_npy(path, Access::ReadOnly).unwrap()).unwrap();
        let mut maps = MapCache::default();
        maps.folders.allow(std::fs::canonicalize(dir.path()).unwrap());
        maps.start_call(1);
        let first = maps.map(&reference(&path)).unwrap();
        assert_eq!(sum(&first), 4.0);
        assert_eq!(sum(&maps.map(&reference(&other)).unwrap()), 20.0);
        let view = (first.storage_bytes().1, first.nbytes());
        assert!(maps.read_only[&path].faulted.contains(&view), "faulted in once");
        maps.start_call(2);
        let again = maps.map(&reference(&path)).unwrap();
        assert_eq!(again.storage_id(), first.storage_id(), "an unchanged file is not mapped again");
        assert_eq!(maps.read_only[&path].faulted.len(), 1, "the same view is recorded once");
        // `other` was kept into call 2 but not used there: call 3 drops it.
        assert!(maps.read_only.contains_key(&other));
        // Replaced: a new file at the same path.
        std::fs::remove_file(&path).unwrap();
        save(&path, 2.0);
        maps.start_call(3);
        assert!(!maps.read_only.contains_key(&other), "unused in call 2");
        let rewritten = maps.map(&reference(&path)).unwrap();
        assert_ne!(rewritten.storage_id(), first.storage_id());
        assert_eq!(sum(&rewritten), 8.0);
        // Deleted: the cached mapping goes too.
        drop((first, again, rewritten));
        std::fs::remove_file(&path).unwrap();
        maps.start_call(4);
        assert!(maps.read_only.is_empty());
    }
}
