//! Opt-in handling of the signals that would end the process, for programs
//! that start workers: whatever stops procjob, its workers are stopped and
//! its temp folders removed first.
//!
//! The library installs nothing by itself: a program asks with
//! [`install`], as the `procjob` binary does first thing in `main`.
//!
//! ```text
//!   kill -HUP ──► (blocked in every thread) ──► signal thread: sigtimedwait
//!                                                  │ records it (received())
//!                                                  │ wakes every pool ──► Error::Interrupted,
//!                                                  │                      unwinds: workers stopped,
//!                                                  │                      folders removed, exit 128+N
//!                                                  └ 2 s later or 2nd signal: stop_now
//!   a read of a mapped file faults ──► SIGBUS handler: records the address,
//!                                      parks the faulting thread ──► signal thread:
//!                                      names the file, stop_now, exit 1
//! ```
//!
//! # Which signals
//!
//! Every signal whose default action ends the process and that can be sent
//! to it from outside ([`terminating_signals`]): SIGHUP, SIGINT, SIGQUIT,
//! SIGTRAP, SIGABRT, SIGUSR1, SIGUSR2, SIGALRM, SIGTERM, SIGSTKFLT, SIGXCPU,
//! SIGXFSZ, SIGVTALRM, SIGPROF, SIGIO (SIGPOLL), SIGPWR, SIGSYS and the
//! real-time signals SIGRTMIN..=SIGRTMAX (glibc's SIGRTMIN is above the two
//! it keeps for its own threads, which are never touched). They are blocked
//! in every thread and taken by one dedicated thread with `sigtimedwait`,
//! which
//!
//! 1. records the signal ([`received`]) and wakes every pool waiting for
//!    its workers, so the call in progress fails with
//!    [`Error::Interrupted`](crate::Error::Interrupted) and unwinds
//!    normally: workers stopped (input closed, a short grace period, then
//!    SIGKILL) and reaped, temp folders removed, exit 128 + the signal's
//!    number with one line `procjob: stopped by SIGHUP; ...`;
//! 2. if the program has not exited [`FORCE_AFTER`] later (it was busy in a
//!    long computation of its own), or on a second signal, stops at once:
//!    SIGKILL to every live worker, reap them, remove every
//!    live run folder, and exit with 128 + the signal number.
//!
//! A real-time signal has no [`Signal`] value (nix names only the standard
//! ones), which [`Error::Interrupted`](crate::Error::Interrupted) carries: it
//! takes step 2 at once.
//!
//! Left alone:
//! - a signal that is ignored, or has a handler, when [`install`] runs:
//!   `nohup` and a shell's `cmd &` ignore SIGHUP, SIGINT and SIGQUIT on
//!   purpose, and they stay ignored (Linux queues a blocked signal even
//!   when it is ignored, so blocking it would undo that);
//! - SIGPIPE, which Rust's runtime ignores (a closed pipe is an `EPIPE`);
//! - SIGSEGV, SIGILL and SIGFPE: raised by a faulting instruction in the
//!   thread that executed it, they cannot be waited for, and Rust's own
//!   SIGSEGV handler reports stack overflows.
//!
//! Some of the taken signals also come from the kernel, directed at the
//! one thread that caused them: a breakpoint's SIGTRAP, seccomp's SIGSYS
//! and `abort()`'s SIGABRT are delivered even though blocked and end the
//! process as before; a write over `RLIMIT_FSIZE` gets `EFBIG` (its SIGXFSZ
//! stays pending on the writing thread) and is reported as the write's
//! error. Only the ones sent from outside are taken.
//!
//! SIGBUS has a handler ([`install`] replaces Rust's, which on Linux only
//! watches SIGSEGV's guard pages): a read of a mapped file that has shrunk
//! under the map (an input truncated during the run) or whose filesystem
//! is full faults with SIGBUS. The handler records the faulting address
//! and parks the faulting thread for good (it must not return to the
//! instruction); the signal thread then finds the file mapped at that
//! address in `/proc/self/maps`, stops as in step 2, and exits 1 with
//! `procjob: error: <file> changed while procjob was reading it ...`. A
//! SIGBUS sent with `kill` is taken as the signals above (exit 135).
//!
//! Workers run in their own process groups, so a terminal's Ctrl-C (sent
//! to the foreground process group) reaches only the coordinator, which
//! decides how the workers stop. Spawned workers unblock every signal
//! before `exec` (which also drops the SIGBUS handler); forked ones unblock
//! them in `prepare_forked`, and the SIGBUS handler they inherit sees that
//! it runs in a worker and lets SIGBUS kill it, as it would without the
//! handler.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::lifecycle;

