//! Element types that procjob moves between processes and stores in `.npy`
//! files: the common numpy dtypes, little-endian — signed and unsigned
//! integers of 1, 2, 4 and 8 bytes, `f32` and `f64`, `bool`, and complex
//! numbers of two `f32`s or two `f64`s — each with a Rust element type
//! ([`Element`]) through which an [`Array`](crate::Array) hands out typed
//! slices.

use serde::{Deserialize, Serialize};

/// The element type of an array.
///
/// The declaration order is the wire encoding (postcard's variant index):
/// the three original dtypes keep 0–2 and newer ones follow.
/// Non-exhaustive: numpy has more dtypes than these, and a match on a
/// `DType` outside this crate keeps a `_` arm for the ones added later.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub enum DType {
    /// 64-bit signed integer (`<i8`, `int64`); arithmetic wraps, as numpy's does.
    I64,
    /// 64-bit IEEE float (`<f8`, `float64`).
    F64,
    /// 32-bit IEEE float (`<f4`, `float32`).
    F32,
    /// 8-bit signed integer (`|i1`, `int8`).
    I8,
    /// 16-bit signed integer (`<i2`, `int16`).
    I16,
    /// 32-bit signed integer (`<i4`, `int32`).
    I32,
    /// 8-bit unsigned integer (`|u1`, `uint8`).
    U8,
    /// 16-bit unsigned integer (`<u2`, `uint16`).
    U16,
    /// 32-bit unsigned integer (`<u4`, `uint32`).
    U32,
    /// 64-bit unsigned integer (`<u8`, `uint64`).
    U64,
    /// Boolean, one byte holding 0 or 1 (`|b1`, numpy's `bool`).
    Bool,
    /// Complex number of two `f32`s, real part first (`<c8`, `complex64`).
    C64,
    /// Complex number of two `f64`s, real part first (`<c16`, `complex128`).
    C128,
}

impl DType {
    /// Every dtype procjob accepts, in the order they are listed to users.
    pub const ALL: [DType; 13] = [
        DType::I8,
        DType::I16,
        DType::I32,
        DType::I64,
        DType::U8,
        DType::U16,
        DType::U32,
        DType::U64,
        DType::F32,
        DType::F64,
        DType::Bool,
        DType::C64,
        DType::C128,
    ];

    /// Size of one element in bytes.
    pub const fn size(self) -> usize {
        match self {
            DType::I8 | DType::U8 | DType::Bool => 1,
            DType::I16 | DType::U16 => 2,
            DType::I32 | DType::U32 | DType::F32 => 4,
            DType::I64 | DType::U64 | DType::F64 | DType::C64 => 8,
            DType::C128 => 16,
        }
    }

    /// Alignment of one element in bytes: where in memory (and at which
    /// file offsets of a mapping) an element may start. The size, except
    /// for complex numbers, which are aligned as their parts.
    pub const fn align(self) -> usize {
        match self {
            DType::C64 => 4,
            DType::C128 => 8,
            other => other.size(),
        }
    }

    /// The numpy `descr` string of this dtype in a `.npy` header, as numpy
    /// writes it (`|` for the one-byte types, whose byte order does not
    /// apply).
    pub const fn npy_descr(self) -> &'static str {
        match self {
            DType::I8 => "|i1",
            DType::I16 => "<i2",
            DType::I32 => "<i4",
            DType::I64 => "<i8",
            DType::U8 => "|u1",
            DType::U16 => "<u2",
            DType::U32 => "<u4",
            DType::U64 => "<u8",
            DType::F32 => "<f4",
            DType::F64 => "<f8",
            DType::Bool => "|b1",
            DType::C64 => "<c8",
            DType::C128 => "<c16",
        }
    }

    /// The short name used on the command line and in JSON: `i8` … `i64`,
    /// `u8` … `u64`, `f32`, `f64`, `bool`, `c64`, `c128` (bits, as numpy's
    /// `int64` or `complex128`).
    pub const fn name(self) -> &'static str {
        match self {
            DType::I8 => "i8",
            DType::I16 => "i16",
            DType::I32 => "i32",
            DType::I64 => "i64",
            DType::U8 => "u8",
            DType::U16 => "u16",
            DType::U32 => "u32",
            DType::U64 => "u64",
            DType::F32 => "f32",
            DType::F64 => "f64",
            DType::Bool => "bool",
            DType::C64 => "c64",
            DType::C128 => "c128",
        }
    }

    /// Parses a short name ([`DType::name`]).
    pub fn from_name(name: &str) -> Option<DType> {
        DType::ALL.into_iter().find(|d| d.name() == name)
    }

    /// Number of bytes of an array of this dtype and shape, or `None` when
    /// the product overflows or exceeds `isize::MAX` (the most a slice, an
    /// allocation or a memory map can span). A shape with a 0 dimension
    /// holds 0 bytes whatever its other dimensions.
    pub fn nbytes(self, shape: &[usize]) -> Option<usize> {
        elements(shape)?.checked_mul(self.size()).filter(|&n| n <= isize::MAX as usize)
    }

    /// Whether every byte pattern is a value of this dtype. Only `bool` has
    /// invalid patterns (a byte other than 0 and 1): its bytes are checked
    /// before they are handed out as `&[bool]`.
    pub const fn any_bytes_valid(self) -> bool {
        !matches!(self, DType::Bool)
    }
}

