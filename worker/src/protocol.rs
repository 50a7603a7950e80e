//! The wire protocol: the only thing the coordinator and a worker share.
//!
//! # Transport
//!
//! A worker reads requests on its standard input and writes replies on its
//! standard output; both are pipes owned by the coordinator. The worker
//! moves both ends off fds 0 and 1 at start-up (see [`crate::serve`]) so a
//! `print!` or a read of stdin inside a task can never touch the stream.
//!
//! # Frames
//!
//! Every message travels as one frame:
//!
//! ```text
//! offset size  field
//!      0    4  magic        b"PJOB"
//!      4    2  version      u16 little-endian, = PROTOCOL_VERSION
//!      6    1  kind         1 = Request (coordinator → worker), 2 = Reply (worker → coordinator)
//!      7    1  reserved     0
//!      8    4  payload_len  u32 little-endian, ≤ MAX_PAYLOAD
//!     12    8  bulk_len     u64 little-endian, ≤ MAX_BULK
//!     20    …  payload      postcard encoding of a [`Request`] or [`Reply`]
//!      …    …  bulk         raw array bytes, bulk_len of them
//! ```
//!
//! The payload is a postcard-encoded tagged enum ([`Request`] or [`Reply`]);
//! postcard is compact, not self-describing, and has a stable wire format
//! (1.0). Array elements are never encoded one by one: every
//! [`ArrayRef::Inline`] named in the payload, in the order it appears,
//! owns the next `dtype.size() × product(shape)` bytes of the bulk, little
//! endian, C order, with no padding. The reader checks that those sizes add
//! up to `bulk_len` before it allocates any of them.
//!
//! # Limits
//!
//! `payload_len` is checked against [`MAX_PAYLOAD`] before a byte of the
//! payload is allocated; `bulk_len` against [`MAX_BULK`] and then against
//! the arrays the payload declares. A frame that breaks any rule is a typed
//! [`DecodeError`]. A bad length is refused before anything is allocated for
//! it; a frame whose declared arrays agree with its bulk length is read
//! array by array into fallible allocations, so an advertised size that
//! memory cannot hold is an error, not an abort. Every size is a checked
//! product ([`ArrayRef::nbytes`], [`ArrayRef::checked_shape`]); a task kind
//! name longer than [`MAX_KIND_NAME`] is refused by [`recv_request`]. A
//! worker bounds the reply it builds by the same limits (see
//! `docs/protocol.md`, "Limits").
//!
//! # Versioning and handshake
//!
//! Each frame carries [`PROTOCOL_VERSION`]; a frame of another version is a
//! [`DecodeError::VersionMismatch`]. A conversation opens with the
//! coordinator's [`Request::Hello`], answered by [`Reply::Ready`]; only then
//! do [`Request::Run`] batches follow, each answered by one
//! [`Reply::Results`], and [`Request::Allow`] frames, not answered. The
//! worker exits when its input closes.
//!
//! # Trust
//!
//! The `Hello` must carry the secret of the pool that started the worker
//! ([`crate::secret`]), else the worker refuses it; a batch names code only
//! by the offset of an entry descriptor, which the worker proves before it
//! calls anything ([`crate::entry`]); a file reference is mapped only under
//! the folders the coordinator named ([`crate::confine`]). docs/protocol.md,
//! "What the worker trusts", says what this defends against and what not.

use std::io::{self, IoSlice, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::dtype::DType;
pub use crate::io::write_all_vectored;
pub use crate::memory::MemorySnapshot;
pub use crate::payload::Payload;

/// The four bytes every frame starts with.
pub const MAGIC: [u8; 4] = *b"PJOB";
/// The protocol version; bumped on any incompatible change of frames or messages.
pub const PROTOCOL_VERSION: u16 = 8;
/// Length of the fixed frame prelude.
pub const PRELUDE_LEN: usize = 20;
/// Largest payload (the postcard part) a reader accepts: 64 MiB.
pub const MAX_PAYLOAD: usize = 64 << 20;
/// Largest bulk part a reader accepts: 1 TiB.
pub const MAX_BULK: u64 = 1 << 40;
/// Longest task kind name ([`TaskKind::name`]) a worker accepts, in bytes:
/// refused at decode ([`DecodeError::KindNameTooLong`]). A name is a
/// registry key and appears in messages, some repeated per task; type
/// paths of generic tasks (`Task::name`'s default) stay well under it.
pub const MAX_KIND_NAME: usize = 256;
/// Most tasks one batch may carry. A task takes a few bytes on the wire but
/// tens once decoded, and its outcome as many again: without a bound, a
/// 64 MiB frame of empty tasks would take gigabytes to decode and answer.
/// The coordinator's batches never exceed it.
pub const MAX_BATCH_TASKS: usize = 1 << 16;

/// Who sent a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameKind {
    /// Coordinator → worker.
    Request = 1,
    /// Worker → coordinator.
    Reply = 2,
}

impl FrameKind {
    fn from_byte(b: u8) -> Option<FrameKind> {
        match b {
            1 => Some(FrameKind::Request),
            2 => Some(FrameKind::Reply),
            _ => None,
        }
    }
}

/// A message from the coordinator to a worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Request {
    /// Opens the conversation.
    Hello(Hello),
    /// Run these tasks, in order, and answer with one [`Reply::Results`].
    Run(Batch),
    /// The worker may also map files under these folders from now on (see
    /// [`crate::confine`]); not answered. The coordinator sends it before
    /// the first batch that refers to a file in a folder the worker has not
    /// been told of.
    Allow {
        /// Absolute, canonical folders (as bytes on the wire, like every
        /// path: see [`path_bytes`]).
        #[serde(with = "paths_bytes")]
        folders: Vec<PathBuf>,
    },
    /// The worker may lend its large results by address
    /// ([`ArrayRef::Lent`]) from now on: the coordinator reads them out of
    /// its memory (`process_vm_readv`). Also says how many of the worker's
    /// replies that lent arrays the coordinator has read in full, counted
    /// from the first: their arrays are the worker's to write or free
    /// again. Not answered. The coordinator sends it once it has read the
    /// worker's [`Ready::lend_probe`] from its memory (`read` 0), and again
    /// as soon as it has read each reply that lent arrays; a worker that
    /// never gets it sends every result's bytes in the frame.
    Lending {
        /// Replies with lent arrays read so far.
        read: u64,
    },
}