/// How long after the first signal the program may take to stop on its own.
pub const FORCE_AFTER: Duration = Duration::from_secs(2);

static INSTALLED: AtomicBool = AtomicBool::new(false);
/// Asks the watcher thread to stop (it checks every [`WATCH_TICK`]).
static STOP_WATCHER: AtomicBool = AtomicBool::new(false);
/// Whether a watcher thread is there to act on a recorded SIGBUS fault.
static WATCHER_RUNNING: AtomicBool = AtomicBool::new(false);
static WATCHER: Mutex<Option<std::thread::JoinHandle<()>>> = Mutex::new(None);
/// How often the watcher looks at [`STOP_WATCHER`] and for a SIGBUS while
/// no signal comes.
const WATCH_TICK: Duration = Duration::from_millis(5);
static RECEIVED: AtomicI32 = AtomicI32::new(0);
/// The signals the watcher takes, decided once by [`install`].
static TAKEN: OnceLock<Vec<i32>> = OnceLock::new();
/// The process that installed the handlers: a forked worker is another.
static COORDINATOR_PID: AtomicI32 = AtomicI32::new(0);
/// A SIGBUS sent with `kill` (not a fault), for the watcher to take.
static BUS_SENT: AtomicBool = AtomicBool::new(false);
/// The first SIGBUS fault: claimed by one faulting thread, which then
/// fills in the address and code and sets `FAULT_READY`.
static FAULT_CLAIMED: AtomicBool = AtomicBool::new(false);
static FAULT_READY: AtomicBool = AtomicBool::new(false);
static FAULT_ADDR: AtomicUsize = AtomicUsize::new(0);
static FAULT_CODE: AtomicI32 = AtomicI32::new(0);
/// The standard signals whose default action ends the process and that
/// can come from outside (see the module docs for the ones left out).
const STANDARD: [Signal; 17] = [
    Signal::SIGHUP,
    Signal::SIGINT,
    Signal::SIGQUIT,
    Signal::SIGTRAP,
    Signal::SIGABRT,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
    Signal::SIGALRM,
    Signal::SIGTERM,
    Signal::SIGSTKFLT,
    Signal::SIGXCPU,
    Signal::SIGXFSZ,
    Signal::SIGVTALRM,
    Signal::SIGPROF,
    Signal::SIGIO,
    Signal::SIGPWR,
    Signal::SIGSYS,
];

/// The numbers of every signal [`install`] takes when it finds it with its
/// default action: the standard ones of the module docs, then SIGRTMIN up
/// to SIGRTMAX. SIGBUS, which has a handler, is not among them.
pub fn terminating_signals() -> Vec<i32> {
    let mut v: Vec<i32> = STANDARD.iter().map(|&s| s as i32).collect();
    v.extend(libc::SIGRTMIN()..=libc::SIGRTMAX());
    v
}

/// The name of signal `n`: `SIGHUP`, `SIGRTMIN+3`, `SIGRTMAX`, or
/// `signal 99` for a number that is none of these.
pub fn signal_name(n: i32) -> String {
    let (min, max) = (libc::SIGRTMIN(), libc::SIGRTMAX());
    match Signal::try_from(n) {
        Ok(s) => s.as_str().to_string(),
        Err(_) if n == min => "SIGRTMIN".to_string(),
        Err(_) if n == max => "SIGRTMAX".to_string(),
        Err(_) if n > min && n < max => format!("SIGRTMIN+{}", n - min),
        Err(_) => format!("signal {n}"),
    }
}

/// A signal set holding `signals`.
fn sigset_of(signals: &[i32]) -> libc::sigset_t {
    // SAFETY: sigemptyset initialises the set it is given; sigaddset
    // only writes into it (and refuses an invalid number with EINVAL).
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for &n in signals {
            libc::sigaddset(&mut set, n);
        }
        set
    }
}

