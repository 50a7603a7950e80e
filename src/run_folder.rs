//! The run's private temp folder: where arrays are dumped to be mapped by
//! workers.
//!
//! A folder `procjob-<pid>-<random>` (mode 0700, unpredictable name, made
//! without following symlinks by `tempfile`) under a parent chosen as
//! `--temp-folder`, else `PROCJOB_TEMP_FOLDER`, else `/dev/shm` when it has
//! more than 2 GB free and room for the data, else the system temp dir.
//! Only that folder is ever removed: on drop, whatever the outcome.
//!
//! # The lock, and the sweep of stale folders
//!
//! A process killed with SIGKILL cannot remove its folder, so every new run
//! first sweeps the parent for folders of runs that are gone. Whether a run
//! is gone is not judged by its pid (another PID namespace may reuse it, or
//! not see it at all): each run folder holds a lock file, [`LOCK_FILE`],
//! that its run keeps locked (`flock`, exclusive) for the folder's whole
//! life. The kernel drops the lock when the last descriptor of it closes,
//! however the process ends. The descriptor is close-on-exec, so spawned
//! workers do not hold it, and forked workers close every descriptor but
//! their pipes (`pool::close_other_fds`), so the lock lives exactly as long
//! as the run.
//!
//! The lock file is written (its first line is [`LOCK_FILE_HEADER`]) and
//! locked under another name, then renamed to [`LOCK_FILE`]: a folder that
//! has one is locked from the moment it shows.
//!
//! An entry of the parent is swept only when all of these hold:
//! 1. its name is exactly `procjob-<pid>-<random>`: `<pid>` a decimal
//!    number from 1 to 2^31 - 1 without sign or leading zero, `<random>`
//!    exactly 10 ASCII letters and digits (what `tempfile` makes);
//! 2. it is a directory, not a symlink, owned by this user;
//! 3. it holds [`LOCK_FILE`]: a regular file (not a symlink) owned by this
//!    user whose content begins with [`LOCK_FILE_HEADER`];
//! 4. an exclusive, non-blocking `flock` of that file succeeds: no live
//!    run holds it. The sweeper keeps the lock while it removes the folder.
//!
//! So a folder without the lock file, be it a user's, one of an older
//! procjob version, one whose run died within the microseconds between
//! making the folder and naming its lock, or one on a filesystem that
//! cannot `flock` (where the run makes no lock file), is never removed.
//!
//! A stale folder is removed through the descriptor it was checked with
//! (its entries with `unlinkat`, never following a symlink), then its name
//! with `rmdir`, which fails unless it is empty: what it checked is what it
//! removes, even if the name is swapped meanwhile.

use std::ffi::OsString;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg, OFlag};
use nix::sys::stat::Mode;

/// The environment variable that names the parent of run folders.
pub const TEMP_FOLDER_ENV: &str = "PROCJOB_TEMP_FOLDER";
const SHM: &str = "/dev/shm";
const SHM_MIN_FREE: u64 = 2_000_000_000;
/// The name of the lock file in every run folder (see the module docs).
pub const LOCK_FILE: &str = ".lock";
/// The first line of a run folder's lock file: what marks the folder as
/// procjob's (see the module docs).
pub const LOCK_FILE_HEADER: &str = "procjob run folder lock v1\n";
/// The name of the lock file before it is locked.
const LOCK_FILE_NEW: &str = ".lock-new";
/// Length of the random part of a run folder's name.
const RANDOM_LEN: usize = 10;
/// How deep the sweep goes into a stale folder (run folders are flat).
const SWEEP_DEPTH: usize = 8;

