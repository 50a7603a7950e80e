//! Files to nodes that do not see rank 0's run folder, and rows back.
//!
//! A worker maps the files its inputs refer to by path. Where a node does
//! not see rank 0's run folder (a node-local `/tmp`), rank 0 has that
//! node's agent make a folder at the same path on its node (the name is
//! private to this run: `procjob-<pid>-<random>`), so the references in
//! the frames hold unchanged on every node. Then, as each batch leaves for
//! a worker on such a node ([`before_run`]):
//!
//! - of a file the worker reads, the bytes the batch refers to that the
//!   node does not have yet are shipped (a row block of A when its task
//!   goes there, all of B once), into a file of the same length at the
//!   same path, the rest of it a hole;
//! - a file the worker writes (memmap-out's C) is made there, as long as
//!   rank 0's and empty, and the agent is told which bytes of it the batch
//!   writes ([`Down::WriteBack`]): when the worker's answer to that batch
//!   comes, the agent sends those bytes to rank 0 just before the answer's
//!   last byte, and rank 0 writes them into its file ([`land`]) before its
//!   reader can have decoded the answer.
//!
//! The bytes travel as [`TAG_FILE`] messages of at most [`CHUNK`] bytes.
//! Messages between two ranks arrive in the order they were sent, so
//! shipped bytes are in place before the frame that refers to them reaches
//! its worker, and rows written back land before the answer that reports
//! them. The agent removes the folders it made when it leaves. Where the
//! folder an agent was to make is there already (rank 0's own, when
//! several "nodes" are simulated on one machine), it writes nothing into
//! it: the bytes are there.

use std::collections::HashMap;
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use procjob_worker::protocol::{ArrayRef, Batch};

use super::link::{Link, Outgoing};
use super::wire::{self, Down, Key, Span, TAG_FILE};
use super::world::{hub, probe_nodes, world, Hub};

/// For tests: a file to which an agent appends a line per piece of a file
/// it receives (its rank, the piece's offset and length, the path).
const SHIP_LOG_ENV: &str = "PROCJOB_MPI_SHIP_LOG";

/// The largest piece of a file in one message.
const CHUNK: u64 = 64 << 20;

/// What heads a [`TAG_FILE`] message (postcard, after its length as a
/// little-endian u32); the piece's bytes follow.
#[derive(Debug, Serialize, Deserialize)]
struct Piece {
    path: PathBuf,
    /// Where the bytes go in the file.
    offset: u64,
    /// To an agent: the first piece of this file to its node; the agent
    /// makes the file anew, `file_len` bytes long (a hole), before writing.
    fresh: bool,
    file_len: u64,
    /// To rank 0: the worker whose rows these are (their landing failing
    /// fails that worker's batch).
    worker: Option<Key>,
}

/// A [`TAG_FILE`] message: `piece`, then `len` bytes that `fill` writes.
fn message(piece: &Piece, len: u64, fill: impl FnOnce(&mut [u8]) -> std::io::Result<()>) -> Result<Vec<u8>, String> {
    let head = wire::encode(piece);
    let total = 4 + head.len() + len as usize;
    let mut m = Vec::new();
    m.try_reserve_exact(total).map_err(|_| format!("cannot allocate {len} bytes to send a piece of a file"))?;
    m.extend_from_slice(&(head.len() as u32).to_le_bytes());
    m.extend_from_slice(&head);
    m.resize(total, 0);
    fill(&mut m[4 + head.len()..]).map_err(|e| format!("cannot read {}: {e}", piece.path.display()))?;
    Ok(m)
}

/// The piece a [`TAG_FILE`] message carries, and its bytes.
fn split(message: &[u8]) -> Option<(Piece, &[u8])> {
    let len = u32::from_le_bytes(message.get(..4)?.try_into().ok()?) as usize;
    let piece = wire::decode::<Piece>(message.get(4..4 + len)?)?;
    Some((piece, &message[4 + len..]))
}

