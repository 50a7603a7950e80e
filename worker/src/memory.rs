//! A process's memory, read from its own `/proc/self` files.
//!
//! Read by the worker itself after each batch and never by a sampler
//! running during the computation: sampling every 20 ms was seen to make a
//! matrix product twice as slow on the machines procjob targets.

use crate::protocol::MemorySnapshot;

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

fn field_kib(text: &str, key: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with(key))?;
    line[key.len()..].split_whitespace().next()?.parse().ok()
}

/// Arrays at least this large ask for transparent huge pages (numpy's
/// threshold too: it advises `MADV_HUGEPAGE` from 4 MiB on).
pub const HUGE_PAGE_THRESHOLD: usize = 4 << 20;

/// Asks Linux to back the anonymous memory at `ptr..ptr + len` with
/// transparent huge pages (`MADV_HUGEPAGE`) when its pages are first
/// touched, if `len` reaches [`HUGE_PAGE_THRESHOLD`]. Fewer page faults
/// when a large buffer is first written, and fewer TLB misses when a
/// kernel walks it with a large stride. Only a hint: with THP off, or
/// elsewhere than Linux, nothing happens, and the contents never change.
pub fn advise_huge_pages(ptr: *const u8, len: usize) {
    #[cfg(target_os = "linux")]
    if len >= HUGE_PAGE_THRESHOLD {
        let page = 4096usize;
        let start = (ptr as usize).next_multiple_of(page);
        let end = (ptr as usize + len) & !(page - 1);
        if end > start {
            // SAFETY: the range lies inside memory the caller owns;
            // MADV_HUGEPAGE only changes how the kernel backs it, never
            // what it holds.
            unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE) };
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (ptr, len);
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
