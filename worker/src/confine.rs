//! The folders a worker may map files from, and how it opens a file
//! inside them without being led out.
//!
//! A worker maps only files under folders its coordinator named: in the
//! handshake (`Hello.folders`) or in a later frame of the same proven
//! stream (`Request::Allow`). The coordinator names canonical folders (its
//! run folders, the folders of file-backed arrays it sends) and sends
//! canonical paths. A file reference must be an absolute path without `..`
//! below one of them, and every component below the folder is resolved
//! without following a symbolic link: `openat2(RESOLVE_BENEATH |
//! RESOLVE_NO_SYMLINKS)` where the kernel has it (Linux 5.6+), otherwise a
//! walk that opens one component at a time with `O_NOFOLLOW`. The folder's
//! own path is resolved as usual: the coordinator named it.
//!
//! Platform code: the walk needs `openat` and `O_PATH` (Linux).

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

/// Why a file reference was not opened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfineError {
    /// The path is under none of the folders.
    #[error("it is outside the folders the coordinator named ({})", list(.folders))]
    Outside {
        /// The folders named so far.
        folders: Vec<PathBuf>,
    },
    /// The path leaves its folder: a symbolic link or `..` below it.
    #[error(
        "it is outside the folders the coordinator named: below {folder} it goes through a symbolic \
         link or '..', which a worker does not follow"
    )]
    Escapes {
        /// The folder the path is lexically under.
        folder: PathBuf,
    },
    /// Opening failed for another reason.
    #[error("{0}")]
    Open(#[source] io::Error),
}

fn list(folders: &[PathBuf]) -> String {
    if folders.is_empty() {
        return "none".into();
    }
    folders.iter().map(|f| f.display().to_string()).collect::<Vec<_>>().join(", ")
}

/// Folders a worker may map files from. Only grows.
#[derive(Debug, Clone, Default)]
pub struct Folders {
    list: Vec<PathBuf>,
}

impl Folders {
    /// No folder: every file is outside.
    pub fn new() -> Folders {
        Folders::default()
    }

    /// Adds `folder`. Only an absolute path without `.` or `..` is kept; any
    /// other could never contain a reference, and is dropped.
    pub fn allow(&mut self, folder: PathBuf) {
        let plain =
            folder.is_absolute() && folder.components().all(|c| matches!(c, Component::RootDir | Component::Normal(_)));
        if plain && !self.list.contains(&folder) {
            self.list.push(folder);
        }
    }

    /// The folders named so far.
    pub fn list(&self) -> &[PathBuf] {
        &self.list
    }

    /// Opens `path` with `flags` (`O_RDONLY` or `O_RDWR`, and others such as
    /// `O_NONBLOCK`; `O_CLOEXEC` and `O_NOFOLLOW` are added) if it lies
    /// under one of the folders, resolving every component below the
    /// folder without following a symbolic link.
    pub fn open(&self, path: &Path, flags: libc::c_int) -> Result<File, ConfineError> {
        self.open_with(path, flags, open_beneath)
    }

    /// [`open`](Folders::open) with the way of resolving below a folder given.
    fn open_with(&self, path: &Path, flags: libc::c_int, beneath: Resolver) -> Result<File, ConfineError> {
        let outside = || ConfineError::Outside { folders: self.list.clone() };
        if !path.is_absolute() {
            return Err(outside());
        }
        // The longest folder that holds the path: a shorter one could only
        // refuse more (more components resolved without symlinks).
        let folder = self.list.iter().filter(|f| path.starts_with(f)).max_by_key(|f| f.as_os_str().len());
        let folder = folder.ok_or_else(outside)?;
        let rel = path.strip_prefix(folder).expect("starts_with said so");
        if !rel.components().all(|c| matches!(c, Component::Normal(_))) {
            return Err(ConfineError::Escapes { folder: folder.clone() });
        }
        let dir = open_dir(folder).map_err(ConfineError::Open)?;
        let flags = flags | libc::O_CLOEXEC | libc::O_NOFOLLOW | libc::O_NOCTTY;
        let escapes = || ConfineError::Escapes { folder: folder.clone() };
        beneath(dir.as_fd(), rel, flags).map(File::from).map_err(|e| match e {
            Beneath::Escapes => escapes(),
            Beneath::Io(e) => ConfineError::Open(e),
        })
    }
}

