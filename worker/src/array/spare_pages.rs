//! Page reuse for products' outputs: the pages an earlier output gave
//! back serve [`Array::try_for_overwrite`], a few mappings per thread, taken
//! by exact length. They come back two ways: when such an output is
//! dropped on a thread that recycles (every thread but a serve loop's; under
//! [`DROPPED_KEPT_BELOW`] bytes), as glibc's heap keeps numpy's freed
//! arrays for the next; and by [`Array::put_back_pages`], which a serve loop
//! calls once nothing outside the worker reads the pages any more.

use std::cell::{Cell, RefCell};
use std::sync::Arc;

use super::storage::{Owned, Pages, Storage};
use super::{Array, ArrayError};
use crate::dtype::DType;

/// At most this many mappings are kept, the newest (a batch rarely
/// returns more than one large block, and a caller of `dot` rarely holds
/// more than its last two results).
pub(crate) const KEEP: usize = 2;

/// A dropped output smaller than this is kept for reuse; a larger one goes
/// back to the system at once. glibc's largest threshold for serving an
/// allocation from its heap rather than a mapping of its own (32 MiB on
/// 64-bit; an array of exactly 32 MiB, 2048² `f64`, is above it with the
/// chunk's header), so no more than numpy's allocator keeps of its freed
/// arrays.
pub(crate) const DROPPED_KEPT_BELOW: usize = 32 << 20;

thread_local! {
    static SPARES: RefCell<Vec<memmap2::MmapMut>> = const { RefCell::new(Vec::new()) };
    /// Whether outputs dropped on this thread give their pages to `SPARES`.
    static RECYCLING: Cell<bool> = const { Cell::new(true) };
}

pub(super) fn take(bytes: usize) -> Option<memmap2::MmapMut> {
    SPARES.with_borrow_mut(|spares| {
        let at = spares.iter().position(|m| m.len() == bytes)?;
        Some(spares.swap_remove(at))
    })
}

/// Keeps `map` for reuse, in place of the oldest one kept when `KEEP` are.
pub(super) fn put(map: memmap2::MmapMut) {
    // `try_`: an array dropped while this thread's locals are torn down
    // just goes.
    let _ = SPARES.try_with(|spares| {
        if let Ok(mut spares) = spares.try_borrow_mut() {
            if spares.len() >= KEEP {
                spares.remove(0);
            }
            spares.push(map);
        }
    });
}

/// Whether outputs dropped on this thread are kept for reuse (false while
/// it serves, see [`NoRecycling`]).
pub(crate) fn recycles_here() -> bool {
    RECYCLING.try_with(Cell::get).unwrap_or(false)
}

/// The pages of an output dropped on this thread: kept for reuse when this
/// thread recycles and they are under [`DROPPED_KEPT_BELOW`] bytes,
/// otherwise unmapped.
pub(super) fn dropped(map: memmap2::MmapMut) {
    if map.len() < DROPPED_KEPT_BELOW && recycles_here() {
        put(map);
    }
}

pub(super) fn clear() {
    let _ = SPARES.try_with(|spares| spares.borrow_mut().clear());
}

/// While alive, outputs dropped on this thread give their pages back to
/// the system rather than to the spares: for a serve loop, whose results
/// may still be read out of its memory after it lets go of them (from a
/// pipe that holds their pages by reference, or by address). Those come
/// back only through [`Array::put_back_pages`], once nothing reads them.
/// Starting it also drops the spares this thread holds: a forked worker's
/// would be its coordinator's pages, copied on the first write.
pub(crate) struct NoRecycling {
    was: bool,
    /// Ended on the thread it began on (not `Send`).
    _here: std::marker::PhantomData<*const ()>,
}

impl NoRecycling {
    pub(crate) fn begin() -> NoRecycling {
        clear();
        NoRecycling { was: RECYCLING.replace(false), _here: std::marker::PhantomData }
    }
}

impl Drop for NoRecycling {
    fn drop(&mut self) {
        let _ = RECYCLING.try_with(|on| on.set(self.was));
    }
}

