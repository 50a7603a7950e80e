//! Views and reshaping: row slices, `np.array_split` and `np.vstack`
//! along the first axis, reshape, views of a storage at an offset, and a
//! matrix's rows as typed slices ([`Rows`]). A view shares its storage
//! with the array it came from.

use std::ops::Range;
use std::sync::Arc;

use super::error::checked_len;
use super::storage::Storage;
use super::value::product;
use super::{Array, ArrayError};
use crate::dtype::{DType, Element};

impl Array {
    /// A view of rows `range` (along the first axis), sharing storage.
    pub fn rows(&self, range: Range<usize>) -> Result<Array, ArrayError> {
        let Some((&n_rows, rest)) = self.shape.split_first() else {
            return Err(ArrayError::Shape("a 0-dimensional array has no rows".into()));
        };
        if range.start > range.end || range.end > n_rows {
            return Err(ArrayError::Shape(format!("rows {range:?} out of range for {n_rows} rows")));
        }
        let row_bytes = product(rest) * self.dtype.size();
        let mut shape = self.shape.clone();
        shape[0] = range.end - range.start;
        Ok(Array {
            dtype: self.dtype,
            shape,
            storage: Arc::clone(&self.storage),
            offset: self.offset + range.start * row_bytes,
        })
    }

    /// Splits along the first axis into `sections` views as
    /// `np.array_split` does: the first `len % sections` get one row more.
    /// `sections` must be at least 1.
    pub fn array_split(&self, sections: usize) -> Result<Vec<Array>, ArrayError> {
        let Some(&n) = self.shape.first() else {
            return Err(ArrayError::Shape("a 0-dimensional array cannot be split".into()));
        };
        if sections == 0 {
            return Err(ArrayError::Shape("cannot split into 0 sections".into()));
        }
        let (base, extra) = (n / sections, n % sections);
        let mut start = 0;
        (0..sections)
            .map(|i| {
                let len = base + usize::from(i < extra);
                start += len;
                self.rows(start - len..start)
            })
            .collect()
    }

    /// Stacks arrays along the first axis into a new owned array, as
    /// `np.vstack` does for arrays of two or more dimensions. All must have
    /// the same dtype and the same shape after the first axis.
    pub fn vstack(parts: &[Array]) -> Result<Array, ArrayError> {
        let Some(first) = parts.first() else {
            return Err(ArrayError::Shape("nothing to stack".into()));
        };
        let Some((_, rest)) = first.shape.split_first() else {
            return Err(ArrayError::Shape("cannot stack 0-dimensional arrays".into()));
        };
        let mut rows: usize = 0;
        for p in parts {
            if p.dtype != first.dtype || p.shape.get(1..) != Some(rest) {
                return Err(ArrayError::Shape(format!(
                    "cannot stack {} {:?} onto {} {:?}",
                    p.dtype, p.shape, first.dtype, first.shape
                )));
            }
            rows = rows.checked_add(p.shape[0]).ok_or_else(|| {
                let mut shape = first.shape.clone();
                shape[0] = usize::MAX;
                ArrayError::too_large(first.dtype, &shape)
            })?;
        }
        let mut shape = first.shape.clone();
        shape[0] = rows;
        let mut out = Array::try_zeros(first.dtype, shape)?;
        let storage = Arc::get_mut(&mut out.storage).expect("a fresh array is unshared");
        let Storage::Owned(owned) = storage else { unreachable!("zeros() is owned") };
        let mut at = 0;
        let dst = owned.bytes_mut();
        for p in parts {
            let b = p.as_bytes();
            dst[at..at + b.len()].copy_from_slice(b);
            at += b.len();
        }
        Ok(out)
    }

    /// The same elements with another shape of the same element count.
    pub fn reshape(mut self, shape: impl Into<Vec<usize>>) -> Result<Array, ArrayError> {
        let shape = shape.into();
        if checked_len(self.dtype, &shape) != Some(self.len()) {
            return Err(ArrayError::Shape(format!("cannot reshape {:?} into {shape:?}", self.shape)));
        }
        self.shape = shape;
        Ok(self)
    }

    /// A view with the given dtype, shape and offset into the same storage as
    /// `self` (used to share one mapping among many file references).
    pub fn view_of_storage(&self, dtype: DType, shape: &[usize], offset: u64) -> Result<Array, ArrayError> {
        let nbytes = dtype.nbytes(shape).ok_or_else(|| ArrayError::too_large(dtype, shape))?;
        let total = self.storage.bytes().len();
        let end = (offset as usize).checked_add(nbytes);
        if end.is_none_or(|e| e > total) || !(offset as usize).is_multiple_of(dtype.align()) {
            return Err(ArrayError::Shape(format!("bytes {offset}..+{nbytes} out of range of {total}")));
        }
        Ok(Array { dtype, shape: shape.to_vec(), storage: Arc::clone(&self.storage), offset: offset as usize })
    }
}

impl Array {
    /// Row `i` (along the first axis) as a slice of `T`: for a matrix
    /// `m × n`, the `n` elements of row `i`; for more dimensions, the
    /// C-ordered elements of `a[i]`. Errors for a 0-d array, a row out of
    /// range, or a `T` that is not the array's element type.
    pub fn row<T: Element>(&self, i: usize) -> Result<&[T], ArrayError> {
        let rows = self.iter_rows::<T>()?;
        let n = rows.len();
        rows.into_iter().nth(i).ok_or_else(|| ArrayError::Shape(format!("row {i} out of range for {n} rows")))
    }

