//! [`Array`]: an n-dimensional array that knows how to travel between
//! processes.
//!
//! An array is either owned (a buffer in this process) or mapped (a view of
//! a file, usually a `.npy` in the run's temp folder). When a task's input
//! or output is encoded, every `Array` inside it is replaced by an index into
//! a list of [`ArrayRef`]s: an owned array travels inline as raw bytes in
//! the frame's bulk, a mapped one as a file reference with a byte offset, so
//! a row slice of a mapped array costs a few dozen bytes on the pipe — what
//! joblib does for `np.split` of a memmap. The coordinator decides at
//! encoding time whether a large owned array is dumped to a file instead
//! (see [`ArrayEncoder`]).
//!
//! Serde sees an `Array` only through a scoped encoder or decoder installed
//! by [`encode_with`] / [`decode_with`]; serializing one anywhere else is an
//! error rather than a silent copy.

use std::cell::Cell;
use std::fs::File;
use std::io::Read;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::confine::Folders;
use crate::dtype::{DType, Element};
use crate::npy;
use crate::payload::Payload;
use crate::protocol::{Access, ArrayRef, DecodeError};

/// Why an array operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ArrayError {
    /// The element type asked for is not the array's.
    #[error("array has dtype {actual}, not {requested}")]
    DType {
        /// The array's dtype.
        actual: DType,
        /// The dtype asked for.
        requested: DType,
    },
    /// A shape or range does not fit.
    #[error("{0}")]
    Shape(String),
    /// The array cannot be written through (read-only map, or shared).
    #[error("array is not writable here: {0}")]
    NotWritable(&'static str),
    /// A file could not be used.
    #[error(transparent)]
    Npy(#[from] npy::NpyError),
    /// A referenced file could not be mapped.
    #[error("cannot map {path}: {reason}")]
    Map {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The shape's size in bytes (`dtype.size() × product(shape)`)
    /// overflows, or exceeds `isize::MAX`: no allocation, slice or map can
    /// hold it. Nothing was allocated.
    #[error("a {dtype} array of shape {shape:?} has more bytes than this process can address")]
    TooLarge {
        /// The element type.
        dtype: DType,
        /// The shape asked for.
        shape: Vec<u64>,
    },
    /// The system refused the memory for an array (an allocation failed,
    /// for example under `ulimit -v` or strict overcommit).
    #[error("cannot allocate a {dtype} array of shape {shape:?} ({bytes} bytes): the system refused the memory")]
    OutOfMemory {
        /// The element type.
        dtype: DType,
        /// The shape asked for.
        shape: Vec<u64>,
        /// The bytes asked for.
        bytes: u64,
    },
}

impl ArrayError {
    /// [`ArrayError::TooLarge`] for `dtype` and `shape`.
    pub fn too_large(dtype: DType, shape: &[usize]) -> ArrayError {
        ArrayError::TooLarge { dtype, shape: shape.iter().map(|&d| d as u64).collect() }
    }
}

/// Owned arrays at least this large get pages of their own, advised as
/// transparent huge pages (numpy's threshold too: it advises
/// `MADV_HUGEPAGE` from 4 MiB on).
pub const HUGE_PAGE_THRESHOLD: usize = 4 << 20;

/// The element count of a shape, checked: `None` when `dtype.size() ×
/// product(shape)` overflows or exceeds `isize::MAX`.
fn checked_len(dtype: DType, shape: &[usize]) -> Option<usize> {
    dtype.nbytes(shape)?;
    crate::dtype::elements(shape)
}

/// What only this layer can say about an [`ArrayRef`]: its shape as this
/// process's sizes. (The reference itself is the wire's; the error is ours.)
impl ArrayRef {
    /// The shape as this process's sizes, or [`ArrayError::TooLarge`]
    /// (naming the shape and dtype) when its size in bytes overflows or
    /// exceeds what this process can address (`isize::MAX`).
    pub fn checked_shape(&self) -> Result<Vec<usize>, ArrayError> {
        let (dtype, shape) = self.dtype_and_shape();
        let too_large = || ArrayError::TooLarge { dtype, shape: shape.to_vec() };
        let usize_shape: Vec<usize> =
            shape.iter().map(|&d| usize::try_from(d)).collect::<Result<_, _>>().map_err(|_| too_large())?;
        dtype.nbytes(&usize_shape).ok_or_else(too_large)?;
        Ok(usize_shape)
    }
}

/// Owned, 8-byte-aligned element storage.
enum Owned {
    I64(Vec<i64>),
    F64(Vec<f64>),
    F32(Vec<f32>),
    /// A large array: anonymous pages of its own (page-aligned; every bit
    /// pattern is a valid element), asked to be huge pages. Fresh and zeroed
    /// from [`Array::zeros`]; from [`Array::try_for_overwrite`], possibly the
    /// pages of an earlier array put back.
    Pages(memmap2::MmapMut),
}

impl Owned {
    /// `len` zeros of `dtype` (`len × dtype.size()` already checked to be
    /// at most `isize::MAX`); aborts like `vec!` when the memory cannot be
    /// had.
    fn zeroed(dtype: DType, len: usize) -> Owned {
        Owned::try_zeroed(dtype, len).unwrap_or_else(|| {
            let bytes = len.saturating_mul(dtype.size()).min(isize::MAX as usize & !7);
            std::alloc::handle_alloc_error(std::alloc::Layout::from_size_align(bytes, 8).expect("valid layout"))
        })
    }

    /// `len` zeros of `dtype`, or `None` when the memory cannot be had.
    ///
    /// From [`HUGE_PAGE_THRESHOLD`](HUGE_PAGE_THRESHOLD) on,
    /// a mapping of fresh anonymous pages advised as transparent huge pages,
    /// as numpy's large arrays are: a 2000 × 2000 result is then first
    /// written with a few dozen page faults instead of 8,000, and a GEMM
    /// writing it measured 1–8 % faster. A mapping of its own, because the
    /// advice only takes effect on pages not yet touched, and the allocator
    /// may hand back recycled, already-touched heap memory.
    fn try_zeroed(dtype: DType, len: usize) -> Option<Owned> {
        /// Zeroed by the allocator (`calloc`: fresh pages are zero
        /// already, so a large array costs no write pass), or `None`.
        fn alloc<T: Element>(len: usize) -> Option<Vec<T>> {
            if len == 0 {
                return Some(Vec::new());
            }
            let layout = std::alloc::Layout::array::<T>(len).ok()?;
            // SAFETY: the layout has a non-zero size (len > 0, T is not a ZST).
            let ptr = unsafe { std::alloc::alloc_zeroed(layout) }.cast::<T>();
            if ptr.is_null() {
                return None;
            }
            // SAFETY: `ptr` was allocated by the global allocator with the
            // layout of `len` T's, and all-zero bytes are a valid T
            // (Element types are plain numbers).
            Some(unsafe { Vec::from_raw_parts(ptr, len, len) })
        }
        let bytes = len.checked_mul(dtype.size())?;
        if bytes >= HUGE_PAGE_THRESHOLD {
            let map = memmap2::MmapMut::map_anon(bytes).ok()?;
            // Only a hint, given before the first touch: with THP off
            // nothing changes, and the contents are never affected.
            #[cfg(target_os = "linux")]
            let _ = map.advise(memmap2::Advice::HugePage);
            return Some(Owned::Pages(map));
        }
        Some(match dtype {
            DType::I64 => Owned::I64(alloc(len)?),
            DType::F64 => Owned::F64(alloc(len)?),
            DType::F32 => Owned::F32(alloc(len)?),
        })
    }

    fn bytes(&self) -> &[u8] {
        match self {
            Owned::I64(v) => as_bytes(v),
            Owned::F64(v) => as_bytes(v),
            Owned::F32(v) => as_bytes(v),
            Owned::Pages(map) => map,
        }
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        match self {
            Owned::I64(v) => as_bytes_mut(v),
            Owned::F64(v) => as_bytes_mut(v),
            Owned::F32(v) => as_bytes_mut(v),
            Owned::Pages(map) => map,
        }
    }
}

/// The pages [`Array::put_back_pages`] keeps for [`Array::try_for_overwrite`]:
/// a few mappings per thread (the serve loop runs a batch's tasks on its
/// own thread), taken by exact length.
mod spare_pages {
    use std::cell::RefCell;

    /// At most this many mappings are kept (a batch rarely returns more
    /// than one large block).
    pub(crate) const KEEP: usize = 2;

    thread_local! {
        static SPARES: RefCell<Vec<memmap2::MmapMut>> = const { RefCell::new(Vec::new()) };
    }

    pub(super) fn take(bytes: usize) -> Option<memmap2::MmapMut> {
        SPARES.with_borrow_mut(|spares| {
            let at = spares.iter().position(|m| m.len() == bytes)?;
            Some(spares.swap_remove(at))
        })
    }

    pub(super) fn put(map: memmap2::MmapMut) {
        SPARES.with_borrow_mut(|spares| {
            if spares.len() < KEEP {
                spares.push(map);
            }
        });
    }

    pub(super) fn clear() {
        SPARES.with_borrow_mut(Vec::clear);
    }
}

/// How many large results a worker keeps for reuse (see
/// [`Array::put_back_pages`]).
pub(crate) const SPARES_KEPT: usize = spare_pages::KEEP;

fn as_bytes<T: Element>(v: &[T]) -> &[u8] {
    // SAFETY: Element types are plain numbers without padding; any initialized
    // value may be viewed as bytes, and the length covers exactly the slice.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
}

fn as_bytes_mut<T: Element>(v: &mut [T]) -> &mut [u8] {
    // SAFETY: as in `as_bytes`; every byte pattern is a valid Element, so
    // writes through the byte view cannot create invalid values.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
}

/// A memory map of a whole file, with where it came from.
struct Mapping {
    /// The mapping's entry in the SIGBUS table (a worker's maps only);
    /// declared before `map` so that it is unregistered before the map is
    /// unmapped.
    guard: Option<crate::sigbus::Guard>,
    /// `None` only while being dropped, once handed to `kept_maps`.
    map: Option<memmap2::MmapRaw>,
    path: PathBuf,
    access: Access,
    /// The mapped file's identity when it was mapped, from the open file.
    id: FileId,
    /// For a read-write map a worker lends a task ([`Array::map_kept`]):
    /// when its last view goes on the lending thread, the map goes back to
    /// that thread's `kept_maps` instead of being unmapped.
    kept: Option<Lent>,
}

/// What a lent read-write map carries back to `kept_maps`.
struct Lent {
    /// The thread whose pool the map came from and goes back to; dropped on
    /// any other thread (a task may hand its view to a thread of its own),
    /// the map is simply unmapped.
    lender: std::thread::ThreadId,
    /// The views already faulted in.
    faulted: FaultedViews,
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
    fn raw(&self) -> &memmap2::MmapRaw {
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

/// The read-write maps [`Array::map_kept`] lends tasks, between calls: a
/// few per thread (the serve loop runs a batch's tasks on its own thread).
mod kept_maps {
    use std::cell::RefCell;
    use std::path::{Path, PathBuf};

    use super::{FaultedViews, FileId};

    /// At most this many maps are kept (the oldest goes first).
    const KEEP: usize = 2;

    pub(super) struct Kept {
        /// Before `map`: unregistered before it is unmapped.
        pub(super) guard: Option<crate::sigbus::Guard>,
        pub(super) map: memmap2::MmapRaw,
        pub(super) path: PathBuf,
        pub(super) id: FileId,
        pub(super) faulted: FaultedViews,
    }

    thread_local! {
        pub(super) static KEPT: RefCell<Vec<Kept>> = const { RefCell::new(Vec::new()) };
    }

    /// Keeps `kept` (unmapped instead when this thread's pool is gone, as
    /// it is while the thread exits).
    pub(super) fn put(kept: Kept) {
        // A map a SIGBUS was absorbed in holds zero pages: never lent again.
        if kept.guard.as_ref().is_some_and(crate::sigbus::Guard::is_poisoned) {
            return;
        }
        if let Ok(evicted) = KEPT.try_with(|all| {
            let mut all = all.borrow_mut();
            all.push(kept);
            (all.len() > KEEP).then(|| all.remove(0))
        }) {
            drop(evicted); // unmapped outside the borrow
        }
    }

    /// A kept map of `path`, if that path still names the same file: one
    /// that has `view` faulted in if there is one.
    pub(super) fn take(path: &Path, view: (usize, usize)) -> Option<Kept> {
        let kept = KEPT.with_borrow_mut(|all| {
            let mine = |k: &Kept| k.path == path;
            let at =
                all.iter().position(|k| mine(k) && k.faulted.contains(&view)).or_else(|| all.iter().position(mine))?;
            Some(all.remove(at))
        })?;
        (FileId::of_path(path) == Some(kept.id)).then_some(kept)
    }

    /// Whether this thread keeps any map.
    pub(super) fn any() -> bool {
        KEPT.with_borrow(|all| !all.is_empty())
    }

    /// Drops the maps whose path no longer names the file they map
    /// (deleted or replaced): a deleted file's pages would live on.
    pub(super) fn forget_changed() {
        let gone: Vec<Kept> = KEPT.with_borrow_mut(|all| {
            let (stay, gone) = std::mem::take(all).into_iter().partition(|k| FileId::of_path(&k.path) == Some(k.id));
            *all = stay;
            gone
        });
        drop(gone);
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
    fn of_metadata(m: &std::fs::Metadata) -> FileId {
        use std::os::unix::fs::MetadataExt;
        FileId { dev: m.dev(), ino: m.ino(), len: m.len() }
    }

    /// The identity of what `path` names now, without following a symlink
    /// (as mapping does not), or `None` when it cannot be read.
    pub fn of_path(path: &Path) -> Option<FileId> {
        std::fs::symlink_metadata(path).ok().map(|m| FileId::of_metadata(&m))
    }
}

enum Storage {
    Owned(Owned),
    Mapped(Mapping),
}

impl Storage {
    fn bytes(&self) -> &[u8] {
        match self {
            Storage::Owned(o) => o.bytes(),
            Storage::Mapped(m) => {
                // SAFETY: the mapping lives as long as `self`; the file is
                // procjob's own temp file or a user file mapped in place, which
                // the contract of `Array::open_npy` says must not shrink while
                // mapped.
                unsafe { std::slice::from_raw_parts(m.raw().as_ptr(), m.raw().len()) }
            }
        }
    }
}

/// An n-dimensional, C-ordered array of `i64`, `f64` or `f32`, owned or
/// memory-mapped, cheap to clone (views share their storage).
#[derive(Clone)]
pub struct Array {
    dtype: DType,
    shape: Vec<usize>,
    storage: Arc<Storage>,
    /// Byte offset of the first element in the storage.
    offset: usize,
}

impl std::fmt::Debug for Array {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match &*self.storage {
            Storage::Owned(_) => "owned".to_string(),
            Storage::Mapped(m) => format!("mapped {:?} {:?}", m.path, m.access),
        };
        f.debug_struct("Array")
            .field("dtype", &self.dtype)
            .field("shape", &self.shape)
            .field("storage", &kind)
            .field("offset", &self.offset)
            .finish()
    }
}

impl PartialEq for Array {
    /// Equal when dtype, shape and every byte agree.
    fn eq(&self, other: &Self) -> bool {
        self.dtype == other.dtype && self.shape == other.shape && self.as_bytes() == other.as_bytes()
    }
}

/// The element count of a shape an [`Array`] already has: every
/// constructor checked it ([`checked_len`]), so it cannot overflow.
fn product(shape: &[usize]) -> usize {
    crate::dtype::elements(shape).expect("an array's shape was checked when it was made")
}

impl Array {
    /// An owned array from a vector; `shape` must hold exactly `data.len()` elements.
    ///
    /// # Panics
    /// If the shape's element count differs from `data.len()` or overflows
    /// ([`Array::try_from_vec`] returns an error instead).
    pub fn from_vec<T: Element>(shape: impl Into<Vec<usize>>, data: Vec<T>) -> Array {
        match Array::try_from_vec(shape, data) {
            Ok(a) => a,
            Err(e) => panic!("{e}"),
        }
    }

    /// An owned array from a vector, or [`ArrayError::TooLarge`] when the
    /// shape's size overflows and [`ArrayError::Shape`] when it does not
    /// hold exactly `data.len()` elements.
    pub fn try_from_vec<T: Element>(shape: impl Into<Vec<usize>>, data: Vec<T>) -> Result<Array, ArrayError> {
        let shape = shape.into();
        let len = checked_len(T::DTYPE, &shape).ok_or_else(|| ArrayError::too_large(T::DTYPE, &shape))?;
        if len != data.len() {
            return Err(ArrayError::Shape(format!("shape {shape:?} does not hold {} elements", data.len())));
        }
        let owned = match T::DTYPE {
            // The Element trait is sealed to these three types, so the casts
            // below are identity conversions checked by `downcast`.
            DType::I64 => Owned::I64(downcast(data)),
            DType::F64 => Owned::F64(downcast(data)),
            DType::F32 => Owned::F32(downcast(data)),
        };
        Ok(Array { dtype: T::DTYPE, shape, storage: Arc::new(Storage::Owned(owned)), offset: 0 })
    }

    /// An owned array of zeros, or an error (not an abort) for sizes that
    /// come from outside — a frame, a file, a user's shape: the size is a
    /// checked product ([`ArrayError::TooLarge`], nothing allocated), and
    /// memory the system refuses is [`ArrayError::OutOfMemory`].
    pub fn try_zeros(dtype: DType, shape: impl Into<Vec<usize>>) -> Result<Array, ArrayError> {
        let shape = shape.into();
        let len = checked_len(dtype, &shape).ok_or_else(|| ArrayError::too_large(dtype, &shape))?;
        let owned = Owned::try_zeroed(dtype, len).ok_or_else(|| ArrayError::OutOfMemory {
            dtype,
            shape: shape.iter().map(|&d| d as u64).collect(),
            bytes: (len * dtype.size()) as u64,
        })?;
        Ok(Array { dtype, shape, storage: Arc::new(Storage::Owned(owned)), offset: 0 })
    }

    /// An owned array of zeros.
    ///
    /// # Panics
    /// If the shape's size in bytes overflows or exceeds `isize::MAX`; and
    /// like `vec!`, it aborts the process when the system refuses the
    /// memory. For sizes that come from outside, use [`Array::try_zeros`].
    pub fn zeros(dtype: DType, shape: impl Into<Vec<usize>>) -> Array {
        let shape = shape.into();
        let len = checked_len(dtype, &shape).unwrap_or_else(|| panic!("{}", ArrayError::too_large(dtype, &shape)));
        let owned = Owned::zeroed(dtype, len);
        Array { dtype, shape, storage: Arc::new(Storage::Owned(owned)), offset: 0 }
    }

    /// An owned array for a caller that overwrites every element before
    /// reading any: its initial elements are unspecified (zeros, or the
    /// elements of an earlier array of this thread).
    ///
    /// A large one (pages of its own, see [`Array::zeros`]) takes the pages
    /// of an earlier result of the same byte size when this thread's serve
    /// loop has put them back (`Array::put_back_pages`) — a worker's next
    /// 16 MB block then skips the 2.5–3 ms of faulting in and zeroing fresh
    /// pages, as numpy's next product reuses the memory its last one freed.
    /// Any other array is [`Array::zeros`]. In debug builds reused pages
    /// are first filled with `0xFF` bytes (NaN, or -1 for `i64`), so that a
    /// caller that stops overwriting everything shows in the tests.
    ///
    /// Fallible as [`Array::try_zeros`]: a task's output shape comes from
    /// its inputs (`A[2²⁰, 0] · B[0, 2²⁰]` asks for 8 TiB from 0 bytes).
    pub(crate) fn try_for_overwrite(dtype: DType, shape: impl Into<Vec<usize>>) -> Result<Array, ArrayError> {
        let shape = shape.into();
        let bytes = dtype.nbytes(&shape).ok_or_else(|| ArrayError::too_large(dtype, &shape))?;
        match spare_pages::take(bytes) {
            Some(mut map) => {
                if cfg!(debug_assertions) {
                    map.fill(0xFF);
                }
                Ok(Array { dtype, shape, storage: Arc::new(Storage::Owned(Owned::Pages(map))), offset: 0 })
            }
            None => Array::try_zeros(dtype, shape),
        }
    }

    /// Puts this array's pages back for the next [`Array::try_for_overwrite`]
    /// of the same byte size, when it is their sole owner (see
    /// [`Array::is_sole_owner_of_pages`]); otherwise simply drops it.
    ///
    /// Only for pages nothing outside this process reads any more: a
    /// result handed to a pipe by reference (`vmsplice`) is put back once
    /// that pipe is empty, never before — the next result would be written
    /// into pages the reader has yet to copy.
    pub(crate) fn put_back_pages(self) {
        if !self.is_sole_owner_of_pages() {
            return;
        }
        if let Ok(Storage::Owned(Owned::Pages(map))) = Arc::try_unwrap(self.storage) {
            spare_pages::put(map);
        }
    }

    /// Drops the pages put back on this thread and not taken since.
    pub(crate) fn drop_spare_pages() {
        spare_pages::clear();
    }

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

    /// The element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The shape, C order.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        product(&self.shape)
    }

    /// Whether the array has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Number of bytes of the elements.
    pub fn nbytes(&self) -> usize {
        self.len() * self.dtype.size()
    }

    /// Whether this array is a view of a mapped file.
    pub fn is_mapped(&self) -> bool {
        matches!(&*self.storage, Storage::Mapped(_))
    }

    /// The file and byte offset this array is a view of, if it is mapped.
    pub fn file_location(&self) -> Option<(&Path, u64, Access)> {
        match &*self.storage {
            Storage::Mapped(m) => Some((&m.path, self.offset as u64, m.access)),
            Storage::Owned(_) => None,
        }
    }

    /// The raw little-endian bytes of the elements.
    pub fn as_bytes(&self) -> &[u8] {
        &self.storage.bytes()[self.offset..self.offset + self.nbytes()]
    }

    /// The elements as a slice of `T`.
    pub fn as_slice<T: Element>(&self) -> Result<&[T], ArrayError> {
        self.check_dtype::<T>()?;
        let bytes = self.as_bytes();
        if bytes.is_empty() {
            return Ok(&[]);
        }
        let ptr = bytes.as_ptr();
        // Offsets are multiples of the element size from an aligned base (a
        // Vec of T, or a page-aligned map whose .npy data offset is a multiple
        // of 8), so this holds; check rather than trust.
        assert_eq!(ptr.align_offset(std::mem::align_of::<T>()), 0, "array data is misaligned");
        // SAFETY: the pointer is aligned (checked), the bytes are initialized
        // and live as long as `self`, and every bit pattern is a valid T.
        Ok(unsafe { std::slice::from_raw_parts(ptr.cast::<T>(), bytes.len() / std::mem::size_of::<T>()) })
    }

    /// The elements as a mutable slice of `T`.
    ///
    /// Allowed when this view is the only one in this process: an owned
    /// array not shared with a clone, or a read-write or copy-on-write map
    /// not shared with a clone. With a read-write map other processes may
    /// map the same file: tasks must write disjoint parts.
    pub fn as_mut_slice<T: Element>(&mut self) -> Result<&mut [T], ArrayError> {
        self.check_dtype::<T>()?;
        let (offset, nbytes) = (self.offset, self.nbytes());
        if let Storage::Mapped(Mapping { access: Access::ReadOnly, .. }) = &*self.storage {
            return Err(ArrayError::NotWritable("it is mapped read-only"));
        }
        let storage = Arc::get_mut(&mut self.storage)
            .ok_or(ArrayError::NotWritable("other views of the same storage exist in this process"))?;
        let bytes: &mut [u8] = match storage {
            Storage::Owned(o) => &mut o.bytes_mut()[offset..offset + nbytes],
            Storage::Mapped(m) => {
                // SAFETY: the map is writable (read-write or copy-on-write),
                // `Arc::get_mut` proved this view is its only user in this
                // process, and the range lies inside the map (checked when the
                // view was made).
                unsafe { std::slice::from_raw_parts_mut(m.raw().as_mut_ptr().add(offset), nbytes) }
            }
        };
        if bytes.is_empty() {
            return Ok(&mut []);
        }
        assert_eq!(bytes.as_ptr().align_offset(std::mem::align_of::<T>()), 0, "array data is misaligned");
        // SAFETY: aligned (checked), initialized, exclusively borrowed through
        // `&mut self`, and every bit pattern is a valid T.
        Ok(unsafe { std::slice::from_raw_parts_mut(bytes.as_mut_ptr().cast::<T>(), nbytes / std::mem::size_of::<T>()) })
    }

    /// An owned copy of this view (a mapped array's bytes copied into memory).
    ///
    /// Like `vec!`, it aborts the process when the system refuses the
    /// memory (the size is that of an array that exists already, so it
    /// cannot overflow).
    pub fn to_owned_array(&self) -> Array {
        let mut out = Array::zeros(self.dtype, self.shape.clone());
        let storage = Arc::get_mut(&mut out.storage).expect("a fresh array is unshared");
        let Storage::Owned(owned) = storage else { unreachable!("zeros() is owned") };
        owned.bytes_mut().copy_from_slice(self.as_bytes());
        out
    }

    /// A copy of the elements.
    pub fn to_vec<T: Element>(&self) -> Result<Vec<T>, ArrayError> {
        Ok(self.as_slice::<T>()?.to_vec())
    }

    /// A view of rows `range` (along the first axis), sharing storage.
    pub fn rows(&self, range: Range<usize>) -> Result<Array, ArrayError> {
        let Some((&n_rows, rest)) = self.shape.split_first() else {
            return Err(ArrayError::Shape("a 0-dimensional array has no rows".into()));
        };
        if range.start > range.end || range.end > n_rows {
            return Err(ArrayError::Shape(format!("rows {range:?} out of range for {n_rows} rows")));
        }
        let row_bytes = product(rest) * self.dtype.size();
        let mut shape = self.shape.clone();
        shape[0] = range.end - range.start;
        Ok(Array {
            dtype: self.dtype,
            shape,
            storage: Arc::clone(&self.storage),
            offset: self.offset + range.start * row_bytes,
        })
    }

    /// Splits along the first axis into `sections` views as
    /// `np.array_split` does: the first `len % sections` get one row more.
    /// `sections` must be at least 1.
    pub fn array_split(&self, sections: usize) -> Result<Vec<Array>, ArrayError> {
        let Some(&n) = self.shape.first() else {
            return Err(ArrayError::Shape("a 0-dimensional array cannot be split".into()));
        };
        if sections == 0 {
            return Err(ArrayError::Shape("cannot split into 0 sections".into()));
        }
        let (base, extra) = (n / sections, n % sections);
        let mut start = 0;
        (0..sections)
            .map(|i| {
                let len = base + usize::from(i < extra);
                start += len;
                self.rows(start - len..start)
            })
            .collect()
    }

    /// Stacks arrays along the first axis into a new owned array, as
    /// `np.vstack` does for arrays of two or more dimensions. All must have
    /// the same dtype and the same shape after the first axis.
    pub fn vstack(parts: &[Array]) -> Result<Array, ArrayError> {
        let Some(first) = parts.first() else {
            return Err(ArrayError::Shape("nothing to stack".into()));
        };
        let Some((_, rest)) = first.shape.split_first() else {
            return Err(ArrayError::Shape("cannot stack 0-dimensional arrays".into()));
        };
        let mut rows: usize = 0;
        for p in parts {
            if p.dtype != first.dtype || p.shape.get(1..) != Some(rest) {
                return Err(ArrayError::Shape(format!(
                    "cannot stack {} {:?} onto {} {:?}",
                    p.dtype, p.shape, first.dtype, first.shape
                )));
            }
            rows = rows.checked_add(p.shape[0]).ok_or_else(|| {
                let mut shape = first.shape.clone();
                shape[0] = usize::MAX;
                ArrayError::too_large(first.dtype, &shape)
            })?;
        }
        let mut shape = first.shape.clone();
        shape[0] = rows;
        let mut out = Array::try_zeros(first.dtype, shape)?;
        let storage = Arc::get_mut(&mut out.storage).expect("a fresh array is unshared");
        let Storage::Owned(owned) = storage else { unreachable!("zeros() is owned") };
        let mut at = 0;
        let dst = owned.bytes_mut();
        for p in parts {
            let b = p.as_bytes();
            dst[at..at + b.len()].copy_from_slice(b);
            at += b.len();
        }
        Ok(out)
    }

    /// The same elements with another shape of the same element count.
    pub fn reshape(mut self, shape: impl Into<Vec<usize>>) -> Result<Array, ArrayError> {
        let shape = shape.into();
        if checked_len(self.dtype, &shape) != Some(self.len()) {
            return Err(ArrayError::Shape(format!("cannot reshape {:?} into {shape:?}", self.shape)));
        }
        self.shape = shape;
        Ok(self)
    }

    /// Opens the file this array is a read-write view of, for writing into
    /// it directly ([`Landing`]); `None` for other arrays.
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

    /// True when this array is the only reference to pages of its own
    /// (a large [`zeros`](Array::zeros) array, see `Owned::Pages`): nothing
    /// else can write them, and dropping the array unmaps them. Such bytes
    /// may be handed to a pipe by reference (`vmsplice`) instead of copied,
    /// provided nothing writes them after the send until the reader has
    /// copied them out (the pipe keeps the pages alive until then): the
    /// array is dropped, or put back for reuse only once the pipe is empty
    /// and the reader is known to copy (see `serve`).
    pub fn is_sole_owner_of_pages(&self) -> bool {
        matches!(&*self.storage, Storage::Owned(Owned::Pages(_))) && self.is_unshared()
    }

    /// True when no other array (view or clone) shares this one's storage:
    /// writing it changes nothing anyone else can see in this process.
    pub fn is_unshared(&self) -> bool {
        Arc::strong_count(&self.storage) == 1
    }

    /// A key that is equal for arrays sharing the same storage; used to dump
    /// an array shared by many tasks only once.
    pub fn storage_id(&self) -> usize {
        Arc::as_ptr(&self.storage) as *const () as usize
    }

    /// The bytes of the whole storage this view belongs to (not copied),
    /// and this view's byte offset in them.
    pub fn storage_bytes(&self) -> (&[u8], usize) {
        (self.storage.bytes(), self.offset)
    }

    fn check_dtype<T: Element>(&self) -> Result<(), ArrayError> {
        if T::DTYPE != self.dtype {
            return Err(ArrayError::DType { actual: self.dtype, requested: T::DTYPE });
        }
        Ok(())
    }
}

fn downcast<T: Element, U: Element>(v: Vec<T>) -> Vec<U> {
    assert_eq!(T::DTYPE, U::DTYPE, "downcast between different element types");
    let mut v = std::mem::ManuallyDrop::new(v);
    // SAFETY: T and U have the same DType, and the sealed Element trait maps
    // each DType to exactly one Rust type, so T and U are the same type.
    unsafe { Vec::from_raw_parts(v.as_mut_ptr().cast::<U>(), v.len(), v.capacity()) }
}

fn map_file(file: &File, path: &Path, access: Access) -> Result<Mapping, ArrayError> {
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
fn open_regular(path: &Path, write: bool) -> Result<File, String> {
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

/// Maps the file an [`ArrayRef::File`] names, checking that the referenced
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
    if !offset.is_multiple_of(dtype.size() as u64) {
        return Err(err(format!("offset {offset} is not a multiple of the element size")));
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
    /// Maps a read-write file reference for a task as [`map_file_ref_within`]
    /// does, but reuses this thread's kept map of the same, unchanged file,
    /// and keeps the map again when the task's last view of it goes: a
    /// worker writing its rows of the same output every call (memmap-out's
    /// `C`, written over each repetition) then maps and faults them in
    /// once, not every call (about 3 ms for 16 MB of /dev/shm pages).
    /// Returns the view and whether its pages still need faulting in.
    pub(crate) fn map_kept(
        within: Option<&Folders>,
        path: &Path,
        dtype: DType,
        shape: &[usize],
        offset: u64,
    ) -> Result<(Array, bool), ArrayError> {
        let lender = std::thread::current().id();
        let nbytes = dtype.nbytes(shape).unwrap_or(0);
        let view = (offset as usize, nbytes);
        let aligned = nbytes > 0 && offset.is_multiple_of(dtype.size() as u64);
        if let Some(kept) = aligned.then(|| kept_maps::take(path, view)).flatten() {
            if (offset as usize).checked_add(nbytes).is_some_and(|end| end <= kept.map.len()) {
                let mut faulted = kept.faulted;
                let fresh = faulted.first_time(view);
                let mapping = Mapping {
                    guard: kept.guard,
                    map: Some(kept.map),
                    path: kept.path,
                    access: Access::ReadWrite,
                    id: kept.id,
                    kept: Some(Lent { lender, faulted }),
                };
                let storage = Arc::new(Storage::Mapped(mapping));
                return Ok((Array { dtype, shape: shape.to_vec(), storage, offset: offset as usize }, fresh));
            }
            // Past the end of the file: kept for a view that fits, and
            // `map_file_ref` says what is wrong with this one.
            kept_maps::put(kept);
        }
        let mut array = map_file_ref_within(within, path, dtype, shape, offset, Access::ReadWrite)?;
        if let Some(Storage::Mapped(m)) = Arc::get_mut(&mut array.storage) {
            m.kept = Some(Lent { lender, faulted: FaultedViews::of(view) });
        }
        Ok((array, true))
    }

    /// Drops this thread's kept maps of files deleted or replaced since.
    pub(crate) fn forget_changed_kept_maps() {
        kept_maps::forget_changed();
    }

    /// Whether this thread keeps any read-write map for the next call.
    pub(crate) fn has_kept_maps() -> bool {
        kept_maps::any()
    }

    /// A view with the given dtype, shape and offset into the same storage as
    /// `self` (used to share one mapping among many file references).
    pub fn view_of_storage(&self, dtype: DType, shape: &[usize], offset: u64) -> Result<Array, ArrayError> {
        let nbytes = dtype.nbytes(shape).ok_or_else(|| ArrayError::too_large(dtype, shape))?;
        let total = self.storage.bytes().len();
        let end = (offset as usize).checked_add(nbytes);
        if end.is_none_or(|e| e > total) || !(offset as usize).is_multiple_of(dtype.size()) {
            return Err(ArrayError::Shape(format!("bytes {offset}..+{nbytes} out of range of {total}")));
        }
        Ok(Array { dtype, shape: shape.to_vec(), storage: Arc::clone(&self.storage), offset: offset as usize })
    }
}

// ---------------------------------------------------------------------------
// Encoding: arrays become references while a value is serialized.

/// Decides how each array inside a value travels.
pub trait ArrayEncoder {
    /// Returns the reference under which `array` travels. An
    /// [`ArrayRef::Inline`] means the array's bytes go into the bulk; the
    /// encoder must remember the array to send them.
    fn encode(&mut self, array: &Array) -> Result<ArrayRef, String>;
}

/// The default encoding: owned arrays inline, mapped arrays as file
/// references. It keeps the inline arrays, in order, to send as bulk.
#[derive(Default)]
pub struct InlineEncoder {
    /// The references, in encoding order.
    pub refs: Vec<ArrayRef>,
    /// The arrays whose bytes go inline, in order.
    pub inline: Vec<Array>,
}

/// The reference a mapped array travels as, or `None` for an owned one.
pub fn file_ref(array: &Array) -> Option<ArrayRef> {
    let (path, offset, access) = array.file_location()?;
    Some(ArrayRef::File {
        dtype: array.dtype(),
        shape: array.shape().iter().map(|&d| d as u64).collect(),
        path: path.to_path_buf(),
        offset,
        access,
    })
}

/// The inline reference for an array.
pub fn inline_ref(array: &Array) -> ArrayRef {
    ArrayRef::Inline { dtype: array.dtype(), shape: array.shape().iter().map(|&d| d as u64).collect() }
}

impl ArrayEncoder for InlineEncoder {
    fn encode(&mut self, array: &Array) -> Result<ArrayRef, String> {
        Ok(match file_ref(array) {
            Some(r) => r,
            None => {
                self.inline.push(array.clone());
                inline_ref(array)
            }
        })
    }
}

thread_local! {
    static ENCODER: Cell<Option<NonNull<Collect<'static>>>> = const { Cell::new(None) };
    static DECODER: Cell<Option<NonNull<[Option<Array>]>>> = const { Cell::new(None) };
}

/// Why a value could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct CodecError(pub String);

/// Restores a thread-local slot when dropped, also on unwinding.
struct Restore<T: 'static + Copy> {
    key: &'static std::thread::LocalKey<Cell<T>>,
    previous: T,
}

impl<T: Copy + 'static> Drop for Restore<T> {
    fn drop(&mut self) {
        let previous = self.previous;
        self.key.with(|c| c.set(previous));
    }
}

/// The encoder installed while a value is serialized, with the references
/// handed out so far (an array's index is its position here).
struct Collect<'a> {
    inner: &'a mut dyn ArrayEncoder,
    refs: Vec<ArrayRef>,
}

/// Serializes `value` with postcard; each [`Array`] inside it is handed to
/// `encoder` and replaced by the index of its reference. Returns the bytes
/// and the references.
///
/// The bytes are written into a buffer kept per thread
/// ([`with_scratch`](crate::payload::with_scratch)) and then copied into the
/// [`Payload`], which holds short encodings in place: a task with a small
/// input or output costs no allocation here.
pub fn encode_with<T: Serialize + ?Sized>(
    value: &T,
    encoder: &mut dyn ArrayEncoder,
) -> Result<(Payload, Vec<ArrayRef>), CodecError> {
    crate::payload::with_scratch(|buf| encode_with_buffer(value, encoder, buf))
}

/// [`encode_with`] using `buf` (cleared first) as its buffer: for a caller
/// encoding many values in a row, which keeps its own.
pub fn encode_with_buffer<T: Serialize + ?Sized>(
    value: &T,
    encoder: &mut dyn ArrayEncoder,
    buf: &mut Vec<u8>,
) -> Result<(Payload, Vec<ArrayRef>), CodecError> {
    let mut collect = Collect { inner: encoder, refs: Vec::new() };
    let ptr = NonNull::from(&mut collect).cast::<Collect<'static>>();
    let previous = ENCODER.with(|c| c.replace(Some(ptr)));
    let restore = Restore { key: &ENCODER, previous };
    buf.clear();
    let written = crate::payload::encode_into(value, buf);
    // The slot must be reset before `collect` is used or dropped again.
    drop(restore);
    written.map_err(|e| CodecError(e.to_string()))?;
    Ok((Payload::from_slice(buf), collect.refs))
}

/// Deserializes a postcard value whose arrays are indices into `arrays`.
/// Each array moves into the value (so a writable view stays the only
/// one); an index used twice is an error.
pub fn decode_with<T: DeserializeOwned>(bytes: &[u8], arrays: Vec<Array>) -> Result<T, CodecError> {
    let mut slots: Vec<Option<Array>> = arrays.into_iter().map(Some).collect();
    let ptr = NonNull::from(slots.as_mut_slice());
    let previous = DECODER.with(|c| c.replace(Some(ptr)));
    let restore = Restore { key: &DECODER, previous };
    let value = postcard::from_bytes(bytes).map_err(|e| CodecError(e.to_string()));
    // The slot must be reset before `slots` is dropped.
    drop(restore);
    value
}

impl Serialize for Array {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        // Take the slot for the duration of the call so that a re-entrant
        // serialize cannot create a second `&mut` to the same `Collect`.
        let Some(mut ptr) = ENCODER.with(|c| c.take()) else {
            return Err(serde::ser::Error::custom(
                "procjob::Array can only be serialized by procjob (it travels as raw bytes or a file reference)",
            ));
        };
        let _restore = Restore { key: &ENCODER, previous: Some(ptr) };
        // SAFETY: `encode_with` keeps the `Collect` alive, and does not touch
        // it, while the slot holds this pointer; the slot is empty while we
        // hold the `&mut`, so no other reference to it exists.
        let collect = unsafe { ptr.as_mut() };
        let r = collect.inner.encode(self).map_err(serde::ser::Error::custom)?;
        collect.refs.push(r);
        let index = u32::try_from(collect.refs.len() - 1)
            .map_err(|_| serde::ser::Error::custom("more than 2^32 arrays in one value"))?;
        serializer.serialize_u32(index)
    }
}

impl<'de> Deserialize<'de> for Array {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Array, D::Error> {
        let index = u32::deserialize(deserializer)? as usize;
        // Take the slot while we hold a `&mut` to the slice, so a
        // re-entrant deserialize cannot alias it.
        let Some(mut ptr) = DECODER.with(|c| c.take()) else {
            return Err(serde::de::Error::custom("procjob::Array can only be deserialized by procjob"));
        };
        let _restore = Restore { key: &DECODER, previous: Some(ptr) };
        // SAFETY: `decode_with` keeps the slice alive, and does not touch it,
        // while the slot holds this pointer; the slot is empty while we hold
        // the `&mut`, so no other reference to it exists.
        let arrays = unsafe { ptr.as_mut() };
        let len = arrays.len();
        let slot = arrays
            .get_mut(index)
            .ok_or_else(|| serde::de::Error::custom(format!("array index {index} out of range ({len} arrays)")))?;
        slot.take().ok_or_else(|| serde::de::Error::custom(format!("array index {index} used twice")))
    }
}

/// Where [`read_arrays`] puts one array of a frame.
pub enum Placement {
    /// An inline array: read its bytes into a new owned array.
    Own,
    /// A file or inherited reference, already resolved (mapped, or found in
    /// this process's memory) by the caller.
    Mapped(Result<Array, ArrayError>),
    /// An inline array: write its bytes straight into `file` at `offset`
    /// (a region of a shared output) and stand for them with `view`, a view
    /// of that region. Used when `view`'s dtype and shape match the
    /// array's; otherwise the array is owned as usual.
    Land(Landing),
}

/// A region of a file-backed array that an incoming array is written into
/// directly, with no intermediate buffer of its size.
#[derive(Debug, Clone)]
pub struct Landing {
    /// The file, open for writing.
    pub file: Arc<File>,
    /// Byte offset of the region in the file.
    pub offset: u64,
    /// A view of the region (a read-write mapping of the same file).
    pub view: Array,
}

/// Reads the arrays of a frame: for each reference, in order, `place`
/// (given its position and the reference) says where it goes. Checks the
/// bulk length against the declared arrays before allocating anything.
pub fn read_arrays<'a, R: BulkSource + ?Sized>(
    r: &mut R,
    refs: impl IntoIterator<Item = &'a ArrayRef> + Clone,
    bulk_len: u64,
    place: &mut dyn FnMut(usize, &ArrayRef) -> Placement,
) -> Result<Vec<Result<Array, ArrayError>>, DecodeError> {
    crate::protocol::check_bulk(refs.clone(), bulk_len)?;
    let mut out = Vec::new();
    for (position, r_) in refs.into_iter().enumerate() {
        match (r_, place(position, r_)) {
            (ArrayRef::Inline { dtype, shape }, Placement::Land(land))
                if land.view.dtype() == *dtype
                    && land.view.shape().iter().map(|&d| d as u64).eq(shape.iter().copied()) =>
            {
                r.copy_to_file(&land.file, land.offset, land.view.nbytes() as u64)?;
                out.push(Ok(land.view));
            }
            (ArrayRef::Inline { dtype, .. }, _) => {
                // The sizes were checked against the bulk above; this also
                // checks what a slice can address.
                let mut array = r_.checked_shape().and_then(|shape| Array::try_zeros(*dtype, shape)).map_err(|e| {
                    DecodeError::Io(std::io::Error::new(std::io::ErrorKind::OutOfMemory, e.to_string()))
                })?;
                let storage = Arc::get_mut(&mut array.storage).expect("a fresh array is unshared");
                let Storage::Owned(owned) = storage else { unreachable!("zeros() is owned") };
                crate::protocol::read_part(r, owned.bytes_mut(), "bulk")?;
                out.push(Ok(array));
            }
            (ArrayRef::File { .. } | ArrayRef::Inherited { .. }, Placement::Mapped(result)) => out.push(result),
            (ArrayRef::File { path, .. }, _) => out
                .push(Err(ArrayError::Map { path: path.clone(), reason: "file references are not read here".into() })),
            (ArrayRef::Inherited { .. }, _) => {
                out.push(Err(ArrayError::Shape("inherited arrays are not resolved here".into())))
            }
        }
    }
    Ok(out)
}

