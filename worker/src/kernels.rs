//! Block-row matrix product kernels: `C_block = A_block · B`.
//!
//! A job splits the rows of `A` into blocks and hands each block to some
//! worker; the blocks of `C` are stacked back together afterwards. For the
//! result to be the same no matter how many processes ran the job or how the
//! rows were cut, every kernel here obeys one **summation-order invariant**:
//!
//! > each element `C[i][j]` is computed as `acc = 0`, then
//! > `acc = acc + A[i][p] * B[p][j]` for `p = 0, 1, …, k-1` in ascending
//! > order, each multiplication and each addition rounded on its own.
//!
//! Nothing in that recipe depends on how many rows the block has or where row
//! `i` sits in it, so splitting `A` into any blocks gives bit-identical `C` for
//! floats (floating-point addition is not associative, so a different order —
//! or an FMA, or several partial accumulators combined at the end — would
//! change the last bits and make results depend on the process count).
//! Rust never contracts `a * b + c` into an FMA on its own, so plain `*` and
//! `+` are enough to keep each operation separately rounded.
//!
//! For `i64` the products and sums wrap, as numpy's `int64` matmul does.
//! Wrapping arithmetic is associative, so order would not matter there, but
//! the same loop structure is used for all types.
//!
//! The fast kernel ([`matmul_block`]) reorders the *loops* for cache and SIMD
//! friendliness (column tiles, depth tiles, four rows at a time) but never the
//! sequence of operations applied to any single element; [`matmul_naive`] is
//! the plain triple loop it is tested against.

use crate::dtype::Element;

/// Columns of `B`/`C` processed per tile. Four `C` row tiles plus one `B` row
/// tile of this width (at 8 bytes an element: 5 × 2 KiB) stay in L1.
const NC: usize = 256;

/// Rows of `B` (the shared dimension `k`) per depth tile. A `KC × NC` panel of
/// `B` (256 KiB for 8-byte elements) stays in L2 while every row group of `A`
/// sweeps over it. Splitting `p` into tiles still visits `p` in ascending
/// order for every element, because the tiles are taken in ascending order and
/// the partial sum lives in `C` itself between tiles — one accumulator, never
/// two combined.
const KC: usize = 128;

/// Rows of `A`/`C` processed together, sharing each load of a `B` row.
const MR: usize = 4;

/// The scalar step `acc + x * y` behind every kernel, one per element type.
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
/// follows the summation-order invariant described in the [module
/// docs](self).
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
        tiled(a, b, c, rows, k, n);
    }
}

impl Kernel for f64 {
    fn matmul_block(a: &[f64], b: &[f64], c: &mut [f64], rows: usize, k: usize, n: usize) {
        tiled(a, b, c, rows, k, n);
    }
}

impl Kernel for f32 {
    fn matmul_block(a: &[f32], b: &[f32], c: &mut [f32], rows: usize, k: usize, n: usize) {
        tiled(a, b, c, rows, k, n);
    }
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

/// The naive `i-j-p` triple loop, in the same per-element summation order as
/// [`matmul_block`]; the reference the fast kernel is tested against.
/// Returns the `rows × n` row-major product of `a` (`rows × k`) and `b`
/// (`k × n`).
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

/// The tiled kernel shared by all element types, built on the type's
/// [`Step::mul_add`]. Each type gets its own monomorphised, inlined and
/// auto-vectorised copy.
///
/// Loop order: column tile `jc` → depth tile `pc` → group of `MR` rows →
/// `p` ascending within the tile → `j` within the tile. For every element the
/// steps arrive with `p` ascending (depth tiles in ascending order, `p`
/// ascending inside each), starting from the zero written before the first
/// tile: exactly the naive order.
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

