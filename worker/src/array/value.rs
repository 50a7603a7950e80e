//! The [`Array`] value: dtype, shape and shared storage; its constructors,
//! its accessors and the checks that guard writing through it.

use std::path::Path;
use std::sync::Arc;

use super::error::checked_len;
use super::mapping::Mapping;
use super::storage::{Owned, Storage};
use super::ArrayError;
use crate::dtype::{valid_bytes, DType, Element};
use crate::protocol::Access;

/// An n-dimensional, C-ordered array of one of the [`DType`]s (integers,
/// floats, `bool`, complex numbers), owned or memory-mapped, cheap to clone
/// (views share their storage).
///
/// Typed access goes through the element type:
/// [`as_slice::<f64>`](Array::as_slice), [`row::<f64>(i)`](Array::row) and
/// [`iter_rows::<f64>`](Array::iter_rows) for a matrix, and with the
/// `ndarray` feature `view::<f64>()` (an `ndarray::ArrayViewD`, no copy).
#[derive(Clone)]
pub struct Array {
    pub(super) dtype: DType,
    pub(super) shape: Vec<usize>,
    pub(super) storage: Arc<Storage>,
    /// Byte offset of the first element in the storage.
    pub(super) offset: usize,
}

impl std::fmt::Debug for Array {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match &*self.storage {
            Storage::Owned(_) => "owned".to_string(),
            Storage::Mapped(m) => format!("mapped {:?} {:?}", m.path, m.access),
        };
        f.debug_struct("Array")
            .field("dtype", &self.dtype)
            .field("shape", &self.shape)
            .field("storage", &kind)
            .field("offset", &self.offset)
            .finish()
    }
}

impl PartialEq for Array {
    /// Equal when dtype, shape and every byte agree.
    fn eq(&self, other: &Self) -> bool {
        self.dtype == other.dtype && self.shape == other.shape && self.as_bytes() == other.as_bytes()
    }
}

/// The element count of a shape an [`Array`] already has: every
/// constructor checked it ([`checked_len`]), so it cannot overflow.
pub(super) fn product(shape: &[usize]) -> usize {
    crate::dtype::elements(shape).expect("an array's shape was checked when it was made")
}

impl Array {
    /// An owned array from a vector; `shape` must hold exactly `data.len()` elements.
    ///
    /// # Panics
    /// If the shape's element count differs from `data.len()` or overflows
    /// ([`Array::try_from_vec`] returns an error instead).
    pub fn from_vec<T: Element>(shape: impl Into<Vec<usize>>, data: Vec<T>) -> Array {
        match Array::try_from_vec(shape, data) {
            Ok(a) => a,
            Err(e) => panic!("{e}"),
        }
    }

    /// An owned array from a vector, or [`ArrayError::TooLarge`] when the
    /// shape's size overflows and [`ArrayError::Shape`] when it does not
    /// hold exactly `data.len()` elements.
    pub fn try_from_vec<T: Element>(shape: impl Into<Vec<usize>>, data: Vec<T>) -> Result<Array, ArrayError> {
        let shape = shape.into();
        let len = checked_len(T::DTYPE, &shape).ok_or_else(|| ArrayError::too_large(T::DTYPE, &shape))?;
        if len != data.len() {
            return Err(ArrayError::Shape(format!("shape {shape:?} does not hold {} elements", data.len())));
        }
        let owned = Owned::from_vec(data);
        Ok(Array { dtype: T::DTYPE, shape, storage: Arc::new(Storage::Owned(owned)), offset: 0 })
    }

    /// An owned array of zeros, or an error (not an abort) for sizes that
    /// come from outside — a frame, a file, a user's shape: the size is a
    /// checked product ([`ArrayError::TooLarge`], nothing allocated), and
    /// memory the system refuses is [`ArrayError::OutOfMemory`].
    pub fn try_zeros(dtype: DType, shape: impl Into<Vec<usize>>) -> Result<Array, ArrayError> {
        let shape = shape.into();
        let len = checked_len(dtype, &shape).ok_or_else(|| ArrayError::too_large(dtype, &shape))?;
        let owned = Owned::try_zeroed(dtype, len).ok_or_else(|| ArrayError::OutOfMemory {
            dtype,
            shape: shape.iter().map(|&d| d as u64).collect(),
            bytes: (len * dtype.size()) as u64,
        })?;
        Ok(Array { dtype, shape, storage: Arc::new(Storage::Owned(owned)), offset: 0 })
    }

