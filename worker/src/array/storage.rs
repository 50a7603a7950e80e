//! Where an array's bytes live: owned buffers aligned for their dtype (large
//! ones on pages of their own, advised as huge pages) or a mapped file.

use super::mapping::Mapping;
use crate::dtype::{DType, Element};

/// Owned arrays at least this large get pages of their own, advised as
/// transparent huge pages (numpy's threshold too: it advises
/// `MADV_HUGEPAGE` from 4 MiB on).
pub const HUGE_PAGE_THRESHOLD: usize = 4 << 20;

/// Owned element storage, held as words of the dtype's alignment (so a
/// `Vec<T>` of any element type is kept without a copy, and its bytes are
/// never viewed as a type that has invalid values: a `Vec<bool>` is kept as
/// bytes, and checked when viewed as `bool` again).
pub(super) enum Owned {
    /// Elements aligned to 1 byte (`i8`, `u8`, `bool`).
    A1(Vec<u8>),
    /// Elements aligned to 2 bytes.
    A2(Vec<u16>),
    /// Elements aligned to 4 bytes (including `Complex<f32>`).
    A4(Vec<u32>),
    /// Elements aligned to 8 bytes (including `Complex<f64>`).
    A8(Vec<u64>),
    /// A large array: anonymous pages of its own (page-aligned; every bit
    /// pattern is a valid element), asked to be huge pages. Fresh and zeroed
    /// from [`Array::zeros`]; from [`Array::try_for_overwrite`], possibly the
    /// pages an earlier output gave back (dropped or put back).
    Pages(Pages),
}

/// The mapping of an [`Owned::Pages`] array, and whether dropping it offers
/// the pages for reuse (see [`Array::try_for_overwrite`]).
pub(super) struct Pages {
    /// `None` only once taken apart by [`Pages::into_map`].
    map: Option<memmap2::MmapMut>,
    /// A product's output: when dropped, its pages go to this thread's
    /// spares rather than back to the system (`spare_pages::dropped`).
    recycle: bool,
}

impl Pages {
    /// Pages given back to the system when dropped.
    pub(super) fn new(map: memmap2::MmapMut) -> Pages {
        Pages { map: Some(map), recycle: false }
    }

    /// Offers the pages for reuse when dropped.
    pub(super) fn recycle_when_dropped(&mut self) {
        self.recycle = true;
    }

    /// The mapping, taken out without being offered for reuse.
    pub(super) fn into_map(mut self) -> memmap2::MmapMut {
        self.map.take().expect("pages are taken apart once")
    }

    fn bytes(&self) -> &[u8] {
        self.map.as_deref().expect("pages are only taken apart when dropped")
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        self.map.as_deref_mut().expect("pages are only taken apart when dropped")
    }
}

impl Drop for Pages {
    fn drop(&mut self) {
        if let Some(map) = self.map.take().filter(|_| self.recycle) {
            super::spare_pages::dropped(map);
        }
    }
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
        /// `len` zeroed words, by the allocator (`calloc`: fresh pages are
        /// zero already, so a large array costs no write pass), or `None`.
        fn alloc<W: Word>(len: usize) -> Option<Vec<W>> {
            if len == 0 {
                return Some(Vec::new());
            }
            let layout = std::alloc::Layout::array::<W>(len).ok()?;
            // SAFETY: the layout has a non-zero size (len > 0, W is not a ZST).
            let ptr = unsafe { std::alloc::alloc_zeroed(layout) }.cast::<W>();
            if ptr.is_null() {
                return None;
            }
            // SAFETY: `ptr` was allocated by the global allocator with the
            // layout of `len` W's, and all-zero bytes are a valid W (an
            // unsigned integer).
            Some(unsafe { Vec::from_raw_parts(ptr, len, len) })
        }
        let bytes = len.checked_mul(dtype.size())?;
        if bytes >= HUGE_PAGE_THRESHOLD {
            let map = memmap2::MmapMut::map_anon(bytes).ok()?;
            // Only a hint, given before the first touch: with THP off
            // nothing changes, and the contents are never affected.
            #[cfg(target_os = "linux")]
            let _ = map.advise(memmap2::Advice::HugePage);
            return Some(Owned::Pages(Pages::new(map)));
        }
        Some(match dtype.align() {
            1 => Owned::A1(alloc(bytes)?),
            2 => Owned::A2(alloc(bytes / 2)?),
            4 => Owned::A4(alloc(bytes / 4)?),
            _ => Owned::A8(alloc(bytes / 8)?),
        })
    }

    /// Keeps `v` as words of its alignment, without copying it.
    pub(super) fn from_vec<T: Element>(v: Vec<T>) -> Owned {
        match std::mem::align_of::<T>() {
            1 => Owned::A1(reinterpret(v)),
            2 => Owned::A2(reinterpret(v)),
            4 => Owned::A4(reinterpret(v)),
            8 => Owned::A8(reinterpret(v)),
            a => unreachable!("no element type is aligned to {a} bytes"),
        }
    }

    pub(super) fn bytes(&self) -> &[u8] {
        match self {
            Owned::A1(v) => v,
            Owned::A2(v) => words_as_bytes(v),
            Owned::A4(v) => words_as_bytes(v),
            Owned::A8(v) => words_as_bytes(v),
            Owned::Pages(pages) => pages.bytes(),
        }
    }

    pub(super) fn bytes_mut(&mut self) -> &mut [u8] {
        match self {
            Owned::A1(v) => v,
            Owned::A2(v) => words_as_bytes_mut(v),
            Owned::A4(v) => words_as_bytes_mut(v),
            Owned::A8(v) => words_as_bytes_mut(v),
            Owned::Pages(pages) => pages.bytes_mut(),
        }
    }
}

/// The unsigned integers owned storage is kept in: any byte pattern is one.
pub(super) trait Word: Copy + 'static {}
impl Word for u8 {}
impl Word for u16 {}
impl Word for u32 {}
impl Word for u64 {}

/// `v`'s allocation as words `W` of the same alignment, without a copy.
fn reinterpret<T: Element, W: Word>(v: Vec<T>) -> Vec<W> {
    let (size, word) = (std::mem::size_of::<T>(), std::mem::size_of::<W>());
    assert!(
        std::mem::align_of::<T>() == std::mem::align_of::<W>() && size % word == 0,
        "reinterpret between layouts that differ"
    );
    let per = size / word;
    let mut v = std::mem::ManuallyDrop::new(v);
    // SAFETY: W has T's alignment (checked), and `len × per` and `capacity ×
    // per` words span exactly the bytes of `len` and `capacity` T's, so the
    // allocation is freed with the layout it was made with. Element types
    // have no padding, so every byte of the first `len × per` words is
    // initialized, and every byte pattern is a valid W.
    unsafe { Vec::from_raw_parts(v.as_mut_ptr().cast::<W>(), v.len() * per, v.capacity() * per) }
}

fn words_as_bytes<W: Word>(v: &[W]) -> &[u8] {
    // SAFETY: words are unsigned integers without padding; any initialized
    // value may be viewed as bytes, and the length covers exactly the slice.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
}

fn words_as_bytes_mut<W: Word>(v: &mut [W]) -> &mut [u8] {
    // SAFETY: as in `words_as_bytes`; every byte pattern is a valid word,
    // so writes through the byte view cannot create invalid values.
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

#[cfg(test)]
mod tests {
    /// The `AnonHugePages` of the mapping that holds `addr`, in KiB.
    #[cfg(target_os = "linux")]
    fn huge_kib_at(addr: usize) -> u64 {
        crate::memory::smaps_kib_at(addr, "AnonHugePages:").unwrap_or(0)
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
