//! How the arrays of a call's inputs travel: by reference when already
//! mapped (or inherited by forked workers), dumped once to the run folder
//! when larger than `max_nbytes` — and that dump reused by the next calls
//! of the same [`Parallel`] while the caller still holds the array
//! ([`DumpCache`]) — inline otherwise; and which folders the workers must
//! be allowed to map from.

use std::collections::HashMap;
use std::path::PathBuf;

use procjob_worker::array::{self, Array, ArrayEncoder};
use procjob_worker::protocol::{Access, ArrayRef, Payload};
use procjob_worker::DType;

use super::builder::Parallel;
use crate::pool::WorkerPool;
use crate::run_folder::RunFolder;

/// The dumps a [`Parallel`] keeps between calls: an owned array dumped for
/// one call is not written again for the next while the caller holds it.
///
/// How it is known to be unchanged: an owned [`Array`]'s bytes can only be
/// written through `as_mut_slice`/`as_bytes_mut`, which require the array
/// to be the only user of its storage (`Arc::get_mut`). The cache keeps a
/// clone of every array it dumped, so from the first dump on no handle can
/// write the storage: the bytes in the file are the array's for as long as
/// the entry lives. Entries are keyed by storage identity (the `Arc`'s
/// address, which cannot be reused while the clone keeps it alive).
///
/// At the end of each call, entries whose array nobody else holds any more
/// are dropped and their files removed (the run folder too, once empty);
/// [`Parallel::forget_dumps`] drops all of them (so the caller may write the
/// arrays again), and so does dropping the `Parallel`.
#[derive(Default)]
pub(super) struct DumpCache {
    /// The parent the run folder was made under (`None`: the default).
    parent: Option<PathBuf>,
    /// The run folder, made at the first dump.
    folder: Option<RunFolder>,
    /// The run folder's canonical path, once made.
    folder_path: Option<PathBuf>,
    /// Storage id → (dump file, data offset, the array kept alive and
    /// unwritable).
    dumped: HashMap<usize, (PathBuf, u64, Array)>,
    /// The number in the next dump file's name.
    next_file: u64,
}

impl DumpCache {
    /// Removes the dumps of arrays nobody else holds any more, and the run
    /// folder once it holds none.
    fn prune(&mut self) {
        self.dumped.retain(|_, (path, _, array)| {
            let keep = !array.is_unshared();
            if !keep {
                let _ = std::fs::remove_file(path);
            }
            keep
        });
        if self.dumped.is_empty() {
            self.folder = None;
            self.folder_path = None;
        }
    }
}

impl Parallel {
    /// Forgets the arrays dumped by earlier calls, and removes their files.
    /// A dump is otherwise kept while the caller holds its array, so the
    /// next call does not write it again; meanwhile the array cannot be
    /// written through (`as_mut_slice` refuses: it is shared with the
    /// dump). Call this to write such an array again.
    pub fn forget_dumps(&mut self) {
        self.dumps = DumpCache::default();
    }
}

/// An encoded input longer than this travels in a file of the run folder
/// (joblib's `max_nbytes` default: what is large enough to map), so that no
/// input is too large for a frame, and a batch of large inputs stays far
/// below the frame limit.
pub(super) const SPILL_BYTES: usize = 1 << 20;

/// Decides how each array of a call travels: mapped arrays by reference,
/// owned arrays above `max_nbytes` dumped once and then by reference, the
/// rest inline.
pub(super) struct CallEncoder {
    /// Owned arrays above this many bytes are dumped (`None`: never).
    max_nbytes: Option<usize>,
    /// How workers map dumped arrays.
    mmap_mode: Access,
    /// Where the run folder is made, when not the default.
    temp_parent: Option<PathBuf>,
    /// The dumps, this call's and those kept from earlier calls.
    cache: DumpCache,
    /// Arrays dumped by this call.
    dumped_arrays: u64,
    /// Bytes written to dump files by this call.
    dumped_bytes: u64,
    /// The arrays of the input being encoded that travel inline, in order.
    inline: Vec<Array>,
    /// Storage ids of the arrays forked workers inherited, by index.
    inherited: Vec<usize>,
    /// The files of inputs too large for a frame, removed at the call's end.
    spilled: Vec<PathBuf>,
    /// The folders of the files this call refers to (canonical), each
    /// once, in order; the first `folders_allowed` were handed to the pool.
    folders: Vec<PathBuf>,
    folders_allowed: usize,
}