    /// An owned array of zeros.
    ///
    /// # Panics
    /// If the shape's size in bytes overflows or exceeds `isize::MAX`; and
    /// like `vec!`, it aborts the process when the system refuses the
    /// memory. For sizes that come from outside, use [`Array::try_zeros`].
    pub fn zeros(dtype: DType, shape: impl Into<Vec<usize>>) -> Array {
        let shape = shape.into();
        let len = checked_len(dtype, &shape).unwrap_or_else(|| panic!("{}", ArrayError::too_large(dtype, &shape)));
        let owned = Owned::zeroed(dtype, len);
        Array { dtype, shape, storage: Arc::new(Storage::Owned(owned)), offset: 0 }
    }

    /// The element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The shape, C order.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        product(&self.shape)
    }

    /// Whether the array has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Number of bytes of the elements.
    pub fn nbytes(&self) -> usize {
        self.len() * self.dtype.size()
    }

    /// Whether this array is a view of a mapped file.
    pub fn is_mapped(&self) -> bool {
        matches!(&*self.storage, Storage::Mapped(_))
    }

    /// The file and byte offset this array is a view of, if it is mapped.
    pub fn file_location(&self) -> Option<(&Path, u64, Access)> {
        match &*self.storage {
            Storage::Mapped(m) => Some((&m.path, self.offset as u64, m.access)),
            Storage::Owned(_) => None,
        }
    }

    /// The raw little-endian bytes of the elements.
    pub fn as_bytes(&self) -> &[u8] {
        &self.storage.bytes()[self.offset..self.offset + self.nbytes()]
    }

    /// The elements as a slice of `T`.
    ///
    /// `T` must be the array's element type ([`ArrayError::DType`]
    /// otherwise). A `bool` array's bytes are checked first: a byte other
    /// than 0 or 1 (from a file or a pipe) is [`ArrayError::NotBool`].
    pub fn as_slice<T: Element>(&self) -> Result<&[T], ArrayError> {
        self.check_dtype::<T>()?;
        let bytes = self.as_bytes();
        check_values::<T>(bytes)?;
        if bytes.is_empty() {
            return Ok(&[]);
        }
        let ptr = bytes.as_ptr();
        // Offsets are multiples of the element alignment from an aligned
        // base (words of that alignment, or a page-aligned map whose .npy
        // data offset is a multiple of 8), so this holds; check rather than
        // trust.
        assert_eq!(ptr.align_offset(std::mem::align_of::<T>()), 0, "array data is misaligned");
        // SAFETY: the pointer is aligned (checked), the bytes are initialized
        // and live as long as `self`, and they are valid values of T (every
        // bit pattern is, except for bool, whose bytes were checked).
        Ok(unsafe { std::slice::from_raw_parts(ptr.cast::<T>(), bytes.len() / std::mem::size_of::<T>()) })
    }

    /// The elements' bytes, writable (little endian, C order), on the same
    /// terms as [`as_mut_slice`](Array::as_mut_slice): for copying raw
    /// blocks of the same dtype into place.
    pub fn as_bytes_mut(&mut self) -> Result<&mut [u8], ArrayError> {
        let (offset, nbytes) = (self.offset, self.nbytes());
        if let Storage::Mapped(Mapping { access: Access::ReadOnly, .. }) = &*self.storage {
            return Err(ArrayError::NotWritable("it is mapped read-only"));
        }
        let storage = Arc::get_mut(&mut self.storage)
            .ok_or(ArrayError::NotWritable("other views of the same storage exist in this process"))?;
        Ok(match storage {
            Storage::Owned(o) => &mut o.bytes_mut()[offset..offset + nbytes],
            Storage::Mapped(m) => {
                if nbytes == 0 {
                    return Ok(&mut []);
                }
                // SAFETY: the map is writable (read-write or copy-on-write),
                // `Arc::get_mut` proved this view is its only user in this
                // process, and the range lies inside the map (checked when the
                // view was made).
                unsafe { std::slice::from_raw_parts_mut(m.raw().as_mut_ptr().add(offset), nbytes) }
            }
        })
    }

    /// The elements as a mutable slice of `T`.
    ///
    /// Allowed when this view is the only one in this process: an owned
    /// array not shared with a clone, or a read-write or copy-on-write map
    /// not shared with a clone. With a read-write map other processes may
    /// map the same file: tasks must write disjoint parts. A `bool` array's
    /// bytes are checked as by [`as_slice`](Array::as_slice).
    pub fn as_mut_slice<T: Element>(&mut self) -> Result<&mut [T], ArrayError> {
        self.check_dtype::<T>()?;
        let bytes = self.as_bytes_mut()?;
        check_values::<T>(bytes)?;
        if bytes.is_empty() {
            return Ok(&mut []);
        }
        assert_eq!(bytes.as_ptr().align_offset(std::mem::align_of::<T>()), 0, "array data is misaligned");
        let len = bytes.len() / std::mem::size_of::<T>();
        // SAFETY: aligned (checked), initialized, exclusively borrowed through
        // `&mut self`, and valid values of T (checked for bool); T's every
        // value is valid bytes, so writes through it keep the storage valid.
        Ok(unsafe { std::slice::from_raw_parts_mut(bytes.as_mut_ptr().cast::<T>(), len) })
    }

    /// An owned copy of this view (a mapped array's bytes copied into memory).
    ///
    /// Like `vec!`, it aborts the process when the system refuses the
    /// memory (the size is that of an array that exists already, so it
    /// cannot overflow).
    pub fn to_owned_array(&self) -> Array {
        let mut out = Array::zeros(self.dtype, self.shape.clone());
        let storage = Arc::get_mut(&mut out.storage).expect("a fresh array is unshared");
        let Storage::Owned(owned) = storage else { unreachable!("zeros() is owned") };
        owned.bytes_mut().copy_from_slice(self.as_bytes());
        out
    }

    /// A copy of the elements.
    pub fn to_vec<T: Element>(&self) -> Result<Vec<T>, ArrayError> {
        Ok(self.as_slice::<T>()?.to_vec())
    }

    /// True when this array is the only reference to pages of its own
    /// (a large [`zeros`](Array::zeros) array, see `Owned::Pages`): nothing
    /// else can write them, and dropping the array unmaps them. Such bytes
    /// may be handed to a pipe by reference (`vmsplice`) instead of copied,
    /// provided nothing writes them after the send until the reader has
    /// copied them out (the pipe keeps the pages alive until then): the
    /// array is dropped, or put back for reuse only once the pipe is empty
    /// and the reader is known to copy (see `serve`).
    pub fn is_sole_owner_of_pages(&self) -> bool {
        matches!(&*self.storage, Storage::Owned(Owned::Pages(_))) && self.is_unshared()
    }

    /// True when no other array (view or clone) shares this one's storage:
    /// writing it changes nothing anyone else can see in this process.
    pub fn is_unshared(&self) -> bool {
        Arc::strong_count(&self.storage) == 1
    }

    /// A key that is equal for arrays sharing the same storage; used to dump
    /// an array shared by many tasks only once.
    pub fn storage_id(&self) -> usize {
        Arc::as_ptr(&self.storage) as *const () as usize
    }

    /// The bytes of the whole storage this view belongs to (not copied),
    /// and this view's byte offset in them.
    pub fn storage_bytes(&self) -> (&[u8], usize) {
        (self.storage.bytes(), self.offset)
    }

    pub(crate) fn check_dtype<T: Element>(&self) -> Result<(), ArrayError> {
        if T::DTYPE != self.dtype {
            return Err(ArrayError::DType { actual: self.dtype, requested: T::DTYPE });
        }
        Ok(())
    }
}

