//! File-backed arrays: mapping a `.npy` file or the bytes a file reference
//! names (only regular files, and in a worker only under the folders its
//! coordinator named), what identifies a mapped file, the views of a map
//! already faulted in, and the file-side operations of an [`Array`].

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::kept_maps;
use super::storage::Storage;
use super::{Array, ArrayError};
use crate::confine::Folders;
use crate::dtype::DType;
use crate::npy;
use crate::protocol::Access;

/// A memory map of a whole file, with where it came from.
pub(super) struct Mapping {
    /// The mapping's entry in the SIGBUS table (a worker's maps only);
    /// declared before `map` so that it is unregistered before the map is
    /// unmapped.
    pub(super) guard: Option<crate::sigbus::Guard>,
    /// `None` only while being dropped, once handed to `kept_maps`.
    pub(super) map: Option<memmap2::MmapRaw>,
    pub(super) path: PathBuf,
    pub(super) access: Access,
    /// The mapped file's identity when it was mapped, from the open file.
    pub(super) id: FileId,
    /// For a read-write map a worker lends a task ([`Array::map_kept`]):
    /// when its last view goes on the lending thread, the map goes back to
    /// that thread's `kept_maps` instead of being unmapped.
    pub(super) kept: Option<Lent>,
}

/// What a lent read-write map carries back to `kept_maps`.
pub(super) struct Lent {
    /// The thread whose pool the map came from and goes back to; dropped on
    /// any other thread (a task may hand its view to a thread of its own),
    /// the map is simply unmapped.
    pub(super) lender: std::thread::ThreadId,
    /// The views already faulted in.
    pub(super) faulted: FaultedViews,
}

/// The views of one mapping already faulted in (byte offset in the map and
/// length), so that a view seen before is not walked again. Past
/// [`FaultedViews::MAX`] views (many small ones, a task per row slice)
/// they are forgotten rather than grow: at worst they are walked again.
#[derive(Default)]
pub(crate) struct FaultedViews(std::collections::HashSet<(usize, usize)>);

impl FaultedViews {
    /// The most views remembered.
    const MAX: usize = 4096;

    /// A set holding `view`.
    pub(crate) fn of(view: (usize, usize)) -> FaultedViews {
        FaultedViews([view].into_iter().collect())
    }

    /// Records `view`; true the first time.
    pub(crate) fn first_time(&mut self, view: (usize, usize)) -> bool {
        if self.0.len() >= Self::MAX && !self.0.contains(&view) {
            self.0.clear();
        }
        self.0.insert(view)
    }

    /// Whether `view` was recorded.
    pub(crate) fn contains(&self, view: &(usize, usize)) -> bool {
        self.0.contains(view)
    }

    /// How many views are recorded.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.0.len()
    }
}

impl Mapping {
    pub(super) fn raw(&self) -> &memmap2::MmapRaw {
        self.map.as_ref().expect("a mapping stays mapped until dropped")
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        if let Some(lent) = self.kept.take() {
            if lent.lender == std::thread::current().id() {
                if let Some(map) = self.map.take() {
                    let path = std::mem::take(&mut self.path);
                    let guard = self.guard.take();
                    kept_maps::put(kept_maps::Kept { guard, map, path, id: self.id, faulted: lent.faulted });
                }
            }
        }
    }
}

/// What identifies a mapped file: device, inode and size. While a mapping
/// holds the inode, no other file can get its number, so a path that still
/// names this `(dev, ino)` names the mapped file; a file written in place
/// shows its new bytes through a shared mapping, and a changed size means
/// it was truncated or extended.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct FileId {
    dev: u64,
    ino: u64,
    len: u64,
}

impl FileId {
    pub(super) fn of_metadata(m: &std::fs::Metadata) -> FileId {
        use std::os::unix::fs::MetadataExt;
        FileId { dev: m.dev(), ino: m.ino(), len: m.len() }
    }

    /// The identity of what `path` names now, without following a symlink
    /// (as mapping does not), or `None` when it cannot be read.
    pub fn of_path(path: &Path) -> Option<FileId> {
        std::fs::symlink_metadata(path).ok().map(|m| FileId::of_metadata(&m))
    }
}