/// The handshake request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    /// The coordinator's [`PROTOCOL_VERSION`].
    pub protocol: u16,
    /// The worker's index in its pool (0-based), for messages.
    pub worker_index: u32,
    /// Identity of the coordinator's executable, so the worker can tell
    /// whether it is the same binary (and may run tasks by entry descriptor
    /// offset). It guards against a stale binary; it authenticates no one.
    pub binary: BinaryId,
    /// Exit after this many milliseconds without a request (0 = never).
    pub idle_timeout_ms: u64,
    /// The worker's replies reach the coordinator's own readers directly,
    /// which copy every byte out of the pipe (`read`, or `splice` into a
    /// file) and never pass its pages on by reference. The worker may then
    /// write again into pages it lent the pipe with `vmsplice` once the
    /// pipe is empty (it reuses a large result's pages for the next one).
    /// Set for workers the coordinator starts itself (re-executing its own
    /// program, or forking); not for a configured worker program, which
    /// could relay the pipe (`pv` splices pipe to pipe).
    pub reuse_lent_pages: bool,
    /// The secret of the pool that started the worker, handed to it out of
    /// band ([`crate::secret`]); a worker refuses a handshake without it.
    pub secret: crate::secret::PoolSecret,
    /// The folders the worker may map files from (absolute, canonical);
    /// [`Request::Allow`] adds more later.
    #[serde(with = "paths_bytes")]
    pub folders: Vec<PathBuf>,
}

/// What identifies an executable file and its layout.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BinaryId {
    /// Device of the executable file.
    pub dev: u64,
    /// Inode of the executable file.
    pub ino: u64,
    /// Size in bytes.
    pub len: u64,
    /// Modification time, nanoseconds since the epoch.
    pub mtime_ns: i128,
    /// Distance between two anchor functions: differs if the code differs.
    pub layout: i64,
}

/// The first of two anchor functions whose distance is [`BinaryId::layout`].
/// Their bodies differ, so that the linker cannot fold them into one.
#[inline(never)]
fn anchor(bytes: &[u8]) -> usize {
    std::hint::black_box(bytes.len())
}

#[inline(never)]
fn second_anchor() -> u64 {
    std::hint::black_box(42)
}

fn anchor_addr() -> usize {
    anchor as fn(&[u8]) -> usize as usize
}

impl BinaryId {
    /// The identity of the running executable.
    pub fn current() -> BinaryId {
        let layout = (second_anchor as fn() -> u64 as usize as i64).wrapping_sub(anchor_addr() as i64);
        match std::fs::metadata("/proc/self/exe") {
            Ok(m) => BinaryId {
                dev: m.dev(),
                ino: m.ino(),
                len: m.len(),
                mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
                layout,
            },
            Err(_) => BinaryId { layout, ..BinaryId::default() },
        }
    }

    /// Whether `self` (the coordinator's) names the running executable.
    /// An unknown identity (all zeros) never matches.
    pub fn is_current(&self) -> bool {
        self.ino != 0 && *self == BinaryId::current()
    }
}

/// A batch of tasks for one worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Batch {
    /// Identifies the call the tasks belong to; a worker drops its cached
    /// file mappings when the call changes.
    pub call: u64,
    /// What every task of the batch runs.
    pub kind: TaskKind,
    /// The tasks, run in this order; at most [`MAX_BATCH_TASKS`] (more is
    /// a decode error, raised before the surplus is decoded).
    #[serde(deserialize_with = "bounded_tasks")]
    pub tasks: Vec<TaskRequest>,
    /// Whether the worker times each task ([`TaskReply::started_ns`] and
    /// [`TaskReply::finished_ns`]); without, both are 0. The coordinator asks
    /// only while it records a trace: a clock read per task was about 5% of
    /// the cost of a tiny task.
    pub timestamps: bool,
    /// The value every task of the call shares (`Parallel::map_with`),
    /// sent with the first batch of the call each worker gets; the worker
    /// keeps it (decoded once, on first use) until the call changes. `None`
    /// on every other batch. Its arrays come first in the frame's bulk.
    pub shared: Option<SharedValue>,
}

/// A value shared by every task of a call: its postcard encoding, and the
/// arrays it refers to, as for a task's input.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SharedValue {
    /// The postcard encoding of the value; arrays in it are indices into
    /// `arrays`.
    pub value: Payload,
    /// The arrays the value refers to.
    pub arrays: Vec<ArrayRef>,
}

/// One task: which code to run and its encoded input.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskRequest {
    /// Index of the task in its call (submission order).
    pub index: u64,
    /// The postcard encoding of the task's input; arrays in it are indices
    /// into `arrays`. On the wire, a byte string (as a `Vec<u8>`).
    pub input: Payload,
    /// The arrays the input refers to.
    pub arrays: Vec<ArrayRef>,
}

/// Names the code a task runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskKind {
    /// The task's name (its registry key, and what messages show).
    pub name: String,
    /// Offset of the task's entry descriptor from the executable's load
    /// address ([`crate::entry`]); used only when the worker is the same
    /// executable as the coordinator, and only once proven to be a
    /// descriptor of the kind `name`.
    pub entry: Option<i64>,
}

/// How a worker maps a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Access {
    /// Shared read-only mapping (joblib's `mmap_mode='r'`).
    ReadOnly,
    /// Shared read-write mapping: writes reach the file and every other
    /// process mapping it (`'r+'`).
    ReadWrite,
    /// Private copy-on-write mapping: writes stay in this process (`'c'`).
    CopyOnWrite,
}

