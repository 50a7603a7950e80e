//! A SIGBUS in a mapped file becomes the error of the task that read it.
//!
//! Reading a page of a file mapping past the file's end raises SIGBUS: a
//! file truncated while a task reads it (or between the check of its length
//! and the read) would kill the worker and every task of its batch. A
//! worker therefore installs a handler (`install`, worker processes only)
//! and registers every file mapping it makes (`register`) in a fixed table
//! the handler can read without locks or allocation. When a fault's address
//! lies in a registered mapping, the handler maps anonymous zero pages over
//! the rest of that mapping (`mmap` with `MAP_FIXED`, one system call, no
//! libc state), marks the mapping poisoned, and returns: the read goes on
//! and sees zeros. After the task, the serve loop takes the recorded faults
//! (`take_faults`) and reports the task as failed, naming the file; a
//! poisoned mapping is never handed to a task again. A SIGBUS anywhere else,
//! or one sent by another process, gets the default action: the handler
//! restores it and raises the signal again, so the worker dies of SIGBUS as
//! it would have without the handler.
//!
//! Why a handler rather than checking the length before every read: a
//! check cannot close the window between itself and the read (another
//! process may truncate at any moment), and a `sigsetjmp` guard would have
//! to wrap every read of mapped memory, including those inside a user's
//! task; unwinding or jumping out of a signal handler through Rust frames is
//! undefined behaviour. Mapping zero pages needs neither: the faulting
//! instruction simply completes. The design is written up in
//! `docs/protocol.md` ("SIGBUS in a mapped file").

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::Mutex;

/// Most mappings guarded at once; more are mapped unguarded (a SIGBUS in
/// one kills the worker, as before). A worker holds one call's inputs.
const SLOTS: usize = 1024;

const FREE: u8 = 0;
const BUSY: u8 = 1;
const LIVE: u8 = 2;

/// One registered mapping. The handler reads it only in state `LIVE`.
struct Slot {
    state: AtomicU8,
    start: AtomicUsize,
    /// Length rounded up to whole pages (the mapping's extent).
    len: AtomicUsize,
    writable: AtomicBool,
    /// A fault was absorbed: the mapping holds zero pages now, for good.
    poisoned: AtomicBool,
    /// A fault was absorbed and not yet taken by [`take_faults`].
    unreported: AtomicBool,
}

impl Slot {
    const fn new() -> Slot {
        Slot {
            state: AtomicU8::new(FREE),
            start: AtomicUsize::new(0),
            len: AtomicUsize::new(0),
            writable: AtomicBool::new(false),
            poisoned: AtomicBool::new(false),
            unreported: AtomicBool::new(false),
        }
    }
}

static TABLE: [Slot; SLOTS] = [const { Slot::new() }; SLOTS];
/// The file and mapped length of each slot, for messages; touched only
/// outside the handler.
static FILES: Mutex<Vec<Option<(PathBuf, u64)>>> = Mutex::new(Vec::new());
/// Faults whose mapping was dropped before they were taken.
static DROPPED: Mutex<Vec<Fault>> = Mutex::new(Vec::new());
static INSTALLED: AtomicBool = AtomicBool::new(false);
/// Set with every absorbed fault, so that [`take_faults`] after each task
/// costs one atomic swap when nothing happened (tiny tasks run a million a
/// second).
static PENDING: AtomicBool = AtomicBool::new(false);
static PAGE: AtomicUsize = AtomicUsize::new(4096);

/// A fault absorbed in a mapping of `path`, `mapped_len` bytes long when it
/// was mapped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Fault {
    pub(crate) path: PathBuf,
    pub(crate) mapped_len: u64,
}

/// Installs the SIGBUS handler. Call once, in a worker process only: a
/// coordinator, or a library user's process, keeps its own handling.
pub(crate) fn install() -> std::io::Result<()> {
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if page > 0 {
        PAGE.store(page as usize, Ordering::Relaxed);
    }
    // SAFETY: a zeroed sigaction is a valid value to fill in; the handler
    // has the SA_SIGINFO signature and only does async-signal-safe work.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_sigbus as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut action.sa_mask);
        if libc::sigaction(libc::SIGBUS, &action, std::ptr::null_mut()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    INSTALLED.store(true, Ordering::Release);
    Ok(())
}

/// The handler. Async-signal-safe: atomics, `mmap`, `sigaction`, `raise`.
extern "C" fn on_sigbus(_signal: libc::c_int, info: *mut libc::siginfo_t, _context: *mut libc::c_void) {
    // SAFETY: with SA_SIGINFO the kernel passes a valid siginfo_t.
    let (addr, code) = unsafe { ((*info).si_addr() as usize, (*info).si_code) };
    // si_code > 0: raised by the kernel for a fault, not sent by a process.
    if code > 0 && absorb(addr) {
        return;
    }
    die_of_sigbus();
}

/// From a SIGBUS handler: lets SIGBUS end this process with its default
/// action. Async-signal-safe.
pub fn die_of_sigbus() {
    // SAFETY: restoring the default action and raising the signal again are
    // async-signal-safe; the signal is blocked in its handler, so it is
    // delivered, with the default action, when the handler returns (and a
    // fault would recur anyway on the same instruction).
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = libc::SIG_DFL;
        libc::sigemptyset(&mut action.sa_mask);
        libc::sigaction(libc::SIGBUS, &action, std::ptr::null_mut());
        libc::raise(libc::SIGBUS);
    }
}

