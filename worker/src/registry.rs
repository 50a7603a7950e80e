//! Which task kinds a worker can run, and how a task names its code.
//!
//! A task travels with its name and, when the coordinator is this same
//! executable, the offset of its entry descriptor from the image's load
//! address ([`entry_offset`]; see [`crate::entry`]). Address-space
//! randomisation moves the whole image, not the distance from its start,
//! so a worker that has checked it is the coordinator's own executable
//! ([`BinaryId`]) can run any [`Task`] type the coordinator names, with no
//! registration — the mechanism procspawn uses — and it calls the offset
//! only after proving it names a descriptor of the kind the batch names. A
//! worker that is another executable (the standalone `procjob-worker`) runs
//! only the tasks in its [`Registry`], by name.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;

use serde::{Deserialize, Serialize};

use crate::task::{entry, ErasedEntry, Task};

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

#[inline(never)]
fn anchor(_: &[u8], _: Vec<crate::array::Array>) -> crate::task::ErasedOutcome {
    crate::task::ErasedOutcome::failed(crate::protocol::FailureCause::Setup, "anchor".into())
}

#[inline(never)]
fn second_anchor() -> u64 {
    std::hint::black_box(42)
}

fn anchor_addr() -> usize {
    anchor as ErasedEntry as usize
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

/// The offset that names task `T` in this executable: that of its entry
/// descriptor ([`crate::entry::offset_of`]); `None` where the platform does
/// not tell where the image lies, so the task goes by name.
pub fn entry_offset<T: Task>() -> Option<i64> {
    crate::entry::offset_of::<T>()
}

/// Task kinds a worker runs by name.
#[derive(Clone, Default)]
pub struct Registry {
    by_name: HashMap<&'static str, ErasedEntry>,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Registry {
        Registry::default()
    }

    /// The task kinds built into procjob: the matrix product, and under the
    /// `test-tasks` feature the misbehaving kinds of the failure tests.
    pub fn builtin() -> Registry {
        let r = Registry::new().with::<crate::matmul::MatmulBlock>().with::<crate::matmul::Dot>();
        #[cfg(feature = "test-tasks")]
        let r = crate::testkinds::register(r);
        r
    }

    /// Adds task `T` under [`Task::name`].
    pub fn with<T: Task>(mut self) -> Registry {
        self.by_name.insert(T::name(), entry::<T>);
        self
    }

    /// The entry registered under `name`.
    pub fn get(&self, name: &str) -> Option<ErasedEntry> {
        self.by_name.get(name).copied()
    }

    /// Registered names, sorted.
    pub fn names(&self) -> Vec<&'static str> {
        let mut v: Vec<_> = self.by_name.keys().copied().collect();
        v.sort_unstable();
        v
    }
}
