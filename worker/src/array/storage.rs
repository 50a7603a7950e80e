//! Where an array's bytes live: owned, 8-byte-aligned buffers (large ones
//! on pages of their own, advised as huge pages) or a mapped file, and the
//! safe byte views of element slices.

use super::mapping::Mapping;
use crate::dtype::{DType, Element};

/// Owned arrays at least this large get pages of their own, advised as
/// transparent huge pages (numpy's threshold too: it advises
/// `MADV_HUGEPAGE` from 4 MiB on).
pub const HUGE_PAGE_THRESHOLD: usize = 4 << 20;

/// Owned, 8-byte-aligned element storage.
pub(super) enum Owned {
    I64(Vec<i64>),
    F64(Vec<f64>),
    F32(Vec<f32>),
    /// A large array: anonymous pages of its own (page-aligned; every bit
    /// pattern is a valid element), asked to be huge pages. Fresh and zeroed
    /// from [`Array::zeros`]; from [`Array::try_for_overwrite`], possibly the
    /// pages of an earlier array put back.
    Pages(memmap2::MmapMut),
}

impl Owned {
    /// `len` zeros of `dtype` (`len × dtype.size()` already checked to be
    /// at most `isize::MAX`); aborts like `vec!` when the memory cannot be
    /// had.
    pub(super) fn zeroed(dtype: DType, len: usize) -> Owned {
        Owned::try_zeroed(dtype, len).unwrap_or_else(|| {
            let bytes = len.saturating_mul(dtype.size()).min(isize::MAX as usize & !7);
            std::alloc::handle_alloc_error(std::alloc::Layout::from_size_align(bytes, 8).expect("valid layout"))
        })
    }

    /// `len` zeros of `dtype`, or `None` when the memory cannot be had.
    ///
    /// From [`HUGE_PAGE_THRESHOLD`](HUGE_PAGE_THRESHOLD) on,
    /// a mapping of fresh anonymous pages advised as transparent huge pages,
    /// as numpy's large arrays are: a 2000 × 2000 result is then first
    /// written with a few dozen page faults instead of 8,000, and a GEMM
    /// writing it measured 1–8 % faster. A mapping of its own, because the
    /// advice only takes effect on pages not yet touched, and the allocator
    /// may hand back recycled, already-touched heap memory.
    pub(super) fn try_zeroed(dtype: DType, len: usize) -> Option<Owned> {
        /// Zeroed by the allocator (`calloc`: fresh pages are zero
        /// already, so a large array costs no write pass), or `None`.
        fn alloc<T: Element>(len: usize) -> Option<Vec<T>> {
            if len == 0 {
                return Some(Vec::new());
            }
            let layout = std::alloc::Layout::array::<T>(len).ok()?;
            // SAFETY: the layout has a non-zero size (len > 0, T is not a ZST).
            let ptr = unsafe { std::alloc::alloc_zeroed(layout) }.cast::<T>();
            if ptr.is_null() {
                return None;
            }
            // SAFETY: `ptr` was allocated by the global allocator with the
            // layout of `len` T's, and all-zero bytes are a valid T
            // (Element types are plain numbers).
            Some(unsafe { Vec::from_raw_parts(ptr, len, len) })
        }
        let bytes = len.checked_mul(dtype.size())?;
        if bytes >= HUGE_PAGE_THRESHOLD {
            let map = memmap2::MmapMut::map_anon(bytes).ok()?;
            // Only a hint, given before the first touch: with THP off
            // nothing changes, and the contents are never affected.
            #[cfg(target_os = "linux")]
            let _ = map.advise(memmap2::Advice::HugePage);
            return Some(Owned::Pages(map));
        }
        Some(match dtype {
            DType::I64 => Owned::I64(alloc(len)?),
            DType::F64 => Owned::F64(alloc(len)?),
            DType::F32 => Owned::F32(alloc(len)?),
        })
    }