/// Opens a relative path of plain components below a folder.
type Resolver = fn(BorrowedFd<'_>, &Path, libc::c_int) -> Result<OwnedFd, Beneath>;

/// How resolving below a folder failed.
enum Beneath {
    /// A symbolic link or `..` on the way.
    Escapes,
    Io(io::Error),
}

fn cstring(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL byte in a path"))
}

/// Opens a folder named by the coordinator, as a handle to resolve below.
fn open_dir(folder: &Path) -> io::Result<OwnedFd> {
    let c = cstring(folder)?;
    // SAFETY: `c` is a NUL-terminated path that lives across the call.
    let fd = unsafe { libc::open(c.as_ptr(), libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a descriptor open() just returned, owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Whether `openat2` was found missing (or forbidden by a seccomp filter),
/// so the walk is used from then on.
static NO_OPENAT2: AtomicBool = AtomicBool::new(false);

/// Opens `rel` (plain components only) below `dir` without following any
/// symbolic link on the way.
fn open_beneath(dir: BorrowedFd<'_>, rel: &Path, flags: libc::c_int) -> Result<OwnedFd, Beneath> {
    if !NO_OPENAT2.load(Ordering::Relaxed) {
        match openat2_beneath(dir, rel, flags) {
            Err(Beneath::Io(e)) if matches!(e.raw_os_error(), Some(libc::ENOSYS | libc::EPERM)) => {
                NO_OPENAT2.store(true, Ordering::Relaxed);
            }
            other => return other,
        }
    }
    walk_beneath(dir, rel, flags)
}

/// `openat2` with `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`.
fn openat2_beneath(dir: BorrowedFd<'_>, rel: &Path, flags: libc::c_int) -> Result<OwnedFd, Beneath> {
    let c = cstring(rel).map_err(Beneath::Io)?;
    // SAFETY: `open_how` is a plain C struct of integers; all zeros is
    // valid (and what the kernel expects of fields not set).
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = flags as u64;
    how.resolve = libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: openat2 reads the NUL-terminated `c` and `size_of_val(&how)`
    // bytes of `how`, both alive across the call; `dir` is an open
    // descriptor.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir.as_raw_fd(),
            c.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of_val(&how),
        )
    };
    if fd < 0 {
        let e = io::Error::last_os_error();
        return Err(match e.raw_os_error() {
            // ELOOP: a symbolic link; EXDEV: the path would leave `dir`.
            Some(libc::ELOOP | libc::EXDEV) => Beneath::Escapes,
            _ => Beneath::Io(e),
        });
    }
    // SAFETY: a descriptor openat2 just returned, owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) })
}

/// The same without `openat2`: one component at a time, each folder opened
/// with `O_NOFOLLOW | O_DIRECTORY`, the file with `O_NOFOLLOW`.
fn walk_beneath(dir: BorrowedFd<'_>, rel: &Path, flags: libc::c_int) -> Result<OwnedFd, Beneath> {
    let names: Vec<&std::ffi::OsStr> = rel.components().map(|c| c.as_os_str()).collect();
    let Some((last, folders)) = names.split_last() else {
        // The folder itself.
        return openat(dir, Path::new("."), flags & !libc::O_NOFOLLOW);
    };
    let mut held: Option<OwnedFd> = None;
    for name in folders {
        let at = held.as_ref().map_or(dir, |fd| fd.as_fd());
        let next = openat(at, Path::new(name), libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC);
        let next = match next {
            // With O_PATH | O_NOFOLLOW a symbolic link opens as itself and
            // then is not a directory.
            Err(Beneath::Io(e)) if e.raw_os_error() == Some(libc::ENOTDIR) && is_symlink(at, name) => {
                return Err(Beneath::Escapes)
            }
            other => other?,
        };
        held = Some(next);
    }
    openat(held.as_ref().map_or(dir, |fd| fd.as_fd()), Path::new(last), flags)
}

fn openat(dir: BorrowedFd<'_>, name: &Path, flags: libc::c_int) -> Result<OwnedFd, Beneath> {
    let c = cstring(name).map_err(Beneath::Io)?;
    // SAFETY: `c` is NUL-terminated and alive across the call; `dir` is open.
    let fd = unsafe { libc::openat(dir.as_raw_fd(), c.as_ptr(), flags, 0) };
    if fd < 0 {
        let e = io::Error::last_os_error();
        return Err(if e.raw_os_error() == Some(libc::ELOOP) { Beneath::Escapes } else { Beneath::Io(e) });
    }
    // SAFETY: a descriptor openat just returned, owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn is_symlink(dir: BorrowedFd<'_>, name: &std::ffi::OsStr) -> bool {
    nix::sys::stat::fstatat(dir, name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW)
        .is_ok_and(|st| st.st_mode & libc::S_IFMT == libc::S_IFLNK)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `root/allowed/{a.npy, sub/b.npy, link-dir -> ../outside, link.npy ->
    /// sub/b.npy}` and `root/outside/secret`.
    fn tree() -> (tempfile::TempDir, PathBuf) {
        let root = tempfile::tempdir().unwrap();
        let base = std::fs::canonicalize(root.path()).unwrap();
        let allowed = base.join("allowed");
        std::fs::create_dir_all(allowed.join("sub")).unwrap();
        std::fs::create_dir(base.join("outside")).unwrap();
        std::fs::write(allowed.join("a.npy"), b"a").unwrap();
        std::fs::write(allowed.join("sub/b.npy"), b"b").unwrap();
        std::fs::write(base.join("outside/secret"), b"secret").unwrap();
        std::os::unix::fs::symlink("../outside", allowed.join("link-dir")).unwrap();
        std::os::unix::fs::symlink("sub/b.npy", allowed.join("link.npy")).unwrap();
        (root, base)
    }

    fn check(open: &dyn Fn(&Path) -> Result<File, ConfineError>, base: &Path) {
        let allowed = base.join("allowed");
        let read = |p: &Path| std::io::read_to_string(open(p).unwrap()).unwrap();
        assert_eq!(read(&allowed.join("a.npy")), "a");
        assert_eq!(read(&allowed.join("sub/b.npy")), "b");
        for escaping in ["link-dir/secret", "link.npy", "sub/../../outside/secret", "sub/../a.npy"] {
            let err = open(&allowed.join(escaping)).unwrap_err();
            assert!(matches!(err, ConfineError::Escapes { .. }), "{escaping}: {err:?}");
            assert!(err.to_string().contains("outside the folders the coordinator named"), "{err}");
        }
        let err = open(&base.join("outside/secret")).unwrap_err();
        assert!(matches!(err, ConfineError::Outside { .. }), "{err:?}");
        assert!(matches!(open(Path::new("allowed/a.npy")).unwrap_err(), ConfineError::Outside { .. }));
        assert!(matches!(open(&allowed.join("missing")).unwrap_err(), ConfineError::Open(_)));
    }

    #[test]
    fn only_files_below_a_named_folder_open_and_no_symlink_is_followed() {
        let (_root, base) = tree();
        let mut folders = Folders::new();
        folders.allow(base.join("allowed"));
        folders.allow(PathBuf::from("relative"));
        folders.allow(base.join("allowed/../outside"));
        assert_eq!(folders.list(), [base.join("allowed")], "only plain absolute folders are kept");
        check(&|p| folders.open(p, libc::O_RDONLY), &base);
    }

    /// The walk used where the kernel has no openat2 refuses the same.
    #[test]
    fn the_component_walk_refuses_what_openat2_refuses() {
        let (_root, base) = tree();
        let mut folders = Folders::new();
        folders.allow(base.join("allowed"));
        check(&|p| folders.open_with(p, libc::O_RDONLY, walk_beneath), &base);
    }
}