/// The number of elements of `shape` (1 for a 0-d shape), or `None` when
/// the product overflows `usize`. A 0 dimension makes it 0 whatever the
/// others, so the order of the dimensions never matters.
pub fn elements(shape: &[usize]) -> Option<usize> {
    if shape.contains(&0) {
        return Some(0);
    }
    shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d))
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A complex number as numpy stores one: the real part, then the imaginary
/// part, each little-endian (`<c8` for `Complex<f32>`, `<c16` for
/// `Complex<f64>`).
///
/// `#[repr(C)]`, so a `[Complex<f64>]` has numpy's layout (and
/// `num_complex::Complex<f64>`'s); convert to another library's complex
/// type field by field, or view the bytes in place when it has the same
/// layout.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[repr(C)]
pub struct Complex<T> {
    /// Real part.
    pub re: T,
    /// Imaginary part.
    pub im: T,
}

impl<T> Complex<T> {
    /// `re + im·i`.
    pub const fn new(re: T, im: T) -> Complex<T> {
        Complex { re, im }
    }
}

mod sealed {
    /// What procjob needs of an element type beyond its [`DType`]: the
    /// proof that its bytes may be viewed in place.
    ///
    /// # Safety
    /// Implemented only for types without padding bytes whose size and
    /// alignment are those of their dtype, whose every byte pattern is a
    /// valid value except those [`Sealed::valid`] rejects.
    ///
    /// [`DType`]: super::DType
    pub unsafe trait Sealed {
        /// Whether `bytes` (a whole number of elements) are all valid values.
        fn valid(bytes: &[u8]) -> bool {
            let _ = bytes;
            true
        }
    }
    // SAFETY: plain integers and floats: no padding, every pattern valid.
    unsafe impl Sealed for i8 {}
    // SAFETY: as above.
    unsafe impl Sealed for i16 {}
    // SAFETY: as above.
    unsafe impl Sealed for i32 {}
    // SAFETY: as above.
    unsafe impl Sealed for i64 {}
    // SAFETY: as above.
    unsafe impl Sealed for u8 {}
    // SAFETY: as above.
    unsafe impl Sealed for u16 {}
    // SAFETY: as above.
    unsafe impl Sealed for u32 {}
    // SAFETY: as above.
    unsafe impl Sealed for u64 {}
    // SAFETY: as above.
    unsafe impl Sealed for f32 {}
    // SAFETY: as above.
    unsafe impl Sealed for f64 {}
    // SAFETY: `#[repr(C)]` pairs of one float type: no padding (two fields
    // of the same size and alignment), every pattern valid.
    unsafe impl Sealed for super::Complex<f32> {}
    // SAFETY: as above.
    unsafe impl Sealed for super::Complex<f64> {}
    // SAFETY: one byte, no padding; only 0 and 1 are valid, which `valid`
    // checks.
    unsafe impl Sealed for bool {
        fn valid(bytes: &[u8]) -> bool {
            // A fold rather than `all`, so that it vectorises (no early exit).
            bytes.iter().fold(0u8, |acc, &b| acc | (b & !1)) == 0
        }
    }
}