/// Why a run folder could not be made.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The parent folder is unusable.
    #[error("temp folder {path}: {reason}")]
    Parent {
        /// The parent.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// Not enough room in the parent.
    #[error(
        "temp folder {path} has {} free but this run needs {} ({needed} bytes); \
         free some space or pick another with --temp-folder or PROCJOB_TEMP_FOLDER",
        human_bytes(*.free),
        human_bytes(*.needed)
    )]
    NoRoom {
        /// The parent.
        path: PathBuf,
        /// Bytes needed.
        needed: u64,
        /// Bytes free.
        free: u64,
    },
    /// Creating the folder failed.
    #[error("cannot create a run folder in {path}: {source}")]
    Create {
        /// The parent.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// Bytes in binary units, e.g. "1.5 GiB".
pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = b as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// A run's private temp folder, locked while it lives and removed on drop.
#[derive(Debug)]
pub struct RunFolder {
    // Fields drop in this order: the folder is removed before its lock is
    // released, so no sweeper ever sees it unlocked.
    dir: tempfile::TempDir,
    /// `None` on a filesystem without `flock`: no lock file, never swept.
    _lock: Option<Flock<File>>,
}

impl RunFolder {
    /// Makes a run folder under `parent` (or the default parent) with room
    /// for `needed` bytes, after sweeping stale folders there.
    pub fn create(parent: Option<&Path>, needed: u64) -> Result<RunFolder, StoreError> {
        let parent = choose_parent(parent, needed)?;
        sweep_stale(&parent);
        let dir = tempfile::Builder::new()
            .prefix(&format!("procjob-{}-", std::process::id()))
            .rand_bytes(RANDOM_LEN)
            .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .tempdir_in(&parent)
            .map_err(|source| StoreError::Create { path: parent.clone(), source })?;
        // On failure `dir` drops here, and with it the folder.
        let lock = lock_folder(dir.path()).map_err(|source| StoreError::Create { path: parent.clone(), source })?;
        crate::lifecycle::folder_created(dir.path().to_path_buf());
        Ok(RunFolder { dir, _lock: lock })
    }

    /// The folder's path.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// A path for a new file in the folder.
    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

impl Drop for RunFolder {
    fn drop(&mut self) {
        // The TempDir field removes the folder right after this.
        crate::lifecycle::folder_removed(self.dir.path());
    }
}

/// Bytes free for an unprivileged user on the filesystem holding `path`.
pub fn free_bytes(path: &Path) -> Option<u64> {
    let s = nix::sys::statvfs::statvfs(path).ok()?;
    Some((s.blocks_available() as u64).saturating_mul(s.fragment_size() as u64))
}

/// The parent folder a run uses: `explicit`, else `PROCJOB_TEMP_FOLDER`,
/// else `/dev/shm` when it has more than 2 GB free and room for `needed`,
/// else the system temp dir. Checks that it is a directory with
/// room for `needed` bytes.
pub fn choose_parent(explicit: Option<&Path>, needed: u64) -> Result<PathBuf, StoreError> {
    let from_env = std::env::var_os(TEMP_FOLDER_ENV).filter(|p| !p.is_empty()).map(PathBuf::from);
    choose_parent_with(explicit, from_env, needed, &free_bytes)
}

/// [`choose_parent`] with the environment and the free-space probe given,
/// so the choice can be tested without filling a disk.
fn choose_parent_with(
    explicit: Option<&Path>,
    from_env: Option<PathBuf>,
    needed: u64,
    free: &dyn Fn(&Path) -> Option<u64>,
) -> Result<PathBuf, StoreError> {
    let (chosen, named_by) = match (explicit, from_env) {
        (Some(p), _) => (p.to_path_buf(), ""),
        (None, Some(p)) => (p, " (named by PROCJOB_TEMP_FOLDER)"),
        (None, None) => match free(Path::new(SHM)) {
            Some(room) if room > SHM_MIN_FREE && room >= needed => (PathBuf::from(SHM), ""),
            _ => (std::env::temp_dir(), ""),
        },
    };
    let meta = std::fs::metadata(&chosen)
        .map_err(|e| StoreError::Parent { path: chosen.clone(), reason: format!("cannot use it{named_by}: {e}") })?;
    if !meta.is_dir() {
        return Err(StoreError::Parent { path: chosen, reason: format!("is not a directory{named_by}") });
    }
    if let Some(room) = free(&chosen) {
        if room < needed {
            return Err(StoreError::NoRoom { path: chosen, needed, free: room });
        }
    }
    Ok(chosen)
}

/// Writes the lock file of the new run folder `dir` and locks it for the
/// folder's life (see the module docs): written and locked as
/// [`LOCK_FILE_NEW`], then renamed to [`LOCK_FILE`]. On a filesystem that
/// cannot `flock`, makes no lock file and returns `None`: the folder is
/// then never swept, rather than the run refused.
pub(crate) fn lock_folder(dir: &Path) -> std::io::Result<Option<Flock<File>>> {
    let new = dir.join(LOCK_FILE_NEW);
    // std opens with O_CLOEXEC: spawned workers do not inherit the lock.
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&new)?;
    let mut lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => lock,
        Err((file, _)) => {
            drop(file);
            std::fs::remove_file(&new)?;
            return Ok(None);
        }
    };
    lock.write_all(format!("{LOCK_FILE_HEADER}pid {}\n", std::process::id()).as_bytes())?;
    std::fs::rename(&new, dir.join(LOCK_FILE))?;
    Ok(Some(lock))
}