/// Sends bytes `start..end` of the open `file` to `dest` in pieces.
fn send_span(link: &Link, dest: usize, file: &std::fs::File, mut piece: Piece, end: u64) -> Result<(), String> {
    loop {
        let n = CHUNK.min(end.saturating_sub(piece.offset));
        let m = message(&piece, n, |buf| file.read_exact_at(buf, piece.offset))?;
        link.send(Outgoing { dest: dest as i32, tag: TAG_FILE, bytes: m })
            .map_err(|_| "the MPI thread has stopped".to_string())?;
        piece.offset += n;
        piece.fresh = false;
        if piece.offset >= end {
            return Ok(());
        }
    }
}

/// A file of a run folder some node does not see, as rank 0 knows it.
struct ShippedFile {
    /// Its length and modification time when last prepared: another
    /// version at the same path is shipped anew.
    version: (u64, u128),
    /// Whether workers write it (in place, memmap-out's C).
    writable: bool,
    /// Per agent, the byte ranges of this version it has (sorted, disjoint).
    sent: HashMap<usize, Vec<(u64, u64)>>,
}

/// Rank 0's record of what it has shipped.
#[derive(Default)]
struct Shipped {
    /// Run folder → the agents of the nodes that do not see it.
    folders: HashMap<PathBuf, Vec<usize>>,
    files: HashMap<PathBuf, ShippedFile>,
}

static SHIPPED: Mutex<Option<Shipped>> = Mutex::new(None);

fn shipped() -> std::sync::MutexGuard<'static, Option<Shipped>> {
    SHIPPED.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Whether `folder` is named as procjob names its run folders.
fn is_run_folder(folder: &Path) -> bool {
    folder.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("procjob-"))
}

/// Readies the file at `path` (canonical) to be referred to by workers on
/// every node (rank 0, under MPI; nothing elsewhere): finds which nodes do
/// not see its folder and has their agents make it; the bytes go as
/// batches need them ([`before_run`]). A file outside procjob's run folder
/// that some node does not see is an error naming the node.
pub(crate) fn prepare(path: &Path, writable: bool) -> Result<(), String> {
    let (Some(_), Some(hub)) = (world(), hub()) else { return Ok(()) };
    let Some(folder) = path.parent() else { return Ok(()) };
    let mut guard = shipped();
    let shipped = guard.get_or_insert_with(Shipped::default);
    if !shipped.folders.contains_key(folder) {
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
        shipped.folders.insert(folder.to_path_buf(), agents);
    }
    if shipped.folders[folder].is_empty() {
        return Ok(());
    }
    let meta = std::fs::metadata(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let modified_ns =
        meta.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).map_or(0, |d| d.as_nanos());
    let version = (meta.len(), modified_ns);
    let file = shipped.files.entry(path.to_path_buf()).or_insert_with(|| ShippedFile {
        version,
        writable,
        sent: HashMap::new(),
    });
    if file.version != version || file.writable != writable {
        *file = ShippedFile { version, writable, sent: HashMap::new() };
    }
    Ok(())
}

/// The parts of `start..end` not in `have` (sorted, disjoint).
fn missing(have: &[(u64, u64)], start: u64, end: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut at = start;
    for &(a, b) in have {
        if b <= at {
            continue;
        }
        if a >= end {
            break;
        }
        if a > at {
            out.push((at, a));
        }
        at = at.max(b);
    }
    if at < end {
        out.push((at, end));
    }
    out
}

/// Adds `start..end` to `have`, keeping it sorted and disjoint.
fn add(have: &mut Vec<(u64, u64)>, start: u64, end: u64) {
    let (mut a, mut b) = (start, end);
    have.retain(|&(x, y)| {
        let overlaps = x <= b && a <= y;
        if overlaps {
            a = a.min(x);
            b = b.max(y);
        }
        !overlaps
    });
    let at = have.partition_point(|&(x, _)| x < a);
    have.insert(at, (a, b));
}