fn taken_set() -> libc::sigset_t {
    sigset_of(TAKEN.get().map_or(&[][..], Vec::as_slice))
}

/// Whether signal `n` still has its default action (no handler, not ignored).
fn has_default_action(n: i32) -> std::io::Result<bool> {
    // SAFETY: sigaction with a null new action only reads the current
    // one into `old`, which it fully initialises on success.
    unsafe {
        let mut old: libc::sigaction = std::mem::zeroed();
        if libc::sigaction(n, std::ptr::null(), &mut old) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(old.sa_sigaction == libc::SIG_DFL)
    }
}

/// Takes the signals that would end the process (see the module docs).
///
/// Call it early in `main`, before starting threads: the signals are
/// blocked in the calling thread and in threads started after it (threads
/// started before keep them unblocked, and one of those may die of them).
/// It replaces any SIGBUS handler. Calling it again does nothing.
pub fn install() -> std::io::Result<()> {
    if INSTALLED.swap(true, Ordering::SeqCst) {
        return Ok(());
    }
    COORDINATOR_PID.store(std::process::id() as i32, Ordering::SeqCst);
    let mut taken = Vec::new();
    for n in terminating_signals() {
        if has_default_action(n)? {
            taken.push(n);
        }
    }
    let set = sigset_of(&taken);
    let _ = TAKEN.set(taken);
    // SAFETY: pthread_sigmask reads a valid set; the old mask is not asked for.
    let r = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if r != 0 {
        return Err(std::io::Error::from_raw_os_error(r));
    }
    install_sigbus_handler()?;
    start_watcher()
}