/// An array as it travels: its bytes in the frame's bulk, or a reference to
/// a file that holds them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ArrayRef {
    /// The bytes follow in the frame's bulk part.
    Inline {
        /// Element type.
        dtype: DType,
        /// Shape (C order).
        shape: Vec<u64>,
    },
    /// The bytes are in a file, to be memory-mapped.
    File {
        /// Element type.
        dtype: DType,
        /// Shape (C order).
        shape: Vec<u64>,
        /// Path of the file (absolute and canonical when procjob made the
        /// reference). It travels as the path's bytes, so a path that is not
        /// UTF-8 works too.
        #[serde(with = "path_bytes")]
        path: PathBuf,
        /// Byte offset of the first element in the file.
        offset: u64,
        /// How to map it.
        access: Access,
    },
    /// The bytes are already in the worker's memory: it was forked from
    /// the coordinator after the array was made, and reads it copy-on-write.
    Inherited {
        /// Element type.
        dtype: DType,
        /// Shape (C order).
        shape: Vec<u64>,
        /// Which of the arrays the worker inherited.
        index: u32,
        /// Byte offset of the first element in that array's storage.
        offset: u64,
    },
    /// The bytes are in the sender's memory at `address`, contiguous, for
    /// the receiver to copy out (`process_vm_readv`); only in the replies
    /// of a worker told it may lend ([`Request::Lending`]). The sender
    /// neither writes nor frees them until the receiver says it has read
    /// that reply.
    Lent {
        /// Element type.
        dtype: DType,
        /// Shape (C order).
        shape: Vec<u64>,
        /// Where the first byte is in the sender's address space.
        address: u64,
    },
}

/// A path on the wire: its bytes (`OsStr` on Unix), so any path the
/// system accepts travels, UTF-8 or not. For a UTF-8 path the encoding is
/// the same as serde's default for `PathBuf` (a length and the bytes).
pub mod path_bytes {
    use std::ffi::OsString;
    use std::os::unix::ffi::{OsStrExt, OsStringExt};
    use std::path::{Path, PathBuf};

    use serde::de::{self, Visitor};
    use serde::{Deserializer, Serializer};

    /// Writes the path's bytes.
    pub fn serialize<S: Serializer>(path: &Path, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(path.as_os_str().as_bytes())
    }

    /// Reads a path from its bytes.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<PathBuf, D::Error> {
        struct PathVisitor;
        impl Visitor<'_> for PathVisitor {
            type Value = PathBuf;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("the bytes of a path")
            }
            fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<PathBuf, E> {
                Ok(PathBuf::from(OsString::from_vec(v.to_vec())))
            }
            fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<PathBuf, E> {
                Ok(PathBuf::from(OsString::from_vec(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<PathBuf, E> {
                Ok(PathBuf::from(v))
            }
        }
        d.deserialize_byte_buf(PathVisitor)
    }
}

/// Decodes a batch's tasks, refusing a list longer than
/// [`MAX_BATCH_TASKS`] as soon as its length is read (postcard writes it
/// first), before any task is decoded. The frame is then a payload decode
/// error (postcard does not carry serde's message).
fn bounded_tasks<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<TaskRequest>, D::Error> {
    struct Bounded;
    impl<'de> serde::de::Visitor<'de> for Bounded {
        type Value = Vec<TaskRequest>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "at most {MAX_BATCH_TASKS} tasks")
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let too_many = |n: usize| {
                serde::de::Error::custom(format!("a batch of {n} tasks; at most {MAX_BATCH_TASKS} are accepted"))
            };
            if let Some(n) = seq.size_hint().filter(|&n| n > MAX_BATCH_TASKS) {
                return Err(too_many(n));
            }
            let mut tasks = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(MAX_BATCH_TASKS));
            while let Some(task) = seq.next_element()? {
                if tasks.len() == MAX_BATCH_TASKS {
                    return Err(too_many(MAX_BATCH_TASKS + 1));
                }
                tasks.push(task);
            }
            Ok(tasks)
        }
    }
    d.deserialize_seq(Bounded)
}

/// A list of paths on the wire, each as [`path_bytes`] writes it.
pub mod paths_bytes {
    use std::path::{Path, PathBuf};

    use serde::ser::SerializeSeq;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    /// Writes each path's bytes.
    pub fn serialize<S: Serializer>(paths: &[PathBuf], s: S) -> Result<S::Ok, S::Error> {
        struct One<'a>(&'a Path);
        impl Serialize for One<'_> {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                super::path_bytes::serialize(self.0, s)
            }
        }
        let mut seq = s.serialize_seq(Some(paths.len()))?;
        for p in paths {
            seq.serialize_element(&One(p))?;
        }
        seq.end()
    }

    /// Reads paths from their bytes.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<PathBuf>, D::Error> {
        #[derive(Deserialize)]
        struct One(#[serde(with = "super::path_bytes")] PathBuf);
        Ok(Vec::<One>::deserialize(d)?.into_iter().map(|o| o.0).collect())
    }
}

impl ArrayRef {
    /// The element type and shape.
    pub fn dtype_and_shape(&self) -> (DType, &[u64]) {
        match self {
            ArrayRef::Inline { dtype, shape }
            | ArrayRef::File { dtype, shape, .. }
            | ArrayRef::Inherited { dtype, shape, .. }
            | ArrayRef::Lent { dtype, shape, .. } => (*dtype, shape),
        }
    }

    /// Bytes of the array (`dtype.size() × product(shape)`, checked; 0 when
    /// a dimension is 0), or `None` if that overflows.
    pub fn nbytes(&self) -> Option<u64> {
        let (dtype, shape) = self.dtype_and_shape();
        if shape.contains(&0) {
            return Some(0);
        }
        shape.iter().try_fold(dtype.size() as u64, |acc, &d| acc.checked_mul(d))
    }
}

/// A message from a worker to the coordinator.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Reply {
    /// The handshake answer.
    Ready(Ready),
    /// The handshake was refused; the worker exits after sending this.
    Refused {
        /// Why, in words.
        reason: String,
    },
    /// The outcomes of one batch, one per task, in the batch's order.
    Results(Results),
    /// The worker's memory after the batch just answered, measured once its
    /// answer was on its way (sent when that answer's
    /// [`Results::memory_follows`] said so, before any other reply).
    Memory(MemorySnapshot),
}