/// A stream [`read_arrays`] reads frames from, which can also move an
/// array's bytes straight into a region of a file.
pub trait BulkSource: Read {
    /// Moves the next `len` bytes of the stream into `file` at `offset`.
    fn copy_to_file(&mut self, file: &File, offset: u64, len: u64) -> Result<(), DecodeError>;
}

/// A buffered pipe (what the coordinator reads each worker's replies from,
/// and a worker its requests from): the bytes already buffered are written
/// with `pwrite`, the rest moved with `splice(2)` from the pipe into the
/// file's pages — one copy, in the kernel, instead of two through a user
/// buffer. When the descriptor cannot be spliced from (not a pipe, or an
/// old kernel), the rest goes through a buffer as before.
impl<R: Read + std::os::fd::AsFd> BulkSource for std::io::BufReader<R> {
    fn copy_to_file(&mut self, file: &File, offset: u64, len: u64) -> Result<(), DecodeError> {
        use std::io::BufRead;
        use std::os::unix::fs::FileExt;
        let buffered = self.buffer();
        let take = buffered.len().min(usize::try_from(len).unwrap_or(usize::MAX));
        file.write_all_at(&buffered[..take], offset)?;
        self.consume(take);
        let (offset, left) = (offset + take as u64, len - take as u64);
        #[cfg(target_os = "linux")]
        let (offset, left) = splice_to_file(self.get_ref(), file, offset, left, len)?;
        copy_through_buffer(self, file, offset, left)
    }
}