pub(super) fn map_file(file: &File, path: &Path, access: Access) -> Result<Mapping, ArrayError> {
    let mut opts = memmap2::MmapOptions::new();
    let meta = file.metadata().map_err(|e| ArrayError::Map { path: path.into(), reason: e.to_string() })?;
    if meta.len() == 0 {
        // mmap of length 0 fails; an empty file holds an empty array anyway.
        return Err(ArrayError::Map { path: path.into(), reason: "the file is empty".into() });
    }
    opts.len(meta.len() as usize);
    let map = match access {
        Access::ReadOnly => opts.map_raw_read_only(file),
        Access::ReadWrite => opts.map_raw(file),
        // SAFETY: a private mapping; see the contract of `Array::open_npy`.
        Access::CopyOnWrite => unsafe { opts.map_copy(file) }.map(memmap2::MmapRaw::from),
    }
    .map_err(|e| ArrayError::Map { path: path.into(), reason: e.to_string() })?;
    let guard = crate::sigbus::register(map.as_ptr(), map.len(), path, access != Access::ReadOnly);
    Ok(Mapping { guard, map: Some(map), path: path.to_path_buf(), access, id: FileId::of_metadata(&meta), kept: None })
}

/// Opens `path` (not following a last-component symlink) for reading, and
/// writing if `write`, and refuses anything but a regular file at once.
pub(super) fn open_regular(path: &Path, write: bool) -> Result<File, String> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| e.to_string())?;
    regular_and_blocking(file)
}

/// Refuses a descriptor that is not a regular file, and clears the
/// `O_NONBLOCK` it was opened with.
///
/// Files are opened with `O_NONBLOCK`: opening a FIFO for reading blocks
/// until a writer comes, so without it a reference naming a FIFO would hang
/// the worker before the file type could be checked. The flag is cleared
/// once the descriptor is known to be a regular file (it means nothing
/// there).
fn regular_and_blocking(file: File) -> Result<File, String> {
    let meta = file.metadata().map_err(|e| e.to_string())?;
    if !meta.is_file() {
        return Err(format!("not a regular file ({})", npy::file_kind(meta.file_type())));
    }
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let flags = fcntl(&file, FcntlArg::F_GETFL).map_err(|e| e.to_string())?;
    fcntl(&file, FcntlArg::F_SETFL(OFlag::from_bits_truncate(flags) - OFlag::O_NONBLOCK)).map_err(|e| e.to_string())?;
    Ok(file)
}

/// Maps the file an [`ArrayRef::File`](crate::protocol::ArrayRef::File) names, checking that the referenced
/// bytes lie inside it. The file need not be a `.npy` (a row slice points
/// into the middle of one); it must be a regular file. Opens any path but
/// a final symbolic link: for the coordinator, which maps the references
/// of its own workers' replies; a worker uses [`map_file_ref_within`].
pub fn map_file_ref(
    path: &Path,
    dtype: DType,
    shape: &[usize],
    offset: u64,
    access: Access,
) -> Result<Array, ArrayError> {
    map_file_ref_within(None, path, dtype, shape, offset, access)
}

/// [`map_file_ref`], opening the file only if it lies under one of
/// `within`'s folders, with no symbolic link below the folder (see
/// [`crate::confine`]); `None` opens it as [`map_file_ref`] does.
pub fn map_file_ref_within(
    within: Option<&Folders>,
    path: &Path,
    dtype: DType,
    shape: &[usize],
    offset: u64,
    access: Access,
) -> Result<Array, ArrayError> {
    let err = |reason: String| ArrayError::Map { path: path.to_path_buf(), reason };
    let file = open_file_ref(within, path, access).map_err(err)?;
    let meta = file.metadata().map_err(|e| err(e.to_string()))?;
    let nbytes = dtype.nbytes(shape).ok_or_else(|| ArrayError::too_large(dtype, shape))? as u64;
    let end = offset.checked_add(nbytes).ok_or_else(|| err("offset overflows".into()))?;
    if end > meta.len() {
        return Err(err(format!("needs bytes {offset}..{end} but the file has {} bytes", meta.len())));
    }
    if !offset.is_multiple_of(dtype.align() as u64) {
        return Err(err(format!(
            "offset {offset} is not a multiple of the element alignment ({} bytes)",
            dtype.align()
        )));
    }
    if nbytes == 0 {
        return Ok(Array::zeros(dtype, shape.to_vec()));
    }
    let mapping = map_file(&file, path, access)?;
    Ok(Array { dtype, shape: shape.to_vec(), storage: Arc::new(Storage::Mapped(mapping)), offset: offset as usize })
}

/// Opens the file a reference names, for [`map_file_ref_within`].
fn open_file_ref(within: Option<&Folders>, path: &Path, access: Access) -> Result<File, String> {
    match within {
        Some(folders) => {
            let flags = if access == Access::ReadWrite { libc::O_RDWR } else { libc::O_RDONLY };
            let file = folders.open(path, flags | libc::O_NONBLOCK).map_err(|e| e.to_string())?;
            regular_and_blocking(file)
        }
        None => open_regular(path, access == Access::ReadWrite),
    }
}