/// Removes the stale run folders in `parent`: those that meet every rule of
/// the module docs (procjob's name, this user's directory, procjob's lock
/// file, and that lock free). A folder whose lock is held, by a run in any
/// PID namespace, is never touched, nor is anything that is not provably a
/// procjob run folder. Returns the folders removed.
pub fn sweep_stale(parent: &Path) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    let Ok(entries) = std::fs::read_dir(parent) else { return removed };
    let Ok(parent_fd) =
        nix::fcntl::open(parent, OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, Mode::empty())
    else {
        return removed;
    };
    let uid = nix::unistd::getuid().as_raw();
    for entry in entries.flatten() {
        let name = entry.file_name();
        if !name.to_str().is_some_and(is_run_folder_name) {
            continue;
        }
        let Some(stale) = StaleFolder::claim(parent_fd.as_fd(), &name, uid) else { continue };
        if stale.remove(parent_fd.as_fd()).is_ok() {
            removed.push(entry.path());
        }
    }
    removed
}

/// Whether `name` is exactly a run folder's: `procjob-<pid>-<random>`, the
/// pid in decimal from 1 to `i32::MAX` without sign or leading zero, the
/// random part [`RANDOM_LEN`] ASCII letters and digits.
fn is_run_folder_name(name: &str) -> bool {
    let Some((pid, random)) = name.strip_prefix("procjob-").and_then(|rest| rest.split_once('-')) else {
        return false;
    };
    let pid_ok = !pid.is_empty()
        && !pid.starts_with('0')
        && pid.bytes().all(|b| b.is_ascii_digit())
        && pid.parse::<i32>().is_ok_and(|p| p > 0);
    pid_ok && random.len() == RANDOM_LEN && random.bytes().all(|b| b.is_ascii_alphanumeric())
}

/// A run folder proved stale: checked through `dir`, and locked by this
/// process until it is removed.
struct StaleFolder {
    name: OsString,
    dir: OwnedFd,
    _lock: Flock<File>,
}

impl StaleFolder {
    /// Checks rules 2 to 4 of the module docs for the entry `name` of the
    /// parent open as `parent`, and takes its lock. `None` when any fails.
    fn claim(parent: BorrowedFd<'_>, name: &std::ffi::OsStr, uid: u32) -> Option<StaleFolder> {
        let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        let dir = nix::fcntl::openat(parent, name, flags, Mode::empty()).ok()?;
        let st = nix::sys::stat::fstat(&dir).ok()?;
        if st.st_mode & libc::S_IFMT != libc::S_IFDIR || st.st_uid != uid {
            return None;
        }
        // O_NONBLOCK: a FIFO in its place must not block the open.
        let flags = OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_NOCTTY | OFlag::O_CLOEXEC;
        let lock_fd = nix::fcntl::openat(&dir, LOCK_FILE, flags, Mode::empty()).ok()?;
        let st = nix::sys::stat::fstat(&lock_fd).ok()?;
        if st.st_mode & libc::S_IFMT != libc::S_IFREG || st.st_uid != uid {
            return None;
        }
        let mut file = File::from(lock_fd);
        let mut head = vec![0u8; LOCK_FILE_HEADER.len()];
        file.read_exact(&mut head).ok()?;
        if head != LOCK_FILE_HEADER.as_bytes() {
            return None;
        }
        // Held by a live run (of any PID namespace): EWOULDBLOCK.
        let lock = Flock::lock(file, FlockArg::LockExclusiveNonblock).ok()?;
        Some(StaleFolder { name: name.to_owned(), dir, _lock: lock })
    }

    /// Empties the folder through its descriptor, then removes its name
    /// from `parent` (which fails unless what has that name is empty).
    fn remove(self, parent: BorrowedFd<'_>) -> std::io::Result<()> {
        remove_entries(self.dir.as_fd(), SWEEP_DEPTH)?;
        nix::unistd::unlinkat(parent, self.name.as_os_str(), nix::unistd::UnlinkatFlags::RemoveDir)?;
        Ok(())
    }
}