fn install_sigbus_handler() -> std::io::Result<()> {
    // SAFETY: a zeroed sigaction is a valid start; the handler has the
    // signature SA_SIGINFO asks for and is async-signal-safe (see
    // `on_sigbus`); sigemptyset initialises the mask.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        let handler: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) = on_sigbus;
        action.sa_sigaction = handler as libc::sighandler_t;
        action.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
        libc::sigemptyset(&mut action.sa_mask);
        if libc::sigaction(libc::SIGBUS, &action, std::ptr::null_mut()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The SIGBUS handler. Async-signal-safe: atomics, getpid, sigaction,
/// raise, write, pause and _exit only.
extern "C" fn on_sigbus(_signal: libc::c_int, info: *mut libc::siginfo_t, _context: *mut libc::c_void) {
    // SAFETY: getpid is async-signal-safe and cannot fail.
    if unsafe { libc::getpid() } != COORDINATOR_PID.load(Ordering::SeqCst) {
        // A forked worker inherited this handler: die of SIGBUS as it would
        // without it (its coordinator names the signal and the task).
        procjob_worker::sigbus::die_of_sigbus();
        return;
    }
    // SAFETY: with SA_SIGINFO the kernel passes a valid siginfo_t; si_addr
    // is meaningful for the fault codes (> 0) only, where it is read.
    let (code, addr) = unsafe { ((*info).si_code, (*info).si_addr() as usize) };
    if code <= 0 {
        // Sent with kill, sigqueue or tgkill: no instruction to return to.
        // The watcher takes it as the other signals.
        BUS_SENT.store(true, Ordering::SeqCst);
        return;
    }
    if !FAULT_CLAIMED.swap(true, Ordering::SeqCst) {
        FAULT_ADDR.store(addr, Ordering::SeqCst);
        FAULT_CODE.store(code, Ordering::SeqCst);
        FAULT_READY.store(true, Ordering::SeqCst);
    }
    if !WATCHER_RUNNING.load(Ordering::SeqCst) {
        // No thread to act on it (it is stopped while workers are forked).
        write_stderr(b"procjob: error: SIGBUS: a mapped file shrank or its filesystem is full; the temp folder may be left behind\n");
        // SAFETY: _exit is async-signal-safe.
        unsafe { libc::_exit(128 + libc::SIGBUS) }
    }
    // The faulting thread must not return to the faulting instruction: it
    // waits here until the watcher ends the process.
    loop {
        // SAFETY: pause is async-signal-safe; it returns only after a
        // handler ran, and this thread blocks every taken signal.
        unsafe { libc::pause() };
    }
}

/// Writes `bytes` to stderr with write(2): no lock, no allocation.
fn write_stderr(bytes: &[u8]) {
    let mut rest = bytes;
    while !rest.is_empty() {
        // SAFETY: write reads `rest.len()` bytes of a live slice.
        let n = unsafe { libc::write(libc::STDERR_FILENO, rest.as_ptr().cast(), rest.len()) };
        if n <= 0 {
            // SAFETY: reading errno of this thread.
            if n < 0 && unsafe { *libc::__errno_location() } == libc::EINTR {
                continue;
            }
            return;
        }
        rest = &rest[n as usize..];
    }
}

fn start_watcher() -> std::io::Result<()> {
    STOP_WATCHER.store(false, Ordering::SeqCst);
    WATCHER_RUNNING.store(true, Ordering::SeqCst);
    let handle = match std::thread::Builder::new().name("procjob-signals".into()).spawn(watch) {
        Ok(h) => h,
        Err(e) => {
            WATCHER_RUNNING.store(false, Ordering::SeqCst);
            return Err(e);
        }
    };
    if let Ok(mut w) = WATCHER.lock() {
        *w = Some(handle);
    }
    Ok(())
}

/// Runs `f` with the signal thread stopped, so that, as far as procjob is
/// concerned, the process has one thread (forking requires it). The taken
/// signals stay blocked meanwhile: one that arrives waits, and is taken when
/// the thread starts again after `f`.
pub fn single_threaded<R>(f: impl FnOnce() -> R) -> R {
    let handle = WATCHER.lock().ok().and_then(|mut w| w.take());
    let Some(handle) = handle else { return f() };
    WATCHER_RUNNING.store(false, Ordering::SeqCst);
    STOP_WATCHER.store(true, Ordering::SeqCst);
    let _ = handle.join();
    let result = f();
    if let Err(e) = start_watcher() {
        say!("procjob: warning: cannot restart the signal thread ({e}); Ctrl-C may leave workers behind");
    }
    result
}

/// Live workers of this process (started and not yet reaped).
pub fn live_workers() -> usize {
    lifecycle::live_workers()
}

/// The first taken signal received since [`install`], if any (a real-time
/// signal never shows here: it stops the process at once).
pub fn received() -> Option<Signal> {
    match RECEIVED.load(Ordering::SeqCst) {
        0 => None,
        n => Signal::try_from(n).ok(),
    }
}

/// The exit code for a stop by `signal`: 128 + its number (130 for SIGINT,
/// 143 for SIGTERM, 129 for SIGHUP).
pub fn exit_code(signal: Signal) -> i32 {
    128 + signal as i32
}

/// Ends the process with `code`, as `std::process::exit` does, unless the
/// signal thread is stopping it at once (it kills the workers, removes the
/// folders, prints its line and exits 128 + N): then waits for that.
///
/// A program that called [`install`] ends through this, so that a stop
/// that cannot wait, whose killing of the workers may make the program
/// fail on its own at the same moment, is the one that decides the exit.
pub fn exit(code: i32) -> ! {
    if !lifecycle::claim_exit() {
        park_forever()
    }
    std::process::exit(code)
}

/// Waits for the end of the process when the signal thread is stopping it
/// at once (see [`exit`]); returns at once otherwise. A program calls it
/// before it reports a failure, which may be the workers that stop killed.
pub fn wait_if_stopping() {
    if lifecycle::is_stopping() {
        park_forever()
    }
}

fn park_forever() -> ! {
    loop {
        std::thread::park();
    }
}

/// Claims the end of the process for the signal thread; waits for the end
/// when `main` has claimed it first (it is exiting).
fn claim_stop() {
    if !lifecycle::claim_stop() {
        park_forever()
    }
}

/// Waits up to `timeout` for one of `set`; its number, or `None`.
fn wait_for(set: &libc::sigset_t, timeout: Duration) -> Option<i32> {
    let timeout =
        libc::timespec { tv_sec: timeout.as_secs() as libc::time_t, tv_nsec: timeout.subsec_nanos() as libc::c_long };
    // SAFETY: sigtimedwait reads a valid signal set and timeout and writes
    // nothing we pass (the info pointer is null).
    let got = unsafe { libc::sigtimedwait(set, std::ptr::null_mut(), &timeout) };
    (got > 0).then_some(got)
}

/// A SIGBUS fault: where and what kind (`si_code`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Fault {
    addr: usize,
    code: i32,
}

/// `si_code` of a SIGBUS for a hardware memory error (machine check),
/// action required and action optional.
const BUS_MCEERR_AR: i32 = 4;
const BUS_MCEERR_AO: i32 = 5;

/// The SIGBUS fault the handler recorded, if any.
fn recorded_fault() -> Option<Fault> {
    FAULT_READY
        .load(Ordering::SeqCst)
        .then(|| Fault { addr: FAULT_ADDR.load(Ordering::SeqCst), code: FAULT_CODE.load(Ordering::SeqCst) })
}

fn watch() {
    // A SIGBUS sent with kill must not land on this thread: parked in the
    // handler, it could act on nothing.
    let bus = sigset_of(&[libc::SIGBUS]);
    // SAFETY: pthread_sigmask reads a valid set; the old mask is not asked for.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &bus, std::ptr::null_mut()) };
    let set = taken_set();
    let first = loop {
        if let Some(fault) = recorded_fault() {
            stop_after_fault(fault);
        }
        if BUS_SENT.swap(false, Ordering::SeqCst) {
            break libc::SIGBUS;
        }
        if STOP_WATCHER.load(Ordering::SeqCst) {
            // A fault recorded while this thread was being stopped.
            if let Some(fault) = recorded_fault() {
                stop_after_fault(fault);
            }
            return;
        }
        if let Some(n) = wait_for(&set, WATCH_TICK) {
            break n;
        }
    };
    let Ok(signal) = Signal::try_from(first) else {
        // A real-time signal: Error::Interrupted cannot carry it.
        stop_now(first)
    };
    RECEIVED.store(first, Ordering::SeqCst);
    if lifecycle::folders_go_first() {
        // Under MPI: before the launcher's SIGKILL can come (the workers
        // keep the files they mapped; the program is stopping anyway).
        for folder in lifecycle::live_folders() {
            let _ = std::fs::remove_dir_all(folder);
        }
    }
    lifecycle::wake_all(signal);
    // A second signal, a fault, or no exit within FORCE_AFTER: stop at once.
    let deadline = Instant::now() + FORCE_AFTER;
    loop {
        if let Some(fault) = recorded_fault() {
            stop_after_fault(fault);
        }
        if BUS_SENT.swap(false, Ordering::SeqCst) {
            stop_now(libc::SIGBUS);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            stop_now(first);
        }
        if let Some(n) = wait_for(&set, left.min(WATCH_TICK)) {
            stop_now(n);
        }
    }
}

/// The children of this process that are workers it started: the
/// processes each of its threads started (`/proc/self/task/*/children`)
/// whose environment names this process as their coordinator. They
/// include a worker just started, not yet recorded by `worker_started`.
fn started_workers() -> Vec<i32> {
    let wanted = format!("{}={}", procjob_worker::serve::WORKER_ENV, std::process::id());
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else { return Vec::new() };
    tasks
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("children")).ok())
        .flat_map(|children| children.split_whitespace().filter_map(|p| p.parse::<i32>().ok()).collect::<Vec<_>>())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/environ"))
                .is_ok_and(|env| env.split(|&b| b == 0).any(|var| var == wanted.as_bytes()))
        })
        .collect()
}