/// The handshake answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ready {
    /// The worker's [`PROTOCOL_VERSION`].
    pub protocol: u16,
    /// The worker's process id.
    pub pid: u32,
    /// Whether the worker is the coordinator's own executable, so tasks
    /// named only by code offset can run.
    pub same_binary: bool,
    /// The worker's memory at start, so a worker that never gets a task
    /// still reports its footprint.
    pub memory: MemorySnapshot,
    /// Where [`LEND_PROBE`](crate::array::LEND_PROBE) is in the worker's
    /// memory: a coordinator that can read those bytes there may let it
    /// lend its results ([`Request::Lending`]).
    pub lend_probe: u64,
}

/// The answer to one batch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Results {
    /// One per task of the batch, in order.
    pub tasks: Vec<TaskReply>,
    /// Whether a [`Reply::Memory`] follows this answer: after any batch
    /// that computed for a millisecond or more, and otherwise at most every
    /// 100 ms. Reading `/proc/self/smaps_rollup` walks the page tables of
    /// every mapping: tens of microseconds for a small worker (as much as a
    /// tiny batch), 2–3 ms for one that maps 2000² `f64` operands — which is
    /// why it waits until the answer is on its way.
    pub memory_follows: bool,
    /// When the batch's request had arrived (prelude and payload read), on
    /// the monotonic clock.
    pub received_ns: u64,
    /// When its arrays had been read and mapped.
    pub mapped_ns: u64,
    /// When this reply was encoded, just before it was written.
    pub replying_ns: u64,
}

/// The outcome of one task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskReply {
    /// The task's index in its call.
    pub index: u64,
    /// When the task started, on the machine's monotonic clock
    /// ([`crate::clock::monotonic_ns`], the same in every process); 0 when
    /// the batch did not ask for [`Batch::timestamps`].
    pub started_ns: u64,
    /// When it returned, on the same clock (0 likewise).
    pub finished_ns: u64,
    /// What came of it.
    pub outcome: Outcome,
}

/// What came of a task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Outcome {
    /// It returned `Ok`.
    Ok {
        /// The postcard encoding of the output; arrays are indices into
        /// `arrays`. On the wire, a byte string (as a `Vec<u8>`).
        output: Payload,
        /// The arrays the output refers to.
        arrays: Vec<ArrayRef>,
    },
    /// It returned `Err`, panicked, or could not be run.
    Failed(TaskFailure),
}

/// Why a task failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FailureCause {
    /// The task returned an error.
    Error,
    /// The task panicked.
    Panic,
    /// The worker could not run it (unknown task kind, bad input, unmappable file).
    Setup,
}

/// A task's failure, as the worker reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskFailure {
    /// Error, panic or set-up problem.
    pub cause: FailureCause,
    /// The error's `Display`, or the panic message.
    pub message: String,
    /// `file:line:column` of a panic.
    pub location: Option<String>,
    /// The postcard encoding of the task's typed error, when it returned one.
    pub error: Option<Vec<u8>>,
    /// The `Display` of each error in the chain of sources below the one
    /// the task returned, outermost first; at most [`MAX_SOURCES`] (more is
    /// a decode error).
    #[serde(deserialize_with = "bounded_sources")]
    pub sources: Vec<String>,
}

/// Most sources a [`TaskFailure`] carries; a worker keeps the outermost
/// ones of a longer chain.
pub const MAX_SOURCES: usize = 32;

/// Decodes a failure's sources, refusing more than [`MAX_SOURCES`] as
/// soon as the length is read.
fn bounded_sources<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    struct Bounded;
    impl<'de> serde::de::Visitor<'de> for Bounded {
        type Value = Vec<String>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "at most {MAX_SOURCES} sources")
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let too_many = || serde::de::Error::custom(format!("more than {MAX_SOURCES} error sources"));
            if seq.size_hint().is_some_and(|n| n > MAX_SOURCES) {
                return Err(too_many());
            }
            let mut sources = Vec::new();
            while let Some(s) = seq.next_element()? {
                if sources.len() == MAX_SOURCES {
                    return Err(too_many());
                }
                sources.push(s);
            }
            Ok(sources)
        }
    }
    d.deserialize_seq(Bounded)
}

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The stream ended cleanly between frames.
    #[error("the stream ended")]
    Closed,
    /// Reading failed.
    #[error("cannot read a frame: {0}")]
    Io(#[from] io::Error),
    /// The stream ended inside a frame.
    #[error("the stream ended inside a frame ({got} of {needed} bytes of its {part})")]
    Truncated {
        /// Which part was cut short.
        part: &'static str,
        /// Bytes expected.
        needed: u64,
        /// Bytes received.
        got: u64,
    },
    /// The frame does not start with [`MAGIC`].
    #[error(
        "bad frame magic \"{}\" (expected \"PJOB\"); the peer is not a procjob process or the stream is corrupt",
        .0.escape_ascii()
    )]
    BadMagic([u8; 4]),
    /// The peer speaks another protocol version.
    #[error("protocol version mismatch: this side speaks {ours}, the peer {theirs}; run the same procjob version on both sides")]
    VersionMismatch {
        /// Our version.
        ours: u16,
        /// Theirs.
        theirs: u16,
    },
    /// A frame of the wrong kind for this direction.
    #[error("unexpected frame kind {got} (expected {expected:?})")]
    WrongKind {
        /// The kind this side reads.
        expected: FrameKind,
        /// The byte received.
        got: u8,
    },
    /// The payload is larger than [`MAX_PAYLOAD`].
    #[error("frame payload of {len} bytes exceeds the limit of {max} bytes")]
    PayloadTooLarge {
        /// Advertised length.
        len: u64,
        /// The limit.
        max: u64,
    },
    /// The bulk is larger than [`MAX_BULK`].
    #[error("frame bulk of {len} bytes exceeds the limit of {max} bytes")]
    BulkTooLarge {
        /// Advertised length.
        len: u64,
        /// The limit.
        max: u64,
    },
    /// The payload is not a valid message.
    #[error("cannot decode the frame payload: {0}")]
    Payload(#[from] postcard::Error),
    /// The payload holds bytes after its message.
    #[error("the frame payload has {0} bytes after its message")]
    TrailingBytes(usize),
    /// The reserved prelude byte is not zero.
    #[error("reserved frame byte is {0}, not 0; the peer speaks an unknown variant of the protocol")]
    Reserved(u8),
    /// The bulk length disagrees with the arrays the payload declares.
    #[error("frame bulk is {actual} bytes but its arrays need {declared}")]
    BulkMismatch {
        /// Bytes the inline arrays need.
        declared: u64,
        /// `bulk_len` of the frame.
        actual: u64,
    },
    /// A batch names a task kind longer than [`MAX_KIND_NAME`].
    #[error("task kind name of {len} bytes exceeds the limit of {max} bytes")]
    KindNameTooLong {
        /// The name's length.
        len: usize,
        /// The limit.
        max: usize,
    },
}