/// Rank 0, before `batch` goes to the worker `key` of the agent `agent` as
/// its `run`-th batch: ships what the batch reads that the node lacks, and
/// tells the agent what it writes (see the module docs).
pub(super) fn before_run(hub: &Hub, agent: usize, key: Key, run: u64, batch: &Batch) -> Result<(), String> {
    let mut guard = shipped();
    let Some(shipped) = guard.as_mut() else { return Ok(()) };
    let refs =
        batch.shared.iter().flat_map(|s| s.arrays.iter()).chain(batch.tasks.iter().flat_map(|t| t.arrays.iter()));
    let mut spans = Vec::new();
    for r in refs {
        let ArrayRef::File { path, offset, .. } = r else { continue };
        let blind = path.parent().and_then(|f| shipped.folders.get(f)).is_some_and(|a| a.contains(&agent));
        let Some(file) = shipped.files.get_mut(path).filter(|_| blind) else { continue };
        let file_len = file.version.0;
        let start = (*offset).min(file_len);
        let end = offset.saturating_add(r.nbytes().unwrap_or(0)).min(file_len);
        let fresh = !file.sent.contains_key(&agent);
        let have = file.sent.entry(agent).or_default();
        // A file workers write is made there empty; one they read gets the
        // bytes it lacks (`writable` comes from its references' access).
        let mut gaps = if file.writable { Vec::new() } else { missing(have, start, end) };
        if fresh && gaps.is_empty() {
            // Make the file there, even with nothing to put in it.
            gaps.push((start, start));
        }
        if !gaps.is_empty() {
            let f = std::fs::File::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
            for (i, &(a, b)) in gaps.iter().enumerate() {
                let piece = Piece { path: path.clone(), offset: a, fresh: fresh && i == 0, file_len, worker: None };
                send_span(&hub.link, agent, &f, piece, b)?;
                add(have, a, b);
            }
        }
        if file.writable && end > start {
            spans.push(Span { path: path.clone(), offset: start, len: end - start });
        }
    }
    if !spans.is_empty() {
        hub.send(agent, &Down::WriteBack { key, run, spans });
    }
    Ok(())
}

/// A fault of the test suite, like `PROCJOB_MPI_SHARED_FS`: when its
/// variable is `1`, [`fires`](OnceFault::fires) is true once per process
/// (the variable read once).
struct OnceFault {
    env: &'static str,
    set: std::sync::OnceLock<bool>,
    fired: std::sync::atomic::AtomicBool,
}

impl OnceFault {
    const fn new(env: &'static str) -> OnceFault {
        OnceFault { env, set: std::sync::OnceLock::new(), fired: std::sync::atomic::AtomicBool::new(false) }
    }

    fn fires(&self) -> bool {
        *self.set.get_or_init(|| std::env::var_os(self.env).is_some_and(|v| v == "1"))
            && !self.fired.swap(true, std::sync::atomic::Ordering::SeqCst)
    }
}

/// For tests only: `PROCJOB_MPI_TEST_LAND_FAIL=1` makes rank 0 fail to
/// land the first rows a worker of another node wrote, once, as a full
/// disk would.
static TEST_LAND_FAIL: OnceFault = OnceFault::new("PROCJOB_MPI_TEST_LAND_FAIL");

/// For tests only: `PROCJOB_MPI_TEST_SEND_FAIL=1` makes an agent fail to
/// send the first rows its workers wrote back to rank 0, once, as a
/// vanished file would.
static TEST_SEND_FAIL: OnceFault = OnceFault::new("PROCJOB_MPI_TEST_SEND_FAIL");

