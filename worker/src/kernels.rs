//! Block-row matrix product kernels: `C_block = A_block · B`.
//!
//! A job splits the rows of `A` into blocks and hands each block to some
//! worker; the blocks of `C` are stacked back together afterwards. For the
//! result to be the same no matter how many processes ran the job or how the
//! rows were cut, every kernel here obeys one **split invariance**:
//!
//! > the sequence of arithmetic operations that produces `C[i][j]` depends
//! > only on row `i` of `A`, on `B` and on the shape `k × n` — never on how
//! > many rows the block holding row `i` has, nor on where in it row `i` sits.
//!
//! So any cut of `A` into blocks gives bit-identical `C`. Against the naive
//! triple loop ([`matmul_naive`]) the result is exact for integer-valued data
//! (always for `i64`, which wraps as numpy's `int64` does) and within the usual
//! floating-point error otherwise: the per-element order is fixed, but it is
//! not the naive order (see below), and it may use fused multiply-adds.
//!
//! # `f64` and `f32`: our packed GEMM, or matrixmultiply
//!
//! On x86-64 CPUs with AVX2 and FMA (checked at run time), [`crate::gemm`]:
//! a BLIS-style packed GEMM with AVX-512 (6 × 32 `f64`, 6 × 64 `f32`) or
//! AVX2 (6 × 8, 6 × 16) FMA microkernels, level with single-threaded
//! OpenBLAS behind `numpy.dot` on the CPUs measured (`docs/kernels.md`,
//! "Figures", has the paired measurements). Its module docs give the
//! split-invariance argument in full; in short, for every `C[i][j]`: `k` is
//! cut into chunks of a constant
//! `KC = 256`, in ascending order; each chunk is a fresh chain
//! `s = fma(A[i][p], B[p][j], s)` from `+0` over `p` ascending, one SIMD lane
//! per element; the first chunk stores `C = s` and each later one
//! `C = C + s`; a row in a short (edge) row panel runs through the same
//! microkernel on zero-padded panels, and its scratch tile is written back
//! with exactly those two operations; `MC`/`NC` blocking only groups work.
//! With `KC = 256` these are the bits matrixmultiply gives on the same CPU,
//! except where a chunk's sum underflows to `-0` (matrixmultiply stores
//! `+0` there) and for NaN payloads, which are made canonical below anyway.
//!
//! ## Fallback: matrixmultiply
//!
//! On every other CPU, [`matrixmultiply::dgemm`] / [`matrixmultiply::sgemm`]
//! with `alpha = 1`, `beta = 0` and row-major strides (slower than ours where
//! both run: `docs/kernels.md`, "Figures"). Why its per-element
//! order does not depend on the block's row count,
//! checked against the source of matrixmultiply 0.3.11 (`src/gemm.rs`,
//! `src/packing.rs`, `src/util.rs`, `src/archparam_defaults.rs`,
//! `src/dgemm_kernel.rs`, `src/sgemm_kernel.rs`, `src/x86/mod.rs`,
//! `src/kernel_util.rs`):
//!
//! 1. *The depth is cut by a constant.* `gemm_loop` (gemm.rs) runs loop 5 over
//!    `n` in steps of `NC`, loop 4 over `k` in steps of `KC`, loop 3 over the
//!    rows in steps of `MC`. `KC` (256 for both types), `NC` (1024) and `MC`
//!    (64) are compile-time constants (`archparam_defaults.rs`; the
//!    `constconf` feature that would read them from the environment at build
//!    time is off), and `range_chunk` (util.rs) takes the steps in ascending
//!    order, so the `KC`-chunks of `k` an element goes through depend on `k`
//!    alone.
//! 2. *Each chunk is a fresh chain.* For every chunk the microkernel starts
//!    its accumulators at `+0` and, for `p` ascending through the chunk, does
//!    `s = fma(A[i][p], B[p][j], s)` (`kernel_x86_avx::<FusedMulAdd>` in
//!    dgemm_kernel.rs and sgemm_kernel.rs, picked at run time when the CPU
//!    has AVX2 and FMA — this machine; `s = s + a·b` with two roundings on
//!    AVX-only CPUs and in the generic kernel, an FMA chain on AVX-512). Each
//!    SIMD lane holds one `(i, j)` and lanes never mix: the shuffles, blends
//!    and `permute2f128` that put the lanes in order after the loop only move
//!    values, and `unroll_by_with_last!` only unrolls.
//! 3. *Chunks are combined one at a time.* The first chunk stores `1·s` (as
//!    `fma(1, s, +0)` on AVX2; `beta = 0`, so `C` is not read and junk in it
//!    is fine); every later one stores `C·1 + s`, one rounding (`betap = 1`
//!    for `l4 > 0`). With `alpha = 1` and `beta ∈ {0, 1}` the scalings are
//!    exact.
//! 4. *Where the row sits does not matter.* Rows are packed into `MR`-row
//!    panels (`pack_impl`, packing.rs; `MR` = 8 on AVX2); a short last panel is
//!    zero-padded and runs through the same microkernel into a scratch tile,
//!    whose real rows are then copied out as `C = M` (first chunk) or
//!    `C = C·1 + M` (later chunks, `c_to_masked_ab_beta_c`). That is the same
//!    value as the direct store `fma(1, s, C·1)`: both round `C + s` once. (The
//!    scratch tile holds `fma(1, s, +0)`, which turns a `-0` into `+0`; that
//!    could only show if `C` itself were `-0`, and it never is: it starts as
//!    `fma(1, s, +0)` and, rounding to nearest, a sum is `-0` only when both
//!    addends are.) sgemm computes the scratch tile transposed
//!    (`preferential_transpose`, kernel_util.rs), which swaps the two factors
//!    of each FMA: the same value. The padded rows produce their own lanes
//!    and are thrown away. Loop 3 (the `MC`-row slices) only decides which
//!    rows are packed together.
//! 5. *`B` is packed the same way for every block.* `B` is always the same
//!    `k × n` matrix with the same strides; its `KC × NR` panels (`NR` = 4 for
//!    f64, 8 for f32 on AVX2), zero-padded in the last column panel, depend
//!    on `k` and `n` only, so column `j` is in the same lane position and the
//!    same (masked or not) column panel whatever the block.
//! 6. *NaNs are made canonical.* Which NaN an instruction returns when
//!    several operands are NaN (sign and payload) depends on their order in
//!    that instruction, and the direct and scratch-tile stores above put `C`
//!    and `s` in different orders. So after the product every NaN in the block
//!    is replaced by the canonical quiet NaN (`f64::NAN` / `f32::NAN`, one
//!    cheap pass over `C`); without that, blocks of different sizes really do
//!    give NaNs of different signs (`special_values_split_invariant_*`).
//!
//! Point 6 holds for our kernel too (its full-tile store and its edge-tile
//! write-back also put `C` and `s` in different operand orders), so the NaN
//! pass runs after either.
//!
//! What this does *not* promise: the same bits on every CPU. Every CPU with
//! AVX2 and FMA — with or without AVX-512 — runs our kernel and gets the same
//! bits (no run-time choice inside it depends on anything but those two
//! flags). Other CPUs fall back to matrixmultiply, whose kernels for them
//! (AVX, generic) round differently (no FMA). All the workers of one machine
//! run the same binary and pick the same kernel, so the invariant holds across
//! processes, modes and blocks; a job spread over hosts with and without
//! AVX2+FMA (the MPI transport) may differ in the last bits between them.
//! `matrixmultiply`'s `threading` feature must stay off (it is; it would only
//! split loops 3 and 2 across threads, which does not change any element's
//! chain either, but the workers are meant to be single-threaded).
//!
//! # `i64`: two paths, one answer
//!
//! `i64` products and sums wrap, as numpy's do. Wrapping arithmetic is
//! arithmetic modulo 2^64, which is associative and commutative, so every
//! order of the operations gives the same bits: the result is
//! `(Σ_p A[i][p]·B[p][j]) mod 2^64`, a function of row `i` and `B` only.
//!
//! * **Exact fast path.** When `max|A_block| · max|B| · k < 2^53`
//!   ([`i64_fits_f64_exactly`]), the block and `B` are converted to `f64`,
//!   multiplied with `dgemm` and converted back. Every intermediate of that
//!   computation is exact (the argument is at `i64_via_f64`), so it yields
//!   the exact integer product, which is within `i64` range and therefore
//!   equal to the wrapping result.
//! * **General path.** Otherwise — or when the block has fewer than
//!   `EXACT_MIN_ROWS` rows, where scanning and converting `B` would cost
//!   more than the product itself — the cache-blocked kernel `tiled` in
//!   plain wrapping `i64` arithmetic, run through an AVX2 build of it when the
//!   CPU has AVX2 (`tiled_i64`).
//!
//! The choice is made per call, from the block's own row count and
//! `max|A|`: one block of a job may take the fast path and another the
//! general one. Both give the exact wrapping result whenever the fast path is
//! taken, so the stacked `C` is the same either way.
//!
//! [`matmul_naive`] is the plain triple loop every kernel is tested against.

