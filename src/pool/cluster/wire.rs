//! What rank 0 and the node agents say to each other over MPI.
//!
//! Two kinds of message: control messages ([`Down`], [`Up`]), encoded with
//! postcard, and data messages (tag [`TAG_DATA`]): a [`Key`] then raw bytes
//! of a worker's input or output stream, relayed unchanged. Messages
//! between two ranks arrive in the order they were sent (MPI does not let
//! one overtake another on the same communicator), so a worker's data
//! comes before the news of its end.

use serde::{Deserialize, Serialize};

use procjob_worker::secret::PoolSecret;

use crate::error::WorkerExit;

/// Tag of control messages.
pub(super) const TAG_CONTROL: i32 = 1;
/// Tag of data messages.
pub(super) const TAG_DATA: i32 = 2;
/// Tag of the start-up exchange in [`super::world`].
pub(super) const TAG_HELLO: i32 = 3;
/// Tag of a piece of a file: shipped to a node, or rows written there sent
/// back to rank 0 (see [`super::ship`]).
pub(super) const TAG_FILE: i32 = 4;

/// One worker, in one slot of one pool of rank 0, in one generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub(super) struct Key {
    pub(super) pool: u32,
    pub(super) slot: u32,
    pub(super) generation: u64,
}

/// Bytes of a [`Key`] at the head of a data message.
pub(super) const KEY_LEN: usize = 16;

impl Key {
    pub(super) fn to_bytes(self) -> [u8; KEY_LEN] {
        let mut b = [0u8; KEY_LEN];
        b[..4].copy_from_slice(&self.pool.to_le_bytes());
        b[4..8].copy_from_slice(&self.slot.to_le_bytes());
        b[8..].copy_from_slice(&self.generation.to_le_bytes());
        b
    }

    /// The key at the head of a data message, and the bytes after it.
    pub(super) fn split(message: &[u8]) -> Option<(Key, &[u8])> {
        let (head, rest) = message.split_at_checked(KEY_LEN)?;
        let pool = u32::from_le_bytes(head[..4].try_into().ok()?);
        let slot = u32::from_le_bytes(head[4..8].try_into().ok()?);
        let generation = u64::from_le_bytes(head[8..].try_into().ok()?);
        Some((Key { pool, slot, generation }, rest))
    }
}

/// A data message: `key`, then `bytes`.
pub(super) fn data(key: Key, bytes: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(KEY_LEN + bytes.len());
    m.extend_from_slice(&key.to_bytes());
    m.extend_from_slice(bytes);
    m
}

/// Rank 0 to an agent.
#[derive(Debug, Serialize, Deserialize)]
pub(super) enum Down {
    /// Start a worker for `key`, handing it the pool's secret; it is to use
    /// `threads` threads for libraries that start their own.
    Start { key: Key, secret: PoolSecret, threads: u32 },
    /// Close the worker's input (it exits when it sees that).
    CloseInput { key: Key },
    /// Kill the worker.
    Kill { key: Key },
    /// Whether the file at `path` holds `content` on the agent's node.
    Probe { path: std::path::PathBuf, content: Vec<u8> },
    /// Make the run folder `path` on the agent's node (see [`super::ship`]).
    MakeFolder { path: std::path::PathBuf },
    /// When the worker for `key` answers the batch it was sent as its
    /// `run`-th (counting from 0), send these byte spans of files it wrote
    /// in place back to rank 0, before the answer (see [`super::ship`]).
    WriteBack { key: Key, run: u64, spans: Vec<Span> },
    /// Stop every worker and leave.
    Shutdown,
}

/// A span of bytes of a file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Span {
    pub(super) path: std::path::PathBuf,
    pub(super) offset: u64,
    pub(super) len: u64,
}

/// An agent to rank 0.
#[derive(Debug, Serialize, Deserialize)]
pub(super) enum Up {
    /// The worker for `key` runs, as process `pid`.
    Started { key: Key, pid: u32 },
    /// It could not be started.
    StartFailed { key: Key, reason: String },
    /// Its output stream ended.
    Eof { key: Key },
    /// Its input no longer takes bytes (it exited, or a write failed).
    InputClosed { key: Key },
    /// It ended so, and was reaped; `killed_for` says why, when the agent
    /// killed it itself.
    Exited { key: Key, exit: Exit, killed_for: Option<String> },
    /// The answer to [`Down::Probe`].
    Probed { same: bool },
    /// Every worker is stopped; the agent leaves.
    Bye,
}

/// How a worker ended, on the wire.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub(super) enum Exit {
    Code(i32),
    Signal(i32),
    Unknown,
}

impl From<WorkerExit> for Exit {
    fn from(e: WorkerExit) -> Exit {
        match e {
            WorkerExit::Exited { code } => Exit::Code(code),
            WorkerExit::Signaled { signal } => Exit::Signal(signal as i32),
            WorkerExit::Unknown => Exit::Unknown,
        }
    }
}

impl From<Exit> for WorkerExit {
    fn from(e: Exit) -> WorkerExit {
        match e {
            Exit::Code(code) => WorkerExit::Exited { code },
            Exit::Signal(s) => nix::sys::signal::Signal::try_from(s)
                .map_or(WorkerExit::Unknown, |signal| WorkerExit::Signaled { signal }),
            Exit::Unknown => WorkerExit::Unknown,
        }
    }
}

/// Encodes a control message.
pub(super) fn encode<M: Serialize>(m: &M) -> Vec<u8> {
    postcard::to_stdvec(m).unwrap_or_default()
}

/// Decodes a control message.
pub(super) fn decode<'a, M: Deserialize<'a>>(bytes: &'a [u8]) -> Option<M> {
    postcard::from_bytes(bytes).ok()
}
