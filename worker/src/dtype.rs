//! Element types that procjob moves between processes and stores in `.npy`
//! files: `i64`, `f64` and `f32`, little-endian, as numpy's `<i8`, `<f8`,
//! `<f4`.

use serde::{Deserialize, Serialize};

/// The element type of an array.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DType {
    /// 64-bit signed integer (`<i8`); arithmetic wraps, as numpy's does.
    I64,
    /// 64-bit IEEE float (`<f8`).
    F64,
    /// 32-bit IEEE float (`<f4`).
    F32,
}

impl DType {
    /// Every dtype procjob accepts, in the order they are listed to users.
    pub const ALL: [DType; 3] = [DType::I64, DType::F64, DType::F32];

    /// Size of one element in bytes.
    pub const fn size(self) -> usize {
        match self {
            DType::I64 | DType::F64 => 8,
            DType::F32 => 4,
        }
    }

    /// The numpy `descr` string of this dtype in a `.npy` header.
    pub const fn npy_descr(self) -> &'static str {
        match self {
            DType::I64 => "<i8",
            DType::F64 => "<f8",
            DType::F32 => "<f4",
        }
    }

    /// The short name used on the command line and in JSON (`i64`, `f64`, `f32`).
    pub const fn name(self) -> &'static str {
        match self {
            DType::I64 => "i64",
            DType::F64 => "f64",
            DType::F32 => "f32",
        }
    }

    /// Parses a short name (`i64`, `f64`, `f32`).
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

mod sealed {
    pub trait Sealed {}
    impl Sealed for i64 {}
    impl Sealed for f64 {}
    impl Sealed for f32 {}
}

/// A Rust element type with a [`DType`]: `i64`, `f64` or `f32`.
///
/// Sealed: every bit pattern of these types is a valid value, which is what
/// lets procjob view raw file and pipe bytes as slices of them.
pub trait Element: sealed::Sealed + Copy + Send + Sync + Default + PartialEq + std::fmt::Debug + 'static {
    /// The dtype of this element type.
    const DTYPE: DType;
}

impl Element for i64 {
    const DTYPE: DType = DType::I64;
}
impl Element for f64 {
    const DTYPE: DType = DType::F64;
}
impl Element for f32 {
    const DTYPE: DType = DType::F32;
}