/// Moves up to `left` bytes from the pipe `from` into `file` at `offset`
/// with `splice(2)`; returns where it stopped and what is left, which is
/// nothing unless `from` cannot be spliced from (then the caller copies the
/// rest). `len` is the whole array's length, for the error message.
#[cfg(target_os = "linux")]
fn splice_to_file(
    from: &impl std::os::fd::AsFd,
    file: &File,
    mut offset: u64,
    mut left: u64,
    len: u64,
) -> Result<(u64, u64), DecodeError> {
    use nix::errno::Errno;
    use nix::fcntl::{splice, SpliceFFlags};
    use std::os::fd::AsFd;
    while left > 0 {
        let mut off = offset as libc::loff_t;
        let chunk = usize::try_from(left).unwrap_or(usize::MAX).min(1 << 30);
        match splice(from.as_fd(), None, file.as_fd(), Some(&mut off), chunk, SpliceFFlags::SPLICE_F_MOVE) {
            Ok(0) => return Err(DecodeError::Truncated { part: "bulk", needed: len, got: len - left }),
            Ok(n) => {
                offset += n as u64;
                left -= n as u64;
            }
            Err(Errno::EINTR) => {}
            Err(Errno::EINVAL | Errno::ENOSYS) => break, // not spliceable: the caller copies
            Err(e) => return Err(DecodeError::Io(e.into())),
        }
    }
    Ok((offset, left))
}