/// A decoded frame prelude.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prelude {
    /// Who sent it.
    pub kind: FrameKind,
    /// Length of the postcard payload.
    pub payload_len: u32,
    /// Length of the raw bulk.
    pub bulk_len: u64,
}

/// Encodes a prelude.
pub fn encode_prelude(kind: FrameKind, payload_len: usize, bulk_len: u64) -> [u8; PRELUDE_LEN] {
    let mut p = [0u8; PRELUDE_LEN];
    p[0..4].copy_from_slice(&MAGIC);
    p[4..6].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    p[6] = kind as u8;
    p[8..12].copy_from_slice(&(payload_len as u32).to_le_bytes());
    p[12..20].copy_from_slice(&bulk_len.to_le_bytes());
    p
}

/// Decodes and checks a prelude: magic, version, kind and both limits.
pub fn decode_prelude(p: &[u8; PRELUDE_LEN], expected: FrameKind) -> Result<Prelude, DecodeError> {
    let magic: [u8; 4] = [p[0], p[1], p[2], p[3]];
    if magic != MAGIC {
        return Err(DecodeError::BadMagic(magic));
    }
    let version = u16::from_le_bytes([p[4], p[5]]);
    if version != PROTOCOL_VERSION {
        return Err(DecodeError::VersionMismatch { ours: PROTOCOL_VERSION, theirs: version });
    }
    if FrameKind::from_byte(p[6]) != Some(expected) {
        return Err(DecodeError::WrongKind { expected, got: p[6] });
    }
    if p[7] != 0 {
        return Err(DecodeError::Reserved(p[7]));
    }
    let payload_len = u32::from_le_bytes([p[8], p[9], p[10], p[11]]);
    if payload_len as usize > MAX_PAYLOAD {
        return Err(DecodeError::PayloadTooLarge { len: payload_len.into(), max: MAX_PAYLOAD as u64 });
    }
    let mut b = [0u8; 8];
    b.copy_from_slice(&p[12..20]);
    let bulk_len = u64::from_le_bytes(b);
    if bulk_len > MAX_BULK {
        return Err(DecodeError::BulkTooLarge { len: bulk_len, max: MAX_BULK });
    }
    Ok(Prelude { kind: expected, payload_len, bulk_len })
}

/// Writes one frame: prelude, payload, then each bulk slice, with vectored
/// writes. Returns the number of bytes written.
pub fn write_frame<W: Write + ?Sized>(w: &mut W, kind: FrameKind, payload: &[u8], bulk: &[&[u8]]) -> io::Result<u64> {
    if payload.len() > MAX_PAYLOAD {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("message of {} bytes exceeds the frame payload limit of {MAX_PAYLOAD} bytes", payload.len()),
        ));
    }
    let bulk_len: u64 = bulk.iter().map(|b| b.len() as u64).sum();
    let prelude = encode_prelude(kind, payload.len(), bulk_len);
    let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(2 + bulk.len());
    slices.push(IoSlice::new(&prelude));
    slices.push(IoSlice::new(payload));
    slices.extend(bulk.iter().filter(|b| !b.is_empty()).map(|b| IoSlice::new(b)));
    write_all_vectored(w, &mut slices)?;
    w.flush()?;
    Ok(PRELUDE_LEN as u64 + payload.len() as u64 + bulk_len)
}

/// Encodes a message and writes it as a frame with the given bulk.
pub fn send<W: Write + ?Sized, M: Serialize>(
    w: &mut W,
    kind: FrameKind,
    message: &M,
    bulk: &[&[u8]],
) -> io::Result<u64> {
    crate::payload::with_scratch(|payload| {
        crate::payload::encode_into(message, payload)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("cannot encode a message: {e}")))?;
        write_frame(w, kind, payload, bulk)
    })
}

/// Reads exactly `buf.len()` bytes; distinguishes a short read as `Truncated`.
pub fn read_part<R: Read + ?Sized>(r: &mut R, buf: &mut [u8], part: &'static str) -> Result<(), DecodeError> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => {
                return Err(DecodeError::Truncated { part, needed: buf.len() as u64, got: got as u64 });
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(DecodeError::Io(e)),
        }
    }
    Ok(())
}

/// A frame whose prelude and payload have been read; its bulk, if any, is
/// still in the stream and must be read next (see [`crate::array::read_arrays`]).
#[derive(Debug)]
pub struct Frame<M> {
    /// The decoded message.
    pub message: M,
    /// Bytes of bulk that follow in the stream.
    pub bulk_len: u64,
    /// Bytes of prelude and payload read.
    pub header_bytes: u64,
}