/// How many large results a worker keeps for reuse (see
/// [`Array::put_back_pages`]).
pub(crate) const SPARES_KEPT: usize = KEEP;

impl Array {
    /// An owned array for a caller that overwrites every element before
    /// reading any: its initial elements are unspecified (zeros, or the
    /// elements of an earlier array of this thread).
    ///
    /// A large one (pages of its own, see [`Array::zeros`]) takes the pages
    /// of an earlier output of the same byte size that this thread dropped
    /// or put back (module docs) — a worker's next 16 MB block then skips
    /// the 2.5–3 ms of faulting in and zeroing fresh pages, as numpy's next
    /// product reuses the memory its last one freed — and offers its own
    /// when dropped. Any other array is [`Array::zeros`]. In debug builds
    /// reused pages are first filled with `0xFF` bytes (NaN, or -1 for `i64`), so that a
    /// caller that stops overwriting everything shows in the tests.
    ///
    /// Fallible as [`Array::try_zeros`]: a task's output shape comes from
    /// its inputs (`A[2²⁰, 0] · B[0, 2²⁰]` asks for 8 TiB from 0 bytes).
    pub(crate) fn try_for_overwrite(dtype: DType, shape: impl Into<Vec<usize>>) -> Result<Array, ArrayError> {
        let shape = shape.into();
        let bytes = dtype.nbytes(&shape).ok_or_else(|| ArrayError::too_large(dtype, &shape))?;
        let mut out = match take(bytes) {
            Some(mut map) => {
                if cfg!(debug_assertions) {
                    map.fill(0xFF);
                }
                Array { dtype, shape, storage: Arc::new(Storage::Owned(Owned::Pages(Pages::new(map)))), offset: 0 }
            }
            None => Array::try_zeros(dtype, shape)?,
        };
        if let Some(Storage::Owned(Owned::Pages(pages))) = Arc::get_mut(&mut out.storage) {
            pages.recycle_when_dropped();
        }
        Ok(out)
    }

    /// Puts this array's pages back for the next [`Array::try_for_overwrite`]
    /// of the same byte size, when it is their sole owner (see
    /// [`Array::is_sole_owner_of_pages`]); otherwise simply drops it.
    ///
    /// Only for pages nothing outside this process reads any more: a
    /// result handed to a pipe by reference (`vmsplice`) is put back once
    /// that pipe is empty, never before — the next result would be written
    /// into pages the reader has yet to copy.
    pub(crate) fn put_back_pages(self) {
        if !self.is_sole_owner_of_pages() {
            return;
        }
        if let Ok(Storage::Owned(Owned::Pages(pages))) = Arc::try_unwrap(self.storage) {
            put(pages.into_map());
        }
    }

