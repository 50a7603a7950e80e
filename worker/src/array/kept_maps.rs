//! Map reuse for outputs: the read-write maps [`Array::map_kept`] lends
//! tasks, kept between calls, a few per thread (the serve loop runs a
//! batch's tasks on its own thread).

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::mapping::{map_file_ref_within, Lent, Mapping};
use super::storage::Storage;
use super::{Array, ArrayError, FaultedViews, FileId};
use crate::confine::Folders;
use crate::dtype::DType;
use crate::protocol::Access;

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
        let at = all.iter().position(|k| mine(k) && k.faulted.contains(&view)).or_else(|| all.iter().position(mine))?;
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
        let aligned = nbytes > 0 && offset.is_multiple_of(dtype.align() as u64);
        if let Some(kept) = aligned.then(|| super::kept_maps::take(path, view)).flatten() {
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
            super::kept_maps::put(kept);
        }
        let mut array = map_file_ref_within(within, path, dtype, shape, offset, Access::ReadWrite)?;
        if let Some(Storage::Mapped(m)) = Arc::get_mut(&mut array.storage) {
            m.kept = Some(Lent { lender, faulted: FaultedViews::of(view) });
        }
        Ok((array, true))
    }

    /// Drops this thread's kept maps of files deleted or replaced since.
    pub(crate) fn forget_changed_kept_maps() {
        super::kept_maps::forget_changed();
    }

    /// Whether this thread keeps any read-write map for the next call.
    pub(crate) fn has_kept_maps() -> bool {
        super::kept_maps::any()
    }
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
        let kept_here = || KEPT.with_borrow(|all| all.iter().filter(|k| k.path == path).count());
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
}