/// Removes everything in the directory open as `dir`, without following
/// symlinks, down to `depth` levels of subfolders.
fn remove_entries(dir: BorrowedFd<'_>, depth: usize) -> std::io::Result<()> {
    use nix::sys::stat::{fstatat, SFlag};
    use nix::unistd::{unlinkat, UnlinkatFlags};
    for name in entry_names(dir)? {
        let st = fstatat(dir, name.as_os_str(), nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW)?;
        if SFlag::from_bits_truncate(st.st_mode & libc::S_IFMT) == SFlag::S_IFDIR {
            if depth == 0 {
                return Err(std::io::Error::other("too deep"));
            }
            let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
            let sub = nix::fcntl::openat(dir, name.as_os_str(), flags, Mode::empty())?;
            remove_entries(sub.as_fd(), depth - 1)?;
            unlinkat(dir, name.as_os_str(), UnlinkatFlags::RemoveDir)?;
        } else {
            unlinkat(dir, name.as_os_str(), UnlinkatFlags::NoRemoveDir)?;
        }
    }
    Ok(())
}

/// The names in the directory open as `dir`, but `.` and `..`.
fn entry_names(dir: BorrowedFd<'_>) -> std::io::Result<Vec<OsString>> {
    use std::os::unix::ffi::OsStrExt;
    // fdopendir takes over the descriptor it is given: give it a duplicate
    // (it shares the read position, at the start: `dir` is read only here).
    let dup = dir.try_clone_to_owned()?;
    let raw = std::os::fd::IntoRawFd::into_raw_fd(dup);
    // SAFETY: `raw` is an open directory descriptor this function owns;
    // fdopendir takes it over on success and leaves it ours on failure.
    let stream = unsafe { libc::fdopendir(raw) };
    if stream.is_null() {
        let e = std::io::Error::last_os_error();
        // SAFETY: fdopendir failed, so `raw` is still ours to close.
        unsafe { libc::close(raw) };
        return Err(e);
    }
    let mut names = Vec::new();
    let result = loop {
        // SAFETY: `stream` is a valid DIR* until closedir below; errno is
        // cleared first so an error can be told from the end; the entry
        // readdir returns stays valid until the next call on `stream`, and
        // its name is copied out before that.
        unsafe {
            *libc::__errno_location() = 0;
            let entry = libc::readdir64(stream);
            if entry.is_null() {
                let errno = *libc::__errno_location();
                break if errno == 0 { Ok(()) } else { Err(std::io::Error::from_raw_os_error(errno)) };
            }
            let name = std::ffi::CStr::from_ptr((*entry).d_name.as_ptr()).to_bytes();
            if name != b"." && name != b".." {
                names.push(std::ffi::OsStr::from_bytes(name).to_owned());
            }
        }
    };
    // SAFETY: `stream` came from fdopendir and is closed once (with the
    // duplicate descriptor it owns).
    unsafe { libc::closedir(stream) };
    result.map(|()| names)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn run_folder_is_private_locked_and_removed_on_drop() {
        let parent = tempfile::tempdir().unwrap();
        let folder = RunFolder::create(Some(parent.path()), 0).unwrap();
        let path = folder.path().to_path_buf();
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        assert!(is_run_folder_name(&name) && name.starts_with(&format!("procjob-{}-", std::process::id())), "{name}");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        let lock = path.join(LOCK_FILE);
        let text = std::fs::read_to_string(&lock).unwrap();
        assert_eq!(text, format!("{LOCK_FILE_HEADER}pid {}\n", std::process::id()));
        assert_eq!(std::fs::metadata(&lock).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(!path.join(LOCK_FILE_NEW).exists());
        // Held: another open file description cannot take it.
        let other = File::open(&lock).unwrap();
        let (_, errno) = Flock::lock(other, FlockArg::LockExclusiveNonblock).unwrap_err();
        assert_eq!(errno, nix::errno::Errno::EWOULDBLOCK);
        std::fs::write(folder.file("x"), b"x").unwrap();
        drop(folder);
        assert!(!path.exists());
        assert!(parent.path().exists());
    }

    #[test]
    fn run_folder_names_are_exactly_procjobs_form() {
        for name in ["procjob-1-abcdefghij", "procjob-4711-AbC0eFgH9z", "procjob-2147483647-0123456789"] {
            assert!(is_run_folder_name(name), "{name}");
        }
        for name in [
            "procjob-2024-results",
            "procjob-+99994-x",
            "procjob-099993-x",
            "procjob-+99994-abcdefghij",
            "procjob-099993-abcdefghij",
            "procjob-0-abcdefghij",
            "procjob--5-abcdefghij",
            "procjob-2147483648-abcdefghij",
            "procjob-4711-abcdefghi",
            "procjob-4711-abcdefghijk",
            "procjob-4711-abcdefgh_j",
            "procjob-4711-abcdéfghi",
            "procjob-4711-",
            "procjob-4711",
            "procjob- 4711-abcdefghij",
            "xprocjob-4711-abcdefghij",
        ] {
            assert!(!is_run_folder_name(name), "{name}");
        }
    }

    /// A folder `parent/name` with a lock file holding `lock_text` (none
    /// when `None`), as a run of procjob or something else might leave it.
    fn folder_with_lock(parent: &Path, name: &str, lock_text: Option<&str>) -> PathBuf {
        let dir = parent.join(name);
        std::fs::create_dir(&dir).unwrap();
        if let Some(text) = lock_text {
            std::fs::write(dir.join(LOCK_FILE), text).unwrap();
        }
        dir
    }

    #[test]
    fn sweep_removes_only_procjob_folders_whose_lock_is_free() {
        let parent = tempfile::tempdir().unwrap();
        let p = parent.path();
        let outside = tempfile::tempdir().unwrap();
        let header = format!("{LOCK_FILE_HEADER}pid 2147483646\n");
        // This process's own run folder (made first: making one sweeps).
        let own = RunFolder::create(Some(p), 0).unwrap();
        // A dead run's folder (its lock free), with what a run leaves.
        let dead = folder_with_lock(p, "procjob-2147483646-deadRun001", Some(&header));
        std::fs::write(dead.join("memmap-A-1.npy"), b"left behind").unwrap();
        std::fs::create_dir(dead.join("sub")).unwrap();
        std::fs::write(dead.join("sub").join("f"), b"").unwrap();
        let precious = outside.path().join("precious");
        std::fs::write(&precious, b"keep").unwrap();
        std::os::unix::fs::symlink(&precious, dead.join("link")).unwrap();
        std::os::unix::fs::symlink(outside.path(), dead.join("dirlink")).unwrap();
        // A live run's folder: a pid that exists nowhere, but its lock held
        // (here by another open file description of this process).
        let live = folder_with_lock(p, "procjob-2147483646-liveRun001", Some(&header));
        let held = Flock::lock(File::open(live.join(LOCK_FILE)).unwrap(), FlockArg::LockExclusiveNonblock).unwrap();
        // The user's folder with a procjob-like name.
        let user = p.join("procjob-2024-results");
        std::fs::create_dir(&user).unwrap();
        std::fs::write(user.join("data.csv"), b"x").unwrap();
        // Names procjob never makes, even with procjob's lock file.
        let signed = folder_with_lock(p, "procjob-+99994-x", Some(&header));
        let zero = folder_with_lock(p, "procjob-099993-x", Some(&header));
        let zero_long = folder_with_lock(p, "procjob-099993-abcdefghij", Some(&header));
        // An older procjob's folder (no lock file), a lock file of another
        // program, and a lock file that is a symlink to procjob's.
        let old = folder_with_lock(p, "procjob-2147483646-oldVersion", None);
        let foreign = folder_with_lock(p, "procjob-2147483646-foreignLck", Some("some other lock\n"));
        let linked = folder_with_lock(p, "procjob-2147483646-linkedLock", None);
        std::fs::write(outside.path().join("lock"), &header).unwrap();
        std::os::unix::fs::symlink(outside.path().join("lock"), linked.join(LOCK_FILE)).unwrap();
        // A symlink with a run folder's name, to a stale-looking folder.
        let target = folder_with_lock(outside.path(), "procjob-2147483646-symTarget1", Some(&header));
        let symlink = p.join("procjob-2147483646-symlinkRun");
        std::os::unix::fs::symlink(&target, &symlink).unwrap();

        let removed = sweep_stale(p);
        assert_eq!(removed, vec![dead.clone()]);
        assert!(!dead.exists());
        assert_eq!(std::fs::read(&precious).unwrap(), b"keep");
        for kept in [&live, own.path(), &user, &signed, &zero, &zero_long, &old, &foreign, &linked, &target] {
            assert!(kept.join(".").is_dir(), "{} was removed", kept.display());
        }
        assert!(user.join("data.csv").is_file() && live.join(LOCK_FILE).is_file());
        assert!(symlink.symlink_metadata().unwrap().file_type().is_symlink());

        // Once its run is gone (the lock released), the live folder is stale.
        drop(held);
        assert_eq!(sweep_stale(p), vec![live.clone()]);
        assert!(own.path().is_dir());
    }

    #[test]
    fn sweep_leaves_other_users_folders() {
        if !nix::unistd::getuid().is_root() {
            println!("skipped: needs root to give a folder to another user");
            return;
        }
        let parent = tempfile::tempdir().unwrap();
        let theirs =
            folder_with_lock(parent.path(), "procjob-2147483646-otherUser1", Some(&format!("{LOCK_FILE_HEADER}\n")));
        let other = Some(nix::unistd::Uid::from_raw(12345));
        nix::unistd::chown(&theirs, other, None).unwrap();
        assert_eq!(sweep_stale(parent.path()), Vec::<PathBuf>::new());
        nix::unistd::chown(&theirs, Some(nix::unistd::getuid()), None).unwrap();
        nix::unistd::chown(&theirs.join(LOCK_FILE), other, None).unwrap();
        assert_eq!(sweep_stale(parent.path()), Vec::<PathBuf>::new());
        assert!(theirs.join(LOCK_FILE).is_file());
    }

    #[test]
    fn shm_is_used_only_with_more_than_2_gb_and_room_for_the_run() {
        let gb = 1_000_000_000u64;
        let shm_free = |shm: u64| move |p: &Path| Some(if p == Path::new(SHM) { shm } else { 100 * gb });
        let tmp = std::env::temp_dir();
        let shm_exists = Path::new(SHM).is_dir();
        if shm_exists {
            assert_eq!(choose_parent_with(None, None, gb, &shm_free(3 * gb)).unwrap(), PathBuf::from(SHM));
        }
        // More than 2 GB free but not enough for this run: the temp dir.
        assert_eq!(choose_parent_with(None, None, 4 * gb, &shm_free(3 * gb)).unwrap(), tmp);
        // Room for the run but not more than 2 GB free: the temp dir too.
        assert_eq!(choose_parent_with(None, None, gb / 2, &shm_free(gb)).unwrap(), tmp);
        // The environment and the flag win, in that order.
        let dir = tempfile::tempdir().unwrap();
        let env = Some(dir.path().to_path_buf());
        assert_eq!(choose_parent_with(None, env.clone(), 1, &shm_free(3 * gb)).unwrap(), dir.path());
        let flag = tempfile::tempdir().unwrap();
        assert_eq!(choose_parent_with(Some(flag.path()), env, 1, &shm_free(3 * gb)).unwrap(), flag.path());
        // No room anywhere: an error saying how much is needed and free.
        let err = choose_parent_with(Some(flag.path()), None, 5 * gb, &|_: &Path| Some(gb)).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("953.7 MiB free") && msg.contains("needs 4.7 GiB"), "{msg}");
    }

    #[test]
    fn parent_must_be_a_directory_with_room() {
        let parent = tempfile::tempdir().unwrap();
        let file = parent.path().join("f");
        std::fs::write(&file, b"").unwrap();
        let err = choose_parent(Some(&file), 0).unwrap_err();
        assert!(err.to_string().contains("is not a directory"), "{err}");
        let err = choose_parent_with(None, Some(file.clone()), 0, &|_: &Path| None).unwrap_err();
        assert!(err.to_string().contains("is not a directory (named by PROCJOB_TEMP_FOLDER)"), "{err}");
        let err = choose_parent(Some(&parent.path().join("missing")), 0).unwrap_err();
        assert!(err.to_string().contains("cannot use it"), "{err}");
        let err = choose_parent(Some(parent.path()), u64::MAX).unwrap_err();
        assert!(matches!(err, StoreError::NoRoom { .. }), "{err}");
    }
}
