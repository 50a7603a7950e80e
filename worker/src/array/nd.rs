//! [`Array`] and the `ndarray` crate (the `ndarray` feature): zero-copy
//! views of an array's elements — owned or memory-mapped alike, so a view
//! of a mapped input reads the file's pages in place, as
//! `np.load(path, mmap_mode='r')` does — and owned conversions both ways,
//! copying only what must be copied.

use ndarray::{ArrayD, ArrayView2, ArrayViewD, ArrayViewMutD, Dimension, IxDyn};

use super::{Array, ArrayError};
use crate::dtype::Element;

/// An `ndarray` shape error as ours: the shapes come from an `Array`, which
/// holds exactly its shape's elements, so this names an internal mismatch.
fn shape_error(e: ndarray::ShapeError) -> ArrayError {
    ArrayError::Shape(format!("cannot view the array in ndarray: {e}"))
}

impl Array {
    /// The elements as an `ndarray` view of the array's shape, without a
    /// copy: for a mapped array, a view of the mapped pages.
    ///
    /// `T` must be the array's element type ([`ArrayError::DType`]
    /// otherwise; a `bool` array's bytes are checked as by
    /// [`as_slice`](Array::as_slice)).
    pub fn view<T: Element>(&self) -> Result<ArrayViewD<'_, T>, ArrayError> {
        ArrayViewD::from_shape(IxDyn(self.shape()), self.as_slice::<T>()?).map_err(shape_error)
    }

    /// A matrix's elements as an `ndarray` 2-D view, without a copy;
    /// [`ArrayError::Shape`] when the array is not 2-D.
    pub fn view2<T: Element>(&self) -> Result<ArrayView2<'_, T>, ArrayError> {
        let &[rows, cols] = self.shape() else {
            return Err(ArrayError::Shape(format!(
                "a {}-D array of shape {:?} is not a matrix (2-D)",
                self.shape().len(),
                self.shape()
            )));
        };
        ArrayView2::from_shape((rows, cols), self.as_slice::<T>()?).map_err(shape_error)
    }

    /// The elements as a mutable `ndarray` view, without a copy, on the
    /// terms of [`as_mut_slice`](Array::as_mut_slice) (this view is the
    /// only one in this process, and not mapped read-only).
    pub fn view_mut<T: Element>(&mut self) -> Result<ArrayViewMutD<'_, T>, ArrayError> {
        let shape = IxDyn(&self.shape);
        ArrayViewMutD::from_shape(shape, self.as_mut_slice::<T>()?).map_err(shape_error)
    }

    /// An owned `ndarray` array holding a copy of the elements.
    pub fn to_ndarray<T: Element>(&self) -> Result<ArrayD<T>, ArrayError> {
        ArrayD::from_shape_vec(IxDyn(self.shape()), self.to_vec::<T>()?).map_err(shape_error)
    }

    /// An owned array from an `ndarray` array of any dimension, taking its
    /// buffer without a copy when it is in standard (C) order and starts
    /// at the buffer's beginning, copying it into C order otherwise (a
    /// transposed or sliced array).
    pub fn from_ndarray<T: Element, D: Dimension>(a: ndarray::Array<T, D>) -> Array {
        let shape = a.shape().to_vec();
        let data = if a.is_standard_layout() {
            let len = a.len();
            match a.into_raw_vec_and_offset() {
                (v, Some(0) | None) if v.len() == len => v,
                (v, Some(offset)) => v[offset..offset + len].to_vec(),
                (v, None) => v[..len].to_vec(),
            }
        } else {
            a.iter().copied().collect()
        };
        Array::from_vec(shape, data)
    }

    /// An owned array holding a copy of an `ndarray` view's elements, in C
    /// order.
    pub fn from_ndarray_view<T: Element, D: Dimension>(a: ndarray::ArrayView<'_, T, D>) -> Array {
        let data = match a.as_slice() {
            Some(contiguous) => contiguous.to_vec(),
            None => a.iter().copied().collect(),
        };
        Array::from_vec(a.shape().to_vec(), data)
    }
}

impl<T: Element, D: Dimension> From<ndarray::Array<T, D>> for Array {
    /// [`Array::from_ndarray`].
    fn from(a: ndarray::Array<T, D>) -> Array {
        Array::from_ndarray(a)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::Complex;

    #[test]
    fn views_share_the_elements_and_conversions_copy_what_they_must() {
        let a = Array::from_vec(vec![2, 3], (0..6u32).collect::<Vec<_>>());
        let v = a.view::<u32>().unwrap();
        assert_eq!(v.shape(), &[2, 3]);
        assert_eq!(v[[1, 2]], 5);
        assert_eq!(v.as_ptr(), a.as_slice::<u32>().unwrap().as_ptr());
        let m = a.view2::<u32>().unwrap();
        assert_eq!(m.row(1).to_vec(), vec![3, 4, 5]);
        assert!(a.view::<i32>().is_err());
        assert!(Array::from_vec(vec![6], vec![0u8; 6]).view2::<u8>().is_err());

        // Standard layout: the buffer is taken as it is.
        let nd = ndarray::Array2::from_shape_vec((2, 2), vec![1.0f64, 2.0, 3.0, 4.0]).unwrap();
        let ptr = nd.as_ptr();
        let back = Array::from(nd);
        assert_eq!(back.as_slice::<f64>().unwrap().as_ptr(), ptr);
        // Transposed: copied into C order, as numpy's ascontiguousarray.
        let t = ndarray::Array2::from_shape_vec((2, 3), (0..6i16).collect()).unwrap().reversed_axes();
        let t = Array::from_ndarray(t);
        assert_eq!((t.shape(), t.as_slice::<i16>().unwrap()), (&[3, 2][..], &[0, 3, 1, 4, 2, 5][..]));
        let sliced = ndarray::Array1::from_vec(vec![true, false, true, true]);
        let view = sliced.slice(ndarray::s![1..]);
        assert_eq!(Array::from_ndarray_view(view).as_slice::<bool>().unwrap(), &[false, true, true]);

        let mut c = Array::from_vec(vec![2], vec![Complex::new(1.0f32, 2.0), Complex::new(3.0, 4.0)]);
        c.view_mut::<Complex<f32>>().unwrap()[[1]].im = -4.0;
        assert_eq!(c.to_ndarray::<Complex<f32>>().unwrap()[[1]], Complex::new(3.0, -4.0));
        assert_eq!(c.view::<num_complex::Complex32>().unwrap()[[1]], num_complex::Complex32::new(3.0, -4.0));
    }
}