        /// Small integers in [-1000, 1000], so products and sums stay exact.
        fn small_i64s(&mut self, len: usize) -> Vec<i64> {
            (0..len).map(|_| (self.next_u64() % 2001) as i64 - 1000).collect()
        }
    }

    const SHAPES: [(usize, usize, usize); 7] =
        [(1, 1, 1), (7, 3, 5), (33, 65, 17), (64, 64, 64), (0, 4, 3), (4, 0, 3), (4, 3, 0)];

    /// Shapes that also cross the column (NC) and depth (KC) tile edges and
    /// leave a remainder of rows after the groups of four.
    const TILE_SHAPES: [(usize, usize, usize); 3] = [(9, 300, 520), (6, 129, 257), (5, 1, 1)];

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

    #[test]
    fn block_equals_naive_f64_bitwise() {
        let mut rng = SplitMix(1);
        for &(m, k, n) in SHAPES.iter().chain(&TILE_SHAPES) {
            let a = rng.f64s(m * k);
            let b = rng.f64s(k * n);
            let fast = block(&a, &b, m, k, n, f64::NAN);
            let naive = matmul_naive(&a, &b, m, k, n);
            assert_eq!(fast.len(), m * n);
            assert_eq!(bits_f64(&fast), bits_f64(&naive), "shape {m}x{k}x{n}");
        }
    }

    #[test]
    fn block_equals_naive_f32_bitwise() {
        let mut rng = SplitMix(2);
        for &(m, k, n) in SHAPES.iter().chain(&TILE_SHAPES) {
            let a = rng.f32s(m * k);
            let b = rng.f32s(k * n);
            let fast = block(&a, &b, m, k, n, f32::NAN);
            let naive = matmul_naive(&a, &b, m, k, n);
            assert_eq!(fast.len(), m * n);
            assert_eq!(bits_f32(&fast), bits_f32(&naive), "shape {m}x{k}x{n}");
        }
    }

    #[test]
    fn zero_k_gives_zeros() {
        let c = block::<f64>(&[], &[], 4, 0, 3, 7.5);
        assert_eq!(c, vec![0.0; 12]);
        let c = block::<i64>(&[], &[], 2, 0, 2, 99);
        assert_eq!(c, vec![0; 4]);
    }

    #[test]
    fn row_blocks_stack_to_whole_product_bitwise() {
        let mut rng = SplitMix(3);
        let (m, k, n) = (23, 300, 270);
        let a = rng.f64s(m * k);
        let b = rng.f64s(k * n);
        let whole = block(&a, &b, m, k, n, 0.0);
        for bs in [1, 2, 3, 5, 7] {
            let mut stacked = Vec::with_capacity(m * n);
            for r0 in (0..m).step_by(bs) {
                let rows = bs.min(m - r0);
                stacked.extend(block(&a[r0 * k..(r0 + rows) * k], &b, rows, k, n, 0.0));
            }
            assert_eq!(bits_f64(&stacked), bits_f64(&whole), "block size {bs}");
        }
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

    #[test]
    fn i64_matches_exact_i128_reference() {
        let mut rng = SplitMix(4);
        for &(m, k, n) in SHAPES.iter().chain(&TILE_SHAPES) {
            let a = rng.small_i64s(m * k);
            let b = rng.small_i64s(k * n);
            let fast = block(&a, &b, m, k, n, -1);
            let mut exact = vec![0i128; m * n];
            for i in 0..m {
                for j in 0..n {
                    exact[i * n + j] = (0..k).map(|p| a[i * k + p] as i128 * b[p * n + j] as i128).sum();
                }
            }
            let exact: Vec<i64> = exact.iter().map(|&x| i64::try_from(x).unwrap()).collect();
            assert_eq!(fast, exact, "shape {m}x{k}x{n}");
            assert_eq!(matmul_naive(&a, &b, m, k, n), exact, "naive {m}x{k}x{n}");
        }
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

    /// Throughput check, not run by default:
    /// `cargo test --release -p procjob-worker kernels::tests::bench -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn bench_1000_cubed() {
        let (m, k, n) = (1000, 1000, 1000);
        let mut rng = SplitMix(5);
        let ai = rng.small_i64s(m * k);
        let bi = rng.small_i64s(k * n);
        let af = rng.f64s(m * k);
        let bf = rng.f64s(k * n);
        let af32 = rng.f32s(m * k);
        let bf32 = rng.f32s(k * n);
        fn time<T: Kernel>(name: &str, a: &[T], b: &[T], m: usize, k: usize, n: usize) {
            let mut c = vec![T::default(); m * n];
            let mut best = f64::INFINITY;
            for _ in 0..3 {
                let t = std::time::Instant::now();
                matmul_block(a, b, &mut c, m, k, n);
                best = best.min(t.elapsed().as_secs_f64());
            }
            let gops = 2.0 * (m * k * n) as f64 / best / 1e9;
            println!("{name} {m}x{k}x{n}: {best:.3} s, {gops:.2} GOP/s");
        }
        time("i64", &ai, &bi, m, k, n);
        time("f64", &af, &bf, m, k, n);
        time("f32", &af32, &bf32, m, k, n);
    }
}