impl CallEncoder {
    /// An encoder for one call, reusing the dumps in `cache` (kept from
    /// earlier calls) unless they were made under another parent folder.
    pub(super) fn new(
        max_nbytes: Option<usize>,
        mmap_mode: Access,
        temp_parent: Option<PathBuf>,
        mut cache: DumpCache,
    ) -> CallEncoder {
        if cache.parent != temp_parent {
            cache = DumpCache { parent: temp_parent.clone(), ..DumpCache::default() };
        }
        CallEncoder {
            max_nbytes,
            mmap_mode,
            temp_parent,
            cache,
            dumped_arrays: 0,
            dumped_bytes: 0,
            inline: Vec::new(),
            inherited: Vec::new(),
            spilled: Vec::new(),
            folders: Vec::new(),
            folders_allowed: 0,
        }
    }

    /// Arrays the forked workers inherited travel as their index in
    /// `inherit`.
    pub(super) fn inherit(&mut self, inherit: &[Array]) {
        self.inherited = inherit.iter().map(Array::storage_id).collect();
    }

    /// The arrays of the input just encoded that travel inline, in order.
    pub(super) fn take_inline(&mut self) -> Vec<Array> {
        std::mem::take(&mut self.inline)
    }

    /// Arrays dumped by this call, and their bytes (a dump reused from an
    /// earlier call counts in neither).
    pub(super) fn dumped(&self) -> (u64, u64) {
        (self.dumped_arrays, self.dumped_bytes)
    }

    /// Ends the call's use of its dumps, and hands them back to be kept for
    /// the next calls: those of arrays nobody holds any more are removed.
    pub(super) fn close(&mut self) -> DumpCache {
        for path in self.spilled.drain(..) {
            let _ = std::fs::remove_file(path);
        }
        let mut cache = std::mem::take(&mut self.cache);
        cache.prune();
        cache
    }

    /// Notes the folder of a file reference, which workers must be allowed
    /// to map from (see [`procjob_worker::confine`]). The path is canonical:
    /// `Array::open_npy`/`create_npy` and the run folder make it so. Under
    /// MPI, the nodes that do not see it are readied to receive its bytes.
    fn note_folder(&mut self, r: &ArrayRef) -> Result<(), String> {
        let ArrayRef::File { path, access, .. } = r else { return Ok(()) };
        crate::pool::cluster::prepare(path, *access == Access::ReadWrite)?;
        let Some(folder) = path.parent() else { return Ok(()) };
        if !self.folders.iter().any(|f| f == folder) {
            self.folders.push(folder.to_path_buf());
        }
        Ok(())
    }

    /// Hands the folders noted since the last time to the pool, which tells
    /// each worker once.
    pub(super) fn allow_folders(&mut self, pool: &mut WorkerPool) {
        for folder in &self.folders[self.folders_allowed..] {
            pool.allow_folder(folder.clone());
        }
        self.folders_allowed = self.folders.len();
    }

