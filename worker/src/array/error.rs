//! Why an array operation failed ([`ArrayError`]), and the checked sizes
//! every constructor starts from: a shape's byte size is a checked product,
//! refused before anything is allocated.

use std::path::PathBuf;

use crate::dtype::DType;
use crate::npy;
use crate::protocol::ArrayRef;

/// Why an array operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ArrayError {
    /// The element type asked for is not the array's.
    #[error("array has dtype {actual}, not {requested}")]
    DType {
        /// The array's dtype.
        actual: DType,
        /// The dtype asked for.
        requested: DType,
    },
    /// A `bool` array holds a byte other than 0 (false) or 1 (true): it
    /// came from a file or a peer that does not keep numpy's rule, and is
    /// not handed out as `bool`s.
    #[error("the bool array holds byte {byte:#04x} at element {index}; a bool byte must be 0 or 1")]
    NotBool {
        /// The first such element.
        index: usize,
        /// Its byte.
        byte: u8,
    },
    /// A shape or range does not fit.
    #[error("{0}")]
    Shape(String),
    /// The array cannot be written through (read-only map, or shared).
    #[error("array is not writable here: {0}")]
    NotWritable(&'static str),
    /// A file could not be used.
    #[error(transparent)]
    Npy(#[from] npy::NpyError),
    /// A referenced file could not be mapped.
    #[error("cannot map {path}: {reason}")]
    Map {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The shape's size in bytes (`dtype.size() × product(shape)`)
    /// overflows, or exceeds `isize::MAX`: no allocation, slice or map can
    /// hold it. Nothing was allocated.
    #[error("a {dtype} array of shape {shape:?} has more bytes than this process can address")]
    TooLarge {
        /// The element type.
        dtype: DType,
        /// The shape asked for.
        shape: Vec<u64>,
    },
    /// The system refused the memory for an array (an allocation failed,
    /// for example under `ulimit -v` or strict overcommit).
    #[error("cannot allocate a {dtype} array of shape {shape:?} ({bytes} bytes): the system refused the memory")]
    OutOfMemory {
        /// The element type.
        dtype: DType,
        /// The shape asked for.
        shape: Vec<u64>,
        /// The bytes asked for.
        bytes: u64,
    },
}

impl ArrayError {
    /// [`ArrayError::TooLarge`] for `dtype` and `shape`.
    pub fn too_large(dtype: DType, shape: &[usize]) -> ArrayError {
        ArrayError::TooLarge { dtype, shape: shape.iter().map(|&d| d as u64).collect() }
    }
}

/// The element count of a shape, checked: `None` when `dtype.size() ×
/// product(shape)` overflows or exceeds `isize::MAX`.
pub(super) fn checked_len(dtype: DType, shape: &[usize]) -> Option<usize> {
    dtype.nbytes(shape)?;
    crate::dtype::elements(shape)
}

/// What only this layer can say about an [`ArrayRef`]: its shape as this
/// process's sizes. (The reference itself is the wire's; the error is ours.)
impl ArrayRef {
    /// The shape as this process's sizes, or [`ArrayError::TooLarge`]
    /// (naming the shape and dtype) when its size in bytes overflows or
    /// exceeds what this process can address (`isize::MAX`).
    pub fn checked_shape(&self) -> Result<Vec<usize>, ArrayError> {
        let (dtype, shape) = self.dtype_and_shape();
        let too_large = || ArrayError::TooLarge { dtype, shape: shape.to_vec() };
        let usize_shape: Vec<usize> =
            shape.iter().map(|&d| usize::try_from(d)).collect::<Result<_, _>>().map_err(|_| too_large())?;
        dtype.nbytes(&usize_shape).ok_or_else(too_large)?;
        Ok(usize_shape)
    }
}