/// Rank 0: writes rows a worker of another node wrote in place into the
/// same file here, which must be one that workers write, and the rows
/// within it. On failure, the error and the worker whose rows they were.
pub(super) fn land(message: &[u8]) -> Result<(), (String, Option<Key>)> {
    let Some((piece, bytes)) = split(message) else { return Err(("a malformed piece of a file".into(), None)) };
    if TEST_LAND_FAIL.fires() {
        let why = format!("cannot write rows into {}: {}=1", piece.path.display(), TEST_LAND_FAIL.env);
        return Err((why, piece.worker));
    }
    let guard = shipped();
    let known = guard.as_ref().and_then(|s| s.files.get(&piece.path)).filter(|f| f.writable);
    let Some(file) = known else {
        return Err((format!("rows of {}, which no worker writes", piece.path.display()), piece.worker));
    };
    if piece.offset.saturating_add(bytes.len() as u64) > file.version.0 {
        return Err((format!("rows past the end of {}", piece.path.display()), piece.worker));
    }
    std::fs::OpenOptions::new()
        .write(true)
        .open(&piece.path)
        .and_then(|f| f.write_all_at(bytes, piece.offset))
        .map_err(|e| (format!("cannot write rows into {}: {e}", piece.path.display()), piece.worker))
}

/// What an agent made on its node, and what it found there.
#[derive(Default)]
struct Folders {
    /// Folders it made, each with its lock held (removed when it leaves).
    made: Vec<(PathBuf, Option<nix::fcntl::Flock<std::fs::File>>)>,
    /// Folders it found made: rank 0's own, seen from the same machine.
    found: Vec<PathBuf>,
}

static FOLDERS: Mutex<Option<Folders>> = Mutex::new(None);

fn folders() -> std::sync::MutexGuard<'static, Option<Folders>> {
    FOLDERS.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// An agent: makes `folder` (0700) unless it is there already (rank 0's