/// A Rust element type with a [`DType`]: `i8`, `i16`, `i32`, `i64`, `u8`,
/// `u16`, `u32`, `u64`, `f32`, `f64`, `bool`, [`Complex<f32>`] and
/// [`Complex<f64>`] (and, with the `ndarray` feature, ndarray's
/// `num_complex::Complex<f32>` and `<f64>`, of the same layout).
///
/// Sealed: procjob views raw file and pipe bytes as slices of these types,
/// which is sound because every bit pattern of them is a valid value —
/// except for `bool`, whose bytes are checked to be 0 or 1 each time they
/// are handed out as `&[bool]` (an error otherwise, never undefined
/// behaviour).
pub trait Element: sealed::Sealed + Copy + Send + Sync + Default + PartialEq + std::fmt::Debug + 'static {
    /// The dtype of this element type.
    const DTYPE: DType;
}

macro_rules! element {
    ($($t:ty => $d:ident),* $(,)?) => {
        $(impl Element for $t {
            const DTYPE: DType = DType::$d;
        })*
        #[cfg(test)]
        mod layout {
            use super::*;

            /// Each element type has its dtype's size and alignment.
            #[test]
            fn sizes_and_alignments_match_the_dtypes() {
                $(
                    assert_eq!(std::mem::size_of::<$t>(), DType::$d.size(), "{}", DType::$d);
                    assert_eq!(std::mem::align_of::<$t>(), DType::$d.align(), "{}", DType::$d);
                )*
            }
        }
    };
}

element! {
    i8 => I8, i16 => I16, i32 => I32, i64 => I64,
    u8 => U8, u16 => U16, u32 => U32, u64 => U64,
    f32 => F32, f64 => F64, bool => Bool,
    Complex<f32> => C64, Complex<f64> => C128,
}

// With the `ndarray` feature, `num_complex::Complex<f32>` and `<f64>`
// (ndarray's complex types) are element types too: `#[repr(C)]` pairs
// `{ re, im }`, the same layout as [`Complex`].
#[cfg(feature = "ndarray")]
// SAFETY: num-complex documents `Complex<T>` as `#[repr(C)]` with fields
// `re` then `im`: no padding, every pattern valid (checked below).
unsafe impl sealed::Sealed for num_complex::Complex<f32> {}
#[cfg(feature = "ndarray")]
// SAFETY: as above.
unsafe impl sealed::Sealed for num_complex::Complex<f64> {}
#[cfg(feature = "ndarray")]
impl Element for num_complex::Complex<f32> {
    const DTYPE: DType = DType::C64;
}
#[cfg(feature = "ndarray")]
impl Element for num_complex::Complex<f64> {
    const DTYPE: DType = DType::C128;
}

/// Whether `bytes` are valid elements of `T` (always, except for `bool`).
pub(crate) fn valid_bytes<T: Element>(bytes: &[u8]) -> bool {
    T::valid(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_descrs_are_distinct_and_parse_back() {
        for d in DType::ALL {
            assert_eq!(DType::from_name(d.name()), Some(d));
            assert_eq!(DType::ALL.iter().filter(|e| e.npy_descr() == d.npy_descr()).count(), 1);
            assert!(d.size().is_power_of_two());
            assert!(d.align() <= d.size() && d.size() % d.align() == 0);
        }
        assert_eq!(DType::from_name("int64"), None);
    }

    #[test]
    fn only_zero_and_one_are_valid_bools() {
        assert!(valid_bytes::<bool>(&[0, 1, 1, 0]));
        assert!(valid_bytes::<bool>(&[]));
        for bad in [2u8, 3, 0x80, 0xff] {
            assert!(!valid_bytes::<bool>(&[0, 1, bad, 0]), "{bad}");
        }
        assert!(valid_bytes::<u8>(&[0xff]));
        assert!(!DType::Bool.any_bytes_valid() && DType::U8.any_bytes_valid());
    }

    #[cfg(feature = "ndarray")]
    #[test]
    fn num_complex_has_the_layout_of_complex() {
        use std::mem::{align_of, offset_of, size_of};
        assert_eq!(size_of::<num_complex::Complex<f32>>(), size_of::<Complex<f32>>());
        assert_eq!(align_of::<num_complex::Complex<f64>>(), align_of::<Complex<f64>>());
        assert_eq!(offset_of!(num_complex::Complex<f64>, im), offset_of!(Complex<f64>, im));
        assert_eq!(offset_of!(num_complex::Complex<f32>, im), 4);
    }
}
