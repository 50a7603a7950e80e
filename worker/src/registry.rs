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

pub use crate::protocol::BinaryId;
use crate::task::{entry, ErasedEntry, Task};

/// The offset that names task `T` in this executable: that of its entry
/// descriptor ([`crate::entry::offset_of`]); `None` where the platform does
/// not tell where the image lies, so the task goes by name.
pub fn entry_offset<T: Task>() -> Option<i64> {
    crate::entry::offset_of::<T>()
}

/// Task kinds a worker runs by name.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    by_name: HashMap<&'static str, ErasedEntry>,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Registry {
        Registry::default()
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
