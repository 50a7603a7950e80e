//! `f64` and `f32` products: safe wrappers that run our packed GEMM
//! ([`super::gemm`]) on CPUs with AVX2 and FMA and matrixmultiply on every
//! other, and the pass that makes a block's NaNs canonical (see the
//! [module docs](super), point 6).

use super::wide::widest;

/// Defines a safe wrapper around a GEMM: ours ([`super::gemm`]) when the CPU
/// has AVX2 and FMA, else a matrixmultiply entry point.
macro_rules! gemm_wrapper {
    ($(#[$doc:meta])* $name:ident, $t:ty, $ours:path, $gemm:path) => {
        $(#[$doc])*
        pub(super) fn $name(a: &[$t], b: &[$t], c: &mut [$t], rows: usize, k: usize, n: usize, accumulate: bool) {
            assert!(
                rows.checked_mul(k) == Some(a.len())
                    && k.checked_mul(n) == Some(b.len())
                    && rows.checked_mul(n) == Some(c.len()),
                "gemm: slice lengths do not fit {rows}×{k}×{n}"
            );
            if rows == 0 || n == 0 {
                return;
            }
            if k == 0 {
                if !accumulate {
                    c.fill(0.0);
                }
                return;
            }
            // Our packed GEMM when the CPU has AVX2 and FMA (it returns
            // false, without touching `c`, when not); matrixmultiply on
            // every other CPU.
            if $ours(a, b, c, rows, k, n, accumulate) {
                return;
            }
            // Row strides: k and n are at most the lengths of the non-empty
            // slices `a` and `b`, which fit in isize.
            let rs_a = isize::try_from(k).expect("k fits in isize");
            let rs_bc = isize::try_from(n).expect("n fits in isize");
            let beta = if accumulate { 1.0 } else { 0.0 };
            // SAFETY: the assertion above makes `a`, `b` and `c` exactly
            // `rows × k`, `k × n` and `rows × n` elements, all non-empty here.
            // With these strides the GEMM reads A at `i·k + p`, B at `p·n + j`
            // and writes C at `i·n + j` (i < rows, p < k, j < n): all inside
            // the slices, and the C positions are distinct. `c` is an
            // exclusive borrow, so it aliases neither input. With `beta = 0`
            // C is not read; with `beta = 1` it holds the caller's values.
            // Without matrixmultiply's `threading` feature nothing runs on
            // another thread.
            unsafe {
                $gemm(rows, k, n, 1.0, a.as_ptr(), rs_a, 1, b.as_ptr(), rs_bc, 1, beta, c.as_mut_ptr(), rs_bc, 1);
            }
            // Point 6 of `gemm.rs`: its kernel makes NaNs canonical tile by
            // tile; matrixmultiply's block gets a pass, compiled for the
            // widest vectors the CPU has.
            widest(|| super::gemm::canonical_nans(c, <$t>::NAN, <$t>::is_nan));
        }
    };
}

gemm_wrapper!(
    /// `c = a · b` (or `c += a · b` with `accumulate`) in `f64`, row-major
    /// `rows × k`, `k × n`, `rows × n`: through [`super::gemm::dgemm`] on
    /// CPUs with AVX2 and FMA, else [`matrixmultiply::dgemm`] with
    /// `alpha = 1`.
    ///
    /// # Panics
    ///
    /// If the slice lengths do not fit the shape.
    dgemm,
    f64,
    super::gemm::dgemm,
    matrixmultiply::dgemm
);

gemm_wrapper!(
    /// [`dgemm`] for `f32`, through [`super::gemm::sgemm`] or
    /// [`matrixmultiply::sgemm`].
    ///
    /// # Panics
    ///
    /// If the slice lengths do not fit the shape.
    sgemm,
    f32,
    super::gemm::sgemm,
    matrixmultiply::sgemm
);
