//! A process's memory, read from its own `/proc/self` files, and the
//! [`MemorySnapshot`] a worker reports it in (a leaf: it imports nothing of
//! this crate; the protocol re-exports the snapshot type).
//!
//! Read by the worker itself after its batches (after every one that
//! computed for a millisecond or more) and never by a sampler running
//! during the computation: sampling every 20 ms was seen to make a matrix
//! product twice as slow on the machines procjob targets. The peak RSS is
//! read afresh each time; `Snapshots` walks the page tables
//! (`smaps_rollup`) for USS and PSS only when the process's resident pages
//! moved since its last walk, or that walk is a second old: the walk's
//! cost grows with what the worker maps (docs/architecture.md, "Seeing a
//! run"), while the counters it is checked against cost microseconds. What moves USS or PSS without moving those counters —
//! another process ceasing to share a page, a copy-on-write break in a
//! forked worker — shows at the next walk, and not at all if no snapshot
//! follows a second later.

use std::time::{Duration, Instant};

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

/// The resident pages of this process, from `/proc/self/statm`: counters
/// the kernel keeps, so reading them walks nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Footprint {
    /// Resident bytes (`statm`'s second field).
    resident: u64,
    /// Resident bytes of files and shared memory (its third).
    shared: u64,
}

impl Footprint {
    /// This process's, or `None` when `statm` cannot be read.
    fn now() -> Option<Footprint> {
        let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
        let mut fields = statm.split_whitespace().skip(1).map(|f| f.parse::<u64>().ok());
        let (resident, shared) = (fields.next()??, fields.next()??);
        // statm counts pages of the base size.
        // SAFETY: sysconf has no preconditions.
        let page = u64::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).ok().filter(|&p| p > 0)?;
        Some(Footprint { resident: resident * page, shared: shared * page })
    }

    /// Whether both counters are within [`Snapshots::MOVED`] of `other`'s.
    fn near(&self, other: &Footprint) -> bool {
        self.resident.abs_diff(other.resident) <= Snapshots::MOVED
            && self.shared.abs_diff(other.shared) <= Snapshots::MOVED
    }
}

/// A worker's snapshots after its batches, each with a fresh peak RSS, and
/// USS and PSS from a walk of the page tables only when the resident pages
/// moved since the last walk or the walk is [`Snapshots::WALK_EVERY`] old;
/// otherwise the last walk's USS and PSS, which the same resident pages
/// give again unless other processes mapped or unmapped pages this one
/// shares (which the next walk catches, if a snapshot comes a second
/// later).
#[derive(Debug, Default)]
pub(crate) struct Snapshots {
    /// The last walk: when, the footprint then, and what it read.
    last: Option<(Instant, Footprint, MemorySnapshot)>,
    /// Walks so far.
    walks: u64,
}

impl Snapshots {
    /// How far a counter may move and the last walk's figures stand: 64
    /// KiB, under what a report shows (a tenth of a MiB).
    const MOVED: u64 = 64 << 10;
    /// The oldest walk whose figures are used again.
    const WALK_EVERY: Duration = Duration::from_secs(1);

    /// The figures now.
    pub(crate) fn take(&mut self) -> MemorySnapshot {
        let now = Footprint::now();
        if let (Some((at, then, figures)), Some(now)) = (&self.last, now) {
            if !walk_needed(then, &now, at.elapsed()) {
                return MemorySnapshot { peak_rss: peak_rss().max(figures.peak_rss), ..*figures };
            }
        }
        let figures = snapshot();
        self.walks += 1;
        self.last = now.map(|now| (Instant::now(), now, figures));
        figures
    }
}

/// Whether a snapshot must walk the page tables: the footprint moved from
/// the last walk's `then`, or that walk is `age` old, at least
/// [`Snapshots::WALK_EVERY`].
fn walk_needed(then: &Footprint, now: &Footprint, age: Duration) -> bool {
    age >= Snapshots::WALK_EVERY || !now.near(then)
}

/// Peak RSS of this process in bytes (`VmHWM`), 0 if unknown.
pub fn peak_rss() -> u64 {
    std::fs::read_to_string("/proc/self/status").ok().and_then(|s| field_kib(&s, "VmHWM:")).map_or(0, |k| k * 1024)
}

/// The memory the system has available for new allocations without
/// swapping (`MemAvailable` of `/proc/meminfo`), in bytes; `None` where it
/// is not known.
pub fn available() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    field_kib(&text, "MemAvailable:").map(|k| k.saturating_mul(1024))
}

/// The value of the `key` line of a `/proc` file, in KiB (the number
/// before `kB`).
pub(crate) fn field_kib(text: &str, key: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with(key))?;
    line[key.len()..].split_whitespace().next()?.parse().ok()
}

/// The `key` field (`"AnonHugePages:"`, `"ShmemPmdMapped:"`, …) of the
/// mapping in `/proc/self/smaps` that holds `addr`, in KiB (that mapping's
/// own entry, so other threads' allocations do not count); `None` when no
/// mapping holds it or the entry has no such field. For tests.
#[cfg(all(test, target_os = "linux"))]
pub(crate) fn smaps_kib_at(addr: usize, key: &str) -> Option<u64> {
    let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
    let mut inside = false;
    for line in smaps.lines() {
        // A mapping's header: `lo-hi perms offset dev inode path`.
        let range = line.split_whitespace().next().and_then(|r| r.split_once('-'));
        if let Some((Ok(lo), Ok(hi))) =
            range.map(|(lo, hi)| (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16)))
        {
            inside = (lo..hi).contains(&addr);
            continue;
        }
        if inside && line.starts_with(key) {
            return field_kib(line, key);
        }
    }
    None
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
    fn the_page_tables_are_walked_again_when_the_footprint_moved_or_a_second_passed() {
        let then = Footprint { resident: 100 << 20, shared: 60 << 20 };
        let fresh = Duration::from_millis(150);
        assert!(!walk_needed(&then, &then, fresh), "nothing moved");
        let nudged = Footprint { resident: then.resident + Snapshots::MOVED, shared: then.shared - 4096 };
        assert!(!walk_needed(&then, &nudged, fresh), "moved by no more than MOVED");
        let grown = Footprint { resident: then.resident + Snapshots::MOVED + 4096, ..then };
        assert!(walk_needed(&then, &grown, fresh), "resident grew");
        let unshared = Footprint { shared: then.shared - 16 * 4096 - 4096, ..then };
        assert!(walk_needed(&then, &unshared, fresh), "shared shrank");
        assert!(walk_needed(&then, &then, Snapshots::WALK_EVERY), "the last walk is a second old");
    }

    #[test]
    fn a_snapshot_walks_again_once_the_process_took_memory() {
        let mut snapshots = Snapshots::default();
        let first = snapshots.take();
        assert_eq!(snapshots.walks, 1, "the first snapshot walks");
        assert!(first.uss > 0 && first.pss > 0, "{first:?}");
        // 64 MiB written, so resident: the footprint moves by a thousand
        // times MOVED, and the next snapshot walks again. (Tests run on
        // other threads of this process: they can add walks, and would
        // have to free 64 MiB at this moment to take this one away.)
        let held = vec![1u8; 64 << 20];
        std::hint::black_box(&held);
        snapshots.take();
        assert!(snapshots.walks >= 2, "no walk after the process took 64 MiB");
        drop(held);
    }

    #[test]
    fn own_snapshot_is_plausible() {
        let m = snapshot();
        assert!(m.peak_rss > 0 && m.pss > 0 && m.uss > 0, "{m:?}");
        assert!(m.uss <= m.peak_rss.max(m.pss) * 2, "{m:?}");
    }
}
