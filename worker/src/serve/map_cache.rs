//! The mappings a worker keeps between tasks, batches and calls, so that a
//! file is mapped and faulted in once, not once per task — and checked
//! again before a cached map serves a new batch.

use std::collections::HashMap;
use std::path::PathBuf;

use crate::array::{self, Array, ArrayError, FileId};
use crate::protocol::{Access, ArrayRef};

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
pub(super) struct MapCache {
    pub(super) call: u64,
    /// Counts batches, for the once-per-batch check of cached files.
    batch: u64,
    pub(super) read_only: HashMap<PathBuf, Cached>,
    /// The folders the coordinator named: nothing outside them is mapped.
    pub(super) folders: crate::confine::Folders,
}

/// One file's entry in [`MapCache`].
pub(super) struct Cached {
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
    pub(super) fn holds_any(&self) -> bool {
        !self.read_only.is_empty() || Array::has_kept_maps()
    }

    /// Drops the maps, here and kept read-write ones, whose path no longer
    /// names the file they map.
    pub(super) fn forget_changed(&mut self) {
        self.read_only.retain(|path, cached| cached.names_its_file(path));
        Array::forget_changed_kept_maps();
    }

    /// Starts a batch: every cached file is checked again before its map
    /// serves this batch.
    pub(super) fn start_batch(&mut self) {
        self.batch += 1;
    }

    /// Drops the mappings a SIGBUS was absorbed in.
    pub(super) fn forget_poisoned(&mut self) {
        self.read_only.retain(|_, cached| !cached.map.is_poisoned());
    }

    /// Starts call `call`: keeps the mappings the last call used whose
    /// files are unchanged.
    pub(super) fn start_call(&mut self, call: u64) {
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
    pub(super) fn map(&mut self, r: &ArrayRef) -> Result<Array, ArrayError> {
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

#[cfg(test)]
mod tests {
    use super::*;

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