use crate::dtype::Element;

/// Columns of `B`/`C` processed per tile by [`tiled`]. Four `C` row tiles
/// plus one `B` row tile of this width (at 8 bytes an element: 5 × 2 KiB)
/// stay in L1.
const NC: usize = 256;

/// Rows of `B` (the shared dimension `k`) per depth tile of [`tiled`]. A
/// `KC × NC` panel of `B` (256 KiB for 8-byte elements) stays in L2 while
/// every row group of `A` sweeps over it.
const KC: usize = 128;

/// Rows of `A`/`C` processed together by [`tiled`], sharing each load of a
/// `B` row.
const MR: usize = 4;

/// Rows of `B` converted to `f64` at a time by the exact `i64` path, so its
/// scratch space is `EXACT_KC × n` plus `rows × EXACT_KC` doubles rather than
/// a copy of all of `B`. A multiple of the GEMMs' own depth step (256 in
/// both [`crate::gemm`] and matrixmultiply), so cutting `k` here adds no extra
/// passes over `C`.
const EXACT_KC: usize = 512;

/// Blocks of fewer rows than this always take the wrapping `i64` kernel: for
/// thin blocks the exact path's cost is scanning and converting `B`, which
/// the wrapping kernel does not pay, and below this many rows that makes it
/// the slower one (`bench_i64_thin_blocks`; `docs/kernels.md`, "The i64
/// paths").
const EXACT_MIN_ROWS: usize = 8;

/// The scalar step `acc + x * y` of the naive reference and of [`tiled`], one
/// per element type.
///
/// A supertrait of [`Kernel`] in a private module (the sealed-trait pattern),
/// so generic code in this file can call it while users see only
/// [`Kernel::matmul_block`].
mod step {
    /// One accumulation step, `acc + x * y`.
    pub trait Step: Copy + Default {
        /// Returns `acc + x * y`: wrapping for `i64`; for floats one rounded
        /// multiplication then one rounded addition (never an FMA).
        fn mul_add(acc: Self, x: Self, y: Self) -> Self;
    }

    impl Step for i64 {
        #[inline(always)]
        fn mul_add(acc: i64, x: i64, y: i64) -> i64 {
            acc.wrapping_add(x.wrapping_mul(y))
        }
    }

    // Separate `*` and `+`: Rust does not contract these into an FMA, so the
    // product is rounded before the sum, as in the naive definition.
    impl Step for f64 {
        #[inline(always)]
        fn mul_add(acc: f64, x: f64, y: f64) -> f64 {
            acc + x * y
        }
    }

    impl Step for f32 {
        #[inline(always)]
        fn mul_add(acc: f32, x: f32, y: f32) -> f32 {
            acc + x * y
        }
    }
}

use step::Step;

/// Element types with a block matrix-product kernel.
///
/// Implemented for `i64` (wrapping), `f64` and `f32`; every implementation
/// is split-invariant as described in the [module docs](self).
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
        if takes_exact_path(a, b, rows, k) {
            i64_via_f64(a, b, c, rows, k, n);
        } else {
            tiled_i64(a, b, c, rows, k, n);
        }
    }
}

impl Kernel for f64 {
    fn matmul_block(a: &[f64], b: &[f64], c: &mut [f64], rows: usize, k: usize, n: usize) {
        checked_lengths(a.len(), b.len(), Some(c.len()), rows, k, n);
        dgemm(a, b, c, rows, k, n, false);
        canonical_nans(c, f64::NAN, f64::is_nan);
    }
}

impl Kernel for f32 {
    fn matmul_block(a: &[f32], b: &[f32], c: &mut [f32], rows: usize, k: usize, n: usize) {
        checked_lengths(a.len(), b.len(), Some(c.len()), rows, k, n);
        sgemm(a, b, c, rows, k, n, false);
        canonical_nans(c, f32::NAN, f32::is_nan);
    }
}

/// Replaces every NaN in `c` by `nan`, the canonical quiet NaN, so a
/// block's NaNs do not depend on which tile computed them (see
/// `gemm.rs`, point 6). Checks 64 elements at a time with a branch-free
/// test the compiler vectorises and writes only where it found a NaN: the
/// plain `filter(is_nan)` loop it replaces ran one element per branch and
/// cost a visible share of a 2000² product (`docs/kernels.md`, "Dispatch").
fn canonical_nans<T: Copy>(c: &mut [T], nan: T, is_nan: impl Fn(T) -> bool) {
    for chunk in c.chunks_mut(64) {
        if chunk.iter().fold(false, |any, &x| any | is_nan(x)) {
            for x in chunk.iter_mut().filter(|x| is_nan(**x)) {
                *x = nan;
            }
        }
    }
}

