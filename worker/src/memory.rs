//! A process's memory, read from its own `/proc/self` files, and the
//! [`MemorySnapshot`] a worker reports it in (a leaf: it imports nothing of
//! this crate; the protocol re-exports the snapshot type).
//!
//! Read by the worker itself after each batch and never by a sampler
//! running during the computation: sampling every 20 ms was seen to make a
//! matrix product twice as slow on the machines procjob targets.

use serde::{Deserialize, Serialize};

/// A worker's memory, read from its own `/proc/self` files.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemorySnapshot {
    /// Peak resident set size (`VmHWM`), bytes.
    pub peak_rss: u64,
    /// Unique set size now (`Private_Clean + Private_Dirty`), bytes.
    pub uss: u64,
    /// Proportional set size now (`Pss`), bytes.
    pub pss: u64,
}

impl MemorySnapshot {
    /// Raises each figure to `other`'s where that is higher: the peak of
    /// the two.
    pub fn raise_to(&mut self, other: &MemorySnapshot) {
        self.peak_rss = self.peak_rss.max(other.peak_rss);
        self.uss = self.uss.max(other.uss);
        self.pss = self.pss.max(other.pss);
    }
}

/// Reads peak RSS from `/proc/self/status` and USS and PSS from
/// `/proc/self/smaps_rollup`. Fields that cannot be read are 0.
pub fn snapshot() -> MemorySnapshot {
    let mut m = MemorySnapshot::default();
    if let Ok(status) = std::fs::read_to_string("/proc/self/status") {
        m.peak_rss = field_kib(&status, "VmHWM:").unwrap_or(0) * 1024;
    }
    if let Ok(rollup) = std::fs::read_to_string("/proc/self/smaps_rollup") {
        m.pss = field_kib(&rollup, "Pss:").unwrap_or(0) * 1024;
        m.uss = (field_kib(&rollup, "Private_Clean:").unwrap_or(0) + field_kib(&rollup, "Private_Dirty:").unwrap_or(0))
            * 1024;
    }
    m
}

/// Peak RSS of this process in bytes (`VmHWM`), 0 if unknown.
pub fn peak_rss() -> u64 {
    std::fs::read_to_string("/proc/self/status").ok().and_then(|s| field_kib(&s, "VmHWM:")).map_or(0, |k| k * 1024)
}

/// The value of the `key` line of a `/proc` file, in KiB (the number
/// before `kB`).
pub(crate) fn field_kib(text: &str, key: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with(key))?;
    line[key.len()..].split_whitespace().next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_kib_fields() {
        let text = "Name:\tx\nVmHWM:\t    1234 kB\nPss:  7 kB\n";
        assert_eq!(field_kib(text, "VmHWM:"), Some(1234));
        assert_eq!(field_kib(text, "Pss:"), Some(7));
        assert_eq!(field_kib(text, "Rss:"), None);
    }

    #[test]
    fn own_snapshot_is_plausible() {
        let m = snapshot();
        assert!(m.peak_rss > 0 && m.pss > 0 && m.uss > 0, "{m:?}");
        assert!(m.uss <= m.peak_rss.max(m.pss) * 2, "{m:?}");
    }
}