    pub(super) fn bytes(&self) -> &[u8] {
        match self {
            Owned::I64(v) => as_bytes(v),
            Owned::F64(v) => as_bytes(v),
            Owned::F32(v) => as_bytes(v),
            Owned::Pages(map) => map,
        }
    }

    pub(super) fn bytes_mut(&mut self) -> &mut [u8] {
        match self {
            Owned::I64(v) => as_bytes_mut(v),
            Owned::F64(v) => as_bytes_mut(v),
            Owned::F32(v) => as_bytes_mut(v),
            Owned::Pages(map) => map,
        }
    }
}

pub(super) fn as_bytes<T: Element>(v: &[T]) -> &[u8] {
    // SAFETY: Element types are plain numbers without padding; any initialized
    // value may be viewed as bytes, and the length covers exactly the slice.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
}

pub(super) fn as_bytes_mut<T: Element>(v: &mut [T]) -> &mut [u8] {
    // SAFETY: as in `as_bytes`; every byte pattern is a valid Element, so
    // writes through the byte view cannot create invalid values.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
}

pub(super) enum Storage {
    Owned(Owned),
    Mapped(Mapping),
}

impl Storage {
    pub(super) fn bytes(&self) -> &[u8] {
        match self {
            Storage::Owned(o) => o.bytes(),
            Storage::Mapped(m) => {
                // SAFETY: the mapping lives as long as `self`; the file is
                // procjob's own temp file or a user file mapped in place, which
                // the contract of `Array::open_npy` says must not shrink while
                // mapped.
                unsafe { std::slice::from_raw_parts(m.raw().as_ptr(), m.raw().len()) }
            }
        }
    }
}

pub(super) fn downcast<T: Element, U: Element>(v: Vec<T>) -> Vec<U> {
    assert_eq!(T::DTYPE, U::DTYPE, "downcast between different element types");
    let mut v = std::mem::ManuallyDrop::new(v);
    // SAFETY: T and U have the same DType, and the sealed Element trait maps
    // each DType to exactly one Rust type, so T and U are the same type.
    unsafe { Vec::from_raw_parts(v.as_mut_ptr().cast::<U>(), v.len(), v.capacity()) }
}

#[cfg(test)]
mod tests {
    /// The `AnonHugePages` of the mapping in `/proc/self/smaps` that holds
    /// `addr`, in KiB.
    #[cfg(target_os = "linux")]
    fn huge_kib_at(addr: usize) -> u64 {
        let smaps = std::fs::read_to_string("/proc/self/smaps").expect("smaps");
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
            if inside && line.starts_with("AnonHugePages:") {
                return crate::memory::field_kib(line, "AnonHugePages:").unwrap_or(0);
            }
        }
        0
    }

    /// With THP in `madvise` mode (or `always`), a large zeroed array is
    /// backed by huge pages once written; with THP off there is nothing to
    /// see.
    #[cfg(target_os = "linux")]
    #[test]
    fn large_arrays_get_huge_pages() {
        let read =
            |f: &str| std::fs::read_to_string(format!("/sys/kernel/mm/transparent_hugepage/{f}")).unwrap_or_default();
        let (mode, defrag) = (read("enabled"), read("defrag"));
        if !(mode.contains("[madvise]") || mode.contains("[always]")) {
            eprintln!("skipped: transparent huge pages are off ({})", mode.trim());
            return;
        }
        // Without direct compaction for advised regions, a huge page is only
        // had when one happens to be free: nothing to assert.
        if !(defrag.contains("[madvise]") || defrag.contains("[always]") || defrag.contains("[defer+madvise]")) {
            eprintln!("skipped: THP defrag is {}, huge pages are not guaranteed", defrag.trim());
            return;
        }
        let mut array = crate::Array::zeros(crate::DType::F64, vec![1024, 1024]); // 8 MiB
        let data = array.as_mut_slice::<f64>().expect("owned f64");
        data.fill(1.0);
        let huge = huge_kib_at(data.as_ptr() as usize + data.len() * 4);
        assert!(huge >= 2048, "an 8 MiB array has {huge} KiB in huge pages");
    }
}