/// Maps zero pages from `addr`'s page to the end of the registered mapping
/// that holds it; false when none does or the kernel refuses.
fn absorb(addr: usize) -> bool {
    let page = PAGE.load(Ordering::Relaxed);
    for slot in &TABLE {
        if slot.state.load(Ordering::Acquire) != LIVE {
            continue;
        }
        let (start, len) = (slot.start.load(Ordering::Relaxed), slot.len.load(Ordering::Relaxed));
        if !(start..start + len).contains(&addr) {
            continue;
        }
        let from = addr & !(page - 1);
        let prot =
            if slot.writable.load(Ordering::Relaxed) { libc::PROT_READ | libc::PROT_WRITE } else { libc::PROT_READ };
        // SAFETY: the range lies inside a mapping this process registered
        // and still holds (a slot is unregistered before its mapping is
        // unmapped); replacing its pages with anonymous ones changes what
        // reads see, which is what the poisoned flag reports.
        let mapped = unsafe {
            libc::mmap(
                from as *mut libc::c_void,
                start + len - from,
                prot,
                libc::MAP_FIXED | libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if mapped == libc::MAP_FAILED {
            return false;
        }
        slot.poisoned.store(true, Ordering::Release);
        slot.unreported.store(true, Ordering::Release);
        PENDING.store(true, Ordering::Release);
        return true;
    }
    false
}

/// A registered mapping; unregisters on drop, which must come before the
/// mapping is unmapped (declare it before the map in a struct).
#[derive(Debug)]
pub(crate) struct Guard {
    slot: usize,
}

/// Registers the mapping of `path` at `start..start + len` so that a SIGBUS
/// in it is absorbed; `None` when no handler is installed (not a worker) or
/// the table is full.
pub(crate) fn register(start: *const u8, len: usize, path: &Path, writable: bool) -> Option<Guard> {
    if !INSTALLED.load(Ordering::Acquire) || len == 0 {
        return None;
    }
    let page = PAGE.load(Ordering::Relaxed);
    let slot =
        TABLE.iter().position(|s| s.state.compare_exchange(FREE, BUSY, Ordering::AcqRel, Ordering::Relaxed).is_ok())?;
    {
        let mut files = FILES.lock().unwrap_or_else(|e| e.into_inner());
        if files.len() < SLOTS {
            files.resize(SLOTS, None);
        }
        files[slot] = Some((path.to_path_buf(), len as u64));
    }
    let s = &TABLE[slot];
    s.start.store(start as usize, Ordering::Relaxed);
    s.len.store(len.div_ceil(page) * page, Ordering::Relaxed);
    s.writable.store(writable, Ordering::Relaxed);
    s.poisoned.store(false, Ordering::Relaxed);
    s.unreported.store(false, Ordering::Relaxed);
    s.state.store(LIVE, Ordering::Release);
    Some(Guard { slot })
}

impl Guard {
    /// Whether a fault was absorbed in this mapping: it holds zero pages
    /// where the file's bytes were, and must not be read again.
    pub(crate) fn is_poisoned(&self) -> bool {
        TABLE[self.slot].poisoned.load(Ordering::Acquire)
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let s = &TABLE[self.slot];
        s.state.store(BUSY, Ordering::Release);
        let file = FILES.lock().unwrap_or_else(|e| e.into_inner())[self.slot].take();
        if s.unreported.swap(false, Ordering::AcqRel) {
            if let Some((path, mapped_len)) = file {
                DROPPED.lock().unwrap_or_else(|e| e.into_inner()).push(Fault { path, mapped_len });
                PENDING.store(true, Ordering::Release);
            }
        }
        s.state.store(FREE, Ordering::Release);
    }
}

/// The faults absorbed since the last call, one per mapping (a task that
/// read a truncated file faulted in it): the serve loop fails that task.
pub(crate) fn take_faults() -> Vec<Fault> {
    if !PENDING.swap(false, Ordering::AcqRel) {
        return Vec::new();
    }
    let mut faults = std::mem::take(&mut *DROPPED.lock().unwrap_or_else(|e| e.into_inner()));
    let files = FILES.lock().unwrap_or_else(|e| e.into_inner());
    for (slot, s) in TABLE.iter().enumerate() {
        if s.state.load(Ordering::Acquire) == LIVE && s.unreported.swap(false, Ordering::AcqRel) {
            if let Some(Some((path, mapped_len))) = files.get(slot) {
                faults.push(Fault { path: path.clone(), mapped_len: *mapped_len });
            }
        }
    }
    faults
}