impl Array {
    /// Maps a `.npy` file after validating its header and length.
    ///
    /// The file must not shrink or be truncated by anyone while mapped
    /// (reading a truncated mapping raises SIGBUS). With
    /// [`Access::ReadWrite`] writes reach the file; with
    /// [`Access::CopyOnWrite`] they stay private to this process.
    pub fn open_npy(path: &Path, access: Access) -> Result<Array, ArrayError> {
        // The mapping remembers the canonical path: file references sent to
        // workers must be absolute and free of symlinks (workers refuse to
        // follow them).
        let path = &std::fs::canonicalize(path)
            .map_err(|e| ArrayError::Npy(npy::NpyError::Io { path: path.to_path_buf(), source: e }))?;
        let (file, header) = npy::read_header(path)?;
        let file = match access {
            Access::ReadOnly | Access::CopyOnWrite => file,
            // Opened again, without blocking: the path may name something
            // else by now.
            Access::ReadWrite => {
                open_regular(path, true).map_err(|reason| ArrayError::Map { path: path.clone(), reason })?
            }
        };
        let mapping = map_file(&file, path, access)?;
        Ok(Array {
            dtype: header.dtype,
            shape: header.shape,
            storage: Arc::new(Storage::Mapped(mapping)),
            offset: header.data_offset,
        })
    }

    /// Creates a new `.npy` file of zeros and maps it read-write: a shared
    /// output that tasks in other processes fill in disjoint parts.
    pub fn create_npy(path: &Path, dtype: DType, shape: impl Into<Vec<usize>>) -> Result<Array, ArrayError> {
        let shape = shape.into();
        let (file, header) = npy::create(path, dtype, &shape)?;
        let path = &std::fs::canonicalize(path)
            .map_err(|e| ArrayError::Npy(npy::NpyError::Io { path: path.to_path_buf(), source: e }))?;
        let mapping = map_file(&file, path, Access::ReadWrite)?;
        Ok(Array { dtype, shape, storage: Arc::new(Storage::Mapped(mapping)), offset: header.data_offset })
    }

    /// Writes this array to a new `.npy` file.
    pub fn save_npy(&self, path: &Path) -> Result<(), ArrayError> {
        npy::write(path, self.dtype, &self.shape, self.as_bytes())?;
        Ok(())
    }

    /// Opens the file this array is a read-write view of, for writing into
    /// it directly ([`Landing`](super::Landing)); `None` for other arrays.
    pub fn open_for_landing(&self) -> Option<std::io::Result<File>> {
        match &*self.storage {
            Storage::Mapped(m) if m.access == Access::ReadWrite => {
                use std::os::unix::fs::OpenOptionsExt;
                Some(
                    std::fs::OpenOptions::new()
                        .write(true)
                        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                        .open(&m.path),
                )
            }
            _ => None,
        }
    }

    /// A pointer to this view's first byte through which it may be written,
    /// when it is a view of a read-write shared map (whose writes reach the
    /// file, and every process mapping it, by design); `None` otherwise.
    pub(crate) fn shared_write_ptr(&self) -> Option<*mut u8> {
        match &*self.storage {
            Storage::Mapped(m) if m.access == Access::ReadWrite => {
                // SAFETY: the view lies within its map, so the offset stays
                // inside the mapped bytes.
                Some(unsafe { m.raw().as_mut_ptr().add(self.offset) })
            }
            _ => None,
        }
    }

    /// Asks the kernel to map this view's pages into the page tables now, in
    /// one call, instead of one page fault at a time as a task touches them
    /// (`MADV_POPULATE_WRITE` for a read-write map, `MADV_POPULATE_READ`
    /// otherwise: populating a copy-on-write map for writing would copy
    /// every page; Linux 5.14+). Owned arrays, and kernels without it,
    /// ignore the request.
    pub fn prefault(&self) {
        #[cfg(target_os = "linux")]
        if let Storage::Mapped(m) = &*self.storage {
            let advice = match m.access {
                Access::ReadWrite => memmap2::Advice::PopulateWrite,
                Access::ReadOnly | Access::CopyOnWrite => memmap2::Advice::PopulateRead,
            };
            // Only a request: an older kernel refuses it and the pages
            // fault in as they are touched.
            let _ = m.raw().advise_range(advice, self.offset, self.nbytes());
        }
    }

