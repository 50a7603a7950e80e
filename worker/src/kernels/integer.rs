//! The `i64` kernels: the exact path through `f64` ([`i64_via_f64`], when
//! [`i64_fits_f64_exactly`]) and the wrapping tiled kernel built for the
//! CPU's vector width ([`tiled_i64`]), and the per-block choice between
//! them. Both give the same bits (the [module docs](super), "`i64`: two
//! paths, one answer").

use super::float::dgemm;
use super::gemm::{dgemm_i64, Convert, ExactI64, SmallI64, MAGIC};
use super::tiled::tiled;
use super::wide::widest;

/// Rows of `B` converted to `f64` at a time by the exact `i64` path, so its
/// scratch space is `EXACT_KC × n` plus `rows × EXACT_KC` doubles rather than
/// a copy of all of `B`. A multiple of the GEMMs' own depth step (256 in
/// both [`super::gemm`] and matrixmultiply), so cutting `k` here adds no extra
/// passes over `C`.
const EXACT_KC: usize = 512;

thread_local! {
    /// The exact path's `f64` copies of a slice of `A` and of `B`, kept
    /// between calls on this thread.
    static EXACT_SCRATCH: std::cell::Cell<Vec<f64>> = const { std::cell::Cell::new(Vec::new()) };
}

/// Blocks of fewer rows than this always take the wrapping `i64` kernel: for
/// thin blocks the exact path's cost is scanning and converting `B`, which
/// the wrapping kernel does not pay, and below this many rows that makes it
/// the slower one (`bench_i64_thin_blocks`; `docs/kernels.md`, "The i64
/// paths").
pub(super) const EXACT_MIN_ROWS: usize = 8;

/// Whether an `i64` block goes through [`i64_via_f64`] rather than the
/// wrapping kernel: it has at least [`EXACT_MIN_ROWS`] rows (thinner blocks
/// are as fast or faster in the wrapping kernel, so they skip the scan) and
/// passes [`i64_fits_f64_exactly`]. Either way the bits are the same.
#[cfg(test)]
pub(super) fn takes_exact_path(a: &[i64], b: &[i64], rows: usize, k: usize) -> bool {
    exact_maxima(a, b, rows, k).is_some()
}

/// [`takes_exact_path`], with the maxima it found when it does.
pub(super) fn exact_maxima(a: &[i64], b: &[i64], rows: usize, k: usize) -> Option<Maxima> {
    if rows < EXACT_MIN_ROWS {
        return None;
    }
    let (a, b) = (max_abs(a), max_abs(b));
    i64_fits_f64_exactly(a, b, k).then_some(Maxima { a, b })
}

/// `max|A|` and `max|B|` of a product that takes the exact path.
#[derive(Debug, Clone, Copy)]
pub(super) struct Maxima {
    pub(super) a: u64,
    pub(super) b: u64,
}

/// The largest `|x|` in `v` (0 for an empty slice), as `u64` so that
/// `i64::MIN` (magnitude 2^63) has one.
pub(super) fn max_abs(v: &[i64]) -> u64 {
    widest(|| v.iter().fold(0, |m, &x| m.max(x.unsigned_abs())))
}

/// Integers of magnitude below this convert between `i64` and `f64` with
/// one integer addition and one float subtraction ([`to_f64`], [`to_i64`]),
/// which vectorize on every x86-64 (SSE2 has no instruction that converts a
/// 64-bit integer, and AVX2 none either; only AVX-512DQ has).
const SMALL: u64 = 1 << 51;

/// `dst[i] = src[i] as f64`, exactly; `small` says every `|src[i]|` is below
/// [`SMALL`], so the fast form holds.
fn to_f64(dst: &mut [f64], src: &[i64], small: bool) {
    widest(|| to_f64_plain(dst, src, small));
}

#[inline(always)]
fn to_f64_plain(dst: &mut [f64], src: &[i64], small: bool) {
    if small {
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = SmallI64::convert(s);
        }
    } else {
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = ExactI64::convert(s);
        }
    }
}