/// SIGKILL every live worker, reap them, and remove every live run folder.
fn kill_workers_and_remove_folders() {
    let mut pids = lifecycle::live_pids();
    pids.extend(started_workers());
    pids.sort_unstable();
    pids.dedup();
    for &pid in &pids {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
    }
    for &pid in &pids {
        let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None);
    }
    for folder in lifecycle::live_folders() {
        let _ = std::fs::remove_dir_all(folder);
    }
}

/// SIGKILL every live worker, reap them, remove every live run folder, and
/// exit with 128 + `signal`.
fn stop_now(signal: i32) -> ! {
    claim_stop();
    kill_workers_and_remove_folders();
    write_stderr(
        format!("procjob: stopped by {}; workers killed, temp folder removed\n", signal_name(signal)).as_bytes(),
    );
    // SAFETY: _exit ends the process without running destructors, which
    // may be in use by the thread that did not stop in time.
    unsafe { libc::_exit(128 + signal) }
}

/// Stops after a SIGBUS fault: names the file mapped where it happened,
/// then as [`stop_now`], with the exit code of [`fault_report`].
fn stop_after_fault(fault: Fault) -> ! {
    claim_stop();
    let file = std::fs::read("/proc/self/maps").ok().and_then(|maps| mapped_file_at(&maps, fault.addr));
    let (line, code) = fault_report(fault, file.as_ref(), &lifecycle::live_folders());
    kill_workers_and_remove_folders();
    write_stderr(format!("{line}\n").as_bytes());
    // SAFETY: _exit ends the process at once; the faulting thread is parked
    // and must never run on.
    unsafe { libc::_exit(code) }
}