/// Reads a prelude and payload, and decodes the payload as `M`.
///
/// Returns [`DecodeError::Closed`] if the stream ends before the first byte
/// of a frame.
pub fn recv<R: Read + ?Sized, M: serde::de::DeserializeOwned>(
    r: &mut R,
    expected: FrameKind,
) -> Result<Frame<M>, DecodeError> {
    let mut p = [0u8; PRELUDE_LEN];
    // The first byte tells a clean end of stream from a truncated frame.
    loop {
        match r.read(&mut p[..1]) {
            Ok(0) => return Err(DecodeError::Closed),
            Ok(_) => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(DecodeError::Io(e)),
        }
    }
    read_part(r, &mut p[1..], "prelude").map_err(|e| match e {
        // Count the first byte, read on its own above.
        DecodeError::Truncated { part, needed, got } => {
            DecodeError::Truncated { part, needed: needed + 1, got: got + 1 }
        }
        e => e,
    })?;
    let prelude = decode_prelude(&p, expected)?;
    // Up to MAX_PAYLOAD, reserved fallibly: under a memory limit, a large
    // payload the system refuses is an error, not an abort.
    let len = prelude.payload_len as usize;
    let mut payload = Vec::new();
    payload.try_reserve_exact(len).map_err(|_| {
        DecodeError::Io(io::Error::new(
            io::ErrorKind::OutOfMemory,
            format!("cannot allocate {len} bytes for a frame payload"),
        ))
    })?;
    payload.resize(len, 0);
    read_part(r, &mut payload, "payload")?;
    let (message, rest) = postcard::take_from_bytes(&payload)?;
    if !rest.is_empty() {
        return Err(DecodeError::TrailingBytes(rest.len()));
    }
    Ok(Frame { message, bulk_len: prelude.bulk_len, header_bytes: (PRELUDE_LEN + payload.len()) as u64 })
}

/// [`recv`] for a worker: reads a [`Request`] and checks the limits its
/// payload can break without being malformed (a task kind name longer than
/// [`MAX_KIND_NAME`] is [`DecodeError::KindNameTooLong`]).
pub fn recv_request<R: Read + ?Sized>(r: &mut R) -> Result<Frame<Request>, DecodeError> {
    let frame = recv::<_, Request>(r, FrameKind::Request)?;
    if let Request::Run(batch) = &frame.message {
        if batch.kind.name.len() > MAX_KIND_NAME {
            return Err(DecodeError::KindNameTooLong { len: batch.kind.name.len(), max: MAX_KIND_NAME });
        }
    }
    Ok(frame)
}

/// Checks that the inline arrays declared in `refs` need exactly `bulk_len`
/// bytes.
pub fn check_bulk<'a>(refs: impl IntoIterator<Item = &'a ArrayRef>, bulk_len: u64) -> Result<(), DecodeError> {
    let mut declared: u64 = 0;
    for r in refs {
        if let ArrayRef::Inline { .. } = r {
            let n = r.nbytes().ok_or(DecodeError::BulkMismatch { declared: u64::MAX, actual: bulk_len })?;
            declared =
                declared.checked_add(n).ok_or(DecodeError::BulkMismatch { declared: u64::MAX, actual: bulk_len })?;
        }
    }
    if declared != bulk_len {
        return Err(DecodeError::BulkMismatch { declared, actual: bulk_len });
    }
    Ok(())
}

impl Request {
    /// The array references of a batch's shared value and of every task,
    /// in bulk order.
    pub fn array_refs(&self) -> impl Iterator<Item = &ArrayRef> + Clone {
        let (shared, tasks): (&[ArrayRef], &[TaskRequest]) = match self {
            Request::Run(b) => (b.shared.as_ref().map_or(&[], |s| s.arrays.as_slice()), &b.tasks),
            Request::Hello(_) | Request::Allow { .. } | Request::Lending { .. } => (&[], &[]),
        };
        shared.iter().chain(tasks.iter().flat_map(|t| t.arrays.iter()))
    }
}

impl Results {
    /// The bytes of the arrays its outcomes lent by address
    /// ([`ArrayRef::Lent`]): what the receiver copies out of the worker's
    /// memory instead of the bulk.
    pub fn lent_bytes(&self) -> u64 {
        self.tasks
            .iter()
            .filter_map(|t| match &t.outcome {
                Outcome::Ok { arrays, .. } => Some(arrays),
                Outcome::Failed(_) => None,
            })
            .flatten()
            .filter(|a| matches!(a, ArrayRef::Lent { .. }))
            .map(|a| a.nbytes().unwrap_or(0))
            .fold(0, u64::saturating_add)
    }
}