    /// An encoded input as it travels: as is, or, when longer than
    /// [`SPILL_BYTES`], written to a file in the run folder that the worker
    /// maps (see [`spill_ref`]), so that an input of any size fits a frame.
    pub(super) fn place_input(
        &mut self,
        input: Payload,
        mut refs: Vec<ArrayRef>,
    ) -> Result<(Payload, Vec<ArrayRef>), String> {
        if input.len() <= SPILL_BYTES {
            return Ok((input, refs));
        }
        let words = (8 + input.len()).div_ceil(8);
        let mut bytes = Vec::new();
        bytes.try_reserve_exact(words * 8).map_err(|_| format!("cannot allocate {} bytes to spill it", words * 8))?;
        bytes.extend_from_slice(&(input.len() as u64).to_le_bytes());
        bytes.extend_from_slice(&input);
        bytes.resize(words * 8, 0);
        let folder = self.folder(bytes.len() as u64)?;
        let path = folder.join(format!("input-{}.npy", self.spilled.len()));
        let header = procjob_worker::npy::write(&path, DType::I64, &[words], &bytes).map_err(|e| e.to_string())?;
        self.spilled.push(path.clone());
        let r = ArrayRef::File {
            dtype: DType::I64,
            shape: vec![words as u64],
            path,
            offset: header.data_offset as u64,
            access: Access::ReadOnly,
        };
        self.note_folder(&r)?;
        refs.push(r);
        Ok((Payload::default(), refs))
    }

    /// The run folder's canonical path, made with room for `needed` bytes
    /// if need be.
    fn folder(&mut self, needed: u64) -> Result<PathBuf, String> {
        if self.cache.folder.is_none() {
            let folder = RunFolder::create(self.temp_parent.as_deref(), needed).map_err(|e| e.to_string())?;
            // Workers follow no symbolic link below the folders they are
            // given, and compare paths with them: name it canonically.
            let canonical = std::fs::canonicalize(folder.path())
                .map_err(|e| format!("cannot resolve the run folder {}: {e}", folder.path().display()))?;
            self.cache.folder = Some(folder);
            self.cache.folder_path = Some(canonical);
        }
        Ok(self.cache.folder_path.clone().expect("just made"))
    }

    /// Dumps the whole storage of `a` (once per call) and returns the file
    /// and the byte offset of its data.
    fn dump(&mut self, a: &Array) -> Result<(PathBuf, u64), String> {
        if let Some((path, data_offset, _)) = self.cache.dumped.get(&a.storage_id()) {
            return Ok((path.clone(), *data_offset));
        }
        let (bytes, _) = a.storage_bytes();
        let folder = self.folder(bytes.len() as u64)?;
        let path = folder.join(format!("arg-{}.npy", self.cache.next_file));
        self.cache.next_file += 1;
        let elements = bytes.len() / a.dtype().size();
        let header = procjob_worker::npy::write(&path, a.dtype(), &[elements], bytes).map_err(|e| e.to_string())?;
        self.dumped_arrays += 1;
        self.dumped_bytes += bytes.len() as u64;
        let data_offset = header.data_offset as u64;
        self.cache.dumped.insert(a.storage_id(), (path.clone(), data_offset, a.clone()));
        Ok((path, data_offset))
    }
}

impl ArrayEncoder for CallEncoder {
    fn encode(&mut self, a: &Array) -> Result<ArrayRef, String> {
        if let Some(index) = self.inherited.iter().position(|&id| id == a.storage_id()) {
            return Ok(ArrayRef::Inherited {
                dtype: a.dtype(),
                shape: a.shape().iter().map(|&d| d as u64).collect(),
                index: index as u32,
                offset: a.storage_bytes().1 as u64,
            });
        }
        if let Some(r) = array::file_ref(a) {
            self.note_folder(&r)?;
            return Ok(r);
        }
        if self.max_nbytes.is_some_and(|max| a.nbytes() > max) {
            let (path, data_offset) = self.dump(a)?;
            let (_, view_offset) = a.storage_bytes();
            let r = ArrayRef::File {
                dtype: a.dtype(),
                shape: a.shape().iter().map(|&d| d as u64).collect(),
                path,
                offset: data_offset + view_offset as u64,
                access: self.mmap_mode,
            };
            self.note_folder(&r)?;
            return Ok(r);
        }
        self.inline.push(a.clone());
        Ok(array::inline_ref(a))
    }
}