    /// Gives the pages this thread keeps for its next product's result back
    /// to the system. A product's result (`procjob::tasks::dot`, the
    /// matmul tasks) of 4 MiB to under 32 MiB keeps its pages for the next
    /// result of its byte size when dropped, as glibc's heap keeps numpy's
    /// freed arrays; at most the two newest, on the thread that dropped
    /// them, until it exits or calls this.
    pub fn drop_spare_pages() {
        clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pages put back serve the next `for_overwrite` of the same byte size
    /// on this thread, whatever its dtype and shape, once; other sizes,
    /// shared arrays and arrays too small for pages of their own start from
    /// zeros. (Taken pages hold their old elements, or in debug builds the
    /// `0xFF` marker: either way not zeros.)
    #[test]
    fn for_overwrite_takes_pages_put_back_by_byte_size() {
        // As in a serve loop: pages come back only when put back.
        let _explicit_only = NoRecycling::begin();
        let len = crate::array::HUGE_PAGE_THRESHOLD / 8 + 2000;
        let filled = |len: usize| {
            let mut a = Array::zeros(DType::F64, vec![len]);
            a.as_mut_slice::<f64>().unwrap().fill(3.0);
            a
        };
        let zeros = |a: &Array| a.as_bytes().iter().all(|&b| b == 0);
        filled(len).put_back_pages();
        assert!(zeros(&Array::try_for_overwrite(DType::F64, vec![len + 1]).unwrap()), "another size");
        let reused = Array::try_for_overwrite(DType::I64, vec![len]).unwrap();
        assert_eq!((reused.dtype(), reused.shape()), (DType::I64, &[len][..]));
        assert!(!zeros(&reused), "the pages put back were not taken");
        if !cfg!(debug_assertions) {
            assert_eq!(reused.as_bytes(), filled(len).as_bytes(), "the pages put back, as they were");
        }
        drop(reused);
        assert!(zeros(&Array::try_for_overwrite(DType::F64, vec![len]).unwrap()), "taken only once");
        let shared = filled(len);
        let _other_view = shared.clone();
        shared.put_back_pages();
        assert!(zeros(&Array::try_for_overwrite(DType::F64, vec![len]).unwrap()), "a shared array's pages");
        Array::from_vec(vec![3], vec![1.0f64; 3]).put_back_pages();
        assert!(zeros(&Array::try_for_overwrite(DType::F64, vec![3]).unwrap()), "a small array");
        Array::drop_spare_pages();
    }

    /// Whether `for_overwrite` of `bytes` bytes took pages given back
    /// (their first element is not the zero of fresh pages: the old
    /// element, or in debug builds the `0xFF` marker).
    fn reuses(bytes: usize) -> bool {
        let a = Array::try_for_overwrite(DType::U8, vec![bytes]).unwrap();
        let reused = a.as_bytes()[0] != 0;
        let was = RECYCLING.replace(false); // not given back again
        drop(a);
        RECYCLING.set(was);
        reused
    }

    /// An output of `bytes` bytes with a first element that is not zero.
    fn output(bytes: usize) -> Array {
        let mut a = Array::try_for_overwrite(DType::U8, vec![bytes]).unwrap();
        a.as_mut_slice::<u8>().unwrap()[0] = 7;
        a
    }

    /// A product's output dropped on an ordinary thread gives its pages to
    /// the next output of its byte size, under `DROPPED_KEPT_BELOW` bytes
    /// and the newest `KEEP` of them; other arrays, and larger outputs, give
    /// theirs back to the system.
    #[test]
    fn dropped_outputs_serve_the_next_ones() {
        let len = crate::array::HUGE_PAGE_THRESHOLD + 4096;
        drop(output(len));
        assert!(reuses(len), "a dropped output's pages were not reused");
        assert!(!reuses(len), "taken only once");
        let mut zeros = Array::zeros(DType::U8, vec![len]);
        zeros.as_mut_slice::<u8>().unwrap()[0] = 7;
        drop(zeros);
        assert!(!reuses(len), "an array not made for overwriting gave its pages");
        drop(output(DROPPED_KEPT_BELOW));
        assert!(!reuses(DROPPED_KEPT_BELOW), "an output at the limit was kept");
        drop(output(DROPPED_KEPT_BELOW - 4096));
        assert!(reuses(DROPPED_KEPT_BELOW - 4096), "an output under the limit was not kept");
        let sizes = [len, len + 4096, len + 8192];
        sizes.iter().for_each(|&n| drop(output(n)));
        assert!(!reuses(sizes[0]), "more than KEEP kept, or not the newest");
        assert!(reuses(sizes[1]) && reuses(sizes[2]), "the newest were not kept");
        Array::drop_spare_pages();
    }

    /// While a serve loop's `NoRecycling` lives, dropped outputs give their
    /// pages back to the system; starting it drops the spares the thread
    /// held (a forked worker's copy of its coordinator's); afterwards
    /// dropping recycles again.
    #[test]
    fn a_serve_loop_does_not_recycle_what_it_drops() {
        let len = crate::array::HUGE_PAGE_THRESHOLD + 4096;
        drop(output(len));
        {
            let _serving = NoRecycling::begin();
            assert!(!reuses(len), "the spares held before serving survived");
            drop(output(len));
            assert!(!reuses(len), "an output dropped while serving was kept");
            output(len).put_back_pages();
            assert!(reuses(len), "an output put back while serving was not kept");
        }
        drop(output(len));
        assert!(reuses(len), "recycling did not resume after serving");
        Array::drop_spare_pages();
    }
}
