//! The [`Kernel`] trait, implemented for `i64`, `f64` and `f32`: which
//! kernel a block of each element type runs (the floats through the GEMM
//! wrappers of `float`, `i64` through the exact or the wrapping path of
//! `integer`), the generic entry point [`matmul_block`], and the naive
//! reference [`matmul_naive`] every kernel is tested against.

use super::float::{dgemm, sgemm};
use super::integer::{exact_maxima, i64_via_f64_within, tiled_i64};
use super::tiled::{checked_lengths, Step};
use crate::dtype::Element;

/// Element types with a block matrix-product kernel.
///
/// Implemented for `i64` (wrapping), `f64` and `f32`; every implementation
/// is split-invariant as described in the [module docs](super).
pub trait Kernel: Element + Step {
    /// Computes `c = a · b`, where `a` is `rows × k`, `b` is `k × n` and `c` is
    /// `rows × n`, all row-major and contiguous. Overwrites `c`.
    ///
    /// # Panics
    ///
    /// If `a.len() != rows * k`, `b.len() != k * n` or `c.len() != rows * n`.
    fn matmul_block(a: &[Self], b: &[Self], c: &mut [Self], rows: usize, k: usize, n: usize);
}

impl Kernel for i64 {
    fn matmul_block(a: &[i64], b: &[i64], c: &mut [i64], rows: usize, k: usize, n: usize) {
        checked_lengths(a.len(), b.len(), Some(c.len()), rows, k, n);
        if rows == 0 || n == 0 {
            return;
        }
        if let Some(max) = exact_maxima(a, b, rows, k) {
            i64_via_f64_within(a, b, c, rows, k, n, max);
        } else {
            tiled_i64(a, b, c, rows, k, n);
        }
    }
}

impl Kernel for f64 {
    fn matmul_block(a: &[f64], b: &[f64], c: &mut [f64], rows: usize, k: usize, n: usize) {
        checked_lengths(a.len(), b.len(), Some(c.len()), rows, k, n);
        dgemm(a, b, c, rows, k, n, false);
    }
}

impl Kernel for f32 {
    fn matmul_block(a: &[f32], b: &[f32], c: &mut [f32], rows: usize, k: usize, n: usize) {
        checked_lengths(a.len(), b.len(), Some(c.len()), rows, k, n);
        sgemm(a, b, c, rows, k, n, false);
    }
}

/// Computes `C_block = A_block · B` for any [`Kernel`] type, overwriting `c`
/// (old contents are ignored, not accumulated into).
///
/// `a` is `rows × k`, `b` is `k × n`, `c` is `rows × n`, all row-major and
/// contiguous. The result for each row depends only on that row of `a` and
/// on `b`, bit for bit, whatever `rows` is (see the [module docs](super)).
///
/// # Panics
///
/// If `a.len() != rows * k`, `b.len() != k * n` or `c.len() != rows * n`;
/// callers guarantee these, so a mismatch is a bug.
pub fn matmul_block<T: Kernel>(a: &[T], b: &[T], c: &mut [T], rows: usize, k: usize, n: usize) {
    T::matmul_block(a, b, c, rows, k, n);
}

/// The naive `i-j-p` triple loop: for each element `acc = 0`, then
/// `acc = acc + A[i][p] · B[p][j]` for `p` ascending, each multiplication and
/// addition rounded on its own (wrapping for `i64`). The reference the
/// kernels are tested against: equal for `i64` and integer-valued floats,
/// within rounding error otherwise. Returns the `rows × n` row-major product
/// of `a` (`rows × k`) and `b` (`k × n`).
///
/// # Panics
///
/// If `a.len() != rows * k` or `b.len() != k * n`.
pub fn matmul_naive<T: Kernel>(a: &[T], b: &[T], rows: usize, k: usize, n: usize) -> Vec<T> {
    let c_len = checked_lengths(a.len(), b.len(), None, rows, k, n);
    let mut c = vec![T::default(); c_len];
    for i in 0..rows {
        for j in 0..n {
            let mut acc = T::default();
            for p in 0..k {
                acc = T::mul_add(acc, a[i * k + p], b[p * n + j]);
            }
            c[i * n + j] = acc;
        }
    }
    c
}