impl Reply {
    /// The array references of every outcome in this reply, in bulk order.
    pub fn array_refs(&self) -> impl Iterator<Item = &ArrayRef> + Clone {
        let tasks: &[TaskReply] = match self {
            Reply::Results(r) => &r.tasks,
            _ => &[],
        };
        tasks.iter().flat_map(|t| match &t.outcome {
            Outcome::Ok { arrays, .. } => arrays.as_slice(),
            Outcome::Failed(_) => &[],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello() -> Request {
        Request::Hello(Hello {
            protocol: PROTOCOL_VERSION,
            worker_index: 3,
            binary: BinaryId::default(),
            idle_timeout_ms: 0,
            reuse_lent_pages: true,
            secret: crate::secret::PoolSecret::from_bytes([7; 32]),
            folders: vec![PathBuf::from("/tmp/procjob-1-x")],
        })
    }

    #[test]
    fn frame_round_trips() {
        let mut buf = Vec::new();
        let n = send(&mut buf, FrameKind::Request, &hello(), &[]).unwrap();
        assert_eq!(n as usize, buf.len());
        let frame: Frame<Request> = recv(&mut buf.as_slice(), FrameKind::Request).unwrap();
        assert_eq!(frame.message, hello());
        assert_eq!(frame.bulk_len, 0);
    }

    #[test]
    fn a_batch_of_more_tasks_than_allowed_is_refused_while_decoding() {
        let batch = |n: usize| {
            Request::Run(Batch {
                call: 1,
                kind: TaskKind { name: "k".into(), entry: None },
                tasks: (0..n as u64)
                    .map(|index| TaskRequest { index, input: Payload::default(), arrays: Vec::new() })
                    .collect(),
                timestamps: false,
                shared: None,
            })
        };
        for (n, ok) in [(MAX_BATCH_TASKS, true), (MAX_BATCH_TASKS + 1, false)] {
            let mut buf = Vec::new();
            send(&mut buf, FrameKind::Request, &batch(n), &[]).unwrap();
            match recv::<_, Request>(&mut buf.as_slice(), FrameKind::Request) {
                Ok(frame) => assert!(ok, "{n} tasks were accepted: {:?}", frame.bulk_len),
                // postcard reports any serde error as such, without its text.
                Err(e) => assert!(!ok && e.to_string().contains("cannot decode the frame payload"), "{n} tasks: {e}"),
            }
        }
    }

    #[test]
    fn paths_travel_as_bytes_utf8_or_not() {
        use std::os::unix::ffi::OsStringExt;
        let file = |path: PathBuf| ArrayRef::File {
            dtype: DType::F64,
            shape: vec![2, 3],
            path,
            offset: 128,
            access: Access::ReadOnly,
        };
        let odd = PathBuf::from(std::ffi::OsString::from_vec(b"/tmp/bad\xffx/A.npy".to_vec()));
        let bytes = postcard::to_stdvec(&file(odd.clone())).unwrap();
        assert_eq!(postcard::from_bytes::<ArrayRef>(&bytes).unwrap(), file(odd));
        // A UTF-8 path is encoded as serde encodes a `PathBuf` (a string).
        #[derive(Serialize)]
        enum Plain {
            _Inline { dtype: DType, shape: Vec<u64> },
            File { dtype: DType, shape: Vec<u64>, path: PathBuf, offset: u64, access: Access },
        }
        let path = PathBuf::from("/dev/shm/procjob-1-x/A.npy");
        let plain = Plain::File {
            dtype: DType::F64,
            shape: vec![2, 3],
            path: path.clone(),
            offset: 128,
            access: Access::ReadOnly,
        };
        assert_eq!(postcard::to_stdvec(&file(path)).unwrap(), postcard::to_stdvec(&plain).unwrap());
    }

    #[test]
    fn empty_stream_is_closed_not_truncated() {
        let err = recv::<_, Request>(&mut &b""[..], FrameKind::Request).unwrap_err();
        assert!(matches!(err, DecodeError::Closed), "{err:?}");
    }

    #[test]
    fn every_truncation_is_a_typed_error() {
        let mut buf = Vec::new();
        send(&mut buf, FrameKind::Request, &hello(), &[]).unwrap();
        for cut in 1..buf.len() {
            let err = recv::<_, Request>(&mut &buf[..cut], FrameKind::Request).unwrap_err();
            assert!(matches!(err, DecodeError::Truncated { .. }), "cut {cut}: {err:?}");
        }
    }

    #[test]
    fn bad_magic_version_and_kind_are_refused() {
        let mut buf = Vec::new();
        send(&mut buf, FrameKind::Request, &hello(), &[]).unwrap();
        let mut bad = buf.clone();
        bad[0] = b'X';
        assert!(matches!(recv::<_, Request>(&mut bad.as_slice(), FrameKind::Request), Err(DecodeError::BadMagic(_))));
        let mut bad = buf.clone();
        bad[4] = 99;
        let err = recv::<_, Request>(&mut bad.as_slice(), FrameKind::Request).unwrap_err();
        assert!(matches!(err, DecodeError::VersionMismatch { theirs: 99, .. }), "{err:?}");
        assert!(err.to_string().contains("version mismatch"));
        let err = recv::<_, Request>(&mut buf.as_slice(), FrameKind::Reply).unwrap_err();
        assert!(matches!(err, DecodeError::WrongKind { .. }), "{err:?}");
    }

    #[test]
    fn oversized_payload_is_refused_before_allocation() {
        // Advertise u32::MAX bytes of payload and provide none: the reader must
        // refuse on the prelude alone.
        let p = encode_prelude(FrameKind::Request, u32::MAX as usize, 0);
        let err = recv::<_, Request>(&mut &p[..], FrameKind::Request).unwrap_err();
        assert!(matches!(err, DecodeError::PayloadTooLarge { .. }), "{err:?}");
        let p = encode_prelude(FrameKind::Request, 1, u64::MAX);
        let err = recv::<_, Request>(&mut &p[..], FrameKind::Request).unwrap_err();
        assert!(matches!(err, DecodeError::BulkTooLarge { .. }), "{err:?}");
    }

    #[test]
    fn trailing_payload_bytes_and_a_nonzero_reserved_byte_are_refused() {
        let mut payload = postcard::to_stdvec(&hello()).unwrap();
        payload.push(0);
        let mut buf = Vec::new();
        write_frame(&mut buf, FrameKind::Request, &payload, &[]).unwrap();
        let err = recv::<_, Request>(&mut buf.as_slice(), FrameKind::Request).unwrap_err();
        assert!(matches!(err, DecodeError::TrailingBytes(1)), "{err:?}");
        let mut buf = Vec::new();
        send(&mut buf, FrameKind::Request, &hello(), &[]).unwrap();
        buf[7] = 1;
        let err = recv::<_, Request>(&mut buf.as_slice(), FrameKind::Request).unwrap_err();
        assert!(matches!(err, DecodeError::Reserved(1)), "{err:?}");
    }

    #[test]
    fn a_truncated_prelude_counts_every_byte() {
        let mut buf = Vec::new();
        send(&mut buf, FrameKind::Request, &hello(), &[]).unwrap();
        let err = recv::<_, Request>(&mut &buf[..5], FrameKind::Request).unwrap_err();
        assert!(matches!(err, DecodeError::Truncated { part: "prelude", needed: 20, got: 5 }), "{err:?}");
    }

    #[test]
    fn garbage_payload_is_a_decode_error() {
        let garbage = [0xffu8; 16];
        let mut buf = Vec::new();
        write_frame(&mut buf, FrameKind::Request, &garbage, &[]).unwrap();
        let err = recv::<_, Request>(&mut buf.as_slice(), FrameKind::Request).unwrap_err();
        assert!(matches!(err, DecodeError::Payload(_)), "{err:?}");
    }

    #[test]
    fn bulk_must_match_declared_arrays() {
        let refs = [
            ArrayRef::Inline { dtype: DType::F64, shape: vec![2, 3] },
            ArrayRef::Inline { dtype: DType::F32, shape: vec![5] },
        ];
        assert!(check_bulk(&refs, 48 + 20).is_ok());
        let err = check_bulk(&refs, 48 + 19).unwrap_err();
        assert!(matches!(err, DecodeError::BulkMismatch { declared: 68, actual: 67 }), "{err:?}");
        let huge = [ArrayRef::Inline { dtype: DType::F64, shape: vec![u64::MAX, 2] }];
        assert!(matches!(check_bulk(&huge, 16), Err(DecodeError::BulkMismatch { .. })));
    }

    /// The answer of docs/protocol.md's worked example ("Its answer"), its
    /// one array as `array` says.
    fn documented_answer(array: ArrayRef) -> Reply {
        Reply::Results(Results {
            tasks: vec![TaskReply {
                index: 0,
                started_ns: 1300,
                finished_ns: 2300,
                outcome: Outcome::Ok { output: Payload::from(vec![0, 0]), arrays: vec![array] },
            }],
            memory_follows: true,
            received_ns: 1000,
            mapped_ns: 1200,
            replying_ns: 2400,
        })
    }

    /// The worked example of docs/protocol.md ("Its answer"): the answer to
    /// a batch, then the memory snapshot that follows it, byte for byte.
    #[test]
    fn the_documented_answer_and_memory_frames() {
        let hex = |bytes: &[u8]| bytes.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(" ");
        let results = documented_answer(ArrayRef::Inline { dtype: DType::F64, shape: vec![1, 1] });
        let mut frame = Vec::new();
        send(&mut frame, FrameKind::Reply, &results, &[&11.0f64.to_le_bytes()]).unwrap();
        assert_eq!(
            hex(&frame),
            "50 4a 4f 42 08 00 02 00 18 00 00 00 08 00 00 00 00 00 00 00 \
             02 01 00 94 0a fc 11 00 02 00 00 01 00 01 02 01 01 01 e8 07 \
             b0 09 e0 12 00 00 00 00 00 00 26 40"
        );
        let memory = Reply::Memory(MemorySnapshot { peak_rss: 4096, uss: 0, pss: 0 });
        let mut frame = Vec::new();
        send(&mut frame, FrameKind::Reply, &memory, &[]).unwrap();
        assert_eq!(hex(&frame), "50 4a 4f 42 08 00 02 00 05 00 00 00 00 00 00 00 00 00 00 00 03 80 20 00 00");
    }

    /// The worked examples of docs/protocol.md ("A lent answer", "A
    /// handshake answer"): the same answer with its array lent at 4096
    /// instead of in the bulk, the `Lending` request that gives it back,
    /// and a `Ready`, byte for byte.
    #[test]
    fn the_documented_lent_answer_lending_request_and_ready() {
        let hex = |bytes: &[u8]| bytes.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(" ");
        let results = documented_answer(ArrayRef::Lent { dtype: DType::F64, shape: vec![1, 1], address: 4096 });
        let mut frame = Vec::new();
        send(&mut frame, FrameKind::Reply, &results, &[]).unwrap();
        assert_eq!(
            hex(&frame),
            "50 4a 4f 42 08 00 02 00 1a 00 00 00 00 00 00 00 00 00 00 00 \
             02 01 00 94 0a fc 11 00 02 00 00 01 03 01 02 01 01 80 20 01 \
             e8 07 b0 09 e0 12"
        );
        let mut frame = Vec::new();
        send(&mut frame, FrameKind::Request, &Request::Lending { read: 1 }, &[]).unwrap();
        assert_eq!(hex(&frame), "50 4a 4f 42 08 00 01 00 02 00 00 00 00 00 00 00 00 00 00 00 03 01");
        let ready = Reply::Ready(Ready {
            protocol: PROTOCOL_VERSION,
            pid: 4711,
            same_binary: true,
            memory: MemorySnapshot { peak_rss: 2555904, uss: 167936, pss: 696320 },
            lend_probe: 4096,
        });
        let mut frame = Vec::new();
        send(&mut frame, FrameKind::Reply, &ready, &[]).unwrap();
        assert_eq!(
            hex(&frame),
            "50 4a 4f 42 08 00 02 00 11 00 00 00 00 00 00 00 00 00 00 00 \
             00 08 e7 24 01 80 80 9c 01 80 a0 0a 80 c0 2a 80 20"
        );
    }

    /// Every dtype travels as its variant index (the original three keep
    /// 0–2, as docs/protocol.md lists them), and an index past the last is
    /// a decode error, not a dtype.
    #[test]
    fn dtypes_travel_as_their_variant_index() {
        let order = [
            DType::I64,
            DType::F64,
            DType::F32,
            DType::I8,
            DType::I16,
            DType::I32,
            DType::U8,
            DType::U16,
            DType::U32,
            DType::U64,
            DType::Bool,
            DType::C64,
            DType::C128,
        ];
        assert_eq!(order.len(), DType::ALL.len());
        for (index, dtype) in order.into_iter().enumerate() {
            let bytes = postcard::to_stdvec(&dtype).unwrap();
            assert_eq!(bytes, vec![index as u8], "{dtype}");
            assert_eq!(postcard::from_bytes::<DType>(&bytes).unwrap(), dtype);
            let r = ArrayRef::Inline { dtype, shape: vec![3, 5] };
            assert_eq!(r.nbytes(), Some(15 * dtype.size() as u64));
            assert_eq!(postcard::from_bytes::<ArrayRef>(&postcard::to_stdvec(&r).unwrap()).unwrap(), r);
        }
        assert!(postcard::from_bytes::<DType>(&[order.len() as u8]).is_err());
    }
}
