//! Files to nodes that do not see rank 0's run folder.
//!
//! A worker maps the files its inputs refer to by path. Where a node does
//! not see rank 0's run folder (a node-local `/tmp`), rank 0 has that
//! node's agent make a folder at the same path on its node (the name is
//! private to this run: `procjob-<pid>-<random>`), and ships each file a
//! worker is about to map there once, before the first frame that refers
//! to it: so the references in the frames hold unchanged on every node.
//! The bytes travel as [`TAG_FILE`] messages of at most [`CHUNK`] bytes;
//! messages from rank 0 to an agent arrive in the order they were sent, so
//! a file is complete before the frame that refers to it reaches its
//! worker. The agent writes to a temporary name and renames it over the
//! path at the end (where the folder is rank 0's own, as when several
//! "nodes" are simulated on one machine, rank 0's maps keep their file),
//! and removes the folders it made when it leaves.

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use super::link::Outgoing;
use super::wire::{self, Down, TAG_FILE};
use super::world::{hub, probe_nodes, world};

/// For tests: a file to which an agent appends a line per file it
/// receives (its rank, the file's length, its path).
const SHIP_LOG_ENV: &str = "PROCJOB_MPI_SHIP_LOG";

/// The largest piece of a file in one message.
const CHUNK: usize = 64 << 20;

/// What heads a [`TAG_FILE`] message (postcard, after its length as a
/// little-endian u32); the bytes follow.
#[derive(Debug, Serialize, Deserialize)]
struct Piece {
    path: PathBuf,
    offset: u64,
    last: bool,
    /// The file's modification time on rank 0 (nanoseconds since the
    /// epoch), which the copy takes: rank 0 knows a file it has shipped by
    /// its length and this, which a copy renamed over rank 0's own file
    /// (one machine) keeps.
    modified_ns: u128,
}

/// Rank 0's record of what it has shipped.
#[derive(Default)]
struct Shipped {
    /// Run folder → the agents of the nodes that do not see it.
    folders: HashMap<PathBuf, Vec<usize>>,
    /// Files shipped: path, length, modification time.
    files: HashSet<(PathBuf, u64, u128)>,
}

static SHIPPED: Mutex<Option<Shipped>> = Mutex::new(None);

/// Whether `folder` is named as procjob names its run folders.
fn is_run_folder(folder: &Path) -> bool {
    folder.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("procjob-"))
}

/// Makes the file at `path` (canonical) available at the same path on
/// every node, before a worker is sent a reference to it (rank 0, under
/// MPI; nothing elsewhere). A file to be written (`writable`) cannot be: its
/// rows would stay on the other node.
pub(crate) fn ship(path: &Path, writable: bool) -> Result<(), String> {
    let (Some(_), Some(hub)) = (world(), hub()) else { return Ok(()) };
    let Some(folder) = path.parent() else { return Ok(()) };
    let mut guard = SHIPPED.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let shipped = guard.get_or_insert_with(Shipped::default);
    let agents = match shipped.folders.get(folder) {
        Some(agents) => agents.clone(),
        None => {
            let blind = probe_nodes(folder).map_err(|e| e.to_string())?;
            if let Some((rank, host)) = blind.first() {
                if !is_run_folder(folder) {
                    return Err(format!(
                        "{} is not on a filesystem every node sees (rank {rank} on host {host} does not see it), \
                         and only procjob's own run folder is copied to such nodes; put the file on a shared \
                         filesystem",
                        path.display()
                    ));
                }
            }
            let agents: Vec<usize> = blind.into_iter().map(|(rank, _)| rank).collect();
            for &agent in &agents {
                hub.send(agent, &Down::MakeFolder { path: folder.to_path_buf() });
            }
            shipped.folders.insert(folder.to_path_buf(), agents.clone());
            agents
        }
    };
    if agents.is_empty() {
        return Ok(());
    }
    if writable {
        return Err(format!(
            "{} is to be written in place, but rank {} does not see the folder it is in; put the temp \
             folder on a filesystem every node sees",
            path.display(),
            agents[0]
        ));
    }
    let meta = std::fs::metadata(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let modified_ns =
        meta.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).map_or(0, |d| d.as_nanos());
    let id = (path.to_path_buf(), meta.len(), modified_ns);
    if shipped.files.contains(&id) {
        return Ok(());
    }
    let file = std::fs::File::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    let len = meta.len();
    let mut offset = 0u64;
    loop {
        let n = CHUNK.min((len - offset) as usize);
        let last = offset + n as u64 == len;
        let head = wire::encode(&Piece { path: path.to_path_buf(), offset, last, modified_ns });
        let mut message = Vec::new();
        message
            .try_reserve_exact(4 + head.len() + n)
            .map_err(|_| format!("cannot allocate {n} bytes to ship a file"))?;
        message.extend_from_slice(&(head.len() as u32).to_le_bytes());
        message.extend_from_slice(&head);
        message.resize(4 + head.len() + n, 0);
        file.read_exact_at(&mut message[4 + head.len()..], offset)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        for &agent in &agents {
            let _ = hub.link.send(Outgoing { dest: agent as i32, tag: TAG_FILE, bytes: message.clone() });
        }
        offset += n as u64;
        if offset >= len {
            break;
        }
    }
    shipped.files.insert(id);
    Ok(())
}

