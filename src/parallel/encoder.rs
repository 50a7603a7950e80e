//! How the arrays of a call's inputs travel: by reference when already
//! mapped (or inherited by forked workers), dumped once to the call's run
//! folder when larger than `max_nbytes`, inline otherwise; and which
//! folders the workers must be allowed to map from.

use std::collections::HashMap;
use std::path::PathBuf;

use procjob_worker::array::{self, Array, ArrayEncoder};
use procjob_worker::protocol::{Access, ArrayRef};

use crate::pool::WorkerPool;
use crate::run_folder::RunFolder;

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
    /// The call's run folder, made at the first dump.
    folder: Option<RunFolder>,
    /// Storage id → (dump file, data offset, the array kept alive so its
    /// id is not reused during the call).
    dumped: HashMap<usize, (PathBuf, u64, Array)>,
    /// Bytes written to dump files.
    dumped_bytes: u64,
    /// The arrays of the input being encoded that travel inline, in order.
    inline: Vec<Array>,
    /// Storage ids of the arrays forked workers inherited, by index.
    inherited: Vec<usize>,
    /// The run folder's canonical path, once made.
    folder_path: Option<PathBuf>,
    /// The folders of the files this call refers to (canonical), each
    /// once, in order; the first `folders_allowed` were handed to the pool.
    folders: Vec<PathBuf>,
    folders_allowed: usize,
}

impl CallEncoder {
    /// An encoder for one call, with no run folder yet.
    pub(super) fn new(max_nbytes: Option<usize>, mmap_mode: Access, temp_parent: Option<PathBuf>) -> CallEncoder {
        CallEncoder {
            max_nbytes,
            mmap_mode,
            temp_parent,
            folder: None,
            dumped: HashMap::new(),
            dumped_bytes: 0,
            inline: Vec::new(),
            inherited: Vec::new(),
            folder_path: None,
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

    /// Arrays dumped so far, and their bytes.
    pub(super) fn dumped(&self) -> (u64, u64) {
        (self.dumped.len() as u64, self.dumped_bytes)
    }

    /// Ends the call's use of its dump files: they are removed with the
    /// run folder.
    pub(super) fn close(&mut self) {
        self.dumped.clear();
        self.folder = None;
    }

    /// Notes the folder of a file reference, which workers must be allowed
    /// to map from (see [`procjob_worker::confine`]). The path is canonical:
    /// `Array::open_npy`/`create_npy` and the run folder make it so.
    fn note_folder(&mut self, r: &ArrayRef) {
        let ArrayRef::File { path, .. } = r else { return };
        let Some(folder) = path.parent() else { return };
        if !self.folders.iter().any(|f| f == folder) {
            self.folders.push(folder.to_path_buf());
        }
    }

    /// Hands the folders noted since the last time to the pool, which tells
    /// each worker once.
    pub(super) fn allow_folders(&mut self, pool: &mut WorkerPool) {
        for folder in &self.folders[self.folders_allowed..] {
            pool.allow_folder(folder.clone());
        }
        self.folders_allowed = self.folders.len();
    }

    /// Dumps the whole storage of `a` (once per call) and returns the file
    /// and the byte offset of its data.
    fn dump(&mut self, a: &Array) -> Result<(PathBuf, u64), String> {
        if let Some((path, data_offset, _)) = self.dumped.get(&a.storage_id()) {
            return Ok((path.clone(), *data_offset));
        }
        let (bytes, _) = a.storage_bytes();
        if self.folder.is_none() {
            let folder =
                RunFolder::create(self.temp_parent.as_deref(), bytes.len() as u64).map_err(|e| e.to_string())?;
            // Workers follow no symbolic link below the folders they are
            // given, and compare paths with them: name it canonically.
            let canonical = std::fs::canonicalize(folder.path())
                .map_err(|e| format!("cannot resolve the run folder {}: {e}", folder.path().display()))?;
            self.folder = Some(folder);
            self.folder_path = Some(canonical);
        }
        let folder = self.folder_path.as_ref().expect("just made");
        let path = folder.join(format!("arg-{}.npy", self.dumped.len()));
        let elements = bytes.len() / a.dtype().size();
        let header = procjob_worker::npy::write(&path, a.dtype(), &[elements], bytes).map_err(|e| e.to_string())?;
        self.dumped_bytes += bytes.len() as u64;
        let data_offset = header.data_offset as u64;
        self.dumped.insert(a.storage_id(), (path.clone(), data_offset, a.clone()));
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
            self.note_folder(&r);
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
            self.note_folder(&r);
            return Ok(r);
        }
        self.inline.push(a.clone());
        Ok(array::inline_ref(a))
    }
}