/// Defines a safe wrapper around a GEMM: ours ([`crate::gemm`]) when the CPU
/// has AVX2 and FMA, else a matrixmultiply entry point.
macro_rules! gemm_wrapper {
    ($(#[$doc:meta])* $name:ident, $t:ty, $ours:path, $gemm:path) => {
        $(#[$doc])*
        fn $name(a: &[$t], b: &[$t], c: &mut [$t], rows: usize, k: usize, n: usize, accumulate: bool) {
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
        }
    };
}

gemm_wrapper!(
    /// `c = a · b` (or `c += a · b` with `accumulate`) in `f64`, row-major
    /// `rows × k`, `k × n`, `rows × n`: through [`crate::gemm::dgemm`] on
    /// CPUs with AVX2 and FMA, else [`matrixmultiply::dgemm`] with
    /// `alpha = 1`.
    ///
    /// # Panics
    ///
    /// If the slice lengths do not fit the shape.
    dgemm,
    f64,
    crate::gemm::dgemm,
    matrixmultiply::dgemm
);

gemm_wrapper!(
    /// [`dgemm`] for `f32`, through [`crate::gemm::sgemm`] or
    /// [`matrixmultiply::sgemm`].
    ///
    /// # Panics
    ///
    /// If the slice lengths do not fit the shape.
    sgemm,
    f32,
    crate::gemm::sgemm,
    matrixmultiply::sgemm
);

/// Whether an `i64` block goes through [`i64_via_f64`] rather than the
/// wrapping kernel: it has at least [`EXACT_MIN_ROWS`] rows (thinner blocks
/// are as fast or faster in the wrapping kernel, so they skip the scan) and
/// passes [`i64_fits_f64_exactly`]. Either way the bits are the same.
fn takes_exact_path(a: &[i64], b: &[i64], rows: usize, k: usize) -> bool {
    rows >= EXACT_MIN_ROWS && i64_fits_f64_exactly(max_abs(a), max_abs(b), k)
}

/// The largest `|x|` in `v` (0 for an empty slice), as `u64` so that
/// `i64::MIN` (magnitude 2^63) has one.
fn max_abs(v: &[i64]) -> u64 {
    v.iter().fold(0, |m, &x| m.max(x.unsigned_abs()))
}

/// Whether an `i64` product with `max|A| = max_a`, `max|B| = max_b` and
/// shared dimension `k` can be computed exactly in `f64`:
/// `max_a · max_b · k < 2^53`, evaluated without overflow (a product that
/// overflows `u128` is certainly too large).
///
/// When it holds, every product `a·b` and every sum of at most `k` of them
/// is an integer of magnitude below 2^53, so exactly representable in `f64`
/// (the full argument is at `i64_via_f64` in the source). The bound is
/// strict: at `2^53` itself the answer is `false`.
pub fn i64_fits_f64_exactly(max_a: u64, max_b: u64, k: usize) -> bool {
    const LIMIT: u128 = 1 << f64::MANTISSA_DIGITS; // 2^53
    let Ok(k) = u64::try_from(k) else { return false };
    // max_a · max_b ≤ (2^64 - 1)^2 < 2^128: cannot overflow.
    let ab = u128::from(max_a) * u128::from(max_b);
    ab.checked_mul(u128::from(k)).is_some_and(|x| x < LIMIT)
}

/// The exact `i64` path: `c = a · b` computed with `dgemm` on `f64` copies.
/// Only called when [`i64_fits_f64_exactly`] holds for `max|a|`, `max|b|`
/// and `k`; `rows` and `n` are non-zero and the lengths checked.
///
/// Why the result is exactly the wrapping `i64` product. Let `M = max|a| ·
/// max|b|`, so `M · k < 2^53`.
///
/// * If `M = 0`, every product is zero and so is every element of `C`, in
///   `f64` (a zero times a finite value is ±0, sums of zeros are ±0, and
///   `-0.0 as i64` is 0) and in wrapping `i64`.
/// * Otherwise `max|a|, max|b| ≥ 1`, so each is at most `M < 2^53`: every
///   input converts to `f64` exactly. Each product has `|a·b| ≤ M < 2^53/k`.
///   Whatever the order, every intermediate value `dgemm` forms for `C[i][j]`
///   — a product, a running sum inside a `KC` chunk (with or without FMA),
///   a chunk total, `C` plus a chunk total (inside dgemm or across our own
///   [`EXACT_KC`] chunks, `beta = 1`), the scalings by `alpha = 1` and
///   `beta ∈ {0, 1}` — is a sum of a subset of the `k` products `A[i][p]·B[p][j]`, an integer of magnitude
///   at most `k · M < 2^53`. Such integers are exactly representable in
///   `f64`, so every rounding step returns its exact argument: the final
///   `f64` is the exact integer `Σ_p A[i][p]·B[p][j]`.
/// * That integer is below 2^53 < 2^63 in magnitude, so it converts back to
///   `i64` exactly, and it is the wrapping result too: wrapping arithmetic
///   gives the exact sum modulo 2^64, and an exact sum inside the `i64`
///   range is its own representative (indeed no intermediate of the naive
///   wrapping loop leaves `(-2^53, 2^53)`, so nothing even wraps).
///
/// Hence the same bits as [`tiled`], which is why the choice between the two
/// can be made per block. Cost: converting `B` is `O(k·n)` per call against
/// `O(rows·k·n)` multiply-adds, so small for all but the thinnest blocks, and
/// still correct for one row.
fn i64_via_f64(a: &[i64], b: &[i64], c: &mut [i64], rows: usize, k: usize, n: usize) {
    debug_assert!(a.len() == rows * k && b.len() == k * n && c.len() == rows * n);
    if k == 0 {
        c.fill(0);
        return;
    }
    let step = EXACT_KC.min(k);
    let mut a_f64 = vec![0.0f64; rows * step];
    let mut b_f64 = vec![0.0f64; step * n];
    {
        // `C` is accumulated as f64 in `c`'s own memory, then converted in
        // place below; this saves a `rows × n` scratch buffer.
        let len = c.len();
        // SAFETY: f64 and i64 have the same size and alignment and every bit
        // pattern is a valid value of both, so `c`'s memory is a valid
        // `[f64; len]`. The view reborrows `c` exclusively and is dropped at
        // the end of this scope, before `c` is used again.
        let c_f64: &mut [f64] = unsafe { std::slice::from_raw_parts_mut(c.as_mut_ptr().cast::<f64>(), len) };
        let mut p0 = 0;
        while p0 < k {
            let kc = step.min(k - p0);
            // The exactness argument covers any way of cutting k: each
            // element's chunk total is a sum of a subset of its k products.
            let (a_chunk, b_chunk) = (&mut a_f64[..rows * kc], &mut b_f64[..kc * n]);
            for (dst, src) in a_chunk.chunks_exact_mut(kc).zip(a.chunks_exact(k)) {
                for (d, &s) in dst.iter_mut().zip(&src[p0..p0 + kc]) {
                    *d = s as f64;
                }
            }
            for (d, &s) in b_chunk.iter_mut().zip(&b[p0 * n..(p0 + kc) * n]) {
                *d = s as f64;
            }
            // First chunk: C = A·B (C's i64 contents are not read); then C += A·B.
            dgemm(a_chunk, b_chunk, c_f64, rows, kc, n, p0 > 0);
            p0 += kc;
        }
    }
    // Each element now holds the bits of an exact integer-valued f64 with
    // magnitude below 2^53, so `as i64` is exact.
    for x in c.iter_mut() {
        *x = f64::from_bits(*x as u64) as i64;
    }
}

/// The wrapping `i64` kernel: [`tiled`], compiled again with AVX-512DQ and
/// with AVX2 enabled and picked at run time by what the CPU has. Without
/// AVX2 there is no vector 64-bit multiply worth using, so the plain build
/// does one scalar `imul` per step; the AVX2 build multiplies four lanes at
/// a time out of 32-bit halves; the AVX-512DQ build has a real 64-bit
/// vector multiply (`vpmullq`) over eight lanes. What each gains on which
/// CPU: `docs/kernels.md`, "The i64 paths" and "Figures". Wrapping
/// arithmetic is exact modulo 2^64, so all give the same bits.
fn tiled_i64(a: &[i64], b: &[i64], c: &mut [i64], rows: usize, k: usize, n: usize) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("avx512dq") {
        // SAFETY: the CPU supports AVX-512F and AVX-512DQ (checked just
        // above), the only requirement for calling a function compiled with
        // them enabled.
        unsafe { tiled_i64_avx512(a, b, c, rows, k, n) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2 (checked just above), which is the
        // only requirement for calling a function compiled with it enabled.
        unsafe { tiled_i64_avx2(a, b, c, rows, k, n) };
        return;
    }
    tiled(a, b, c, rows, k, n);
}

/// [`tiled`] for `i64` compiled with AVX2; see [`tiled_i64`].
///
/// # Safety
///
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn tiled_i64_avx2(a: &[i64], b: &[i64], c: &mut [i64], rows: usize, k: usize, n: usize) {
    tiled(a, b, c, rows, k, n);
}

/// [`tiled`] for `i64` compiled with AVX-512F and AVX-512DQ; see
/// [`tiled_i64`].
///
/// # Safety
///
/// The CPU must support AVX-512F and AVX-512DQ.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512dq,avx2")]
unsafe fn tiled_i64_avx512(a: &[i64], b: &[i64], c: &mut [i64], rows: usize, k: usize, n: usize) {
    tiled(a, b, c, rows, k, n);
}

/// Computes `C_block = A_block · B` for any [`Kernel`] type, overwriting `c`
/// (old contents are ignored, not accumulated into).
///
/// `a` is `rows × k`, `b` is `k × n`, `c` is `rows × n`, all row-major and
/// contiguous. The result for each row depends only on that row of `a` and
/// on `b`, bit for bit, whatever `rows` is (see the [module docs](self)).
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

/// Checks the slice lengths against the shape and returns `rows * n`.
/// Panics with the expected and actual lengths on a mismatch.
fn checked_lengths(a_len: usize, b_len: usize, c_len: Option<usize>, rows: usize, k: usize, n: usize) -> usize {
    let want = |x: usize, y: usize, what: &str| {
        x.checked_mul(y).unwrap_or_else(|| panic!("matmul: {what} size {x}×{y} overflows usize"))
    };
    let (a_want, b_want, c_want) = (want(rows, k, "A"), want(k, n, "B"), want(rows, n, "C"));
    assert_eq!(a_len, a_want, "matmul: A has {a_len} elements, expected rows*k = {rows}*{k} = {a_want}");
    assert_eq!(b_len, b_want, "matmul: B has {b_len} elements, expected k*n = {k}*{n} = {b_want}");
    if let Some(c_len) = c_len {
        assert_eq!(c_len, c_want, "matmul: C has {c_len} elements, expected rows*n = {rows}*{n} = {c_want}");
    }
    c_want
}

/// The cache-blocked kernel of the wrapping `i64` path (generic over
/// [`Step`], but only `i64` uses it now that the floats go through
/// matrixmultiply), inlined and auto-vectorised over `j`.
///
/// Loop order: column tile `jc` → depth tile `pc` → group of `MR` rows →
/// `p` ascending within the tile → `j` within the tile. For every element the
/// steps arrive with `p` ascending (depth tiles in ascending order, `p`
/// ascending inside each), starting from the zero written before the first
/// tile: exactly the naive order, whatever the row count (for `i64` any order
/// would give the same bits anyway).
///
/// The `B` panel in L2 and the four `C` row tiles in L1 keep it
/// compute-bound at every size: its throughput is flat from 1000³ to 4000³
/// (`docs/kernels.md`, "Figures").
#[inline(always)]
fn tiled<T: Step>(a: &[T], b: &[T], c: &mut [T], rows: usize, k: usize, n: usize) {
    checked_lengths(a.len(), b.len(), Some(c.len()), rows, k, n);
    // Start every element from zero; with k = 0 this is the whole answer.
    c.fill(T::default());
    if rows == 0 || n == 0 || k == 0 {
        return;
    }
    for jc in (0..n).step_by(NC) {
        let nc = NC.min(n - jc);
        for pc in (0..k).step_by(KC) {
            let kc = KC.min(k - pc);
            let mut i = 0;
            while i + MR <= rows {
                rows4(a, b, c, i, k, n, jc, nc, pc, kc);
                i += MR;
            }
            // Leftover rows go through the one-row path; each element sees
            // the same sequence of steps as in `rows4`, so the bits match.
            while i < rows {
                row1(a, b, c, i, k, n, jc, nc, pc, kc);
                i += 1;
            }
        }
    }
}

/// Rows `i..i+4`, columns `jc..jc+nc`, depth `pc..pc+kc`: each loaded `B` row
/// tile feeds four `C` row tiles, each with its own accumulators in `C`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn rows4<T: Step>(
    a: &[T],
    b: &[T],
    c: &mut [T],
    i: usize,
    k: usize,
    n: usize,
    jc: usize,
    nc: usize,
    pc: usize,
    kc: usize,
) {
    let (c0, rest) = c[i * n..(i + MR) * n].split_at_mut(n);
    let (c1, rest) = rest.split_at_mut(n);
    let (c2, c3) = rest.split_at_mut(n);
    // Slice every row tile to exactly `nc` so the zip below has equal
    // lengths and the compiler drops bounds checks and vectorises over j.
    let (c0, c1, c2, c3) = (&mut c0[jc..jc + nc], &mut c1[jc..jc + nc], &mut c2[jc..jc + nc], &mut c3[jc..jc + nc]);
    let a0 = &a[i * k + pc..i * k + pc + kc];
    let a1 = &a[(i + 1) * k + pc..(i + 1) * k + pc + kc];
    let a2 = &a[(i + 2) * k + pc..(i + 2) * k + pc + kc];
    let a3 = &a[(i + 3) * k + pc..(i + 3) * k + pc + kc];
    for q in 0..kc {
        let p = pc + q;
        let b_row = &b[p * n + jc..p * n + jc + nc];
        let (x0, x1, x2, x3) = (a0[q], a1[q], a2[q], a3[q]);
        for ((((y, s0), s1), s2), s3) in
            b_row.iter().zip(c0.iter_mut()).zip(c1.iter_mut()).zip(c2.iter_mut()).zip(c3.iter_mut())
        {
            let y = *y;
            *s0 = T::mul_add(*s0, x0, y);
            *s1 = T::mul_add(*s1, x1, y);
            *s2 = T::mul_add(*s2, x2, y);
            *s3 = T::mul_add(*s3, x3, y);
        }
    }
}

/// Row `i`, columns `jc..jc+nc`, depth `pc..pc+kc`: the one-row version of
/// [`rows4`], with the same per-element steps.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn row1<T: Step>(
    a: &[T],
    b: &[T],
    c: &mut [T],
    i: usize,
    k: usize,
    n: usize,
    jc: usize,
    nc: usize,
    pc: usize,
    kc: usize,
) {
    let c_row = &mut c[i * n + jc..i * n + jc + nc];
    let a_row = &a[i * k + pc..i * k + pc + kc];
    for (q, &x) in a_row.iter().enumerate() {
        let p = pc + q;
        let b_row = &b[p * n + jc..p * n + jc + nc];
        for (y, s) in b_row.iter().zip(c_row.iter_mut()) {
            *s = T::mul_add(*s, x, *y);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// splitmix64: a tiny deterministic PRNG so the tests need no `rand`.
    struct SplitMix(u64);

    impl SplitMix {
        fn next_u64(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }

        /// Uniform in [-1, 1), 53 random mantissa bits.
        fn f64_pm1(&mut self) -> f64 {
            (self.next_u64() >> 11) as f64 / (1u64 << 52) as f64 - 1.0
        }

        fn f64s(&mut self, len: usize) -> Vec<f64> {
            (0..len).map(|_| self.f64_pm1()).collect()
        }

        fn f32s(&mut self, len: usize) -> Vec<f32> {
            (0..len).map(|_| self.f64_pm1() as f32).collect()
        }

        /// Integers uniform in [-max, max].
        fn ints(&mut self, len: usize, max: u64) -> Vec<i64> {
            (0..len).map(|_| (self.next_u64() % (2 * max + 1)) as i64 - max as i64).collect()
        }

        /// Small integers in [-1000, 1000], so products and sums stay exact.
        fn small_i64s(&mut self, len: usize) -> Vec<i64> {
            self.ints(len, 1000)
        }

        /// Integers of magnitude around 2^40, random sign: their products
        /// (about 2^80) wrap.
        fn big_i64s(&mut self, len: usize) -> Vec<i64> {
            (0..len).map(|_| ((self.next_u64() >> 23) as i64) - (1 << 40)).collect()
        }
    }

    const SHAPES: [(usize, usize, usize); 7] =
        [(1, 1, 1), (7, 3, 5), (33, 65, 17), (64, 64, 64), (0, 4, 3), (4, 0, 3), (4, 3, 0)];

    /// Shapes that cross the tile edges of the kernels: `tiled` (NC 256,
    /// KC 128, 4 rows), [`crate::gemm`] (KC 256, MR 6, NR 8 or 16, MC 48 or
    /// 96) and matrixmultiply (KC 256, MR 8, NR 4 or 8, MC 64), with
    /// remainders of rows and columns.
    const TILE_SHAPES: [(usize, usize, usize); 5] =
        [(9, 300, 520), (6, 129, 257), (5, 1, 1), (70, 513, 9), (3, 7, 1030)];

    fn bits_f64(v: &[f64]) -> Vec<u64> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    fn bits_f32(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    /// Runs `matmul_block` into a buffer pre-filled with garbage, so a kernel
    /// that accumulated into old contents would fail.
    fn block<T: Kernel>(a: &[T], b: &[T], rows: usize, k: usize, n: usize, junk: T) -> Vec<T> {
        let mut c = vec![junk; rows * n];
        matmul_block(a, b, &mut c, rows, k, n);
        c
    }

    /// Float types, seen through f64 for the error bound.
    trait Float: Kernel {
        const EPS: f64;
        fn to_f64(self) -> f64;
        fn from_f64(x: f64) -> Self;
    }

    impl Float for f64 {
        const EPS: f64 = f64::EPSILON;
        fn to_f64(self) -> f64 {
            self
        }
        fn from_f64(x: f64) -> f64 {
            x
        }
    }

    impl Float for f32 {
        const EPS: f64 = f32::EPSILON as f64;
        fn to_f64(self) -> f64 {
            f64::from(self)
        }
        fn from_f64(x: f64) -> f32 {
            x as f32
        }
    }

    /// Asserts `|fast - naive| ≤ 2·k·eps·Σ_p |a_ip·b_pj|` for every element.
    ///
    /// Why that bound: any evaluation of a `k`-term dot product — any order
    /// of the additions, with or without FMA — errs by at most
    /// `γ_k·Σ|a_p·b_p|` with `γ_k = k·u/(1 - k·u)` and `u = eps/2` (Higham,
    /// *Accuracy and Stability of Numerical Algorithms*, §3.1: each product
    /// passes through at most `k` roundings). Both results obey it, so they
    /// differ by at most `2·γ_k·Σ`, which is below `2·k·eps·Σ` as long as
    /// `k·u ≤ 1/2` (true for every `k` here). `Σ` is formed in f64, whose own
    /// error is negligible against the margin.
    fn assert_within_rounding<T: Float>(fast: &[T], naive: &[T], a: &[T], b: &[T], m: usize, k: usize, n: usize) {
        for i in 0..m {
            for j in 0..n {
                let mag: f64 = (0..k).map(|p| (a[i * k + p].to_f64() * b[p * n + j].to_f64()).abs()).sum();
                let (x, y) = (fast[i * n + j].to_f64(), naive[i * n + j].to_f64());
                let tol = 2.0 * k as f64 * T::EPS * mag;
                assert!((x - y).abs() <= tol, "shape {m}x{k}x{n}, C[{i}][{j}]: {x} vs naive {y}, tolerance {tol:e}");
            }
        }
    }

    fn block_matches_naive_within_rounding<T: Float>(seed: u64, make: fn(&mut SplitMix, usize) -> Vec<T>) {
        let mut rng = SplitMix(seed);
        for &(m, k, n) in SHAPES.iter().chain(&TILE_SHAPES) {
            let a = make(&mut rng, m * k);
            let b = make(&mut rng, k * n);
            let fast = block(&a, &b, m, k, n, T::from_f64(f64::NAN));
            let naive = matmul_naive(&a, &b, m, k, n);
            assert_eq!(fast.len(), m * n);
            assert_within_rounding(&fast, &naive, &a, &b, m, k, n);
        }
    }

    #[test]
    fn block_matches_naive_f64_within_rounding() {
        block_matches_naive_within_rounding::<f64>(1, SplitMix::f64s);
    }

    #[test]
    fn block_matches_naive_f32_within_rounding() {
        block_matches_naive_within_rounding::<f32>(2, SplitMix::f32s);
    }

    /// Integer-valued floats: products and partial sums of small integers
    /// are exact in any order, with or without FMA, so C equals the naive
    /// product bit for bit. Values in [-15, 15] keep every partial sum below
    /// 225·k ≤ 225·2048 < 2^24, exact even in f32.
    fn integer_valued_exact<T: Float>(seed: u64) {
        let mut rng = SplitMix(seed);
        let shapes = SHAPES.iter().chain(&TILE_SHAPES).copied().chain([(17, 2048, 33)]);
        for (m, k, n) in shapes {
            let a: Vec<T> = rng.ints(m * k, 15).into_iter().map(|x| T::from_f64(x as f64)).collect();
            let b: Vec<T> = rng.ints(k * n, 15).into_iter().map(|x| T::from_f64(x as f64)).collect();
            let fast = block(&a, &b, m, k, n, T::from_f64(f64::NAN));
            let naive = matmul_naive(&a, &b, m, k, n);
            let bits = |v: &[T]| v.iter().map(|x| x.to_f64().to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&fast), bits(&naive), "shape {m}x{k}x{n}");
        }
    }

    #[test]
    fn integer_valued_f64_is_exact() {
        integer_valued_exact::<f64>(11);
    }

    #[test]
    fn integer_valued_f32_is_exact() {
        integer_valued_exact::<f32>(12);
    }

    #[test]
    fn zero_k_gives_zeros() {
        let c = block::<f64>(&[], &[], 4, 0, 3, 7.5);
        assert_eq!(c, vec![0.0; 12]);
        let c = block::<f32>(&[], &[], 3, 0, 2, f32::NAN);
        assert_eq!(bits_f32(&c), vec![0; 6]);
        let c = block::<i64>(&[], &[], 2, 0, 2, 99);
        assert_eq!(c, vec![0; 4]);
    }

    /// Row counts of the blocks `A` is cut into in the split tests.
    const BLOCK_ROWS: [usize; 7] = [1, 2, 3, 5, 7, 16, 33];

    /// Cuts the `m` rows of `a` into blocks of `rows_per_block` (the last
    /// one shorter), multiplies each with `matmul_block` and stacks them.
    fn stacked<T: Kernel>(a: &[T], b: &[T], m: usize, k: usize, n: usize, rows_per_block: usize, junk: T) -> Vec<T> {
        let mut c = Vec::with_capacity(m * n);
        for r0 in (0..m).step_by(rows_per_block) {
            let rows = rows_per_block.min(m - r0);
            c.extend(block(&a[r0 * k..(r0 + rows) * k], b, rows, k, n, junk));
        }
        c
    }

    /// The invariant itself: for k in {1, 7, 300, 2048} (inside one depth
    /// chunk, across several) and several n (1, fewer than a column panel,
    /// a partial last panel, across the NC = 1024 of matrixmultiply and of
    /// the `f64` [`crate::gemm`]), cutting 67
    /// rows into blocks of 1, 2, 3, 5, 7, 16 or 33 rows and stacking gives the
    /// whole product's bits.
    fn split_invariance<T: Float>(seed: u64, make: fn(&mut SplitMix, usize) -> Vec<T>, bits: fn(&[T]) -> Vec<u64>) {
        let mut rng = SplitMix(seed);
        let m = 67;
        for k in [1, 7, 300, 2048] {
            for n in [1, 5, 130, 1030] {
                let a = make(&mut rng, m * k);
                let b = make(&mut rng, k * n);
                let whole = bits(&block(&a, &b, m, k, n, T::from_f64(f64::NAN)));
                for rows in BLOCK_ROWS {
                    let split = bits(&stacked(&a, &b, m, k, n, rows, T::from_f64(-7.25)));
                    assert!(split == whole, "{m}x{k}x{n} in blocks of {rows} rows differs from the whole product");
                }
            }
        }
    }

    #[test]
    fn row_blocks_stack_to_whole_product_bitwise_f64() {
        split_invariance::<f64>(3, SplitMix::f64s, bits_f64);
    }

    #[test]
    fn row_blocks_stack_to_whole_product_bitwise_f32() {
        split_invariance::<f32>(13, SplitMix::f32s, |v| bits_f32(v).into_iter().map(u64::from).collect());
    }

    /// Zeros of both signs, infinities, NaNs of both signs, overflow and
    /// subnormals in some rows and columns: every cut still gives the whole
    /// product's bits, and a NaN in C is always the canonical `NAN` (the
    /// sign and payload a NaN gets from the hardware depend on the operand
    /// order of the instruction that propagates it, which differs between a
    /// full and a zero-padded row panel). Against the naive loop: the same
    /// NaNs, infinities and zeros.
    fn special_values<T: Float>(seed: u64, make: fn(&mut SplitMix, usize) -> Vec<T>, bits: fn(&[T]) -> Vec<u64>) {
        let mut rng = SplitMix(seed);
        let (m, k, n) = (19, 300, 11); // k crosses one depth chunk (256)
        let mut a = make(&mut rng, m * k);
        let mut b = make(&mut rng, k * n);
        let f = T::from_f64;
        let neg_nan = f(-f64::NAN);
        // Row 1: +∞ early. Row 2: NaN in both depth chunks, of both signs.
        // Row 3: +∞ and -∞ (∞ - ∞ = NaN). Row 4: all -0. Row 5: huge, so the
        // sums overflow. Row 6: subnormals. Row 7: one -NaN only.
        a[k + 5] = f(f64::INFINITY);
        a[2 * k + 3] = neg_nan;
        a[2 * k + 280] = f(f64::NAN);
        a[3 * k + 1] = f(f64::INFINITY);
        a[3 * k + 290] = f(f64::NEG_INFINITY);
        a[4 * k..5 * k].fill(f(-0.0));
        a[5 * k..6 * k].fill(f(1e300));
        a[6 * k..7 * k].fill(f(1e-310));
        a[7 * k + 100] = neg_nan;
        // Column 2: one NaN. Column 4: all -0. Column 7: -∞ late.
        b[10 * n + 2] = f(f64::NAN);
        for p in 0..k {
            b[p * n + 4] = f(-0.0);
        }
        b[270 * n + 7] = f(f64::NEG_INFINITY);
        let whole = block(&a, &b, m, k, n, f(0.0));
        let whole_bits = bits(&whole);
        for rows in BLOCK_ROWS {
            assert!(bits(&stacked(&a, &b, m, k, n, rows, f(0.0))) == whole_bits, "blocks of {rows}");
        }
        let canonical = bits(&[f(f64::NAN)])[0];
        let naive = matmul_naive(&a, &b, m, k, n);
        let mut nans = 0;
        for (idx, (x, y)) in whole.iter().zip(&naive).enumerate() {
            let (x64, y64) = (x.to_f64(), y.to_f64());
            assert_eq!(x64.is_nan(), y64.is_nan(), "C[{}][{}]: {x64} vs naive {y64}", idx / n, idx % n);
            if x64.is_nan() {
                nans += 1;
                assert_eq!(
                    whole_bits[idx],
                    canonical,
                    "C[{}][{}] is a NaN but not the canonical one",
                    idx / n,
                    idx % n
                );
            } else if x64.is_infinite() || y64.is_infinite() || x64 == 0.0 || y64 == 0.0 {
                assert_eq!(x64, y64, "C[{}][{}]", idx / n, idx % n);
            }
        }
        assert!(nans > n && nans < m * n / 2, "{nans} NaNs");
    }

    #[test]
    fn special_values_split_invariant_f64() {
        special_values::<f64>(21, SplitMix::f64s, bits_f64);
    }

    #[test]
    fn special_values_split_invariant_f32() {
        special_values::<f32>(22, SplitMix::f32s, |v| bits_f32(v).into_iter().map(u64::from).collect());
    }

    #[test]
    fn i64_wraps_near_max() {
        let big = i64::MAX - 2;
        // 1×3 · 3×2.
        let a = [big, 3, big];
        let b = [big, 2, 5, i64::MAX, -7, big];
        let c = block(&a, &b, 1, 3, 2, 123);
        let want0 = big.wrapping_mul(big).wrapping_add(3i64.wrapping_mul(5)).wrapping_add(big.wrapping_mul(-7));
        let want1 = big.wrapping_mul(2).wrapping_add(3i64.wrapping_mul(i64::MAX)).wrapping_add(big.wrapping_mul(big));
        // Hand-checked via i128 modulo 2^64: (2^63-3)^2 ≡ 9, 15, (2^63-3)(-7) ≡ 21 - 7·2^63 ≡ 21 + 2^63.
        let mod64 = |x: i128| x as i64; // truncation is reduction mod 2^64
        let b128 = big as i128;
        assert_eq!(want0, mod64(b128 * b128 + 15 + b128 * -7));
        assert_eq!(want1, mod64(b128 * 2 + 3 * i64::MAX as i128 + b128 * b128));
        assert_eq!(c, vec![want0, want1]);
        assert_eq!(matmul_naive(&a, &b, 1, 3, 2), c);
    }

    /// `Σ_p a·b` in i128, reduced modulo 2^64 (what wrapping i64 gives).
    fn i128_reference(a: &[i64], b: &[i64], m: usize, k: usize, n: usize) -> Vec<i64> {
        let mut c = vec![0i64; m * n];
        for i in 0..m {
            for j in 0..n {
                // |a·b| < 2^126 and the sum wraps in i128 only modulo 2^128,
                // which is still exact modulo 2^64.
                let sum = (0..k).fold(0i128, |s, p| s.wrapping_add(a[i * k + p] as i128 * b[p * n + j] as i128));
                c[i * n + j] = sum as i64;
            }
        }
        c
    }

    #[test]
    fn i64_matches_exact_i128_reference() {
        let mut rng = SplitMix(4);
        for &(m, k, n) in SHAPES.iter().chain(&TILE_SHAPES) {
            let a = rng.small_i64s(m * k);
            let b = rng.small_i64s(k * n);
            let fast = block(&a, &b, m, k, n, -1);
            let exact = i128_reference(&a, &b, m, k, n);
            assert_eq!(fast, exact, "shape {m}x{k}x{n}");
            assert_eq!(matmul_naive(&a, &b, m, k, n), exact, "naive {m}x{k}x{n}");
        }
    }

    #[test]
    fn i64_fits_f64_exactly_boundary() {
        const P53: u64 = 1 << 53;
        // 2^53 - 1 = 6361 · 69431 · 20394401 (and 6361 · 69431 = 441650591).
        assert_eq!(6361u128 * 69431 * 20394401, u128::from(P53 - 1));
        assert!(i64_fits_f64_exactly(6361, 69431, 20394401));
        assert!(i64_fits_f64_exactly(441650591, 20394401, 1));
        assert!(i64_fits_f64_exactly(1, 1, (P53 - 1) as usize));
        assert!(i64_fits_f64_exactly(P53 - 1, 1, 1));
        // Exactly 2^53: not below the bound.
        assert!(!i64_fits_f64_exactly(1 << 26, 1 << 26, 2));
        assert!(!i64_fits_f64_exactly(1, 1, P53 as usize));
        assert!(!i64_fits_f64_exactly(P53, 1, 1));
        assert!(!i64_fits_f64_exactly(6361, 69431, 20394402));
        assert!(i64_fits_f64_exactly(1 << 26, 1 << 26, 1));
        // Zero factors, and products far beyond u128.
        assert!(i64_fits_f64_exactly(0, u64::MAX, usize::MAX));
        assert!(i64_fits_f64_exactly(u64::MAX, u64::MAX, 0));
        assert!(!i64_fits_f64_exactly(u64::MAX, u64::MAX, usize::MAX));
        assert!(!i64_fits_f64_exactly(i64::MIN.unsigned_abs(), 1, 1));
        assert_eq!(max_abs(&[3, i64::MIN, -5]), 1 << 63);
        assert_eq!(max_abs(&[]), 0);
        assert_eq!(max_abs(&[-7, 6]), 7);
    }

    /// Data right at the bound, with every product of one sign so the sums
    /// reach `k·max|A|·max|B|`: just under 2^53 the exact path runs and is
    /// exact; one step over, the wrapping kernel runs; both agree with i128.
    #[test]
    fn i64_paths_at_the_bound() {
        let (m, k, n) = (EXACT_MIN_ROWS + 1, 7, 2);
        let max_a: i64 = 1 << 25;
        let max_b: i64 = 38_347_922; // 7 · 2^25 · 38347922 = 2^53 - 2^26
        for (max_b, fast) in [(max_b, true), (max_b + 1, false)] {
            assert_eq!(i64_fits_f64_exactly(max_a as u64, max_b as u64, k), fast, "max|B| = {max_b}");
            // Row 0 all max|A|, so C[0][0] reaches k·max|A|·max|B|.
            let a: Vec<i64> = (0..m * k).map(|i| if i > k && i % 5 == 4 { max_a - 1 } else { max_a }).collect();
            let b: Vec<i64> = (0..k * n).map(|i| if i % 2 == 0 { max_b } else { -max_b }).collect();
            assert_eq!(takes_exact_path(&a, &b, m, k), fast, "max|B| = {max_b}");
            let want = i128_reference(&a, &b, m, k, n);
            assert_eq!(block(&a, &b, m, k, n, 5), want, "max|B| = {max_b}");
            // Both paths directly, whatever the bound says: the wrapping one is
            // always right; the f64 one is right at least under the bound.
            let mut c = vec![9; m * n];
            tiled(&a, &b, &mut c, m, k, n);
            assert_eq!(c, want);
            if fast {
                let mut c = vec![9; m * n];
                i64_via_f64(&a, &b, &mut c, m, k, n);
                assert_eq!(c, want);
                // The largest sum reaches 7 · 2^25 · 38347922 = 2^53 - 2^26.
                assert_eq!(want[0], (1 << 53) - (1 << 26));
            }
        }
        // Why the bound matters: (2^27 + 1)(2^27 - 1) = 2^54 - 1 is not an f64.
        let (a, b) = ([(1i64 << 27) + 1], [(1i64 << 27) - 1]);
        assert!(!i64_fits_f64_exactly(a[0] as u64, b[0] as u64, 1));
        assert_eq!(block(&a, &b, 1, 1, 1, 0), vec![(1 << 54) - 1]);
        let mut c = vec![0; 1];
        i64_via_f64(&a, &b, &mut c, 1, 1, 1);
        assert_ne!(c, vec![(1 << 54) - 1], "f64 would have been exact after all");
    }

    /// Values around 2^40 (products around 2^80, far beyond the bound) take
    /// the wrapping kernel: C equals the i128 product reduced mod 2^64.
    #[test]
    fn i64_beyond_the_bound_wraps_like_i128_mod_2_64() {
        let mut rng = SplitMix(6);
        for &(m, k, n) in SHAPES.iter().chain(&TILE_SHAPES) {
            let a = rng.big_i64s(m * k);
            let b = rng.big_i64s(k * n);
            if m * k > 0 && k * n > 0 {
                assert!(!i64_fits_f64_exactly(max_abs(&a), max_abs(&b), k));
            }
            let want = i128_reference(&a, &b, m, k, n);
            assert_eq!(block(&a, &b, m, k, n, 3), want, "shape {m}x{k}x{n}");
            assert_eq!(matmul_naive(&a, &b, m, k, n), want, "naive {m}x{k}x{n}");
        }
    }

    /// A whose rows alternate between runs of 16 small and 16 huge values,
    /// cut so that some blocks fall under the bound (exact f64 path) and
    /// others over it or are too thin (wrapping kernel): every cut stacks to
    /// the same C, which is the naive wrapping product.
    #[test]
    fn i64_blocks_may_take_different_paths() {
        let mut rng = SplitMix(7);
        let (m, k, n) = (100, 300, 37);
        // Rows 32r..32r+15 small (|a| ≤ 2^20), rows 32r+16..32r+31 huge (≈ 2^40).
        let mut a = Vec::with_capacity(m * k);
        for i in 0..m {
            a.extend(if i % 32 < 16 { rng.ints(k, 1 << 20) } else { rng.big_i64s(k) });
        }
        let b = rng.ints(k * n, 1 << 20); // 2^20 · 2^20 · 300 < 2^49
        let naive = matmul_naive(&a, &b, m, k, n);
        assert_eq!(naive, i128_reference(&a, &b, m, k, n));
        assert_eq!(block(&a, &b, m, k, n, 1), naive, "whole");
        for rows in BLOCK_ROWS.into_iter().chain([8, 10, 32]) {
            let (mut exact, mut wrapping) = (0, 0);
            for r0 in (0..m).step_by(rows) {
                let r1 = (r0 + rows).min(m);
                if takes_exact_path(&a[r0 * k..r1 * k], &b, r1 - r0, k) {
                    exact += 1;
                } else {
                    wrapping += 1;
                }
            }
            if (EXACT_MIN_ROWS..=16).contains(&rows) {
                assert!(exact > 0 && wrapping > 0, "blocks of {rows}: {exact} exact, {wrapping} wrapping");
            }
            assert_eq!(
                stacked(&a, &b, m, k, n, rows, 1),
                naive,
                "blocks of {rows}: {exact} exact, {wrapping} wrapping"
            );
        }
        // And the small-valued rows give the same bits through either path.
        let small = &a[..16 * k];
        let (mut via_f64, mut via_tiled) = (vec![0; 16 * n], vec![0; 16 * n]);
        i64_via_f64(small, &b, &mut via_f64, 16, k, n);
        tiled(small, &b, &mut via_tiled, 16, k, n);
        assert_eq!(via_f64, via_tiled);
        assert_eq!(via_f64, naive[..16 * n]);
    }

    #[test]
    #[should_panic(expected = "expected rows*k")]
    fn wrong_a_length_panics() {
        let mut c = [0.0f64; 4];
        matmul_block(&[1.0; 5], &[1.0; 6], &mut c, 2, 3, 2);
    }

    #[test]
    #[should_panic(expected = "expected k*n")]
    fn wrong_b_length_panics() {
        let mut c = [0i64; 4];
        matmul_block(&[1; 6], &[1; 5], &mut c, 2, 3, 2);
    }

    #[test]
    #[should_panic(expected = "expected rows*n")]
    fn wrong_c_length_panics() {
        let mut c = [0.0f32; 3];
        matmul_block(&[1.0; 6], &[1.0; 6], &mut c, 2, 3, 2);
    }

    /// Best of `reps` runs of one `m × k × n` product; returns (seconds,
    /// GOP/s) and prints them.
    fn time<T: Kernel>(name: &str, a: &[T], b: &[T], (m, k, n): (usize, usize, usize), reps: usize) -> (f64, f64) {
        let mut c = vec![T::default(); m * n];
        let mut best = f64::INFINITY;
        for _ in 0..reps {
            let t = std::time::Instant::now();
            matmul_block(a, b, &mut c, m, k, n);
            best = best.min(t.elapsed().as_secs_f64());
        }
        let gops = 2.0 * (m * k * n) as f64 / best / 1e9;
        println!("{name} {m}x{k}x{n}: {best:.3} s, {gops:.2} GOP/s");
        (best, gops)
    }

    /// Throughput check, not run by default (GFLOP/s for floats, GOP/s for
    /// i64, best of 3, one thread):
    /// `cargo test --release -p procjob-worker --lib kernels::tests::bench_1000 -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn bench_1000_cubed() {
        let shape = (1000, 1000, 1000);
        let len = 1000 * 1000;
        let mut rng = SplitMix(5);
        let (af, bf) = (rng.f64s(len), rng.f64s(len));
        time("f64", &af, &bf, shape, 3);
        let (af32, bf32) = (rng.f32s(len), rng.f32s(len));
        time("f32", &af32, &bf32, shape, 3);
        let (ai, bi) = (rng.small_i64s(len), rng.small_i64s(len));
        assert!(takes_exact_path(&ai, &bi, 1000, 1000));
        time("i64 exact (via f64)", &ai, &bi, shape, 3);
        let (ai, bi) = (rng.big_i64s(len), rng.big_i64s(len));
        assert!(!takes_exact_path(&ai, &bi, 1000, 1000));
        time("i64 wrapping", &ai, &bi, shape, 3);
    }

    /// Where the exact i64 path starts to pay ([`EXACT_MIN_ROWS`]): for thin
    /// blocks of small integers (k = n = 2000), the time of the check plus
    /// the f64 path against the wrapping kernel:
    /// `cargo test --release -p procjob-worker --lib kernels::tests::bench_i64_thin -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn bench_i64_thin_blocks() {
        let (k, n) = (2000, 2000);
        let mut rng = SplitMix(9);
        let b = rng.small_i64s(k * n);
        let mean_ms = |f: &mut dyn FnMut()| {
            f(); // warm up (first-touch page faults)
            let t = std::time::Instant::now();
            for _ in 0..5 {
                f();
            }
            t.elapsed().as_secs_f64() / 5.0 * 1e3
        };
        for rows in [1, 2, 4, 8, 16, 32, 64, 128] {
            let a = rng.small_i64s(rows * k);
            let mut c = vec![0; rows * n];
            let exact = mean_ms(&mut || {
                assert!(i64_fits_f64_exactly(max_abs(&a), max_abs(&b), k));
                i64_via_f64(&a, &b, &mut c, rows, k, n);
            });
            let wrapping = mean_ms(&mut || tiled_i64(&a, &b, &mut c, rows, k, n));
            println!("rows {rows:3}: check + exact f64 path {exact:6.2} ms, wrapping kernel {wrapping:6.2} ms");
        }
    }

    /// The wrapping i64 kernel at n = 1000, 2000, 4000 (or the sizes in
    /// `PROCJOB_BENCH_SIZES`, comma-separated), best of 3 (of 1 above 2000):
    /// `cargo test --release -p procjob-worker --lib kernels::tests::bench_i64_wrapping -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn bench_i64_wrapping_sizes() {
        let sizes = std::env::var("PROCJOB_BENCH_SIZES").unwrap_or_else(|_| "1000,2000,4000".into());
        for size in sizes.split(',').map(|s| s.trim().parse::<usize>().expect("a size")) {
            let mut rng = SplitMix(8);
            let (a, b) = (rng.big_i64s(size * size), rng.big_i64s(size * size));
            time("i64 wrapping", &a, &b, (size, size, size), if size > 2000 { 1 } else { 3 });
        }
    }
}