/// Folders an agent made (removed when it leaves), and those it accepted
/// as rank 0's own.
static FOLDERS: Mutex<(Vec<PathBuf>, Vec<PathBuf>)> = Mutex::new((Vec::new(), Vec::new()));

/// An agent: makes `folder` (0700) unless it is there already (rank 0's
/// own, seen from the same machine).
pub(super) fn make_folder(folder: &Path) {
    if !is_run_folder(folder) {
        return;
    }
    let mut f = FOLDERS.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    match std::fs::DirBuilder::new().mode(0o700).create(folder) {
        Ok(()) => f.0.push(folder.to_path_buf()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => {
            eprintln!("procjob: error: cannot make {} on this node: {e}", folder.display());
            return;
        }
    }
    f.1.push(folder.to_path_buf());
}

/// An agent: writes a piece of a shipped file (see the module docs).
pub(super) fn receive(message: &[u8]) {
    let Some(len) = message.get(..4).and_then(|b| b.try_into().ok()).map(u32::from_le_bytes) else { return };
    let Some(head) = message.get(4..4 + len as usize) else { return };
    let Some(piece) = wire::decode::<Piece>(head) else { return };
    let bytes = &message[4 + len as usize..];
    let (Some(folder), Some(name)) = (piece.path.parent(), piece.path.file_name()) else { return };
    let accepted = FOLDERS.lock().is_ok_and(|f| f.1.iter().any(|a| a == folder));
    if !accepted {
        return;
    }
    let temp = folder.join(format!(".{}.shipped-{}", name.to_string_lossy(), std::process::id()));
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(piece.offset == 0)
        .mode(0o600)
        .open(&temp)
        .and_then(|f| {
            f.write_all_at(bytes, piece.offset)?;
            if piece.last {
                let nanos = u64::try_from(piece.modified_ns).unwrap_or(u64::MAX);
                f.set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_nanos(nanos))?;
            }
            Ok(())
        });
    let renamed = match written {
        Ok(()) if piece.last => std::fs::rename(&temp, &piece.path).and_then(|()| log(&piece.path)),
        other => other,
    };
    if let Err(e) = renamed {
        let _ = std::fs::remove_file(&temp);
        // Rank 0's own folder (one machine), removed at its end before this
        // copy came: nothing is lost.
        if !folder.exists() {
            return;
        }
        eprintln!("procjob: error: cannot write {} on this node: {e}", piece.path.display());
    }
}

/// Notes a received file in the file [`SHIP_LOG_ENV`] names, if any.
fn log(path: &Path) -> std::io::Result<()> {
    let Some(log) = std::env::var_os(SHIP_LOG_ENV) else { return Ok(()) };
    let len = std::fs::metadata(path)?.len();
    let rank = std::env::var("OMPI_COMM_WORLD_RANK").unwrap_or_else(|_| "?".into());
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(log)?;
    std::io::Write::write_all(&mut f, format!("{rank} {len} {}\n", path.display()).as_bytes())
}

/// An agent, as it leaves: removes the folders it made.
pub(super) fn remove_folders() {
    let mut f = FOLDERS.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    for folder in f.0.drain(..) {
        let _ = std::fs::remove_dir_all(folder);
    }
    f.1.clear();
}