/// own, seen from the same machine), with a lock file as a run folder's
/// (see `run_folder.rs`), after removing the stale run folders beside it:
/// those that agents or runs killed by SIGKILL on this node left.
pub(super) fn make_folder(folder: &Path) {
    if !is_run_folder(folder) {
        return;
    }
    if let Some(parent) = folder.parent() {
        crate::run_folder::sweep_stale(parent);
    }
    let mut guard = folders();
    let f = guard.get_or_insert_with(Folders::default);
    match std::fs::DirBuilder::new().mode(0o700).create(folder) {
        Ok(()) => {
            let lock = crate::run_folder::lock_folder(folder).unwrap_or_else(|e| {
                say!("procjob: warning: cannot lock {} on this node: {e}", folder.display());
                None
            });
            f.made.push((folder.to_path_buf(), lock));
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => f.found.push(folder.to_path_buf()),
        Err(e) => say!("procjob: error: cannot make {} on this node: {e}", folder.display()),
    }
}

/// An agent: writes a piece of a shipped file (see the module docs).
pub(super) fn receive(message: &[u8]) {
    let Some((piece, bytes)) = split(message) else { return };
    let Some(folder) = piece.path.parent() else { return };
    let (made, own) = match folders().as_ref() {
        Some(f) => (f.made.iter().any(|(a, _)| a == folder), f.found.iter().any(|a| a == folder)),
        None => (false, false),
    };
    let written = if made {
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(piece.fresh)
            .mode(0o600)
            .open(&piece.path)
            .and_then(|f| {
                if piece.fresh {
                    f.set_len(piece.file_len)?;
                }
                f.write_all_at(bytes, piece.offset)
            })
    } else if own {
        Ok(())
    } else {
        return;
    };
    if let Err(e) = written.and_then(|()| log(&piece, bytes.len())) {
        say!("procjob: error: cannot write {} on this node: {e}", piece.path.display());
    }
}

/// An agent: sends the bytes of `spans` (written by the worker `key`) to
/// rank 0, to land in the same files there.
pub(super) fn write_back(link: &Link, key: Key, spans: &[Span]) -> Result<(), String> {
    if let Some(s) = spans.first().filter(|_| TEST_SEND_FAIL.fires()) {
        return Err(format!("cannot open {}: {}=1", s.path.display(), TEST_SEND_FAIL.env));
    }
    for s in spans {
        let file = std::fs::File::open(&s.path).map_err(|e| format!("cannot open {}: {e}", s.path.display()))?;
        let piece = Piece { path: s.path.clone(), offset: s.offset, fresh: false, file_len: 0, worker: Some(key) };
        send_span(link, 0, &file, piece, s.offset.saturating_add(s.len))?;
    }
    Ok(())
}

/// Notes a received piece in the file [`SHIP_LOG_ENV`] names, if any.
fn log(piece: &Piece, len: usize) -> std::io::Result<()> {
    let Some(log) = std::env::var_os(SHIP_LOG_ENV) else { return Ok(()) };
    let rank = std::env::var("OMPI_COMM_WORLD_RANK").unwrap_or_else(|_| "?".into());
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(log)?;
    let line = format!("{rank} {} {len} {}\n", piece.offset, piece.path.display());
    std::io::Write::write_all(&mut f, line.as_bytes())
}

/// An agent, as it leaves: removes the folders it made.
pub(super) fn remove_folders() {
    remove(folders().take());
}

/// [`remove_folders`] from the panic hook, which must not wait: a thread
/// holding the lock may be the one that panicked.
pub(super) fn remove_folders_without_waiting() {
    match FOLDERS.try_lock() {
        Ok(mut f) => remove(f.take()),
        Err(std::sync::TryLockError::Poisoned(p)) => remove(p.into_inner().take()),
        Err(std::sync::TryLockError::WouldBlock) => {}
    }
}

fn remove(folders: Option<Folders>) {
    if let Some(f) = folders {
        for (folder, lock) in f.made {
            let _ = std::fs::remove_dir_all(folder);
            drop(lock);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{add, make_folder, missing, remove_folders};

    #[test]
    fn an_agent_locks_the_folder_it_makes_and_sweeps_the_stale_ones_beside_it() {
        use crate::run_folder::{LOCK_FILE, LOCK_FILE_HEADER};
        let parent = tempfile::tempdir().unwrap();
        // Left by an agent killed by SIGKILL: its lock file, not held.
        let stale = parent.path().join("procjob-4242-abcdefghij");
        std::fs::create_dir(&stale).unwrap();
        std::fs::write(stale.join(LOCK_FILE), format!("{LOCK_FILE_HEADER}pid 4242\n")).unwrap();
        std::fs::write(stale.join("memmap-1-A.npy"), b"rows").unwrap();
        let folder = parent.path().join("procjob-77-klmnopqrst");
        make_folder(&folder);
        assert!(!stale.exists(), "the stale folder is swept");
        let lock = std::fs::File::open(folder.join(LOCK_FILE)).unwrap();
        let held = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusiveNonblock);
        assert!(held.is_err(), "the new folder's lock is held");
        remove_folders();
        assert!(!folder.exists());
    }

    #[test]
    fn missing_is_what_the_ranges_do_not_cover() {
        let have = vec![(10, 20), (30, 40)];
        assert_eq!(missing(&have, 0, 50), vec![(0, 10), (20, 30), (40, 50)]);
        assert_eq!(missing(&have, 12, 18), vec![]);
        assert_eq!(missing(&have, 15, 35), vec![(20, 30)]);
        assert_eq!(missing(&[], 5, 9), vec![(5, 9)]);
    }

    #[test]
    fn add_merges_overlapping_and_touching_ranges() {
        let mut have = vec![(10, 20), (30, 40)];
        add(&mut have, 20, 30);
        assert_eq!(have, vec![(10, 40)]);
        add(&mut have, 0, 5);
        add(&mut have, 50, 60);
        assert_eq!(have, vec![(0, 5), (10, 40), (50, 60)]);
        add(&mut have, 3, 55);
        assert_eq!(have, vec![(0, 60)]);
    }
}
