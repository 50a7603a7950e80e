//! The [`Kernel`] trait, implemented for `i64`, `f64` and `f32`: which
//! kernel a block of each element type runs (the floats through the GEMM
//! wrappers of `float`, `i64` through the exact or the wrapping path of
//! `integer`), the generic entry point [`matmul_block`], and the naive
//! reference [`matmul_naive`] every kernel is tested against.

use super::float::{dgemm, sgemm};
use super::gemm::{pack_b_panels, packed_b_len, unpack_b_panels};
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

    /// The width of the panels this process's kernel reads `B` in, when it
    /// can take a `B` packed beforehand ([`pack_b`]; `f64` and `f32` on
    /// CPUs with AVX2 and FMA); `None` when `B` is best given as its rows.
    fn b_panel_width() -> Option<usize> {
        None
    }

    /// [`Kernel::matmul_block`] with `B` packed by [`pack_b`] in panels `nr`
    /// wide (`packed` is [`packed_b_len`] long): the same bits, and `B` is
    /// not packed again when `nr` is [`Kernel::b_panel_width`] (a `packed`
    /// that is not 64-byte aligned is copied to an aligned buffer, as
    /// [`gemm::dgemm_packed`](super::gemm::dgemm_packed) says). Otherwise
    /// `B`'s rows are unpacked first.
    ///
    /// # Panics
    ///
    /// If `a.len() != rows * k`, `packed.len()` is not
    /// [`packed_b_len`]`(k, n, nr)` or `c.len() != rows * n`.
    #[allow(clippy::too_many_arguments)]
    fn matmul_block_packed(a: &[Self], packed: &[Self], c: &mut [Self], rows: usize, k: usize, n: usize, nr: usize) {
        unpacked_then_multiplied(a, packed, c, rows, k, n, nr);
    }
}

/// [`Kernel::matmul_block`] on `B`'s rows unpacked from `packed` first:
/// for a kernel that cannot read the panels (`i64`, or panels of another
/// width than this CPU's).
#[allow(clippy::too_many_arguments)]
fn unpacked_then_multiplied<T: Kernel>(a: &[T], packed: &[T], c: &mut [T], rows: usize, k: usize, n: usize, nr: usize) {
    let mut b = vec![T::default(); k.checked_mul(n).expect("k × n fits in memory")];
    unpack_b_panels(packed, k, n, nr, &mut b);
    T::matmul_block(a, &b, c, rows, k, n);
}

/// Packs all of `b` (`k × n`) in panels `nr` wide for
/// [`Kernel::matmul_block_packed`] ([`packed_b_len`] elements), so that
/// the blocks of one product pack `B` once between them
/// ([`gemm::pack_b_panels`](super::gemm::pack_b_panels) has the layout).
///
/// # Panics
///
/// If `b.len() != k · n` or `dst.len()` is not [`packed_b_len`].
pub fn pack_b<T: Kernel>(b: &[T], k: usize, n: usize, nr: usize, dst: &mut [T]) {
    pack_b_panels(b, k, n, nr, dst);
}

/// One part of [`pack_b`], for writing a packed `B` out part by part
/// without all of it in memory ([`gemm::pack_b_part`](super::gemm::pack_b_part)).
///
/// # Panics
///
/// As [`gemm::pack_b_part`](super::gemm::pack_b_part).
pub fn pack_b_part<T: Kernel>(b: &[T], k: usize, n: usize, nr: usize, pc: usize, dst: &mut [T]) {
    super::gemm::pack_b_part(b, k, n, nr, pc, dst);
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

/// [`Kernel`] for a float type: `matmul_block` through its GEMM wrapper,
/// and a `B` packed beforehand through the packed GEMM.
macro_rules! float_kernel {
    ($t:ty, $wrapper:ident, $packed:path, $width:path) => {
        impl Kernel for $t {
            fn matmul_block(a: &[$t], b: &[$t], c: &mut [$t], rows: usize, k: usize, n: usize) {
                checked_lengths(a.len(), b.len(), Some(c.len()), rows, k, n);
                $wrapper(a, b, c, rows, k, n, false);
            }

            fn b_panel_width() -> Option<usize> {
                $width()
            }

            fn matmul_block_packed(a: &[$t], packed: &[$t], c: &mut [$t], rows: usize, k: usize, n: usize, nr: usize) {
                assert!(
                    packed_b_len(k, n, nr) == Some(packed.len())
                        && rows.checked_mul(k) == Some(a.len())
                        && rows.checked_mul(n) == Some(c.len()),
                    "matmul_block_packed: lengths {}, {}, {} do not fit {rows}×{k}×{n} in panels of {nr}",
                    a.len(),
                    packed.len(),
                    c.len()
                );
                if rows == 0 || n == 0 {
                    return;
                }
                if !$packed(a, packed, c, rows, k, n, nr, false) {
                    unpacked_then_multiplied(a, packed, c, rows, k, n, nr);
                }
            }
        }
    };
}

float_kernel!(f64, dgemm, super::gemm::dgemm_packed, super::gemm::dgemm_panel_width);
float_kernel!(f32, sgemm, super::gemm::sgemm_packed, super::gemm::sgemm_panel_width);

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