/// Each element of `c`, holding the bits of an integer-valued `f64` of
/// magnitude below 2^53, replaced by that integer; `small`: below
/// [`SMALL`], so the fast form holds (`MAGIC + x` is exact there, and its
/// bits are `MAGIC`'s plus `x`; a `-0.0` gives 0).
fn to_i64(c: &mut [i64], small: bool) {
    widest(|| to_i64_plain(c, small));
}

#[inline(always)]
fn to_i64_plain(c: &mut [i64], small: bool) {
    if small {
        let magic = MAGIC.to_bits() as i64;
        for x in c.iter_mut() {
            *x = ((f64::from_bits(*x as u64) + MAGIC).to_bits() as i64).wrapping_sub(magic);
        }
    } else {
        for x in c.iter_mut() {
            *x = f64::from_bits(*x as u64) as i64;
        }
    }
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
#[cfg(test)]
pub(super) fn i64_via_f64(a: &[i64], b: &[i64], c: &mut [i64], rows: usize, k: usize, n: usize) {
    let max = Maxima { a: max_abs(a), b: max_abs(b) };
    i64_via_f64_within(a, b, c, rows, k, n, max);
}

/// [`i64_via_f64`] given `max|a|` and `max|b|`, which choose the fast
/// conversions where they hold. Where the packed GEMM runs (AVX2 and FMA),
/// `A` and `B` are converted as they are packed ([`dgemm_i64`]); elsewhere
/// slices of them are converted into a scratch buffer for the fallback
/// GEMM.
pub(super) fn i64_via_f64_within(a: &[i64], b: &[i64], c: &mut [i64], rows: usize, k: usize, n: usize, max: Maxima) {
    debug_assert!(a.len() == rows * k && b.len() == k * n && c.len() == rows * n);
    if k == 0 {
        c.fill(0);
        return;
    }
    {
        // `C` is accumulated as f64 in `c`'s own memory, then converted in
        // place below; this saves a `rows × n` scratch buffer.
        let len = c.len();
        // SAFETY: f64 and i64 have the same size and alignment and every bit
        // pattern is a valid value of both, so `c`'s memory is a valid
        // `[f64; len]`. The view reborrows `c` exclusively and is dropped at
        // the end of this scope, before `c` is used again.
        let c_f64: &mut [f64] = unsafe { std::slice::from_raw_parts_mut(c.as_mut_ptr().cast::<f64>(), len) };
        let small = max.a < SMALL && max.b < SMALL;
        if !dgemm_i64(a, b, c_f64, rows, k, n, small) {
            via_scratch(a, b, c_f64, rows, k, n, max);
        }
    }
    // Each element now holds the bits of an exact integer-valued f64 with
    // magnitude below 2^53, so converting it is exact; k · max|A| · max|B|
    // bounds every element (see above).
    let bound = u128::from(max.a) * u128::from(max.b) * k as u128;
    to_i64(c, bound < u128::from(SMALL));
}

/// `c = a · b` in `f64`, the inputs converted [`EXACT_KC`] rows of `b` at a
/// time into a scratch buffer for [`dgemm`] (the fallback where the packed
/// GEMM does not run).
fn via_scratch(a: &[i64], b: &[i64], c: &mut [f64], rows: usize, k: usize, n: usize, max: Maxima) {
    let step = EXACT_KC.min(k);
    // The scratch is kept between calls on this thread, as the GEMM's
    // packing buffer is: fresh pages for it on every call cost a product
    // of 1000² several percent in page faults.
    let mut scratch = EXACT_SCRATCH.take();
    if scratch.len() < (rows + n) * step {
        scratch = vec![0.0f64; (rows + n) * step];
    }
    let (a_f64, b_f64) = scratch.split_at_mut(rows * step);
    let mut p0 = 0;
    while p0 < k {
        let kc = step.min(k - p0);
        // The exactness argument covers any way of cutting k: each
        // element's chunk total is a sum of a subset of its k products.
        let (a_chunk, b_chunk) = (&mut a_f64[..rows * kc], &mut b_f64[..kc * n]);
        for (dst, src) in a_chunk.chunks_exact_mut(kc).zip(a.chunks_exact(k)) {
            to_f64(dst, &src[p0..p0 + kc], max.a < SMALL);
        }
        to_f64(b_chunk, &b[p0 * n..(p0 + kc) * n], max.b < SMALL);
        // First chunk: C = A·B; then C += A·B.
        dgemm(a_chunk, b_chunk, c, rows, kc, n, p0 > 0);
        p0 += kc;
    }
    EXACT_SCRATCH.set(scratch);
}

/// The wrapping `i64` kernel: [`tiled`], compiled again with AVX-512DQ and
/// with AVX2 enabled and picked at run time by what the CPU has. Without
/// AVX2 there is no vector 64-bit multiply worth using, so the plain build
/// does one scalar `imul` per step; the AVX2 build multiplies four lanes at
/// a time out of 32-bit halves; the AVX-512DQ build has a real 64-bit
/// vector multiply (`vpmullq`) over eight lanes. What each gains on which
/// CPU: `docs/kernels.md`, "The i64 paths" and "Figures". Wrapping
/// arithmetic is exact modulo 2^64, so all give the same bits.
pub(super) fn tiled_i64(a: &[i64], b: &[i64], c: &mut [i64], rows: usize, k: usize, n: usize) {
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

#[cfg(test)]
mod conversions {
    use super::{max_abs, to_f64, to_i64, SMALL};

    /// Integers up to [`SMALL`] in magnitude, its edges included, and a
    /// spread between.
    fn samples() -> Vec<i64> {
        let edge = SMALL as i64 - 1;
        let mut v = vec![0, 1, -1, 2, -2, edge, -edge, edge - 1, -(edge - 1), 1 << 50, -(1 << 50), 255, -256];
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..1000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            v.push((x % (2 * SMALL - 1)) as i64 - edge);
        }
        v
    }

    #[test]
    fn the_fast_conversions_are_exact_below_2_to_the_51() {
        let v = samples();
        let mut f = vec![0.0; v.len()];
        to_f64(&mut f, &v, true);
        for (&x, &y) in v.iter().zip(&f) {
            assert_eq!(y.to_bits(), (x as f64).to_bits(), "{x}");
        }
        let mut c: Vec<i64> = f.iter().map(|y| y.to_bits() as i64).collect();
        c.push((-0.0f64).to_bits() as i64);
        to_i64(&mut c, true);
        assert_eq!(&c[..v.len()], &v[..]);
        assert_eq!(c[v.len()], 0, "-0.0 gives 0");
    }

    #[test]
    fn the_fallback_through_a_scratch_buffer_is_exact_too() {
        use super::{via_scratch, Maxima};
        // k above EXACT_KC, so the scratch is used in slices.
        let (rows, k, n) = (9, 700, 11);
        let a: Vec<i64> = (0..rows * k).map(|i| (i as i64 * 7919) % 2001 - 1000).collect();
        let b: Vec<i64> = (0..k * n).map(|i| (i as i64 * 104_729) % 4001 - 2000).collect();
        let mut c = vec![0.0; rows * n];
        via_scratch(&a, &b, &mut c, rows, k, n, Maxima { a: max_abs(&a), b: max_abs(&b) });
        let naive = crate::kernels::matmul_naive(&a, &b, rows, k, n);
        let got: Vec<i64> = c.iter().map(|&x| x as i64).collect();
        assert_eq!(got, naive);
    }

    #[test]
    fn the_plain_conversions_serve_beyond_2_to_the_51() {
        let v = [1i64 << 52, -(1 << 52) + 3, (1 << 53) - 1, SMALL as i64];
        let mut f = vec![0.0; v.len()];
        to_f64(&mut f, &v, false);
        let mut c: Vec<i64> = f.iter().map(|y| y.to_bits() as i64).collect();
        to_i64(&mut c, false);
        assert_eq!(c, v);
    }

    #[test]
    fn max_abs_is_the_largest_magnitude() {
        let mut v = samples();
        v.extend([i64::MIN, i64::MAX, -7]);
        for len in [0, 1, 3, 8, 15, 16, 17, 100, v.len()] {
            let want = v[..len].iter().map(|x| x.unsigned_abs()).max().unwrap_or(0);
            assert_eq!(max_abs(&v[..len]), want, "{len}");
        }
        assert_eq!(max_abs(&v), 1 << 63);
        assert_eq!(max_abs(&[-5, 3]), 5);
    }
}