    /// The rows (along the first axis) as slices of `T`, in order, without
    /// a copy: `for row in a.iter_rows::<f64>()? { … }` where numpy writes
    /// `for row in a:`. A row of a matrix `m × n` holds `n` elements; rows
    /// of width 0 are empty slices. Errors for a 0-d array or a `T` that is
    /// not the array's element type (and for a `bool` array holding a byte
    /// other than 0 or 1).
    pub fn iter_rows<T: Element>(&self) -> Result<Rows<'_, T>, ArrayError> {
        let Some((&count, rest)) = self.shape.split_first() else {
            return Err(ArrayError::Shape("a 0-dimensional array has no rows".into()));
        };
        let data = self.as_slice::<T>()?;
        Ok(Rows { data, width: product(rest), count })
    }
}

/// The rows of an [`Array`] as slices, from [`Array::iter_rows`].
#[derive(Debug, Clone)]
pub struct Rows<'a, T> {
    /// The rows not yet returned, back to back.
    data: &'a [T],
    /// Elements per row.
    width: usize,
    /// Rows not yet returned.
    count: usize,
}

impl<'a, T> Iterator for Rows<'a, T> {
    type Item = &'a [T];

    fn next(&mut self) -> Option<&'a [T]> {
        if self.count == 0 {
            return None;
        }
        let (row, rest) = self.data.split_at(self.width);
        self.data = rest;
        self.count -= 1;
        Some(row)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.count, Some(self.count))
    }

    fn nth(&mut self, n: usize) -> Option<&'a [T]> {
        let skip = n.min(self.count);
        self.data = &self.data[skip * self.width..];
        self.count -= skip;
        self.next()
    }
}

impl<T> DoubleEndedIterator for Rows<'_, T> {
    fn next_back(&mut self) -> Option<Self::Item> {
        if self.count == 0 {
            return None;
        }
        let (rest, row) = self.data.split_at(self.data.len() - self.width);
        self.data = rest;
        self.count -= 1;
        Some(row)
    }
}

impl<T> ExactSizeIterator for Rows<'_, T> {}

impl<T> std::iter::FusedIterator for Rows<'_, T> {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_and_stack_round_trip() {
        let a = Array::from_vec(vec![7, 2], (0..14i64).collect::<Vec<_>>());
        let parts = a.array_split(3).unwrap();
        let shapes: Vec<_> = parts.iter().map(|p| p.shape().to_vec()).collect();
        assert_eq!(shapes, vec![vec![3, 2], vec![2, 2], vec![2, 2]]);
        assert_eq!(parts[1].as_slice::<i64>().unwrap(), &[6, 7, 8, 9]);
        assert_eq!(Array::vstack(&parts).unwrap(), a);
        let bad = Array::from_vec(vec![1, 3], vec![0i64; 3]);
        assert!(Array::vstack(&[a.clone(), bad]).is_err());
        assert!(a.array_split(0).is_err());
    }

    #[test]
    fn views_share_storage_and_writes_need_exclusive_access() {
        let a = Array::from_vec(vec![4, 2], vec![1.0f64; 8]);
        let mut v = a.rows(1..3).unwrap();
        assert_eq!(v.storage_id(), a.storage_id());
        assert!(matches!(v.as_mut_slice::<f64>(), Err(ArrayError::NotWritable(_))));
        drop(a);
        v.as_mut_slice::<f64>().unwrap().fill(2.0);
        assert_eq!(v.as_slice::<f64>().unwrap(), &[2.0; 4]);
        assert!(matches!(v.as_slice::<i64>(), Err(ArrayError::DType { .. })));
    }

    #[test]
    fn rows_are_typed_slices_without_a_copy() {
        let a = Array::from_vec(vec![3, 4], (0..12u16).collect::<Vec<_>>());
        let rows: Vec<&[u16]> = a.iter_rows::<u16>().unwrap().collect();
        assert_eq!(rows, [&[0, 1, 2, 3][..], &[4, 5, 6, 7], &[8, 9, 10, 11]]);
        assert_eq!(rows[1].as_ptr(), a.as_slice::<u16>().unwrap()[4..].as_ptr());
        assert_eq!(a.iter_rows::<u16>().unwrap().next_back(), Some(&[8, 9, 10, 11][..]));
        assert_eq!(a.iter_rows::<u16>().unwrap().len(), 3);
        assert_eq!(a.row::<u16>(2).unwrap(), &[8, 9, 10, 11]);
        assert!(matches!(a.row::<u16>(3), Err(ArrayError::Shape(_))));
        assert!(matches!(a.row::<i16>(0), Err(ArrayError::DType { .. })));
        // A view's rows start at the view's offset.
        assert_eq!(a.rows(1..3).unwrap().row::<u16>(0).unwrap(), &[4, 5, 6, 7]);
        // Zero-width rows are empty slices; a 3-D array's rows are its 2-D slabs.
        let empty = Array::zeros(DType::F64, vec![2, 0]);
        assert_eq!(empty.iter_rows::<f64>().unwrap().collect::<Vec<_>>(), [&[][..], &[]]);
        let cube = Array::from_vec(vec![2, 2, 2], (0..8i8).collect::<Vec<_>>());
        assert_eq!(cube.row::<i8>(1).unwrap(), &[4, 5, 6, 7]);
        assert!(Array::from_vec(vec![], vec![1.0f32]).iter_rows::<f32>().is_err());
    }
}