/// Bytes in memory (tests, fuzzing): through the buffer.
impl BulkSource for &[u8] {
    fn copy_to_file(&mut self, file: &File, offset: u64, len: u64) -> Result<(), DecodeError> {
        copy_through_buffer(self, file, offset, len)
    }
}

/// Copies `len` bytes from the stream into `file` at `offset`, through a
/// small buffer: memory stays bounded however large the array.
fn copy_through_buffer<R: Read + ?Sized>(
    r: &mut R,
    file: &File,
    mut offset: u64,
    mut len: u64,
) -> Result<(), DecodeError> {
    use std::os::unix::fs::FileExt;
    if len == 0 {
        return Ok(());
    }
    let mut buf = vec![0u8; len.min(1 << 20) as usize];
    while len > 0 {
        let n = len.min(buf.len() as u64) as usize;
        crate::protocol::read_part(r, &mut buf[..n], "bulk")?;
        file.write_all_at(&buf[..n], offset)?;
        offset += n as u64;
        len -= n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A read-write map lent to a task comes back when its last view goes,
    /// and serves the next view of the same unchanged file without being
    /// mapped or faulted in again; a replaced or deleted file's map is not
    /// reused, and `forget_changed_kept_maps` unmaps it.
    #[test]
    fn kept_maps_serve_the_same_file_until_it_changes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.npy");
        Array::zeros(DType::F64, vec![4, 1024]).save_npy(&path).unwrap();
        let data = Array::open_npy(&path, Access::ReadOnly).unwrap().file_location().unwrap().1;
        let offset = |row: u64| data + row * 1024 * 8;
        let kept_here = || kept_maps::KEPT.with_borrow(|all| all.iter().filter(|k| k.path == path).count());
        let (mut first, fresh) = Array::map_kept(None, &path, DType::F64, &[2, 1024], offset(0)).unwrap();
        assert!(fresh);
        first.as_mut_slice::<f64>().unwrap().fill(5.0);
        let at = first.as_bytes().as_ptr();
        assert_eq!(kept_here(), 0, "kept while a view lives");
        drop(first);
        assert_eq!(kept_here(), 1, "not kept after the last view went");
        let (again, fresh) = Array::map_kept(None, &path, DType::F64, &[2, 1024], offset(0)).unwrap();
        assert!(!fresh, "the same view was faulted in again");
        assert_eq!(again.as_bytes().as_ptr(), at, "mapped again");
        assert!(again.as_slice::<f64>().unwrap().iter().all(|&x| x == 5.0));
        drop(again);
        let (other_rows, fresh) = Array::map_kept(None, &path, DType::F64, &[2, 1024], offset(2)).unwrap();
        assert!(fresh, "other rows of the kept map still need faulting in");
        drop(other_rows);
        // A view dropped on another thread is unmapped there, not kept.
        let (elsewhere, _) = Array::map_kept(None, &path, DType::F64, &[2, 1024], offset(0)).unwrap();
        assert_eq!(kept_here(), 0);
        std::thread::spawn(move || drop(elsewhere)).join().unwrap();
        assert_eq!(kept_here(), 0, "a map dropped on another thread came back");
        drop(Array::map_kept(None, &path, DType::F64, &[2, 1024], offset(2)).unwrap());
        let saved = Array::open_npy(&path, Access::ReadOnly).unwrap();
        assert!(saved.as_slice::<f64>().unwrap()[..2048].iter().all(|&x| x == 5.0), "writes reach the file");
        // Replaced: a new file at the same path is mapped afresh.
        std::fs::remove_file(&path).unwrap();
        Array::from_vec(vec![4, 1024], vec![1.0f64; 4096]).save_npy(&path).unwrap();
        let (replaced, fresh) = Array::map_kept(None, &path, DType::F64, &[2, 1024], offset(0)).unwrap();
        assert!(fresh && replaced.as_slice::<f64>().unwrap().iter().all(|&x| x == 1.0));
        drop(replaced);
        // Deleted: forgotten at the next call's start.
        std::fs::remove_file(&path).unwrap();
        assert_eq!(kept_here(), 1);
        Array::forget_changed_kept_maps();
        assert_eq!(kept_here(), 0, "a deleted file's map is kept");
    }

    /// Pages put back serve the next `for_overwrite` of the same byte size
    /// on this thread, whatever its dtype and shape, once; other sizes,
    /// shared arrays and arrays too small for pages of their own start from
    /// zeros. (Taken pages hold their old elements, or in debug builds the
    /// `0xFF` marker: either way not zeros.)
    #[test]
    fn for_overwrite_takes_pages_put_back_by_byte_size() {
        let len = HUGE_PAGE_THRESHOLD / 8 + 2000;
        let filled = |len: usize| {
            let mut a = Array::zeros(DType::F64, vec![len]);
            a.as_mut_slice::<f64>().unwrap().fill(3.0);
            a
        };
        let zeros = |a: &Array| a.as_bytes().iter().all(|&b| b == 0);
        filled(len).put_back_pages();
        assert!(zeros(&Array::try_for_overwrite(DType::F64, vec![len + 1]).unwrap()), "another size");
        let reused = Array::try_for_overwrite(DType::I64, vec![len]).unwrap();
        assert_eq!((reused.dtype(), reused.shape()), (DType::I64, &[len][..]));
        assert!(!zeros(&reused), "the pages put back were not taken");
        if !cfg!(debug_assertions) {
            assert_eq!(reused.as_bytes(), filled(len).as_bytes(), "the pages put back, as they were");
        }
        drop(reused);
        assert!(zeros(&Array::try_for_overwrite(DType::F64, vec![len]).unwrap()), "taken only once");
        let shared = filled(len);
        let _other_view = shared.clone();
        shared.put_back_pages();
        assert!(zeros(&Array::try_for_overwrite(DType::F64, vec![len]).unwrap()), "a shared array's pages");
        Array::from_vec(vec![3], vec![1.0f64; 3]).put_back_pages();
        assert!(zeros(&Array::try_for_overwrite(DType::F64, vec![3]).unwrap()), "a small array");
        Array::drop_spare_pages();
    }

    /// `BulkSource` on a buffered pipe: the bytes already buffered and the
    /// ones still in the pipe (spliced) land in order at the offset, and the
    /// stream goes on after them; from a regular file (which cannot be
    /// spliced from) the same through the buffer.
    #[test]
    fn bulk_lands_in_a_file_from_a_pipe_and_from_a_file() {
        use std::io::{BufReader, Write};
        use std::os::unix::fs::FileExt;
        let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let check = |mut r: BufReader<File>| {
            let mut head = [0u8; 3];
            r.read_exact(&mut head).unwrap(); // fills the buffer past the head
            assert_eq!(head, data[..3]);
            let out = tempfile::tempfile().unwrap();
            let len = 250_000u64;
            r.copy_to_file(&out, 100, len).unwrap();
            let mut landed = vec![0u8; len as usize];
            out.read_exact_at(&mut landed, 100).unwrap();
            assert!(landed == data[3..3 + len as usize], "the landed bytes differ");
            let mut rest = Vec::new();
            r.read_to_end(&mut rest).unwrap();
            assert!(rest == data[3 + len as usize..], "the stream did not resume after the array");
        };
        let (rx, tx) = nix::unistd::pipe().unwrap();
        let writer = {
            let data = data.clone();
            std::thread::spawn(move || File::from(tx).write_all(&data).unwrap())
        };
        check(BufReader::with_capacity(4096, File::from(rx)));
        writer.join().unwrap();
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(&data).unwrap();
        std::io::Seek::rewind(&mut file).unwrap();
        check(BufReader::with_capacity(4096, file));
    }

    /// The anonymous bytes of the mapping that holds `addr`, which is what
    /// a copy-on-write map's copied pages are (`/proc/self/smaps`; this
    /// mapping's own entry, so other threads' allocations do not count).
    #[cfg(target_os = "linux")]
    fn anonymous_in_mapping_of(addr: usize) -> u64 {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut inside = false;
        for line in smaps.lines() {
            // A mapping's first line starts with its range, `lo-hi` in hex.
            if let Some((lo, hi)) = line.split_whitespace().next().and_then(|r| r.split_once('-')) {
                if let (Ok(lo), Ok(hi)) = (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16)) {
                    inside = (lo..hi).contains(&addr);
                    continue;
                }
            }
            if inside && line.starts_with("Anonymous:") {
                return line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024;
            }
        }
        panic!("no mapping holds {addr:#x}")
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

    /// Shapes whose size overflows (or exceeds `isize::MAX`) are refused
    /// with the typed error naming dtype and shape, before anything is
    /// allocated; a 0 dimension makes any shape 0 bytes, in any order.
    #[test]
    fn overflowing_shapes_are_refused_with_a_typed_error() {
        let too_large = |r: Result<Array, ArrayError>, dtype: DType, shape: &[u64]| match r {
            Err(ArrayError::TooLarge { dtype: d, shape: s }) => {
                assert_eq!((d, s.as_slice()), (dtype, shape));
            }
            other => panic!("expected TooLarge for {dtype} {shape:?}, got {other:?}"),
        };
        let wraps = [(1usize << 32) + 1, 1 << 32]; // 2^64 + 2^32 elements: wraps to 2^32
        too_large(Array::try_zeros(DType::F64, wraps.to_vec()), DType::F64, &[(1 << 32) + 1, 1 << 32]);
        too_large(Array::try_zeros(DType::I64, vec![usize::MAX, 2]), DType::I64, &[u64::MAX, 2]);
        // Fits in usize, but not in what a slice may span.
        too_large(Array::try_zeros(DType::F32, vec![1 << 62]), DType::F32, &[1 << 62]);
        too_large(Array::try_from_vec(vec![1usize << 63, 2], Vec::<f64>::new()), DType::F64, &[1 << 63, 2]);
        let err = Array::try_zeros(DType::F64, wraps.to_vec()).unwrap_err().to_string();
        assert!(err.contains("f64") && err.contains("4294967297"), "{err}");
        assert!(matches!(Array::try_from_vec(vec![2, 2], vec![1i64; 3]), Err(ArrayError::Shape(_))));
        assert_eq!(Array::try_zeros(DType::F64, vec![usize::MAX, 2, 0]).unwrap().len(), 0);
        assert_eq!(Array::try_zeros(DType::F64, vec![0, usize::MAX, 2]).unwrap().nbytes(), 0);
        let panicked = std::panic::catch_unwind(|| Array::zeros(DType::F64, wraps.to_vec())).unwrap_err();
        let message = panicked.downcast_ref::<String>().unwrap();
        assert!(message.contains("more bytes than this process can address"), "{message}");
        let empty = Array::try_zeros(DType::F64, vec![usize::MAX, 0]).unwrap();
        assert!(matches!(Array::vstack(&[empty.clone(), empty]), Err(ArrayError::TooLarge { .. })));
        let a = Array::from_vec(vec![2], vec![1.0f64; 2]);
        assert!(a.reshape(vec![(1usize << 63) + 1, 2]).is_err(), "a reshape whose product wraps to 2");
    }

    /// Memory the system refuses is an error, not an abort.
    #[test]
    fn an_allocation_the_system_refuses_is_an_error() {
        // 16 TiB of pages: more than a machine's memory and swap, which
        // the kernel's overcommit heuristic refuses (with overcommit
        // "always" it would be granted, and the test proves nothing).
        let overcommit = std::fs::read_to_string("/proc/sys/vm/overcommit_memory").unwrap_or_default();
        if overcommit.trim() == "1" {
            eprintln!("skipping: vm.overcommit_memory is 1, every allocation is granted");
            return;
        }
        match Array::try_zeros(DType::F64, vec![1 << 41]) {
            Err(ArrayError::OutOfMemory { dtype: DType::F64, shape, bytes }) => {
                assert_eq!((shape, bytes), (vec![1 << 41], 1 << 44));
            }
            other => panic!("16 TiB was granted: {other:?}"),
        }
    }

    #[test]
    fn split_and_stack_round_trip() {
        let a = Array::from_vec(vec![7, 2], (0..14i64).collect::<Vec<_>>());
        let parts = a.array_split(3).unwrap();
        let shapes: Vec<_> = parts.iter().map(|p| p.shape().to_vec()).collect();
        assert_eq!(shapes, vec![vec![3, 2], vec![2, 2], vec![2, 2]]);
        assert_eq!(parts[1].as_slice::<i64>().unwrap(), &[6, 7, 8, 9]);
        assert_eq!(Array::vstack(&parts).unwrap(), a);
        let bad = Array::from_vec(vec![1, 3], vec![0i64; 3]);
        assert!(Array::vstack(&[a.clone(), bad]).is_err());
        assert!(a.array_split(0).is_err());
    }

    #[test]
    fn views_share_storage_and_writes_need_exclusive_access() {
        let a = Array::from_vec(vec![4, 2], vec![1.0f64; 8]);
        let mut v = a.rows(1..3).unwrap();
        assert_eq!(v.storage_id(), a.storage_id());
        assert!(matches!(v.as_mut_slice::<f64>(), Err(ArrayError::NotWritable(_))));
        drop(a);
        v.as_mut_slice::<f64>().unwrap().fill(2.0);
        assert_eq!(v.as_slice::<f64>().unwrap(), &[2.0; 4]);
        assert!(matches!(v.as_slice::<i64>(), Err(ArrayError::DType { .. })));
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

    #[test]
    fn serializing_outside_procjob_is_an_error_not_a_copy() {
        let a = Array::from_vec(vec![2], vec![1.0f32, 2.0]);
        assert!(postcard::to_stdvec(&a).is_err());
    }

    #[test]
    fn values_round_trip_with_arrays_as_references() {
        let a = Array::from_vec(vec![2, 2], vec![1i64, 2, 3, 4]);
        let value = (7u32, a.clone(), vec![a.rows(1..2).unwrap()]);
        let mut enc = InlineEncoder::default();
        let (bytes, refs) = encode_with(&value, &mut enc).unwrap();
        assert_eq!(refs.len(), 2);
        assert!(bytes.len() < 16, "arrays must not be in the payload: {} bytes", bytes.len());
        let back: (u32, Array, Vec<Array>) = decode_with(&bytes, enc.inline.clone()).unwrap();
        assert_eq!(back.0, 7);
        assert_eq!(back.1, a);
        assert_eq!(back.2[0].as_slice::<i64>().unwrap(), &[3, 4]);
    }
}
