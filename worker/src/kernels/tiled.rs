//! The cache-blocked kernel in plain scalar steps ([`Step`]) that the
//! wrapping `i64` path runs ([`tiled`]), its tile sizes, and the check of
//! slice lengths against the shape that every kernel starts with.

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

/// The scalar step `acc + x * y` of the naive reference and of [`tiled`], one
/// per element type.
///
/// A supertrait of [`Kernel`] in a private module (the sealed-trait pattern),
/// so generic code in these kernels can call it while users see only
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

pub(super) use step::Step;

/// Checks the slice lengths against the shape and returns `rows * n`.
/// Panics with the expected and actual lengths on a mismatch.
pub(super) fn checked_lengths(
    a_len: usize,
    b_len: usize,
    c_len: Option<usize>,
    rows: usize,
    k: usize,
    n: usize,
) -> usize {
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
pub(super) fn tiled<T: Step>(a: &[T], b: &[T], c: &mut [T], rows: usize, k: usize, n: usize) {
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