/// [`ArrayError::NotBool`] naming the first byte of `bytes` that is not a
/// valid `T` (only `bool` has invalid bytes).
pub(super) fn check_values<T: Element>(bytes: &[u8]) -> Result<(), ArrayError> {
    if T::DTYPE.any_bytes_valid() || valid_bytes::<T>(bytes) {
        return Ok(());
    }
    let index = bytes.iter().position(|&b| b > 1).expect("an invalid bool byte exists");
    Err(ArrayError::NotBool { index, byte: bytes[index] })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Shapes whose size overflows (or exceeds `isize::MAX`) are refused
    /// with the typed error naming dtype and shape, before anything is
    /// allocated; a 0 dimension makes any shape 0 bytes, in any order.
    #[test]
    fn overflowing_shapes_are_refused_with_a_typed_error() {
        let too_large = |r: Result<Array, ArrayError>, dtype: DType, shape: &[u64]| match r {
            Err(ArrayError::TooLarge { dtype: d, shape: s }) => {
                assert_eq!((d, s.as_slice()), (dtype, shape));
            }
            other => panic!("expected TooLarge for {dtype} {shape:?}, got {other:?}"),
        };
        let wraps = [(1usize << 32) + 1, 1 << 32]; // 2^64 + 2^32 elements: wraps to 2^32
        too_large(Array::try_zeros(DType::F64, wraps.to_vec()), DType::F64, &[(1 << 32) + 1, 1 << 32]);
        too_large(Array::try_zeros(DType::I64, vec![usize::MAX, 2]), DType::I64, &[u64::MAX, 2]);
        // Fits in usize, but not in what a slice may span.
        too_large(Array::try_zeros(DType::F32, vec![1 << 62]), DType::F32, &[1 << 62]);
        too_large(Array::try_from_vec(vec![1usize << 63, 2], Vec::<f64>::new()), DType::F64, &[1 << 63, 2]);
        let err = Array::try_zeros(DType::F64, wraps.to_vec()).unwrap_err().to_string();
        assert!(err.contains("f64") && err.contains("4294967297"), "{err}");
        assert!(matches!(Array::try_from_vec(vec![2, 2], vec![1i64; 3]), Err(ArrayError::Shape(_))));
        assert_eq!(Array::try_zeros(DType::F64, vec![usize::MAX, 2, 0]).unwrap().len(), 0);
        assert_eq!(Array::try_zeros(DType::F64, vec![0, usize::MAX, 2]).unwrap().nbytes(), 0);
        let panicked = std::panic::catch_unwind(|| Array::zeros(DType::F64, wraps.to_vec())).unwrap_err();
        let message = panicked.downcast_ref::<String>().unwrap();
        assert!(message.contains("more bytes than this process can address"), "{message}");
        let empty = Array::try_zeros(DType::F64, vec![usize::MAX, 0]).unwrap();
        assert!(matches!(Array::vstack(&[empty.clone(), empty]), Err(ArrayError::TooLarge { .. })));
        let a = Array::from_vec(vec![2], vec![1.0f64; 2]);
        assert!(a.reshape(vec![(1usize << 63) + 1, 2]).is_err(), "a reshape whose product wraps to 2");
    }

    /// Memory the system refuses is an error, not an abort.
    #[test]
    fn an_allocation_the_system_refuses_is_an_error() {
        // 16 TiB of pages: more than a machine's memory and swap, which
        // the kernel's overcommit heuristic refuses (with overcommit
        // "always" it would be granted, and the test proves nothing).
        let overcommit = std::fs::read_to_string("/proc/sys/vm/overcommit_memory").unwrap_or_default();
        if overcommit.trim() == "1" {
            eprintln!("skipping: vm.overcommit_memory is 1, every allocation is granted");
            return;
        }
        match Array::try_zeros(DType::F64, vec![1 << 41]) {
            Err(ArrayError::OutOfMemory { dtype: DType::F64, shape, bytes }) => {
                assert_eq!((shape, bytes), (vec![1 << 41], 1 << 44));
            }
            other => panic!("16 TiB was granted: {other:?}"),
        }
    }
}
