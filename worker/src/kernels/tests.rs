//! Tests of every kernel against the naive reference: split invariance
//! (bit for bit, whatever the blocks), special values, both `i64` paths and
//! the bound between them, and timings run on demand (`--ignored`).

use super::integer::{i64_via_f64, max_abs, takes_exact_path, tiled_i64, EXACT_MIN_ROWS};
use super::tiled::tiled;
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
/// KC 128, 4 rows), [`super::gemm`] (KC 256, MR 6, NR 8 or 16, MC 48 or
/// 96) and matrixmultiply (KC 256, MR 8, NR 4 or 8, MC 64), with
/// remainders of rows and columns.
const TILE_SHAPES: [(usize, usize, usize); 5] = [(9, 300, 520), (6, 129, 257), (5, 1, 1), (70, 513, 9), (3, 7, 1030)];

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
/// the `f64` [`super::gemm`]), cutting 67
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
/// NaNs, infinities and zeros. At width 11 the special columns lie in a
/// zero-padded edge tile; at `wide` (one AVX-512 panel and a vector) in
/// the last vector, which a narrower microkernel writes straight into C.
fn special_values<T: Float>(
    seed: u64,
    make: fn(&mut SplitMix, usize) -> Vec<T>,
    bits: fn(&[T]) -> Vec<u64>,
    wide: usize,
) {
    for n in [11, wide] {
        special_values_at_width(seed, make, bits, n);
    }
}

fn special_values_at_width<T: Float>(
    seed: u64,
    make: fn(&mut SplitMix, usize) -> Vec<T>,
    bits: fn(&[T]) -> Vec<u64>,
    n: usize,
) {
    let mut rng = SplitMix(seed);
    let (m, k) = (19, 300); // k crosses one depth chunk (256)
                            // The special columns: the first ones of the width 11, the last ones
                            // of a wider product.
    let (c2, c4, c7) = if n == 11 { (2, 4, 7) } else { (n - 6, n - 4, n - 1) };
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
    // Column c2: one NaN. Column c4: all -0. Column c7: -∞ late.
    b[10 * n + c2] = f(f64::NAN);
    for p in 0..k {
        b[p * n + c4] = f(-0.0);
    }
    b[270 * n + c7] = f(f64::NEG_INFINITY);
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
            assert_eq!(whole_bits[idx], canonical, "C[{}][{}] is a NaN but not the canonical one", idx / n, idx % n);
        } else if x64.is_infinite() || y64.is_infinite() || x64 == 0.0 || y64 == 0.0 {
            assert_eq!(x64, y64, "C[{}][{}]", idx / n, idx % n);
        }
    }
    assert!(nans > n && nans < m * n / 2, "{nans} NaNs");
}

#[test]
fn special_values_split_invariant_f64() {
    special_values::<f64>(21, SplitMix::f64s, bits_f64, 40);
}

#[test]
fn special_values_split_invariant_f32() {
    special_values::<f32>(22, SplitMix::f32s, |v| bits_f32(v).into_iter().map(u64::from).collect(), 80);
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
        assert_eq!(stacked(&a, &b, m, k, n, rows, 1), naive, "blocks of {rows}: {exact} exact, {wrapping} wrapping");
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

/// A 64-byte line, 64-byte aligned.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u8; 64]);

/// 64-byte-aligned room for `len` elements of `T`, zeroed.
fn aligned<T: Copy>(len: usize) -> Vec<Line> {
    vec![Line([0; 64]); (len * std::mem::size_of::<T>()).div_ceil(64)]
}

/// A `B` packed once, given to blocks of rows through
/// [`Kernel::matmul_block_packed`]: the bits of [`matmul_block`] on `B`'s
/// rows, in this process's own panels (read in place when aligned) and in
/// panels of other widths (another machine's kernel: unpacked first).
fn packed_b_gives_the_same_bits<T: Kernel + Copy, U: PartialEq + std::fmt::Debug>(
    seed: u64,
    gen: fn(&mut SplitMix, usize) -> Vec<T>,
    bits: fn(&[T]) -> Vec<U>,
) {
    let mut rng = SplitMix(seed);
    let native = T::b_panel_width();
    for (m, k, n) in [(31, 300, 37), (12, 256, 64), (5, 513, 9), (9, 1, 1), (4, 0, 5)] {
        let a = gen(&mut rng, m * k);
        let b = gen(&mut rng, k * n);
        let mut want = vec![T::default(); m * n];
        matmul_block(&a, &b, &mut want, m, k, n);
        for width in native.into_iter().chain([4, 24, 2 * native.unwrap_or(8)]) {
            let len = packed_b_len(k, n, width).unwrap();
            let mut room = aligned::<T>(len + 1);
            // SAFETY: the room holds `len + 1` elements, 64-byte aligned,
            // and every bit pattern is a number.
            let all = unsafe { std::slice::from_raw_parts_mut(room.as_mut_ptr().cast::<T>(), len + 1) };
            pack_b(&b, k, n, width, &mut all[..len]);
            // Aligned, then one element off the line.
            for at in [0, 1] {
                all.copy_within(0..len, at);
                let packed = &all[at..at + len];
                for rows in [1, 7, m] {
                    let mut got = vec![T::default(); m * n];
                    for r0 in (0..m).step_by(rows) {
                        let r1 = (r0 + rows).min(m);
                        T::matmul_block_packed(
                            &a[r0 * k..r1 * k],
                            packed,
                            &mut got[r0 * n..r1 * n],
                            r1 - r0,
                            k,
                            n,
                            width,
                        );
                    }
                    assert_eq!(
                        bits(&got),
                        bits(&want),
                        "{m}×{k}×{n}, panels of {width}, offset {at}, blocks of {rows}"
                    );
                }
            }
        }
    }
}

#[test]
fn packed_b_gives_the_same_bits_f64() {
    packed_b_gives_the_same_bits::<f64, u64>(31, SplitMix::f64s, bits_f64);
}

#[test]
fn packed_b_gives_the_same_bits_f32() {
    packed_b_gives_the_same_bits::<f32, u32>(32, SplitMix::f32s, bits_f32);
}

#[test]
fn packed_b_gives_the_same_bits_i64() {
    packed_b_gives_the_same_bits::<i64, i64>(33, SplitMix::small_i64s, <[i64]>::to_vec);
}
