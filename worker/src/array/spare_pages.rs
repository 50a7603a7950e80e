//! Page reuse for results: the pages [`Array::put_back_pages`] keeps for
//! [`Array::try_for_overwrite`], a few mappings per thread (the serve loop
//! runs a batch's tasks on its own thread), taken by exact length.

use std::cell::RefCell;
use std::sync::Arc;

use super::storage::{Owned, Storage};
use super::{Array, ArrayError};
use crate::dtype::DType;

/// At most this many mappings are kept (a batch rarely returns more
/// than one large block).
pub(crate) const KEEP: usize = 2;

thread_local! {
    static SPARES: RefCell<Vec<memmap2::MmapMut>> = const { RefCell::new(Vec::new()) };
}

pub(super) fn take(bytes: usize) -> Option<memmap2::MmapMut> {
    SPARES.with_borrow_mut(|spares| {
        let at = spares.iter().position(|m| m.len() == bytes)?;
        Some(spares.swap_remove(at))
    })
}

pub(super) fn put(map: memmap2::MmapMut) {
    SPARES.with_borrow_mut(|spares| {
        if spares.len() < KEEP {
            spares.push(map);
        }
    });
}

pub(super) fn clear() {
    SPARES.with_borrow_mut(Vec::clear);
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
    /// of an earlier result of the same byte size when this thread's serve
    /// loop has put them back (`Array::put_back_pages`) — a worker's next
    /// 16 MB block then skips the 2.5–3 ms of faulting in and zeroing fresh
    /// pages, as numpy's next product reuses the memory its last one freed.
    /// Any other array is [`Array::zeros`]. In debug builds reused pages
    /// are first filled with `0xFF` bytes (NaN, or -1 for `i64`), so that a
    /// caller that stops overwriting everything shows in the tests.
    ///
    /// Fallible as [`Array::try_zeros`]: a task's output shape comes from
    /// its inputs (`A[2²⁰, 0] · B[0, 2²⁰]` asks for 8 TiB from 0 bytes).
    pub(crate) fn try_for_overwrite(dtype: DType, shape: impl Into<Vec<usize>>) -> Result<Array, ArrayError> {
        let shape = shape.into();
        let bytes = dtype.nbytes(&shape).ok_or_else(|| ArrayError::too_large(dtype, &shape))?;
        match super::spare_pages::take(bytes) {
            Some(mut map) => {
                if cfg!(debug_assertions) {
                    map.fill(0xFF);
                }
                Ok(Array { dtype, shape, storage: Arc::new(Storage::Owned(Owned::Pages(map))), offset: 0 })
            }
            None => Array::try_zeros(dtype, shape),
        }
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
        if let Ok(Storage::Owned(Owned::Pages(map))) = Arc::try_unwrap(self.storage) {
            super::spare_pages::put(map);
        }
    }

    /// Drops the pages put back on this thread and not taken since.
    pub(crate) fn drop_spare_pages() {
        super::spare_pages::clear();
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
}