/// A file mapped into this process, as `/proc/self/maps` names it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct MappedFile {
    path: PathBuf,
    /// The path no longer names it (the kernel's " (deleted)").
    deleted: bool,
}

/// The file mapped at `addr`, from the text of `/proc/self/maps`: lines
/// `start-end perms offset dev inode path`, hexadecimal addresses. `None`
/// for an address in no mapping or in one that is not a file's.
fn mapped_file_at(maps: &[u8], addr: usize) -> Option<MappedFile> {
    use std::os::unix::ffi::OsStrExt;
    for line in maps.split(|&b| b == b'\n') {
        let mut fields = line.splitn(6, |&b| b == b' ');
        let range = fields.next()?;
        let (Some(_perms), Some(_offset), Some(_dev), Some(inode), Some(rest)) =
            (fields.next(), fields.next(), fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        let Some((start, end)) = std::str::from_utf8(range).ok().and_then(|r| r.split_once('-')) else { continue };
        let (Ok(start), Ok(end)) = (usize::from_str_radix(start, 16), usize::from_str_radix(end, 16)) else {
            continue;
        };
        if !(start..end).contains(&addr) {
            continue;
        }
        let path = rest.trim_ascii_start();
        if inode == b"0" || !path.starts_with(b"/") {
            return None;
        }
        let (path, deleted) = match path.strip_suffix(b" (deleted)") {
            Some(p) => (p, true),
            None => (path, false),
        };
        return Some(MappedFile { path: PathBuf::from(std::ffi::OsStr::from_bytes(path)), deleted });
    }
    None
}

/// The line to print and the exit code after `fault` in `file` (the file
/// mapped where it happened, if any): 1 for a file, as when a worker dies
/// of the same cause; 128 + SIGBUS for an address in no file and for a
/// hardware memory error.
fn fault_report(fault: Fault, file: Option<&MappedFile>, run_folders: &[PathBuf]) -> (String, i32) {
    let addr = fault.addr;
    if matches!(fault.code, BUS_MCEERR_AR | BUS_MCEERR_AO) {
        return (
            format!(
                "procjob: error: SIGBUS: a hardware memory error at address {addr:#x}; \
                 workers stopped, temp folder removed"
            ),
            128 + libc::SIGBUS,
        );
    }
    let Some(file) = file else {
        return (
            format!(
                "procjob: error: SIGBUS at address {addr:#x}, which is in no mapped file; \
                 workers stopped, temp folder removed"
            ),
            128 + libc::SIGBUS,
        );
    };
    let deleted = if file.deleted { " (since deleted)" } else { "" };
    let path = file.path.display();
    if run_folders.iter().any(|f| file.path.starts_with(f)) {
        let parent = file.path.parent().and_then(Path::parent).unwrap_or(Path::new("/"));
        (
            format!(
                "procjob: error: {path}{deleted}, a file of this run's temp folder, could not be paged in \
                 (SIGBUS): the temp folder {} is probably full; free some space or pick another with \
                 --temp-folder or PROCJOB_TEMP_FOLDER",
                parent.display()
            ),
            1,
        )
    } else {
        (
            format!(
                "procjob: error: {path}{deleted} changed while procjob was reading it (it was truncated or \
                 replaced; a mapped input must not change during a run)"
            ),
            1,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_are_named_as_kill_l_does() {
        assert_eq!(signal_name(libc::SIGHUP), "SIGHUP");
        assert_eq!(signal_name(libc::SIGIO), "SIGIO");
        let (min, max) = (libc::SIGRTMIN(), libc::SIGRTMAX());
        assert_eq!(signal_name(min), "SIGRTMIN");
        assert_eq!(signal_name(min + 3), "SIGRTMIN+3");
        assert_eq!(signal_name(max), "SIGRTMAX");
        assert_eq!(signal_name(99), "signal 99");
    }

    #[test]
    fn taken_signals_leave_out_faults_sigpipe_and_glibcs_own() {
        let taken = terminating_signals();
        for n in [libc::SIGSEGV, libc::SIGBUS, libc::SIGILL, libc::SIGFPE, libc::SIGPIPE, libc::SIGKILL] {
            assert!(!taken.contains(&n), "{} is taken", signal_name(n));
        }
        for n in [libc::SIGCHLD, libc::SIGCONT, libc::SIGWINCH, libc::SIGURG, libc::SIGTSTP] {
            assert!(!taken.contains(&n), "{} does not end the process but is taken", signal_name(n));
        }
        // glibc's two internal signals sit below SIGRTMIN.
        assert!(!taken.contains(&32) && !taken.contains(&33));
        for n in [libc::SIGHUP, libc::SIGTERM, libc::SIGXCPU, libc::SIGRTMIN(), libc::SIGRTMAX()] {
            assert!(taken.contains(&n), "{} is not taken", signal_name(n));
        }
    }

    #[test]
    fn the_file_mapped_at_an_address_is_found_in_proc_self_maps() {
        use std::os::unix::fs::FileExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mapped file.npy");
        let file = std::fs::File::create_new(&path).unwrap();
        file.write_all_at(&[7u8; 8192], 0).unwrap();
        // SAFETY: the file is this test's own and does not change while mapped.
        let map = unsafe { memmap2::Mmap::map(&file) }.unwrap();
        let maps = std::fs::read("/proc/self/maps").unwrap();
        let inside = map.as_ptr() as usize + 5000;
        let found = mapped_file_at(&maps, inside).expect("the map is listed");
        assert_eq!(found, MappedFile { path: path.clone(), deleted: false });
        // The heap is mapped, but not from a file.
        let heap = Box::new(0u64);
        assert_eq!(mapped_file_at(&maps, &*heap as *const u64 as usize), None);
        assert_eq!(mapped_file_at(&maps, 16), None);
        std::fs::remove_file(&path).unwrap();
        let maps = std::fs::read("/proc/self/maps").unwrap();
        assert_eq!(mapped_file_at(&maps, inside), Some(MappedFile { path, deleted: true }));
        drop(map);
    }

    #[test]
    fn a_fault_names_an_input_or_the_full_temp_folder() {
        let input = MappedFile { path: PathBuf::from("/data/A.npy"), deleted: false };
        let fault = Fault { addr: 0x1000, code: 2 };
        let folders = [PathBuf::from("/dev/shm/procjob-1-abcdefghij")];
        let (line, code) = fault_report(fault, Some(&input), &folders);
        assert_eq!(
            line,
            "procjob: error: /data/A.npy changed while procjob was reading it (it was truncated or replaced; \
             a mapped input must not change during a run)"
        );
        assert_eq!(code, 1);
        let dump = MappedFile { path: PathBuf::from("/dev/shm/procjob-1-abcdefghij/memmap-A-1.npy"), deleted: false };
        let (line, code) = fault_report(fault, Some(&dump), &folders);
        assert!(line.contains("the temp folder /dev/shm is probably full") && code == 1, "{line}");
        let (line, code) = fault_report(Fault { addr: 0xdead000, code: 2 }, None, &[]);
        assert!(line.contains("SIGBUS at address 0xdead000, which is in no mapped file"), "{line}");
        assert_eq!(code, 135);
        // A machine check is not the file's fault.
        let (line, code) = fault_report(Fault { addr: 0x1000, code: BUS_MCEERR_AR }, Some(&input), &folders);
        assert!(line.contains("hardware memory error") && code == 135, "{line}");
    }
}