    /// Whether this array maps a file in which a SIGBUS was absorbed (see
    /// `crate::sigbus`): its pages past the fault read as zeros now, not as
    /// the file's bytes, so no task may be given it.
    pub(crate) fn is_poisoned(&self) -> bool {
        match &*self.storage {
            Storage::Mapped(m) => m.guard.as_ref().is_some_and(crate::sigbus::Guard::is_poisoned),
            Storage::Owned(_) => false,
        }
    }

    /// The identity of the file this array maps, as it was when mapped;
    /// `None` for an owned array.
    pub fn mapped_file_id(&self) -> Option<FileId> {
        match &*self.storage {
            Storage::Mapped(m) => Some(m.id),
            Storage::Owned(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The anonymous bytes of the mapping that holds `addr`, which is what
    /// a copy-on-write map's copied pages are.
    #[cfg(target_os = "linux")]
    fn anonymous_in_mapping_of(addr: usize) -> u64 {
        let kib = crate::memory::smaps_kib_at(addr, "Anonymous:");
        kib.unwrap_or_else(|| panic!("no mapping holds {addr:#x}")) * 1024
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn prefaulting_maps_writable_pages_and_copies_no_private_ones() {
        let probe = memmap2::MmapMut::map_anon(4096).unwrap();
        if probe.advise(memmap2::Advice::PopulateWrite).is_err() {
            eprintln!("skipping: this kernel has no MADV_POPULATE_WRITE (Linux 5.14+)");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let n = 1 << 20; // 8 MiB of f64
        let path = dir.path().join("x.npy");
        // Read-write: the file's pages exist once prefaulted (mincore sees
        // them in the page cache), where the fresh file had none.
        let rw = Array::create_npy(&path, DType::F64, vec![n]).unwrap();
        let resident = |a: &Array| {
            let (bytes, offset) = a.storage_bytes();
            let page = 4096;
            let start = (bytes.as_ptr() as usize + offset) & !(page - 1);
            let len = (bytes.as_ptr() as usize + offset + a.nbytes()) - start;
            let mut v = vec![0u8; len.div_ceil(page)];
            // SAFETY: the range lies inside the mapping; `v` has a byte
            // per page of it.
            assert_eq!(unsafe { libc::mincore(start as *mut libc::c_void, len, v.as_mut_ptr()) }, 0);
            v.iter().filter(|&&b| b & 1 == 1).count()
        };
        assert!(resident(&rw) < 8, "a fresh file has no pages yet");
        rw.prefault();
        assert_eq!(resident(&rw), (rw.nbytes() + rw.storage_bytes().1 % 4096).div_ceil(4096));
        drop(rw);
        // Copy-on-write: prefaulting reads; writing would give this process
        // a private copy of every page.
        let cow = Array::open_npy(&path, Access::CopyOnWrite).unwrap();
        cow.prefault();
        let copied = anonymous_in_mapping_of(cow.storage_bytes().0.as_ptr() as usize);
        assert_eq!(copied, 0, "prefaulting a copy-on-write map copied {copied} bytes");
    }

    #[test]
    fn file_references_are_checked_before_mapping() {
        let dir = std::env::temp_dir().join(format!("procjob-array-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("a.npy");
        let _ = std::fs::remove_file(&path);
        Array::from_vec(vec![4], vec![1.0f64, 2.0, 3.0, 4.0]).save_npy(&path).unwrap();
        let a = map_file_ref(&path, DType::F64, &[2], 128 + 16, Access::ReadOnly).unwrap();
        assert_eq!(a.as_slice::<f64>().unwrap(), &[3.0, 4.0]);
        // Past the end of the file, misaligned, a symlink, a directory: refused.
        assert!(map_file_ref(&path, DType::F64, &[3], 128 + 16, Access::ReadOnly).is_err());
        assert!(map_file_ref(&path, DType::F64, &[1], 129, Access::ReadOnly).is_err());
        let link = dir.join("link.npy");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&path, &link).unwrap();
        let err = map_file_ref(&link, DType::F64, &[1], 128, Access::ReadOnly).unwrap_err();
        assert!(err.to_string().contains("link.npy"), "{err}");
        assert!(map_file_ref(&dir, DType::F64, &[0], 0, Access::ReadOnly).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A FIFO is refused at once, for every access: opening one for
    /// reading would otherwise wait for a writer for ever.
    #[test]
    fn a_fifo_is_refused_without_waiting_for_a_writer() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo.npy");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        for access in [Access::ReadOnly, Access::CopyOnWrite, Access::ReadWrite] {
            let err = map_file_ref(&fifo, DType::F64, &[1], 0, access).unwrap_err().to_string();
            assert!(err.contains("fifo.npy") && err.contains("not a regular file (a fifo)"), "{access:?}: {err}");
        }
    }
}
