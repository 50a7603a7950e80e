//! A packed, cache-blocked `f64`/`f32` GEMM with AVX2+FMA and AVX-512
//! microkernels whose per-element arithmetic does not depend on the row
//! count.
//!
//! [`dgemm`] and [`sgemm`] compute `C = A·B` (or `C += A·B`) for row-major,
//! contiguous `A` (`rows × k`), `B` (`k × n`) and `C` (`rows × n`), on one
//! thread, in the style of BLIS / GotoBLAS: `B` is packed into `KC × NR`
//! column panels, `A` into `MR × KC` row panels, and a register-blocked
//! microkernel multiplies one `A` panel by one `B` panel into an `MR × NR`
//! tile of `C`. They pick the AVX-512 kernels when the CPU has AVX-512F, the
//! AVX2 ones when it has AVX2 and FMA (checked at run time with
//! `is_x86_feature_detected!`), and return `false` otherwise, so the caller
//! can fall back to another kernel (`kernels/float.rs` uses matrixmultiply).
//! `PROCJOB_GEMM=avx2|avx512|portable`, read once per process
//! (`machine.rs`), forces a kernel the CPU can run (`portable`: return
//! `false`, the fallback).
//!
//! `MC`, `NC` and the loop order come from the caches the CPU reports
//! (`blocking.rs`: BLIS's analytical model applied to each loop order);
//! the constants in this table are the fallback when the caches are
//! unknown.
//!
//! | kernel | tile `MR × NR` | accumulators | `KC` | fallback `MC` | fallback `NC` |
//! |---|---|---|---|---|---|
//! | `f64`, AVX2 | 6 × 8 | 12 `ymm` (6 rows × 2 × 4 lanes) | 256 | 1008 | 128 |
//! | `f32`, AVX2 | 6 × 16 | 12 `ymm` (6 rows × 2 × 8 lanes) | 256 | 1008 | 256 |
//! | `f64`, AVX-512 | 6 × 32 | 24 `zmm` (6 rows × 4 × 8 lanes) | 256 | 1008 | 384 |
//! | `f32`, AVX-512 | 6 × 64 | 24 `zmm` (6 rows × 4 × 16 lanes) | 256 | 1008 | 768 |
//!
//! Two loop orders (`blocking.rs`, `Order`, which also says which cache
//! `B`'s block is sized for), outermost first:
//!
//! * **`B` in L2** (OpenBLAS's order on Skylake-X; where L2 is 1 MiB or
//!   more, and the fallback; with `B` in **L3**, on AMD CPUs with such an
//!   L2, the same loops with blocks sized for L3, which `B` then streams
//!   from): `pc` over the depth `k` in steps of `KC` →
//!   `ic` over the rows in blocks of about `MC` (as even as whole panels
//!   allow, at most 1.5 × `MC`) → `jc` over the columns of `B`/`C` in
//!   blocks of at most `NC`, as even as whole panels allow (pack
//!   `B[pc.., jc..]`) → `ir` over the `MR`-row panels of `A` (each packed
//!   once per `pc` and `ic`, just before the first `jc` block uses it) →
//!   `jr` over the `NR`-column panels of the `B` block → microkernel. The
//!   packed `KC × NC` block of `B` sits in L2 and streams into the
//!   microkernel (which prefetches it four steps of `p` ahead); one
//!   `MR × KC` panel of `A` stays in L1 across the `NC / NR` tiles of a
//!   column block; the block of packed `A` waits in L3 for the next column
//!   block; consecutive tiles lie side by side along rows of `C`.
//! * **`A` in L2** (BLIS's order; where L2 is smaller, as on AMD Zen 1–3):
//!   `jc` → `pc` (pack `B[pc.., jc..]`) → `ic` over the rows in blocks of
//!   at most `MC`, as even as whole panels allow (pack the whole `A` block)
//!   → `jr` → `ir` → microkernel. One `B` panel stays in L1 across the
//!   tiles of the `A` block, which sits in L2 and streams into the
//!   microkernel; the `B` block waits in L3, and while the tiles of one
//!   panel run, the driver fetches the next panel into L2, a share of its
//!   lines before each tile.
//!
//! The AVX2 kernels were first tuned on one core of an AMD EPYC (Zen 3:
//! 32 KiB L1d, 512 KiB L2), the AVX-512 ones on an Intel Xeon (Sapphire
//! Rapids class: 48 KiB L1d, 2 MiB L2); the choice of order was measured
//! on both (`docs/kernels.md`, "Tile shapes and blocking", has the
//! figures). `KC` stays at 256, the value that keeps the bits of the
//! previous kernels (see below). Every kernel, whatever its tile and loop
//! order, computes each element with the same operations (points 1–3
//! below), so the AVX2 and AVX-512 kernels give the same bits; a test
//! checks it.
//!
//! The AVX-512 tiles are 6 rows by four vectors, the shape of the `gemm`
//! crate's AVX-512 kernel, rather than OpenBLAS's 12 rows by two: the same
//! 24 accumulators, but 6 broadcasts and 4 loads per step of `p` instead of
//! 12 and 2, and half the `A` panel in L1. On the Xeon, 12 × 16 and 6 × 32
//! run level when the machine is quiet, and 6 × 32 holds up better in its
//! slow spells, when 12 × 16 drops further (`docs/kernels.md`, "Tile shapes
//! and blocking").
//!
//! # The invariant: a row's result does not depend on its block
//!
//! `kernels` multiplies a job's `A` block by block and stacks the results,
//! and promises that `C` is the same bits however the rows were cut. So the
//! floating-point operations that produce `C[i][j]` must depend only on row
//! `i` of `A`, on `B`, on `k`, `n` and on `accumulate` — never on `rows`, on
//! where row `i` sits in its block, on which `MC` slice or `MR` panel it lands
//! in, or on whether `(i, j)` falls in a full tile or an edge tile. They are,
//! for every element:
//!
//! 1. **The depth is cut by a constant, in ascending order.** `pc` runs over
//!    `0, KC, 2·KC, …` and the chunk `[pc, min(pc + KC, k))` is the same for
//!    every element; `KC` is a compile-time constant per type (it is part of
//!    the arithmetic, unlike `MC` and `NC`, and is never chosen from the
//!    shape).
//! 2. **Each chunk is a fresh FMA chain.** The microkernel starts its
//!    accumulators at `+0` (`_mm256_setzero_*`, `_mm512_setzero_*`) and, for `p` ascending through
//!    the chunk, does `s = fma(A[i][p], B[p][j], s)` — one fused multiply-add,
//!    one rounding. Every SIMD lane holds one `(i, j)` and lanes never mix:
//!    `A[i][p]` is broadcast to all lanes, `B[p][j..j+lanes]` (4 or 8 lanes
//!    with AVX2, 8 or 16 with AVX-512) is loaded as it was packed, and nothing permutes the accumulators.
//! 3. **Chunks are combined with `C` one at a time, the same way for every
//!    element.** The first chunk stores `C = s` (a plain store, no arithmetic;
//!    `C`'s old contents are not read) unless `accumulate` is set; every later
//!    chunk — and with `accumulate` also the first — stores `C = C + s`, one
//!    rounded addition. The last columns of a width that is not a multiple
//!    of `NR` run a narrower microkernel of the same macro (one to three
//!    vectors of the same lanes, reading the first columns of the padded
//!    panel: the same chain per element), straight into `C` when they are
//!    whole vectors in full rows. Any other *edge* tile (fewer than `MR` real
//!    rows, or columns that are not whole vectors) runs the same chains on
//!    zero-padded panels — the narrowest microkernel that covers its columns —
//!    storing `s` into a scratch tile (a plain store: bit-exact, even for `-0`), and
//!    then writes its real elements back with the same rule: `C = s` copied,
//!    or `C = C + s` as one rounded addition per element — the same IEEE
//!    operation on the same two operands as the full tile's vector
//!    `vaddp[sd]` (addition is commutative bit for bit, NaN payloads aside;
//!    see 6). The padded rows and columns only feed their own lanes, which
//!    are thrown away.
//! 4. **`MC`, `NC` and the loop order only group work.** The `ic` loop decides which rows are
//!    packed together, the `jc` and `jr` loops which columns; neither changes
//!    the chunks of `k`, the order of `p`, or the combination with `C`, and
//!    every element is written exactly once per chunk, in ascending chunk
//!    order (the `pc` loop is outside all the others, or, with `A` in L2,
//!    outside all but `jc`, which only picks the columns).
//!    Position within a panel only decides which lane holds an element.
//! 5. **Packing copies bits.** Packing moves values into the panels unchanged
//!    (and pads with `+0`); `B` is the same `k × n` matrix for every block.
//! 6. **NaNs are canonical:** which NaN an instruction returns when both
//!    operands are NaNs depends on their order, which differs between the
//!    vector store of a full tile and the scalar write-back of an edge tile.
//!    So with the last depth chunk each tile's NaNs are replaced by the
//!    canonical quiet NaN (`f64::NAN` / `f32::NAN`) as soon as the tile is
//!    written, while it is in L1: a separate pass over `C` afterwards read
//!    the whole block back and cost about 1 % of a worker's 2000² block.
//!
//! So `C[i][j] = c_{last}` with `c_0 = s_0` (or `C_old + s_0` with
//! `accumulate`), `c_t = c_{t-1} + s_t`, and `s_t` the FMA chain over chunk
//! `t` — a function of row `i`, column `j` of `B`, `k` and `accumulate` only.
//!
//! These are also the bits matrixmultiply 0.3 gave on this machine (its
//! AVX2+FMA kernel, the same `KC = 256`: it stores `fma(1, s, +0)` and
//! `fma(1, s, C)`, the same values), with one exception besides NaN
//! payloads: a chain starting at `+0` can only become `-0` by underflow (an
//! exact negative result too small for the format rounds to `-0`; an exact
//! zero rounds to `+0`, and `+0` plus anything nonzero is not zero); matrixmultiply's
//! `fma(1, s, +0)` turns that into `+0`, we keep the `-0` — in every tile,
//! full or edge. A test checks that the two agree on ordinary data, another
//! that such a `-0` survives every cut.
//!
//! Not promised: the same bits on a CPU without AVX2+FMA (the fallback
//! rounds differently), or for a different `KC`. Promised: the same bits
//! from the AVX2 and the AVX-512 kernels (the chains are the same, only
//! more of them run side by side).
//!
//! The tests here cut 67 rows into blocks of 1 to 33 rows for `k` from 1 to
//! 2048 (around the chunk edge) and `n` from 1 to 1030 (around the panel
//! edges), run the driver with tiny `MC`/`NC` to cross every blocking edge,
//! and compare bits; they also check the result against the naive loop.
//!
//! # Buffers
//!
//! The packed panels live in one 64-byte-aligned buffer per thread
//! (up to `1.5 × MC × KC` of `A` with `B` in L2 or L3 — 3 MiB for `f64` with the fallback `MC`,
//! up to 12 MiB with the largest derived one — plus `KC × NC` of `B`, up to
//! 8 MiB, unless `B` came packed, and one
//! scratch tile, or less for small shapes), grown on demand and kept for the
//! next call: a fresh buffer per call measured slower on thin blocks, where
//! packing is most of the work (`docs/kernels.md`, "Tile shapes and
//! blocking").

#![cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]

use std::cell::Cell;
use std::mem::size_of;
use std::ops::Add;
use std::sync::OnceLock;

use super::blocking::{Blocking, Order, Tile};
use super::machine::{chosen_isa, Isa};

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// `C = A·B` (or `C += A·B` with `accumulate`) in `f64` with the AVX2+FMA
/// kernel; `a` is `rows × k`, `b` is `k × n`, `c` is `rows × n`, row-major and
/// contiguous. Returns `false`, leaving `c` untouched, when the CPU lacks
/// AVX2 or FMA (or is not x86-64), or `PROCJOB_GEMM=portable` asks for the
/// fallback; the caller then needs another kernel.
///
/// See the [module docs](self) for the blocking and why the bits of a row do
/// not depend on `rows`. Every NaN in `C` is the canonical quiet NaN
/// (`f64::NAN`), whatever the operands' payloads.
///
/// # Panics
///
/// If the slice lengths do not fit the shape.
#[must_use]
pub fn dgemm(a: &[f64], b: &[f64], c: &mut [f64], rows: usize, k: usize, n: usize, accumulate: bool) -> bool {
    match chosen_isa(best_isa) {
        Isa::Avx512 => gemm::<F64x32, Same<f64>>(a, BIn::Rows(b), c, rows, k, n, accumulate, F64x32::blocking()),
        Isa::Avx2 => gemm::<F64, Same<f64>>(a, BIn::Rows(b), c, rows, k, n, accumulate, F64::blocking()),
        Isa::Portable => false,
    }
}

/// [`dgemm`] for `f32`.
///
/// # Panics
///
/// If the slice lengths do not fit the shape.
#[must_use]
pub fn sgemm(a: &[f32], b: &[f32], c: &mut [f32], rows: usize, k: usize, n: usize, accumulate: bool) -> bool {
    match chosen_isa(best_isa) {
        Isa::Avx512 => gemm::<F32x64, Same<f32>>(a, BIn::Rows(b), c, rows, k, n, accumulate, F32x64::blocking()),
        Isa::Avx2 => gemm::<F32, Same<f32>>(a, BIn::Rows(b), c, rows, k, n, accumulate, F32::blocking()),
        Isa::Portable => false,
    }
}

/// The elements of a `k × n` `B` packed in panels `nr` wide: `k` rows of `n`
/// rounded up to whole panels (`None` if that overflows, or `nr` is 0).
pub fn packed_b_len(k: usize, n: usize, nr: usize) -> Option<usize> {
    if nr == 0 {
        return None;
    }
    n.checked_next_multiple_of(nr)?.checked_mul(k)
}

/// Packs all of `B` (`k × n`, row-major) into `dst` ([`packed_b_len`]
/// elements) as the GEMM's loops read it, so that many products with the
/// same `B` — a job's row blocks — pack it once instead of once each
/// ([`dgemm_packed`]). The depth is cut in chunks of `KC` (256) rows; chunk
/// `pc` starts at `pc · n'` (`n'` is `n` rounded up to a multiple of `nr`)
/// and holds consecutive `kc × nr` panels, panel `q` holding columns
/// `q·nr ..` with row `p` at `(q·kc + p)·nr`, the last one padded with
/// zeros. The values are `B`'s, moved (point 5 of the module docs).
///
/// # Panics
///
/// If `b.len() != k · n` or `dst.len()` is not [`packed_b_len`].
pub fn pack_b_panels<T: Copy + Default>(b: &[T], k: usize, n: usize, nr: usize, dst: &mut [T]) {
    assert!(
        k.checked_mul(n) == Some(b.len()) && packed_b_len(k, n, nr) == Some(dst.len()),
        "pack_b_panels: lengths {} and {} do not fit {k}×{n} in panels of {nr}",
        b.len(),
        dst.len()
    );
    let wide = n.next_multiple_of(nr);
    for pc in (0..k).step_by(KC) {
        let kc = KC.min(k - pc);
        pack_b_part(b, k, n, nr, pc, &mut dst[pc * wide..(pc + kc) * wide]);
    }
}

/// The rows of `B` packed together by [`pack_b_panels`]: its packed form is
/// made of parts of this many rows (the last one fewer), one after the
/// other.
pub const PACKED_B_DEPTH: usize = KC;

/// One part of [`pack_b_panels`]: rows `pc ..` (`pc` a multiple of
/// [`PACKED_B_DEPTH`], up to that many rows) of `B` packed into `dst`,
/// which becomes `packed[pc · n' .. (pc + rows) · n']` of the whole (`n'`
/// is `n` rounded up to a multiple of `nr`). For writing a packed `B` out
/// part by part.
///
/// # Panics
///
/// If `b.len() != k · n`, `pc` is not a multiple of [`PACKED_B_DEPTH`]
/// below `k`, or `dst` is not that part's length.
pub fn pack_b_part<T: Copy + Default>(b: &[T], k: usize, n: usize, nr: usize, pc: usize, dst: &mut [T]) {
    let kc = KC.min(k.saturating_sub(pc));
    assert!(
        k.checked_mul(n) == Some(b.len())
            && pc.is_multiple_of(KC)
            && pc < k
            && packed_b_len(kc, n, nr) == Some(dst.len()),
        "pack_b_part: rows {pc}.. of {k}×{n} in panels of {nr} do not fit {} elements",
        dst.len()
    );
    pack_b::<Same<T>>(nr, dst, b, n, pc, kc, 0, n);
}

/// The inverse of [`pack_b_panels`]: `B`'s `k × n` rows back from its
/// panels, into `dst`. For a worker whose kernel packs in other panels than
/// the coordinator's (another CPU of a cluster).
///
/// # Panics
///
/// If `dst.len() != k · n` or `packed.len()` is not [`packed_b_len`].
pub fn unpack_b_panels<T: Copy>(packed: &[T], k: usize, n: usize, nr: usize, dst: &mut [T]) {
    assert!(
        k.checked_mul(n) == Some(dst.len()) && packed_b_len(k, n, nr) == Some(packed.len()),
        "unpack_b_panels: lengths {} and {} do not fit {k}×{n} in panels of {nr}",
        packed.len(),
        dst.len()
    );
    let wide = n.next_multiple_of(nr);
    for pc in (0..k).step_by(KC) {
        let kc = KC.min(k - pc);
        for p in 0..kc {
            let row = &mut dst[(pc + p) * n..(pc + p + 1) * n];
            for (q, cols) in row.chunks_mut(nr).enumerate() {
                let at = pc * wide + (q * kc + p) * nr;
                cols.copy_from_slice(&packed[at..at + cols.len()]);
            }
        }
    }
}

/// Declares the packed-`B` entry points of one element type: the width of
/// the panels its kernel reads, and its product with a `B` packed in them.
macro_rules! packed_entries {
    ($(#[$wdoc:meta])* $width:ident, $(#[$pdoc:meta])* $packed:ident, $t:ty, $wide:ty, $narrow:ty) => {
        $(#[$wdoc])*
        pub fn $width() -> Option<usize> {
            match chosen_isa(best_isa) {
                Isa::Avx512 => Some(<$wide>::NR),
                Isa::Avx2 => Some(<$narrow>::NR),
                Isa::Portable => None,
            }
        }

        $(#[$pdoc])*
        #[must_use]
        #[allow(clippy::too_many_arguments)]
        pub fn $packed(
            a: &[$t],
            packed: &[$t],
            c: &mut [$t],
            rows: usize,
            k: usize,
            n: usize,
            nr: usize,
            accumulate: bool,
        ) -> bool {
            if $width() != Some(nr) {
                return false;
            }
            on_aligned(packed, |packed| {
                let b = BIn::Packed(packed);
                match chosen_isa(best_isa) {
                    Isa::Avx512 => gemm::<$wide, Same<$t>>(a, b, c, rows, k, n, accumulate, <$wide>::blocking()),
                    Isa::Avx2 => gemm::<$narrow, Same<$t>>(a, b, c, rows, k, n, accumulate, <$narrow>::blocking()),
                    Isa::Portable => false,
                }
            })
        }
    };
}

packed_entries!(
    /// The panel width `NR` of the kernel [`dgemm`] runs on this CPU: what
    /// [`pack_b_panels`] packs a `B` in for [`dgemm_packed`]. `None` where
    /// [`dgemm`] returns `false`.
    dgemm_panel_width,
    /// [`dgemm`] with `B` packed beforehand by [`pack_b_panels`] in panels
    /// `nr` wide: the same bits, without packing `B` again. Returns `false`,
    /// leaving `c` untouched, where [`dgemm`] would, and where this CPU's
    /// kernel does not read panels `nr` wide ([`dgemm_panel_width`]); the
    /// caller then unpacks `B` ([`unpack_b_panels`]). The microkernel reads
    /// panels at 64-byte-aligned addresses: a `packed` that is not (a small
    /// or middle-sized array from the heap; a large array's pages and a mapped
    /// `.npy` file's data are) is copied into an aligned buffer first, which
    /// costs less than the packing it replaces.
    ///
    /// # Panics
    ///
    /// If the slice lengths do not fit the shape.
    dgemm_packed,
    f64,
    F64x32,
    F64
);

packed_entries!(
    /// [`dgemm_panel_width`] for [`sgemm`].
    sgemm_panel_width,
    /// [`dgemm_packed`] for `f32` ([`sgemm_panel_width`]).
    ///
    /// # Panics
    ///
    /// If the slice lengths do not fit the shape.
    sgemm_packed,
    f32,
    F32x64,
    F32
);

thread_local! {
    /// The aligned copy of a packed `B` that came unaligned
    /// ([`on_aligned`]), kept for the next block while it is small.
    static ALIGNED_B: Cell<Vec<Line>> = const { Cell::new(Vec::new()) };
}

/// The largest aligned copy kept between calls: the arrays that come
/// unaligned are the heap's, below 4 MiB (larger ones get pages of their
/// own).
const KEEP_ALIGNED_B: usize = 4 << 20;

/// `f(packed)`, or `f` of a 64-byte-aligned copy of `packed` when it is not
/// aligned (the microkernel's loads of `B` are aligned ones).
fn on_aligned<T: Copy, R>(packed: &[T], f: impl FnOnce(&[T]) -> R) -> R {
    if packed.as_ptr().cast::<Line>().is_aligned() {
        return f(packed);
    }
    // Only `f64` and `f32` come here: every bit pattern is a value.
    debug_assert!(size_of::<T>() == 8 || size_of::<T>() == 4);
    let bytes = size_of_val(packed);
    let mut buffer = ALIGNED_B.take();
    if buffer.len() * 64 < bytes {
        buffer = vec![Line([0; 64]); bytes.div_ceil(64)];
    }
    // SAFETY: `buffer` holds at least `bytes` initialised bytes, 64-byte
    // aligned (which `T`'s alignment divides), and `T` is a float, for which
    // every bit pattern is valid; the slice lives until `buffer` is put back
    // or dropped below, after its last use.
    let copy = unsafe { std::slice::from_raw_parts_mut(buffer.as_mut_ptr().cast::<T>(), packed.len()) };
    copy.copy_from_slice(packed);
    let result = f(copy);
    if bytes <= KEEP_ALIGNED_B {
        ALIGNED_B.set(buffer);
    }
    result
}

/// Whether this CPU can run [`dgemm`] and [`sgemm`] (x86-64 with AVX2 and
/// FMA). The answer is cached by the standard library after the first call.
pub fn is_supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// How packing turns an element of the caller's `A` and `B` into one the
/// microkernel multiplies: as it is for `f64` and `f32`, or an `i64` as the
/// `f64` of the same value (the exact `i64` path, which so needs no copy of
/// `A` and `B` in `f64`).
pub(super) trait Convert {
    /// What the caller's matrices hold.
    type From: Copy;
    /// What the microkernel multiplies.
    type To;
    /// `x` as the microkernel's element.
    fn convert(x: Self::From) -> Self::To;

    /// `dst[i] = convert(src[i])`, for slices of one length.
    #[inline(always)]
    fn convert_slice(dst: &mut [Self::To], src: &[Self::From]) {
        for (d, &x) in dst.iter_mut().zip(src) {
            *d = Self::convert(x);
        }
    }
}

/// Elements taken as they are.
pub(super) struct Same<T>(std::marker::PhantomData<T>);

impl<T: Copy> Convert for Same<T> {
    type From = T;
    type To = T;
    #[inline(always)]
    fn convert(x: T) -> T {
        x
    }

    /// A copy, which the compiler knows cannot overlap: `B`'s rows are
    /// copied into their panels a vector at a time, where the element loop
    /// inlined into the driver had become one scalar move per element.
    #[inline(always)]
    fn convert_slice(dst: &mut [T], src: &[T]) {
        dst.copy_from_slice(src);
    }
}

/// 1.5 · 2^52. Doubles in [2^52, 2^53) are exactly the integers there, and
/// this one's mantissa field is 2^51: adding an integer `x` with
/// `|x| < 2^51` to its bits gives the bits of `MAGIC + x` (the mantissa
/// stays in (0, 2^52), the exponent unchanged), and subtracting `MAGIC`
/// from that double is exact (the difference, `x`, is representable).
pub(super) const MAGIC: f64 = 6_755_399_441_055_744.0;

/// `i64`s of magnitude below 2^51 as the `f64`s of the same value, by one
/// integer addition and one float subtraction of [`MAGIC`], which
/// vectorize on every x86-64; exact.
pub(super) struct SmallI64;

impl Convert for SmallI64 {
    type From = i64;
    type To = f64;
    #[inline(always)]
    fn convert(x: i64) -> f64 {
        f64::from_bits(MAGIC.to_bits().wrapping_add(x as u64)) - MAGIC
    }
}

/// `i64`s below 2^53 in magnitude as the `f64`s of the same value (`as`);
/// exact.
pub(super) struct ExactI64;

impl Convert for ExactI64 {
    type From = i64;
    type To = f64;
    #[inline(always)]
    fn convert(x: i64) -> f64 {
        x as f64
    }
}

/// [`dgemm`] of `i64` matrices whose elements are below 2^53 in magnitude
/// (below 2^51: `small`), converted to `f64` as they are packed: the exact
/// `i64` path's product, without copies of `A` and `B` in `f64`. `C` is
/// `f64`. The arithmetic is [`dgemm`]'s on the converted values.
///
/// # Panics
///
/// If the slice lengths do not fit the shape.
#[must_use]
pub(super) fn dgemm_i64(a: &[i64], b: &[i64], c: &mut [f64], rows: usize, k: usize, n: usize, small: bool) -> bool {
    match (chosen_isa(best_isa), small) {
        (Isa::Avx512, true) => gemm::<F64x32, SmallI64>(a, BIn::Rows(b), c, rows, k, n, false, F64x32::blocking()),
        (Isa::Avx512, false) => gemm::<F64x32, ExactI64>(a, BIn::Rows(b), c, rows, k, n, false, F64x32::blocking()),
        (Isa::Avx2, true) => gemm::<F64, SmallI64>(a, BIn::Rows(b), c, rows, k, n, false, F64::blocking()),
        (Isa::Avx2, false) => gemm::<F64, ExactI64>(a, BIn::Rows(b), c, rows, k, n, false, F64::blocking()),
        (Isa::Portable, _) => false,
    }
}

/// One element type's microkernel and blocking constants.
trait Micro {
    /// The element type.
    type T: Copy + Default + PartialEq + Add<Output = Self::T>;
    /// The canonical quiet NaN of [`Micro::T`] (point 6 of the module docs).
    const NAN: Self::T;
    /// Rows of a microtile (and of a packed `A` panel).
    const MR: usize;
    /// Columns of a microtile (and of a packed `B` panel). `NR` elements are
    /// a multiple of 64 bytes, so every row of a packed `B` panel is 64-byte
    /// aligned.
    const NR: usize;
    /// Depth chunk. Part of the arithmetic (see the module docs): changing it
    /// changes the bits of `C`.
    const KC: usize;
    /// The fallback for rows of `A` packed at a time (a multiple of `MR`;
    /// `drive` evens the blocks out up to 1.5 times it with `B` in L2 or L3), used when the
    /// caches are unknown; only groups work.
    const MC: usize;
    /// The fallback for most columns of `B` packed at a time (a multiple of
    /// `NR`; `drive` evens the blocks out below it); only groups work.
    const NC: usize;

    /// The blocking this kernel runs with on this machine
    /// ([`Blocking::for_machine`]), computed on the first call.
    fn blocking() -> Blocking;

    /// The constants [`Micro::MC`] and [`Micro::NC`] as a [`Blocking`].
    fn fixed() -> Blocking {
        Blocking { mc: Self::MC, nc: Self::NC, order: Order::BInL2 }
    }

    /// Whether this CPU has the instructions [`Micro::tile`] and
    /// [`Micro::blocked`] are compiled for.
    fn supported() -> bool;

    /// The blocked product ([`drive`]) compiled for this kernel's
    /// instruction set, so that [`Micro::tile`] inlines into it.
    ///
    /// # Safety
    ///
    /// As for [`drive`], and [`Micro::supported`] must be true.
    #[allow(clippy::too_many_arguments)]
    unsafe fn blocked<C: Convert<To = Self::T>>(
        a: &[C::From],
        b: BIn<'_, C::From, Self::T>,
        c: &mut [Self::T],
        rows: usize,
        k: usize,
        n: usize,
        accumulate: bool,
        blk: Blocking,
    );

    /// Multiplies the packed `MR × kc` panel at `a` by the packed `kc × NR`
    /// panel at `b`, each lane an FMA chain from `+0` over `p` ascending, and
    /// stores the `MR × NR` result at `c` (row stride `ldc`): `C = s`, or
    /// `C = C + s` when `add`.
    ///
    /// # Safety
    ///
    /// [`Micro::supported`] must be true. `a` must be valid for reading
    /// `MR·kc` elements, `b` for reading `kc·NR` elements and 64-byte
    /// aligned, and `c` valid for reading and writing `NR` elements at each
    /// of `c + r·ldc`, `r < MR`, not overlapping `a` or `b`. `kc ≥ 1`.
    unsafe fn tile(kc: usize, a: *const Self::T, b: *const Self::T, c: *mut Self::T, ldc: usize, add: bool);

    /// The columns of one vector of [`Micro::tile_part`]; 0 when this
    /// kernel has no narrower microkernels (the tile shapes measured in the
    /// tests), and its edge tiles run [`Micro::tile`] whole.
    const PART: usize = 0;

    /// [`Micro::tile`] on the first `vectors · PART` columns of the panel
    /// only (`vectors < NR / PART`), for the last columns of a product
    /// whose width is not a multiple of `NR`: the same chain per element,
    /// so the same bits, without the full tile's work on padding.
    ///
    /// # Safety
    ///
    /// As for [`Micro::tile`], with `vectors · PART` columns written at
    /// each row of `c`, and `1 ≤ vectors < NR / PART`.
    unsafe fn tile_part(
        kc: usize,
        a: *const Self::T,
        b: *const Self::T,
        c: *mut Self::T,
        ldc: usize,
        add: bool,
        vectors: usize,
    ) {
        let _ = (kc, a, b, c, ldc, add, vectors);
        unreachable!("a kernel without narrower microkernels has PART 0");
    }
}

/// Declares a kernel: a type implementing [`Micro`] with the given element
/// type and constants, whose `tile` is the named microkernel and whose
/// `blocked` is [`drive`] compiled with the named target features.
macro_rules! kernel {
    ($(#[$doc:meta])* $vis:vis $name:ident: $t:ty, MR $mr:literal, NR $nr:literal, MC $mc:literal, NC $nc:literal,
     $tile:ident, features $features:literal, supported $supported:expr
     $(, parts: [$($part:ident),+])?) => {
        $(#[$doc])*
        $vis struct $name;

        impl Micro for $name {
            type T = $t;
            const NAN: $t = <$t>::NAN;
            const MR: usize = $mr;
            const NR: usize = $nr;
            const KC: usize = KC;
            const MC: usize = $mc;
            const NC: usize = $nc;

            fn supported() -> bool {
                $supported
            }

            fn blocking() -> Blocking {
                static BLOCKING: OnceLock<Blocking> = OnceLock::new();
                *BLOCKING.get_or_init(|| Blocking::for_machine(Tile::of::<$t>($mr, $nr, Self::KC), Self::fixed()))
            }

            #[allow(clippy::too_many_arguments)]
            #[cfg_attr(target_arch = "x86_64", target_feature(enable = $features))]
            unsafe fn blocked<C: Convert<To = $t>>(a: &[C::From], b: BIn<'_, C::From, $t>, c: &mut [$t], rows: usize, k: usize, n: usize, accumulate: bool, blk: Blocking) {
                // SAFETY: the caller upholds `blocked`'s contract, which is
                // `drive`'s (instructions present, shapes checked).
                unsafe { drive::<Self, C>(a, b, c, rows, k, n, accumulate, blk) }
            }

            #[inline(always)]
            unsafe fn tile(kc: usize, a: *const $t, b: *const $t, c: *mut $t, ldc: usize, add: bool) {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: the caller upholds the microkernel's contract,
                // which is this method's (instructions present, pointers
                // valid for the panels and the tile).
                unsafe {
                    $tile(kc, a, b, c, ldc, add)
                }
                #[cfg(not(target_arch = "x86_64"))]
                {
                    let _ = (kc, a, b, c, ldc, add);
                    unreachable!("the packed GEMM only runs on x86-64");
                }
            }

            $(
            // The narrower microkernels have one to `vectors − 1` vectors,
            // so a vector is `NR` over one more than their number.
            const PART: usize = $nr / (1 + [$(stringify!($part)),+].len());

            #[inline(always)]
            unsafe fn tile_part(kc: usize, a: *const $t, b: *const $t, c: *mut $t, ldc: usize, add: bool, vectors: usize) {
                #[cfg(target_arch = "x86_64")]
                {
                    type Tile = unsafe fn(usize, *const $t, *const $t, *mut $t, usize, bool);
                    let parts: &[Tile] = &[$($part),+];
                    debug_assert!((1..=parts.len()).contains(&vectors));
                    // SAFETY: the caller upholds `tile_part`'s contract,
                    // which is the narrower microkernel's.
                    unsafe { parts[vectors - 1](kc, a, b, c, ldc, add) }
                }
                #[cfg(not(target_arch = "x86_64"))]
                {
                    let _ = (kc, a, b, c, ldc, add, vectors);
                    unreachable!("the packed GEMM only runs on x86-64");
                }
            }
            )?
        }
    };
}

kernel! {
    /// The AVX2 `f64` kernel: 6 × 8 tiles.
    F64: f64, MR 6, NR 8, MC 1008, NC 128, tile_f64, features "avx2,fma", supported is_supported(),
    parts: [tile_f64_v1]
}

kernel! {
    /// The AVX2 `f32` kernel: 6 × 16 tiles.
    F32: f32, MR 6, NR 16, MC 1008, NC 256, tile_f32, features "avx2,fma", supported is_supported(),
    parts: [tile_f32_v1]
}

kernel! {
    /// The AVX-512 `f64` kernel: 6 × 32 tiles.
    F64x32: f64, MR 6, NR 32, MC 1008, NC 384, tile_f64_avx512, features "avx512f,avx2,fma", supported has_avx512(),
    parts: [tile_f64_avx512_v1, tile_f64_avx512_v2, tile_f64_avx512_v3]
}

kernel! {
    /// The AVX-512 `f32` kernel: 6 × 64 tiles.
    F32x64: f32, MR 6, NR 64, MC 1008, NC 768, tile_f32_avx512, features "avx512f,avx2,fma", supported has_avx512(),
    parts: [tile_f32_avx512_v1, tile_f32_avx512_v2, tile_f32_avx512_v3]
}

/// What the GEMM runs here for `dtype` (`i64` counts as `f64`, whose kernel
/// its exact path runs), in words, for a benchmark's header: the kernel and
/// its tile, the loop order and block sizes, where they came from (the
/// caches this CPU reports, or the fixed fallback) and any environment
/// variable that forced them. Reads what the GEMM itself reads, once per
/// process.
pub fn describe(dtype: crate::DType) -> String {
    fn with<M: Micro>(isa: &str) -> String {
        let blk = M::blocking();
        let order = match blk.order {
            Order::AInL2 => "A's block in L2",
            Order::BInL2 => "B's block in L2",
            Order::BInL3 => "B's block in L3",
        };
        format!("{isa}, {} × {} tiles, {order} (MC {}, NC {}, KC {})", M::MR, M::NR, blk.mc, blk.nc, M::KC)
    }
    let f32 = dtype == crate::DType::F32;
    let kernel = match (chosen_isa(best_isa), f32) {
        (Isa::Avx512, false) => with::<F64x32>("AVX-512"),
        (Isa::Avx512, true) => with::<F32x64>("AVX-512"),
        (Isa::Avx2, false) => with::<F64>("AVX2+FMA"),
        (Isa::Avx2, true) => with::<F32>("AVX2+FMA"),
        (Isa::Portable, _) => "matrixmultiply's kernel (no AVX2+FMA kernel of ours runs)".to_string(),
    };
    let source = match super::machine::caches().describe() {
        Some(caches) => format!("caches {caches}"),
        None => "no caches reported: the fixed blocking".to_string(),
    };
    let forced: Vec<String> = [super::machine::GEMM_ENV, super::blocking::BLOCKING_ENV]
        .into_iter()
        .filter_map(|name| Some(format!("{name}={}", std::env::var(name).ok().filter(|v| !v.trim().is_empty())?)))
        .collect();
    let forced = if forced.is_empty() { String::new() } else { format!("; {}", forced.join(", ")) };
    let what = match dtype {
        crate::DType::F32 => "f32",
        crate::DType::I64 => "i64 (exact path: the f64 kernel)",
        _ => "f64",
    };
    format!("{what} {kernel}; {source}{forced}")
}

/// Whether this CPU has AVX-512F besides AVX2 and FMA (cached by the
/// standard library after the first call).
fn has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_supported() && std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Defines one microkernel (see [`Micro::tile`]): `MR` rows by `vectors`
/// vectors of `lanes` elements (`NR = vectors·lanes`), from the named
/// intrinsics of one instruction set.
///
/// Per `p` (ascending), row `p` of the `B` panel is loaded as `vectors`
/// aligned vectors (columns `0..lanes`, `lanes..2·lanes`, …), each
/// `A[r][p]` is broadcast, and the accumulators of tile row `r` take
/// `fma(A[r][p], B[p][j], acc)` lane by lane. The accumulators start at
/// `+0`; at the end each tile row is stored (`C = s`) or added to `C`
/// (`C = C + s`). The AVX2 kernels (6 rows, 2 vectors) hold 12
/// accumulators, two `B` vectors and a broadcast in the sixteen `ymm`
/// registers; the AVX-512 kernels (6 rows, 4 vectors) 24, four and one in
/// the 32 `zmm` registers. Every lane runs the same chain
/// whatever the vector width, so all kernels give the same bits.
macro_rules! microkernel {
    ($(#[$doc:meta])* $name:ident: $t:ty, MR $mr:literal, lanes $lanes:literal, vectors $v:literal, b_row $brow:expr,
     features $features:literal, prefetch_a $pf:ident, $zero:ident, $load:ident, $loadu:ident, $storeu:ident, $splat:ident,
     $fmadd:ident, $add:ident) => {
        $(#[$doc])*
        ///
        /// # Safety
        ///
        /// As for [`Micro::tile`] with this kernel's `MR` and `NR` (or, for a
        /// narrower microkernel, as for [`Micro::tile_part`]); the CPU must
        /// have the instructions this function is compiled for.
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $features)]
        unsafe fn $name(kc: usize, a: *const $t, b: *const $t, c: *mut $t, ldc: usize, add: bool) {
            // The columns it computes, and the length of a row of the
            // packed B panel it reads them from (`NR` of its kernel: a
            // narrower microkernel reads the first columns of a wider panel).
            const NR: usize = $v * $lanes;
            const B_ROW: usize = $brow;
            debug_assert!(kc > 0 && (b as usize).is_multiple_of(size_of::<$t>() * $lanes));
            // SAFETY: the instructions are present (the caller's contract).
            // Iteration `q < kc` reads `a[MR·q..MR·q+MR]` (inside the `MR·kc`
            // elements of the A panel) and `b[B_ROW·q..B_ROW·q+NR]` as
            // aligned vectors (inside the `B_ROW·kc` elements of the B panel,
            // which is 64-byte aligned, and every row of it is a multiple of
            // 64 bytes; `NR ≤ B_ROW`). The prefetches only hint and cannot fault, and their
            // addresses are formed with `wrapping_add`, so they may point
            // past the panels. The write-back touches `c[r·ldc..r·ldc+NR]`
            // for `r < MR`, which the caller made valid and exclusive. The
            // pointer reads and writes are what needs the block; the
            // intrinsics are safe inside a `target_feature` function (Rust
            // 1.87 on; the MSRV is 1.89, the first with the AVX-512
            // intrinsics).
            unsafe {
                // Every line of the tile's rows: one prefetch per 64 bytes,
                // and one at the last element (a row need not start on a
                // line, so it may end on one line more).
                for r in 0..$mr {
                    for at in (0..NR).step_by(64 / size_of::<$t>()) {
                        _mm_prefetch::<_MM_HINT_T0>(c.wrapping_add(r * ldc + at).cast::<i8>());
                    }
                    _mm_prefetch::<_MM_HINT_T0>(c.wrapping_add(r * ldc + NR - 1).cast::<i8>());
                }
                let mut acc = [[$zero(); $v]; $mr];
                let (mut a, mut b) = (a, b);
                // One step of `p`: `vectors` B vectors, `MR` broadcasts of
                // A, `vectors·MR` FMAs.
                let mut step = || {
                    _mm_prefetch::<_MM_HINT_T0>(a.wrapping_add($pf).cast::<i8>());
                    // The B panel streams from L2 (see `drive`): fetch the
                    // row `PREFETCH_B_STEPS` steps ahead into L1, one
                    // prefetch per line (an AVX2 row is one line).
                    for at in (0..NR).step_by(64 / size_of::<$t>()) {
                        _mm_prefetch::<_MM_HINT_T0>(b.wrapping_add(PREFETCH_B_STEPS * B_ROW + at).cast::<i8>());
                    }
                    let bv: [_; $v] = std::array::from_fn(|v| $load(b.add(v * $lanes)));
                    for (r, acc) in acc.iter_mut().enumerate() {
                        let x = $splat(*a.add(r));
                        for (acc, &bv) in acc.iter_mut().zip(&bv) {
                            *acc = $fmadd(x, bv, *acc);
                        }
                    }
                    a = a.add($mr);
                    b = b.add(B_ROW);
                };
                // Four steps per trip: less loop overhead around the FMAs
                // (measured faster on the Xeon: `docs/kernels-journal.md`,
                // "Profiling the AVX-512 kernel"); the order of `p` is the
                // same either way.
                for _ in 0..kc / 4 {
                    step();
                    step();
                    step();
                    step();
                }
                for _ in 0..kc % 4 {
                    step();
                }
                for (r, acc) in acc.iter().enumerate() {
                    for (v, &acc) in acc.iter().enumerate() {
                        let at = c.add(r * ldc + v * $lanes);
                        if add {
                            $storeu(at, $add($loadu(at), acc));
                        } else {
                            $storeu(at, acc);
                        }
                    }
                }
            }
        }
    };
    // A full-width microkernel: its panel rows are its own `NR`.
    ($(#[$doc:meta])* $name:ident: $t:ty, MR $mr:literal, lanes $lanes:literal, vectors $v:literal, features $features:literal,
     $($rest:tt)*) => {
        microkernel! {
            $(#[$doc])* $name: $t, MR $mr, lanes $lanes, vectors $v, b_row ($v * $lanes), features $features, $($rest)*
        }
    };
}

/// The microkernels of one element type and instruction set, from
/// [`microkernel!`]: six rows by `vectors` vectors, reading panels whose
/// rows are `b_row` elements.
macro_rules! six_rows {
    ($kind:ident: $(#[$doc:meta])* $name:ident, vectors $v:literal, b_row $b:literal) => {
        six_rows!(@ $kind $(#[$doc])* $name, $v, $b);
    };
    (@ avx2_f64 $(#[$doc:meta])* $name:ident, $v:literal, $b:literal) => {
        microkernel! {
            $(#[$doc])* $name: f64, MR 6, lanes 4, vectors $v, b_row $b, features "avx2,fma", prefetch_a PREFETCH_A_F64,
            _mm256_setzero_pd, _mm256_load_pd, _mm256_loadu_pd, _mm256_storeu_pd, _mm256_set1_pd, _mm256_fmadd_pd, _mm256_add_pd
        }
    };
    (@ avx2_f32 $(#[$doc:meta])* $name:ident, $v:literal, $b:literal) => {
        microkernel! {
            $(#[$doc])* $name: f32, MR 6, lanes 8, vectors $v, b_row $b, features "avx2,fma", prefetch_a PREFETCH_A_F32,
            _mm256_setzero_ps, _mm256_load_ps, _mm256_loadu_ps, _mm256_storeu_ps, _mm256_set1_ps, _mm256_fmadd_ps, _mm256_add_ps
        }
    };
    (@ avx512_f64 $(#[$doc:meta])* $name:ident, $v:literal, $b:literal) => {
        microkernel! {
            $(#[$doc])* $name: f64, MR 6, lanes 8, vectors $v, b_row $b, features "avx512f,avx2,fma", prefetch_a PREFETCH_A_F64,
            _mm512_setzero_pd, _mm512_load_pd, _mm512_loadu_pd, _mm512_storeu_pd, _mm512_set1_pd, _mm512_fmadd_pd, _mm512_add_pd
        }
    };
    (@ avx512_f32 $(#[$doc:meta])* $name:ident, $v:literal, $b:literal) => {
        microkernel! {
            $(#[$doc])* $name: f32, MR 6, lanes 16, vectors $v, b_row $b, features "avx512f,avx2,fma", prefetch_a PREFETCH_A_F32,
            _mm512_setzero_ps, _mm512_load_ps, _mm512_loadu_ps, _mm512_storeu_ps, _mm512_set1_ps, _mm512_fmadd_ps, _mm512_add_ps
        }
    };
}

six_rows!(avx2_f64: /// The 6 × 8 `f64` AVX2 microkernel.
    tile_f64, vectors 2, b_row 8);
six_rows!(avx2_f32: /// The 6 × 16 `f32` AVX2 microkernel.
    tile_f32, vectors 2, b_row 16);
six_rows!(avx512_f64: /// The 6 × 32 `f64` AVX-512 microkernel.
    tile_f64_avx512, vectors 4, b_row 32);
six_rows!(avx512_f32: /// The 6 × 64 `f32` AVX-512 microkernel.
    tile_f32_avx512, vectors 4, b_row 64);

// The narrower microkernels of each kernel, for the last columns of a
// product whose width is not a multiple of `NR` (see `Micro::tile_part`):
// one to `vectors − 1` vectors, reading the first columns of a full-width
// panel.
six_rows!(avx2_f64: /// 6 × 4 `f64`, AVX2, from a 6 × 8 kernel's panel.
    tile_f64_v1, vectors 1, b_row 8);
six_rows!(avx2_f32: /// 6 × 8 `f32`, AVX2, from a 6 × 16 kernel's panel.
    tile_f32_v1, vectors 1, b_row 16);
six_rows!(avx512_f64: /// 6 × 8 `f64`, AVX-512, from a 6 × 32 kernel's panel.
    tile_f64_avx512_v1, vectors 1, b_row 32);
six_rows!(avx512_f64: /// 6 × 16 `f64`, AVX-512, from a 6 × 32 kernel's panel.
    tile_f64_avx512_v2, vectors 2, b_row 32);
six_rows!(avx512_f64: /// 6 × 24 `f64`, AVX-512, from a 6 × 32 kernel's panel.
    tile_f64_avx512_v3, vectors 3, b_row 32);
six_rows!(avx512_f32: /// 6 × 16 `f32`, AVX-512, from a 6 × 64 kernel's panel.
    tile_f32_avx512_v1, vectors 1, b_row 64);
six_rows!(avx512_f32: /// 6 × 32 `f32`, AVX-512, from a 6 × 64 kernel's panel.
    tile_f32_avx512_v2, vectors 2, b_row 64);
six_rows!(avx512_f32: /// 6 × 48 `f32`, AVX-512, from a 6 × 64 kernel's panel.
    tile_f32_avx512_v3, vectors 3, b_row 64);

/// How far ahead (in elements) the microkernels prefetch the `A` panel:
/// 384 bytes for `f64`, 192 for `f32`; eight iterations of `p` (`MR` 6).
const PREFETCH_A_F64: usize = 48;
/// [`PREFETCH_A_F64`] for `f32`.
const PREFETCH_A_F32: usize = 48;
/// The most lines of the next `B` panel the driver fetches into L2 before
/// one tile (with `A` in L2; `drive`): a block of at least 16 tiles for a
/// 256-line panel. In thinner blocks the fetch is left out: with one tile
/// per panel it would fetch a whole panel before each tile, which measured
/// slower than none (`docs/kernels.md`, "Tile shapes and blocking"), while
/// the hardware prefetcher follows a panel read from start to end anyway.
const FETCH_LINES_PER_TILE: usize = 16;
/// How many iterations of `p` ahead the microkernels prefetch the `B`
/// panel, which streams from L2 (one prefetch per line of a row: one for an
/// AVX2 row, four for an AVX-512 one).
const PREFETCH_B_STEPS: usize = 4;

/// The best of the GEMM's instruction sets this CPU has.
fn best_isa() -> Isa {
    if has_avx512() {
        Isa::Avx512
    } else if is_supported() {
        Isa::Avx2
    } else {
        Isa::Portable
    }
}

/// Checks the shape, handles the empty cases and runs [`gemm_avx2`] when the
/// CPU allows; `false` (and `c` untouched) when it does not. Packing
/// converts the elements of `a` and `b` with `C` ([`Same`] for `f64` and
/// `f32`).
#[allow(clippy::too_many_arguments)]
fn gemm<M: Micro, C: Convert<To = M::T>>(
    a: &[C::From],
    b: BIn<'_, C::From, M::T>,
    c: &mut [M::T],
    rows: usize,
    k: usize,
    n: usize,
    accumulate: bool,
    blk: Blocking,
) -> bool {
    assert!(
        rows.checked_mul(k) == Some(a.len())
            && b.width::<M>(n).and_then(|w| k.checked_mul(w)) == Some(b.len())
            && rows.checked_mul(n) == Some(c.len()),
        "gemm: slice lengths {}, {}, {} do not fit {rows}×{k}×{n}",
        a.len(),
        b.len(),
        c.len()
    );
    assert!(
        blk.mc > 0 && blk.mc.is_multiple_of(M::MR) && blk.nc > 0 && blk.nc.is_multiple_of(M::NR),
        "gemm: bad blocking {blk:?}"
    );
    // The microkernel's loads of `B` panels are aligned ones.
    assert!(
        match b {
            BIn::Rows(_) => true,
            BIn::Packed(p) => p.as_ptr().cast::<Line>().is_aligned(),
        },
        "gemm: a packed B must be 64-byte aligned"
    );
    if !M::supported() {
        return false;
    }
    if rows == 0 || n == 0 {
        return true;
    }
    if k == 0 {
        if !accumulate {
            c.fill(M::T::default());
        }
        return true;
    }
    // SAFETY: the kernel's instructions are present (`M::supported` above);
    // the lengths were checked and `rows`, `k`, `n` are all positive.
    unsafe { M::blocked::<C>(a, b, c, rows, k, n, accumulate, blk) };
    true
}

/// A 64-byte cache line, the unit of the packing buffer (so the buffer is
/// 64-byte aligned).
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u8; 64]);

thread_local! {
    /// The packing buffer kept between calls on this thread.
    static PACK_BUFFER: Cell<Vec<Line>> = const { Cell::new(Vec::new()) };
}

/// The number of elements of `T` that fill whole lines, at least `len`.
fn round_to_lines<T>(len: usize) -> usize {
    let per_line = 64 / size_of::<T>();
    len.div_ceil(per_line) * per_line
}

/// The depth chunk of every kernel. Part of the arithmetic (point 1 of the
/// module docs) and of the layout of a packed `B` ([`pack_b_panels`]).
const KC: usize = 256;

/// `B` as [`drive`] is given it: the caller's `k × n` rows, packed block by
/// block as the loops reach them, or all of it packed beforehand by
/// [`pack_b_panels`] for this kernel's `NR` (`k × n` rounded up to whole
/// panels), which the loops read in place.
#[derive(Clone, Copy)]
enum BIn<'a, F, T> {
    Rows(&'a [F]),
    Packed(&'a [T]),
}

impl<'a, F, T> BIn<'a, F, T> {
    fn len(&self) -> usize {
        match self {
            BIn::Rows(b) => b.len(),
            BIn::Packed(p) => p.len(),
        }
    }

    /// The columns stored per row of `B` for a product `n` wide: `n`, or
    /// whole panels when packed.
    fn width<M: Micro>(&self, n: usize) -> Option<usize> {
        match self {
            BIn::Rows(_) => Some(n),
            BIn::Packed(_) => n.checked_next_multiple_of(M::NR),
        }
    }

    /// The packed block `B[pc..pc+kc][jc..jc+nc]` (`jc` a multiple of `NR`):
    /// packed into `buffer` from the rows, or the part of the packed `B`
    /// that holds it (the same values in the same places).
    #[inline(always)]
    fn block<'b, M: Micro<T = T>, C: Convert<From = F, To = T>>(
        self,
        buffer: &'b mut [T],
        n: usize,
        pc: usize,
        kc: usize,
        jc: usize,
        nc: usize,
    ) -> &'b [T]
    where
        'a: 'b,
        F: Copy,
        T: Copy + Default,
    {
        match self {
            BIn::Rows(b) => {
                pack_b::<C>(M::NR, buffer, b, n, pc, kc, jc, nc);
                buffer
            }
            BIn::Packed(p) => {
                let at = pc * n.next_multiple_of(M::NR) + jc * kc;
                &p[at..at + nc.next_multiple_of(M::NR) * kc]
            }
        }
    }
}

/// The blocked product; see the module docs. Always inlined into each
/// kernel's [`Micro::blocked`], which is compiled for its instruction set.
///
/// # Safety
///
/// [`Micro::supported`] must be true. `a`, `b` and `c` must be
/// `rows × k`, `k × n` and `rows × n` with `rows`, `k`, `n` all positive, and
/// `blk` a valid [`Blocking`] for `M`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn drive<M: Micro, C: Convert<To = M::T>>(
    a: &[C::From],
    b: BIn<'_, C::From, M::T>,
    c: &mut [M::T],
    rows: usize,
    k: usize,
    n: usize,
    accumulate: bool,
    blk: Blocking,
) {
    let (mr, nr) = (M::MR, M::NR);
    debug_assert!(rows * k == a.len() && b.width::<M>(n).map(|w| k * w) == Some(b.len()) && rows * n == c.len());
    // A row of a packed B panel is whole 64-byte lines for every kernel
    // that runs; the tile shapes measured in the tests (`shapes`) need only
    // the 32-byte alignment of their AVX2 loads.
    debug_assert!((size_of::<M::T>() * nr) % 32 == 0 && 64 % size_of::<M::T>() == 0);
    // Sizes of the three regions actually needed for this shape (elements,
    // each a whole number of lines): packed A, packed B, the edge tile.
    let kc_max = M::KC.min(k);
    let mc_step = row_block(rows, mr, blk);
    let a_len = round_to_lines::<M::T>(mc_step.min(rows.div_ceil(mr) * mr) * kc_max);
    // (No room for B when it comes packed.)
    let b_len = match b {
        BIn::Rows(_) => round_to_lines::<M::T>(blk.nc.min(n.div_ceil(nr) * nr) * kc_max),
        BIn::Packed(_) => 0,
    };
    let t_len = round_to_lines::<M::T>(mr * nr);
    let lines = (a_len + b_len + t_len) * size_of::<M::T>() / 64;
    let mut buffer = PACK_BUFFER.take();
    if buffer.len() < lines {
        buffer = vec![Line([0; 64]); lines];
    }
    let base = buffer.as_mut_ptr().cast::<M::T>();
    // SAFETY: `buffer` holds at least `a_len + b_len + t_len` elements' worth
    // of initialised bytes, 64-byte aligned; `M::T` is `f64` or `f32`, for
    // which every bit pattern is valid and whose alignment divides 64. The
    // three slices are disjoint and live until `buffer` is put back below,
    // after their last use; nothing else refers to `buffer` meanwhile.
    let (a_pack, b_pack, scratch) = unsafe {
        (
            std::slice::from_raw_parts_mut(base, a_len),
            std::slice::from_raw_parts_mut(base.add(a_len), b_len),
            std::slice::from_raw_parts_mut(base.add(a_len + b_len), t_len),
        )
    };
    // Columns per block: at most `blk.nc`, and as even as whole panels
    // allow, so that the last block is not a thin remainder (for which every
    // A panel would come back from L3 to serve a few tiles): n = 2000 with
    // `NC` 384 is cut 6 × 336 rather than 5 × 384 + 80.
    let nc_step = n.div_ceil(n.div_ceil(blk.nc)).next_multiple_of(nr).min(blk.nc);
    // From here on C is only reached through `c`.
    let c = Out { ptr: c.as_mut_ptr(), n, scratch: scratch.as_mut_ptr() };
    // The depth chunk at `pc`: its length; whether it adds to C (point 3 of
    // the module docs: the first chunk overwrites C unless accumulating,
    // every later chunk adds to it); whether it is the last (point 6: with
    // it, each tile's NaNs are made canonical).
    let chunk = |pc: usize| {
        let kc = M::KC.min(k - pc);
        (kc, accumulate || pc > 0, pc + kc == k)
    };
    match blk.order {
        // The same loops, whichever cache `B`'s block was sized for.
        Order::BInL2 | Order::BInL3 => {
            for pc in (0..k).step_by(M::KC) {
                let (kc, add, last) = chunk(pc);
                for ic in (0..rows).step_by(mc_step) {
                    let mc = mc_step.min(rows - ic);
                    for jc in (0..n).step_by(nc_step) {
                        let nc = nc_step.min(n - jc);
                        let b_pack = b.block::<M, C>(b_pack, n, pc, kc, jc, nc);
                        for ir in (0..mc).step_by(mr) {
                            let h = mr.min(mc - ir);
                            let sliver = &mut a_pack[ir * kc..(ir + mr) * kc];
                            // Each A panel is packed once per (pc, ic), just
                            // before its first use, and reused for every
                            // later column block.
                            if jc == 0 {
                                pack_a::<M, C>(sliver, a, k, ic + ir, h, pc, kc);
                            }
                            for jr in (0..nc).step_by(nr) {
                                // The panel of columns jc+jr.. starts at
                                // (jr / nr)·kc·nr.
                                let b_panel = &b_pack[jr * kc..(jr + nr) * kc];
                                // SAFETY: this function's contract; the tile
                                // is inside C and the panels were just packed.
                                unsafe {
                                    c.tile::<M>(ic + ir, jc + jr, h, nr.min(nc - jr), kc, sliver, b_panel, add, last)
                                };
                            }
                        }
                    }
                }
            }
        }
        Order::AInL2 => {
            for jc in (0..n).step_by(nc_step) {
                let nc = nc_step.min(n - jc);
                for pc in (0..k).step_by(M::KC) {
                    let (kc, add, last) = chunk(pc);
                    let b_pack = b.block::<M, C>(b_pack, n, pc, kc, jc, nc);
                    for ic in (0..rows).step_by(mc_step) {
                        let mc = mc_step.min(rows - ic);
                        pack_a::<M, C>(a_pack, a, k, ic, mc, pc, kc);
                        // While the tiles of one B panel run, the next
                        // panel is fetched into L2, a share of its lines
                        // before each tile: the B block waits in L3, too
                        // far for the microkernel's own prefetch a few
                        // steps ahead. After the last panel, the first,
                        // which the next row block starts with (after the
                        // last row block it is repacked: a wasted fetch).
                        // Not in a block of few tiles, where each tile would
                        // fetch much of a panel at once (see
                        // `FETCH_LINES_PER_TILE`).
                        let panel_lines = (kc * nr * size_of::<M::T>()).div_ceil(64);
                        let per_tile = panel_lines.div_ceil(mc.div_ceil(mr));
                        let per_tile = if per_tile <= FETCH_LINES_PER_TILE { per_tile } else { 0 };
                        for jr in (0..nc).step_by(nr) {
                            let b_panel = &b_pack[jr * kc..(jr + nr) * kc];
                            let next = if jr + nr < nc { jr + nr } else { 0 };
                            let next_panel = b_pack[next * kc..].as_ptr();
                            for (t, ir) in (0..mc).step_by(mr).enumerate() {
                                for line in t * per_tile..((t + 1) * per_tile).min(panel_lines) {
                                    prefetch_l2(next_panel.wrapping_byte_add(line * 64));
                                }
                                let sliver = &a_pack[ir * kc..(ir + mr) * kc];
                                // SAFETY: this function's contract; the tile
                                // is inside C and the panels were just packed.
                                unsafe {
                                    c.tile::<M>(
                                        ic + ir,
                                        jc + jr,
                                        mr.min(mc - ir),
                                        nr.min(nc - jr),
                                        kc,
                                        sliver,
                                        b_panel,
                                        add,
                                        last,
                                    )
                                };
                            }
                        }
                    }
                }
            }
        }
    }
    PACK_BUFFER.set(buffer);
}

/// The rows of `A` packed at a time for `rows` rows: as even as whole
/// `mr`-row panels allow. With `B` in L2 or L3, up to 1.5 × `blk.mc`, so that no
/// thin remainder block repacks all of `B` for a few rows: 2048 rows with
/// `MC` 1008 are cut 1026 + 1022 rather than 1008 + 1008 + 32, which packs
/// each depth chunk of `B` twice instead of three times (`docs/kernels.md`,
/// "Tile shapes and blocking"). With `A` in L2 a thin block repacks
/// nothing, and `A`'s block must fit the L2 it was sized for: up to
/// `blk.mc` (2000 rows with `MC` 192 are cut 10 × 186 + 140).
fn row_block(rows: usize, mr: usize, blk: Blocking) -> usize {
    let cap = match blk.order {
        Order::BInL2 | Order::BInL3 => blk.mc + blk.mc / 2 / mr * mr,
        Order::AInL2 => blk.mc,
    };
    rows.div_ceil(rows.div_ceil(cap)).next_multiple_of(mr).min(cap)
}

/// Where [`drive`]'s tiles go: `C` (`rows × n`, row stride `n`) and the
/// scratch tile (`MR × NR`, row stride `NR`) for edge tiles.
struct Out<T> {
    ptr: *mut T,
    n: usize,
    scratch: *mut T,
}

impl<T: Copy + Add<Output = T> + PartialEq> Out<T> {
    /// Runs the microkernel on one `MR × kc` panel of `A` and one `kc × NR`
    /// panel of `B` into the tile of `C` at row `i`, column `j`, of `h` real
    /// rows and `cols` real columns (points 3 and 6 of the module docs).
    ///
    /// # Safety
    ///
    /// The kernel's instructions are present; the panels are `MR·kc` and
    /// `kc·NR` elements, `B`'s 64-byte aligned; rows `i..i + h` and columns
    /// `j..j + cols` are inside `C`, which nothing else reaches meanwhile.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile<M: Micro<T = T>>(
        &self,
        i: usize,
        j: usize,
        h: usize,
        cols: usize,
        kc: usize,
        a_panel: &[T],
        b_panel: &[T],
        add: bool,
        last: bool,
    ) {
        let (mr, nr, n) = (M::MR, M::NR, self.n);
        debug_assert!(a_panel.len() == mr * kc && b_panel.len() == nr * kc);
        let (a_panel, b_panel) = (a_panel.as_ptr(), b_panel.as_ptr());
        // Full rows whose columns are whole vectors go straight into C: a
        // full tile, or the last columns of a width that is not a multiple of
        // `nr` through a narrower microkernel (the same chain per element).
        let part = M::PART;
        if h == mr && (cols == nr || (part > 0 && cols.is_multiple_of(part))) {
            // SAFETY: the kernel's instructions are present and the panels
            // are as the contract says (B's offsets are multiples of `nr`
            // elements in a line-aligned buffer: 64-byte aligned). C rows
            // i..i+mr, columns j..j+cols are inside C (the contract), which
            // is disjoint from the packing buffer; `cols / part` is below
            // `nr / part` when `cols < nr`.
            unsafe {
                if cols == nr {
                    M::tile(kc, a_panel, b_panel, self.ptr.add(i * n + j), n, add);
                } else {
                    M::tile_part(kc, a_panel, b_panel, self.ptr.add(i * n + j), n, add, cols / part);
                }
            }
            if last {
                for r in 0..mr {
                    // SAFETY: row i + r < rows, columns j..j + cols ≤ n:
                    // inside C, which no other reference reaches now.
                    let row = unsafe { std::slice::from_raw_parts_mut(self.ptr.add((i + r) * n + j), cols) };
                    canonical_nans(row, M::NAN, is_nan);
                }
            }
        } else {
            // An edge tile: the same chain into the scratch tile (as many
            // vectors as cover `cols`, where the kernel has narrower
            // microkernels), then `C = s` or `C = C + s` per element.
            let vectors = if part > 0 { cols.div_ceil(part) } else { 0 };
            // SAFETY: as above for the panels; the scratch tile is `mr·nr`
            // elements of the buffer, row stride `nr`, disjoint from both
            // panels.
            unsafe {
                if vectors > 0 && vectors < nr / part {
                    M::tile_part(kc, a_panel, b_panel, self.scratch, nr, false, vectors);
                } else {
                    M::tile(kc, a_panel, b_panel, self.scratch, nr, false);
                }
            }
            for r in 0..h {
                // SAFETY: row i + r < rows and columns j..j + cols ≤ n are
                // inside C, and row r of the scratch tile inside it; no other
                // reference to either is live.
                let (c_row, tile_row) = unsafe {
                    (
                        std::slice::from_raw_parts_mut(self.ptr.add((i + r) * n + j), cols),
                        std::slice::from_raw_parts(self.scratch.add(r * nr), cols),
                    )
                };
                for (x, &s) in c_row.iter_mut().zip(tile_row) {
                    *x = if add { *x + s } else { s };
                }
                if last {
                    canonical_nans(c_row, M::NAN, is_nan);
                }
            }
        }
    }
}

/// Replaces every NaN in `c` by `nan`, the canonical quiet NaN (point 6):
/// 64 elements at a time, a branch-free test the compiler vectorises in the
/// instruction set of the function it is inlined into, and a write only
/// where it found a NaN. The driver runs it on each row of a tile it has
/// just written; `float.rs` on a whole block after matrixmultiply's product.
#[inline(always)]
pub(super) fn canonical_nans<T: Copy>(c: &mut [T], nan: T, is_nan: impl Fn(T) -> bool) {
    for chunk in c.chunks_mut(64) {
        if chunk.iter().fold(false, |any, &x| any | is_nan(x)) {
            for x in chunk.iter_mut().filter(|x| is_nan(**x)) {
                *x = nan;
            }
        }
    }
}

/// Asks for the line at `p` in L2 (`prefetcht1`); only a hint, which
/// cannot fault wherever `p` points. Nothing on other architectures.
#[inline(always)]
fn prefetch_l2<T>(p: *const T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch reads nothing and cannot fault.
    unsafe {
        _mm_prefetch::<_MM_HINT_T1>(p.cast::<i8>())
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// The NaN test for both element types of the kernels.
#[inline(always)]
fn is_nan<T: PartialEq + Copy>(x: T) -> bool {
    #[allow(clippy::eq_op)] // x != x holds for NaNs alone
    let nan = x != x;
    nan
}

/// Packs `B[pc..pc+kc][jc..jc+nc]` into `dst` as consecutive `kc × NR`
/// panels (panel `q` holds columns `jc + q·NR ..`, row `p` of it at
/// `(q·kc + p)·NR`), the last one padded with zeros on the right.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn pack_b<C: Convert>(nr: usize, dst: &mut [C::To], b: &[C::From], n: usize, pc: usize, kc: usize, jc: usize, nc: usize)
where
    C::To: Copy + Default,
{
    let (full, w) = (nc / nr, nc % nr);
    // Row by row of B, so the reads are sequential.
    for p in 0..kc {
        let src = &b[(pc + p) * n + jc..(pc + p) * n + jc + nc];
        for (q, s) in src.chunks_exact(nr).enumerate() {
            let d = (q * kc + p) * nr;
            C::convert_slice(&mut dst[d..d + nr], s);
        }
        if w > 0 {
            let d = (full * kc + p) * nr;
            C::convert_slice(&mut dst[d..d + w], &src[full * nr..]);
            dst[d + w..d + nr].fill(C::To::default());
        }
    }
}

/// Packs `A[ic..ic+mc][pc..pc+kc]` into `dst` as consecutive `MR × kc`
/// panels (panel `q` holds rows `ic + q·MR ..`, element `(r, p)` at
/// `(q·kc + p)·MR + r`), the last one padded with zero rows.
#[inline(always)]
fn pack_a<M: Micro, C: Convert<To = M::T>>(
    dst: &mut [M::T],
    a: &[C::From],
    k: usize,
    ic: usize,
    mc: usize,
    pc: usize,
    kc: usize,
) {
    let mr = M::MR;
    for (q, panel) in dst.chunks_exact_mut(kc * mr).take(mc.div_ceil(mr)).enumerate() {
        let i0 = ic + q * mr;
        let h = mr.min(ic + mc - i0);
        if h == mr {
            // A full panel: read its rows side by side, write it
            // sequentially (one routine per height, so the row slices live
            // in registers; a strided loop here compiled to scatters).
            match mr {
                6 => pack_full_panel::<C, 6>(panel, a, k, i0, pc, kc),
                #[cfg(test)]
                4 => pack_full_panel::<C, 4>(panel, a, k, i0, pc, kc),
                #[cfg(test)]
                8 => pack_full_panel::<C, 8>(panel, a, k, i0, pc, kc),
                #[cfg(test)]
                12 => pack_full_panel::<C, 12>(panel, a, k, i0, pc, kc),
                _ => unreachable!("no kernel has MR = {mr}"),
            }
            continue;
        }
        if h < mr {
            panel.fill(M::T::default());
        }
        for r in 0..h {
            let src = &a[(i0 + r) * k + pc..(i0 + r) * k + pc + kc];
            for (col, &x) in panel.chunks_exact_mut(mr).zip(src) {
                col[r] = C::convert(x);
            }
        }
    }
}

/// Packs the `MR` full rows `i0..i0+MR`, columns `pc..pc+kc`, of `A` into
/// `panel` (element `(r, p)` at `p·MR + r`).
///
/// Not inlined, so a profile shows packing as its own line (and it is
/// compiled for the baseline instruction set: inside an AVX-512 `blocked()`
/// LLVM vectorised it over `p` into scatters, which measured no slower —
/// the time goes into reading `A` from L3 — but are notoriously slow
/// elsewhere).
#[inline(never)]
fn pack_full_panel<C: Convert, const MR: usize>(
    panel: &mut [C::To],
    a: &[C::From],
    k: usize,
    i0: usize,
    pc: usize,
    kc: usize,
) {
    let rows: [&[C::From]; MR] = std::array::from_fn(|r| &a[(i0 + r) * k + pc..(i0 + r) * k + pc + kc]);
    for (p, col) in panel.chunks_exact_mut(MR).enumerate() {
        let col: &mut [C::To; MR] = col.try_into().expect("chunks of MR");
        *col = std::array::from_fn(|r| C::convert(rows[r][p]));
    }
}

/// Other AVX2 `f64` tile shapes, for measuring against the 6 × 8 kernel
/// (`shapes_f64_avx2` below; `docs/kernels-journal.md`, "AVX2 tile
/// shapes"): the same macro, so the same per-element chain.
#[cfg(all(test, target_arch = "x86_64"))]
mod shapes {
    use super::*;

    microkernel! {
        /// 4 × 12: three `B` vectors, four broadcasts, 12 accumulators.
        tile_f64_4x12: f64, MR 4, lanes 4, vectors 3, features "avx2,fma", prefetch_a PREFETCH_A_F64,
        _mm256_setzero_pd, _mm256_load_pd, _mm256_loadu_pd, _mm256_storeu_pd, _mm256_set1_pd, _mm256_fmadd_pd, _mm256_add_pd
    }

    microkernel! {
        /// 12 × 4: one `B` vector, twelve broadcasts, 12 accumulators
        /// (OpenBLAS's Haswell tile seen from row-major `C`, with
        /// broadcasts where it permutes).
        tile_f64_12x4: f64, MR 12, lanes 4, vectors 1, features "avx2,fma", prefetch_a PREFETCH_A_F64,
        _mm256_setzero_pd, _mm256_load_pd, _mm256_loadu_pd, _mm256_storeu_pd, _mm256_set1_pd, _mm256_fmadd_pd, _mm256_add_pd
    }

    microkernel! {
        /// 8 × 4: one `B` vector, eight broadcasts, 8 accumulators.
        tile_f64_8x4: f64, MR 8, lanes 4, vectors 1, features "avx2,fma", prefetch_a PREFETCH_A_F64,
        _mm256_setzero_pd, _mm256_load_pd, _mm256_loadu_pd, _mm256_storeu_pd, _mm256_set1_pd, _mm256_fmadd_pd, _mm256_add_pd
    }

    /// 12 × 4 the way OpenBLAS's Haswell kernel does it: per step one
    /// `B` vector, rotated in registers (`vpermilpd`, `vpermpd`,
    /// `vpermilpd`) instead of broadcasting `A`, and three `A` vectors;
    /// lane `l` of accumulator `[k][v]` holds `C[4v + l][l ^ k]`, put back
    /// in order at the store. Each lane is one fixed element's chain, from
    /// `+0`, over `p` ascending: the same bits.
    ///
    /// # Safety
    ///
    /// As for [`Micro::tile`] with `MR` 12 and `NR` 4; the CPU must have
    /// AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    // The store puts lanes back by index: `C[4v + l][j]` is lane `l` of
    // accumulator `[l ^ j][v]`.
    #[allow(clippy::needless_range_loop)]
    unsafe fn tile_f64_12x4_rot(kc: usize, a: *const f64, b: *const f64, c: *mut f64, ldc: usize, add: bool) {
        // SAFETY: as for the `microkernel!` kernels: step `q < kc` reads
        // `a[12q..12q+12]` and the aligned `b[4q..4q+4]` inside the panels;
        // prefetches cannot fault; the store writes `c[r·ldc..r·ldc+4]`,
        // `r < 12`, which the caller made valid and exclusive.
        unsafe {
            let mut acc = [[_mm256_setzero_pd(); 3]; 4];
            let (mut a, mut b) = (a, b);
            let mut step = || {
                _mm_prefetch::<_MM_HINT_T0>(a.wrapping_add(64).cast::<i8>());
                _mm_prefetch::<_MM_HINT_T0>(b.wrapping_add(64).cast::<i8>());
                let x0 = _mm256_load_pd(b);
                let av = [_mm256_loadu_pd(a), _mm256_loadu_pd(a.add(4)), _mm256_loadu_pd(a.add(8))];
                let x1 = _mm256_permute_pd::<0x05>(x0);
                let x2 = _mm256_permute4x64_pd::<0x1b>(x1);
                let x3 = _mm256_permute_pd::<0x05>(x2);
                for (acc, x) in acc.iter_mut().zip([x0, x1, x2, x3]) {
                    for (acc, &av) in acc.iter_mut().zip(&av) {
                        *acc = _mm256_fmadd_pd(av, x, *acc);
                    }
                }
                a = a.add(12);
                b = b.add(4);
            };
            for _ in 0..kc / 4 {
                step();
                step();
                step();
                step();
            }
            for _ in 0..kc % 4 {
                step();
            }
            let mut t = [[[0.0f64; 4]; 3]; 4];
            for (t, acc) in t.iter_mut().zip(&acc) {
                for (t, &acc) in t.iter_mut().zip(acc) {
                    _mm256_storeu_pd(t.as_mut_ptr(), acc);
                }
            }
            for v in 0..3 {
                for l in 0..4 {
                    let row = c.add((4 * v + l) * ldc);
                    for j in 0..4 {
                        let s = t[l ^ j][v][l];
                        let at = row.add(j);
                        *at = if add { *at + s } else { s };
                    }
                }
            }
        }
    }

    kernel! {
        /// AVX2 `f64`, 12 × 4 tiles with OpenBLAS's rotations.
        pub(super) F64x12x4rot: f64, MR 12, NR 4, MC 1008, NC 128, tile_f64_12x4_rot, features "avx2,fma", supported is_supported()
    }

    kernel! {
        /// AVX2 `f64`, 4 × 12 tiles.
        pub(super) F64x4x12: f64, MR 4, NR 12, MC 1008, NC 132, tile_f64_4x12, features "avx2,fma", supported is_supported()
    }

    kernel! {
        /// AVX2 `f64`, 12 × 4 tiles.
        pub(super) F64x12x4: f64, MR 12, NR 4, MC 1008, NC 128, tile_f64_12x4, features "avx2,fma", supported is_supported()
    }

    kernel! {
        /// AVX2 `f64`, 8 × 4 tiles.
        pub(super) F64x8x4: f64, MR 8, NR 4, MC 1008, NC 128, tile_f64_8x4, features "avx2,fma", supported is_supported()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// splitmix64, as in `kernels/tests.rs`.
    struct SplitMix(u64);

    impl SplitMix {
        fn next_u64(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }

        /// Uniform in [-1, 1).
        fn unit(&mut self) -> f64 {
            (self.next_u64() >> 11) as f64 / (1u64 << 52) as f64 - 1.0
        }

        /// Integers uniform in [-max, max].
        fn int(&mut self, max: u64) -> f64 {
            ((self.next_u64() % (2 * max + 1)) as i64 - max as i64) as f64
        }
    }

    /// `f64`/`f32` seen through `f64`, with their kernel.
    trait Elem: Copy + Default + PartialEq + std::fmt::Debug + Add<Output = Self> {
        const EPS: f64;
        fn from_f64(x: f64) -> Self;
        fn to_f64(self) -> f64;
        fn bits(self) -> u64;
    }

    impl Elem for f64 {
        const EPS: f64 = f64::EPSILON;
        fn from_f64(x: f64) -> f64 {
            x
        }
        fn to_f64(self) -> f64 {
            self
        }
        fn bits(self) -> u64 {
            self.to_bits()
        }
    }

    impl Elem for f32 {
        const EPS: f64 = f32::EPSILON as f64;
        fn from_f64(x: f64) -> f32 {
            x as f32
        }
        fn to_f64(self) -> f64 {
            f64::from(self)
        }
        fn bits(self) -> u64 {
            u64::from(self.to_bits())
        }
    }

    fn random<T: Elem>(rng: &mut SplitMix, len: usize) -> Vec<T> {
        (0..len).map(|_| T::from_f64(rng.unit())).collect()
    }

    fn bits<T: Elem>(v: &[T]) -> Vec<u64> {
        v.iter().map(|x| x.bits()).collect()
    }

    /// Runs the kernel (with blocking `blk`) into a copy of `c0`.
    #[allow(clippy::too_many_arguments)]
    fn run<T: Elem, M: Micro<T = T>>(
        a: &[T],
        b: &[T],
        c0: &[T],
        m: usize,
        k: usize,
        n: usize,
        acc: bool,
        blk: Blocking,
    ) -> Vec<T> {
        let mut c = c0.to_vec();
        assert!(gemm::<M, Same<T>>(a, BIn::Rows(b), &mut c, m, k, n, acc, blk), "no AVX2+FMA");
        c
    }

    fn whole<T: Elem, M: Micro<T = T>>(a: &[T], b: &[T], m: usize, k: usize, n: usize) -> Vec<T> {
        run::<T, M>(a, b, &vec![T::from_f64(f64::NAN); m * n], m, k, n, false, M::blocking())
    }

    /// Cuts the `m` rows into blocks of `rows`, multiplies each on its own
    /// (C pre-filled with junk) and stacks the results.
    fn stacked<T: Elem, M: Micro<T = T>>(a: &[T], b: &[T], m: usize, k: usize, n: usize, rows: usize) -> Vec<T> {
        let mut c = Vec::with_capacity(m * n);
        for r0 in (0..m).step_by(rows) {
            let h = rows.min(m - r0);
            let junk = vec![T::from_f64(-3.5); h * n];
            c.extend(run::<T, M>(&a[r0 * k..(r0 + h) * k], b, &junk, h, k, n, false, M::blocking()));
        }
        c
    }

    /// The naive `p`-ascending loop with separate rounding, and `Σ|a·b|`,
    /// both per element.
    fn naive<T: Elem>(a: &[T], b: &[T], m: usize, k: usize, n: usize) -> (Vec<T>, Vec<f64>) {
        let mut c = vec![T::default(); m * n];
        let mut mag = vec![0.0; m * n];
        for i in 0..m {
            for p in 0..k {
                let x = a[i * k + p];
                for j in 0..n {
                    let y = b[p * n + j];
                    c[i * n + j] = c[i * n + j] + T::from_f64(x.to_f64() * y.to_f64());
                    mag[i * n + j] += (x.to_f64() * y.to_f64()).abs();
                }
            }
        }
        (c, mag)
    }

    const CUTS: [usize; 10] = [1, 2, 3, 5, 6, 7, 8, 13, 16, 33];

    /// The invariant: for every `k` (inside one chunk, at and around the
    /// chunk boundary, several chunks) and `n` (one column, less than an
    /// `f64` panel, exactly one, one more, partial last panels, across the
    /// `NC` of every kernel), cutting 67 rows into blocks of 1 to 33 rows — less
    /// than, equal to and more than a row panel, and misaligned with it —
    /// stacks to the whole product's bits. The blocks' `C` starts as junk,
    /// the whole product's as NaN.
    fn split_invariance<T: Elem, M: Micro<T = T>>(seed: u64) {
        if !M::supported() {
            return;
        }
        let mut rng = SplitMix(seed);
        let m = 67;
        for k in [1, 7, 255, 256, 257, 1000, 2048] {
            for n in [1, 7, 8, 9, 130, 1030] {
                let a = random::<T>(&mut rng, m * k);
                let b = random::<T>(&mut rng, k * n);
                let want = bits(&whole::<T, M>(&a, &b, m, k, n));
                for rows in CUTS {
                    let got = bits(&stacked::<T, M>(&a, &b, m, k, n, rows));
                    assert!(got == want, "{m}x{k}x{n} in blocks of {rows} rows differs from the whole product");
                }
            }
        }
    }

    #[test]
    fn row_blocks_stack_bitwise_f64() {
        split_invariance::<f64, F64>(1);
        split_invariance::<f64, F64x32>(1);
    }

    #[test]
    fn row_blocks_stack_bitwise_f32() {
        split_invariance::<f32, F32>(2);
        split_invariance::<f32, F32x64>(2);
    }

    /// A chain whose every product underflows to `-0` sums to `-0`
    /// (`fma(-tiny, tiny, +0)` rounds a negative result to `-0`), and such an
    /// element must come out as `-0` in full and edge tiles alike, in every
    /// cut, through both depth chunks (`-0 + -0 = -0`); next to it, ordinary
    /// values.
    fn negative_zero_from_underflow<T: Elem, M: Micro<T = T>>(seed: u64) {
        if !M::supported() {
            return;
        }
        let mut rng = SplitMix(seed);
        let tiny = if size_of::<T>() == 8 { 1e-200 } else { 1e-30 };
        // The last column in the scratch tile (NR + 3), and in whole
        // vectors straight into C through a narrower microkernel.
        let widths = [M::NR + 3, M::NR + M::PART.max(1)];
        for n in widths {
            negative_zero_at_width::<T, M>(&mut rng, tiny, n);
        }
    }

    fn negative_zero_at_width<T: Elem, M: Micro<T = T>>(rng: &mut SplitMix, tiny: f64, n: usize) {
        let (m, k) = (13, 300);
        let mut a = random::<T>(rng, m * k);
        let mut b = random::<T>(rng, k * n);
        for i in [2, 7, 12] {
            a[i * k..(i + 1) * k].fill(T::from_f64(-tiny));
        }
        for p in 0..k {
            b[p * n + 3] = T::from_f64(tiny);
            b[p * n + n - 1] = T::from_f64(tiny);
        }
        let want = bits(&whole::<T, M>(&a, &b, m, k, n));
        let neg_zero = T::from_f64(-0.0).bits();
        for i in [2, 7, 12] {
            assert_eq!(want[i * n + 3], neg_zero, "row {i}, full tile, width {n}");
            assert_eq!(want[i * n + n - 1], neg_zero, "row {i}, edge tile, width {n}");
        }
        for rows in CUTS {
            assert!(bits(&stacked::<T, M>(&a, &b, m, k, n, rows)) == want, "blocks of {rows} rows, width {n}");
        }
    }

    #[test]
    fn negative_zero_from_underflow_f64() {
        negative_zero_from_underflow::<f64, F64>(11);
        negative_zero_from_underflow::<f64, F64x32>(11);
    }

    #[test]
    fn negative_zero_from_underflow_f32() {
        negative_zero_from_underflow::<f32, F32>(12);
        negative_zero_from_underflow::<f32, F32x64>(12);
    }

    /// Each narrower microkernel writes exactly its `vectors · PART`
    /// columns, with the full tile's bits for them, and leaves the rest of
    /// the row alone: called directly on one pair of panels, storing and
    /// adding.
    fn parts_write_their_columns_only<T: Elem, M: Micro<T = T>>(seed: u64) {
        if !M::supported() || M::PART == 0 {
            return;
        }
        let mut rng = SplitMix(seed);
        let (mr, nr, kc) = (M::MR, M::NR, 37);
        let ldc = nr + 8;
        let a = random::<T>(&mut rng, mr * kc);
        // B's panel 64-byte aligned, as packing leaves it.
        let mut lines = vec![Line([0; 64]); (kc * nr * size_of::<T>()).div_ceil(64)];
        // SAFETY: the lines hold at least `kc·nr` elements' bytes, 64-byte
        // aligned; every bit pattern is a valid `T` (`f64` or `f32`).
        let b = unsafe { std::slice::from_raw_parts_mut(lines.as_mut_ptr().cast::<T>(), kc * nr) };
        b.copy_from_slice(&random::<T>(&mut rng, kc * nr));
        let c0 = random::<T>(&mut rng, mr * ldc);
        for add in [false, true] {
            let mut full = c0.clone();
            // SAFETY: the CPU has the kernel's instructions (checked
            // above); the panels are `mr·kc` and `kc·nr` elements, B's
            // aligned; C is `mr` rows of `ldc ≥ nr` elements.
            unsafe { M::tile(kc, a.as_ptr(), b.as_ptr(), full.as_mut_ptr(), ldc, add) };
            for vectors in 1..nr / M::PART {
                let cols = vectors * M::PART;
                let mut part = c0.clone();
                // SAFETY: as above, with `vectors < nr / PART`.
                unsafe { M::tile_part(kc, a.as_ptr(), b.as_ptr(), part.as_mut_ptr(), ldc, add, vectors) };
                for r in 0..mr {
                    let row = r * ldc..(r + 1) * ldc;
                    assert!(
                        bits(&part[row.start..row.start + cols]) == bits(&full[row.start..row.start + cols]),
                        "{vectors} vectors, add {add}: row {r} differs from the full tile"
                    );
                    assert!(
                        bits(&part[row.start + cols..row.end]) == bits(&c0[row.start + cols..row.end]),
                        "{vectors} vectors, add {add}: row {r} written past its {cols} columns"
                    );
                }
            }
        }
    }

    #[test]
    fn parts_write_their_columns_only_f64() {
        parts_write_their_columns_only::<f64, F64>(31);
        parts_write_their_columns_only::<f64, F64x32>(31);
    }

    #[test]
    fn parts_write_their_columns_only_f32() {
        parts_write_their_columns_only::<f32, F32>(32);
        parts_write_their_columns_only::<f32, F32x64>(32);
    }

    /// The last columns of a width that is not a multiple of `NR` (through
    /// a narrower microkernel, straight into `C` or into the scratch tile)
    /// have the bits the full tile gives them: every width from one column
    /// to two panels and a bit, against the same product with `B` widened
    /// by random columns to whole panels, with full and short row panels,
    /// one and two depth chunks, and accumulating.
    fn edge_columns_match_full_tiles<T: Elem, M: Micro<T = T>>(seed: u64) {
        if !M::supported() {
            return;
        }
        let mut rng = SplitMix(seed);
        let nr = M::NR;
        for (m, k) in [(13, 300), (M::MR, 40)] {
            let a = random::<T>(&mut rng, m * k);
            for n in 1..=2 * nr + 3 {
                let wide = n.next_multiple_of(nr);
                // The first `n` columns of each row of a `? × wide` matrix.
                let narrow = |x: &[T]| -> Vec<T> { x.chunks_exact(wide).flat_map(|row| row[..n].to_vec()).collect() };
                let b_wide = random::<T>(&mut rng, k * wide);
                let c0_wide = random::<T>(&mut rng, m * wide);
                let (b, c0) = (narrow(&b_wide), narrow(&c0_wide));
                for acc in [false, true] {
                    let want = bits(&narrow(&run::<T, M>(&a, &b_wide, &c0_wide, m, k, wide, acc, M::blocking())));
                    let got = bits(&run::<T, M>(&a, &b, &c0, m, k, n, acc, M::blocking()));
                    assert!(
                        got == want,
                        "{m}x{k}x{n} (accumulate {acc}) differs from the first {n} columns of {m}x{k}x{wide}"
                    );
                }
            }
        }
    }

    #[test]
    fn edge_columns_match_full_tiles_f64() {
        edge_columns_match_full_tiles::<f64, F64>(21);
        edge_columns_match_full_tiles::<f64, F64x32>(21);
    }

    #[test]
    fn edge_columns_match_full_tiles_f32() {
        edge_columns_match_full_tiles::<f32, F32>(22);
        edge_columns_match_full_tiles::<f32, F32x64>(22);
    }

    /// Point 4 of the module docs: `MC` and `NC` only group work. Tiny
    /// blockings (crossing many `MC` and `NC` edges, including ones that are
    /// not multiples of the tile) give the default blocking's bits, also when
    /// accumulating into `C`.
    fn blocking_does_not_matter<T: Elem, M: Micro<T = T>>(seed: u64) {
        if !M::supported() {
            return;
        }
        let mut rng = SplitMix(seed);
        let (mr, nr) = (M::MR, M::NR);
        // Around every edge: one depth chunk or a partial one (k < KC,
        // k = KC), rows and columns below one tile, several chunks.
        for (m, k, n) in [
            (50, 600, 70),
            (13, 300, 3 * nr + 5),
            (mr, 257, nr),
            (mr - 1, 1, nr - 1),
            (2 * mr + 1, 255, 1),
            (7, 256, nr + 3),
            (3, 513, 2 * nr),
        ] {
            let a = random::<T>(&mut rng, m * k);
            let b = random::<T>(&mut rng, k * n);
            let c0 = random::<T>(&mut rng, m * n);
            for acc in [false, true] {
                let want = bits(&run::<T, M>(&a, &b, &c0, m, k, n, acc, M::blocking()));
                // Row blocks are evened out up to 1.5 × mc with B in L2 or L3,
                // up to mc with A in L2: for the 6-row kernels (4·mr, …) cuts
                // 50 rows 30 + 20 or 18 + 18 + 14, (2·mr, …) 18 + 18 + 14 or
                // 12 × 4 + 2. The constants,
                // and what the model gives for the machines of its tests.
                let fixed = M::fixed();
                for (mc, nc) in [
                    (mr, nr),
                    (2 * mr, 3 * nr),
                    (4 * mr, nr),
                    (7 * mr, nr),
                    (mr, 5 * nr),
                    (48 * mr, 64 * nr),
                    (fixed.mc, fixed.nc),
                    (894usize.next_multiple_of(mr), 256usize.next_multiple_of(nr)),
                    (4092usize.next_multiple_of(mr), 512usize.next_multiple_of(nr)),
                ] {
                    for order in [Order::BInL2, Order::AInL2] {
                        let blk = Blocking { mc, nc, order };
                        let got = bits(&run::<T, M>(&a, &b, &c0, m, k, n, acc, blk));
                        assert!(got == want, "{m}x{k}x{n}, accumulate {acc}, MC {mc}, NC {nc}, {order:?}");
                        // And with B packed once beforehand.
                        let got = bits(&run_packed::<T, M>(&a, &b, &c0, (m, k, n), acc, blk));
                        assert!(got == want, "packed B: {m}x{k}x{n}, accumulate {acc}, MC {mc}, NC {nc}, {order:?}");
                    }
                }
            }
        }
    }

    /// The other AVX2 `f64` tile shapes keep the invariant and give the
    /// 6 × 8 kernel's bits: the tile only groups the work.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn other_tile_shapes_give_the_same_bits() {
        use super::shapes::{F64x12x4, F64x12x4rot, F64x4x12, F64x8x4};
        split_invariance::<f64, F64x12x4rot>(11);
        split_invariance::<f64, F64x4x12>(11);
        split_invariance::<f64, F64x12x4>(11);
        split_invariance::<f64, F64x8x4>(11);
        // Their `MR` of 4, 8 and 12 through both loop orders.
        blocking_does_not_matter::<f64, F64x12x4rot>(12);
        blocking_does_not_matter::<f64, F64x4x12>(12);
        blocking_does_not_matter::<f64, F64x12x4>(12);
        blocking_does_not_matter::<f64, F64x8x4>(12);
        if !is_supported() {
            return;
        }
        let mut rng = SplitMix(12);
        for (m, k, n) in [(67, 1000, 130), (13, 257, 1030), (100, 600, 37)] {
            let a = random::<f64>(&mut rng, m * k);
            let b = random::<f64>(&mut rng, k * n);
            let want = bits(&whole::<f64, F64>(&a, &b, m, k, n));
            assert!(bits(&whole::<f64, F64x4x12>(&a, &b, m, k, n)) == want, "4x12 {m}x{k}x{n}");
            assert!(bits(&whole::<f64, F64x12x4>(&a, &b, m, k, n)) == want, "12x4 {m}x{k}x{n}");
            assert!(bits(&whole::<f64, F64x8x4>(&a, &b, m, k, n)) == want, "8x4 {m}x{k}x{n}");
            assert!(bits(&whole::<f64, F64x12x4rot>(&a, &b, m, k, n)) == want, "12x4 rotated {m}x{k}x{n}");
        }
    }

    /// Sizes and rounds of the timing benchmarks below:
    /// `PROCJOB_BENCH_SIZES` (default 2000,2048) and `PROCJOB_BENCH_ROUNDS`
    /// (default 9).
    fn bench_sizes_and_rounds() -> (Vec<usize>, usize) {
        let sizes = std::env::var("PROCJOB_BENCH_SIZES")
            .map(|s| s.split(',').map(|x| x.trim().parse().expect("PROCJOB_BENCH_SIZES")).collect())
            .unwrap_or_else(|_| vec![2000, 2048]);
        let rounds =
            std::env::var("PROCJOB_BENCH_ROUNDS").map(|r| r.parse().expect("PROCJOB_BENCH_ROUNDS")).unwrap_or(9);
        (sizes, rounds)
    }

    /// A named way of computing `C = A·B` for square matrices.
    type Variant<'a, T> = (String, &'a dyn Fn(&[T], &[T], &mut [T]));

    /// Times `n³` products of each variant on one thread, into a `C`
    /// allocated once, in rounds whose order rotates, and prints each
    /// variant's GFLOP/s and the median of its per-round time ratio to the
    /// first variant (below 1: faster).
    fn time_rotated<T: Elem>(n: usize, rounds: usize, variants: &[Variant<'_, T>]) {
        let mut rng = SplitMix(13);
        let (a, b) = (random::<T>(&mut rng, n * n), random::<T>(&mut rng, n * n));
        let mut c = vec![T::default(); n * n];
        for (_, f) in variants {
            f(&a, &b, &mut c);
        }
        let mut times = vec![Vec::new(); variants.len()];
        for round in 0..rounds {
            for i in 0..variants.len() {
                let v = (round + i) % variants.len();
                let t = std::time::Instant::now();
                (variants[v].1)(&a, &b, &mut c);
                times[v].push(t.elapsed().as_secs_f64());
            }
        }
        let median = |mut v: Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        for (v, (name, _)) in variants.iter().enumerate() {
            let ratios: Vec<f64> = times[v].iter().zip(&times[0]).map(|(t, base)| t / base).collect();
            let gflops = 2.0 * (n as f64).powi(3) / median(times[v].clone()) / 1e9;
            println!(
                "n {n} {name:>12}: {gflops:6.1} GFLOP/s, median time ratio to {} {:.3}",
                variants[0].0,
                median(ratios)
            );
        }
    }

    /// The AVX2 `f64` tile shapes timed against each other
    /// ([`time_rotated`]):
    /// `cargo test --release -p procjob-worker --lib shapes_f64_avx2 -- --ignored --nocapture`.
    #[cfg(target_arch = "x86_64")]
    #[test]
    #[ignore = "a benchmark"]
    fn shapes_f64_avx2() {
        use super::shapes::{F64x12x4, F64x12x4rot, F64x4x12, F64x8x4};
        if !is_supported() {
            return;
        }
        fn product<M: Micro<T = f64>>(a: &[f64], b: &[f64], c: &mut [f64]) {
            let n = (a.len() as f64).sqrt() as usize;
            assert!(gemm::<M, Same<f64>>(a, BIn::Rows(b), c, n, n, n, false, M::blocking()));
        }
        let shapes: [Variant<'_, f64>; 5] = [
            ("6x8".into(), &product::<F64>),
            ("4x12".into(), &product::<F64x4x12>),
            ("12x4".into(), &product::<F64x12x4>),
            ("12x4r".into(), &product::<F64x12x4rot>),
            ("8x4".into(), &product::<F64x8x4>),
        ];
        let (sizes, rounds) = bench_sizes_and_rounds();
        for n in sizes {
            time_rotated(n, rounds, &shapes);
        }
    }

    /// Blockings timed against each other ([`time_rotated`]) for the kernel
    /// that runs here (`PROCJOB_GEMM` chooses), `f64` and `f32`: this
    /// machine's (the model's, or `PROCJOB_GEMM_BLOCKING`'s) first, then
    /// each `MC,NC[,a|b|b3]` of `PROCJOB_BENCH_BLOCKINGS` (`;`-separated, default
    /// `fixed` alone: the constants):
    /// `cargo test --release -p procjob-worker --lib blockings -- --ignored --nocapture`.
    #[test]
    #[ignore = "a benchmark"]
    fn blockings() {
        fn each<T: Elem, M: Micro<T = T>>() {
            if !M::supported() {
                return;
            }
            let list = std::env::var("PROCJOB_BENCH_BLOCKINGS").unwrap_or_else(|_| "fixed".into());
            let mut blockings = vec![("machine".to_string(), M::blocking())];
            for item in list.split(';').map(str::trim).filter(|s| !s.is_empty()) {
                // Read as `PROCJOB_GEMM_BLOCKING` is: `fixed` or `MC,NC[,a|b|b3]`.
                let tile = Tile::of::<T>(M::MR, M::NR, M::KC);
                let (blk, warning) = Blocking::overridden(Some(item), tile, M::fixed(), M::blocking());
                assert!(warning.is_none(), "PROCJOB_BENCH_BLOCKINGS: {warning:?}");
                blockings.push((format!("{},{},{:?}", blk.mc, blk.nc, blk.order), blk));
            }
            println!("{} kernel {}x{}, machine blocking {:?}", std::any::type_name::<T>(), M::MR, M::NR, M::blocking());
            let products: Vec<_> = blockings
                .iter()
                .map(|&(_, blk)| {
                    move |a: &[T], b: &[T], c: &mut [T]| {
                        let n = (a.len() as f64).sqrt() as usize;
                        assert!(gemm::<M, Same<T>>(a, BIn::Rows(b), c, n, n, n, false, blk));
                    }
                })
                .collect();
            let variants: Vec<Variant<'_, T>> = blockings
                .iter()
                .zip(&products)
                .map(|((name, _), f)| (name.clone(), f as &dyn Fn(&[T], &[T], &mut [T])))
                .collect();
            let (sizes, rounds) = bench_sizes_and_rounds();
            for n in sizes {
                time_rotated(n, rounds, &variants);
            }
        }
        match chosen_isa(best_isa) {
            Isa::Avx512 => {
                each::<f64, F64x32>();
                each::<f32, F32x64>();
            }
            Isa::Avx2 => {
                each::<f64, F64>();
                each::<f32, F32>();
            }
            Isa::Portable => {}
        }
    }

    /// `b` (`k × n`) packed by [`pack_b_panels`] in panels `nr` wide, in
    /// 64-byte-aligned lines, and its length in elements.
    fn packed_lines<T: Elem>(b: &[T], k: usize, n: usize, nr: usize) -> (Vec<Line>, usize) {
        let len = packed_b_len(k, n, nr).expect("a small B");
        let mut lines = vec![Line([0xA5; 64]); (len * size_of::<T>()).div_ceil(64)];
        pack_b_panels(b, k, n, nr, elems_mut(&mut lines, len));
        (lines, len)
    }

    fn elems<T: Elem>(lines: &[Line], len: usize) -> &[T] {
        assert!(len * size_of::<T>() <= lines.len() * 64);
        // SAFETY: within the lines (checked), aligned (64-byte lines), and
        // every bit pattern is a float.
        unsafe { std::slice::from_raw_parts(lines.as_ptr().cast::<T>(), len) }
    }

    fn elems_mut<T: Elem>(lines: &mut [Line], len: usize) -> &mut [T] {
        assert!(len * size_of::<T>() <= lines.len() * 64);
        // SAFETY: as in `elems`, and the borrow is exclusive.
        unsafe { std::slice::from_raw_parts_mut(lines.as_mut_ptr().cast::<T>(), len) }
    }

    /// [`run`] with `B` packed beforehand.
    fn run_packed<T: Elem, M: Micro<T = T>>(
        a: &[T],
        b: &[T],
        c0: &[T],
        (m, k, n): (usize, usize, usize),
        acc: bool,
        blk: Blocking,
    ) -> Vec<T> {
        let (lines, len) = packed_lines(b, k, n, M::NR);
        let mut c = c0.to_vec();
        assert!(gemm::<M, Same<T>>(a, BIn::Packed(elems(&lines, len)), &mut c, m, k, n, acc, blk), "no AVX2+FMA");
        c
    }

    #[test]
    fn packed_b_unpacks_to_b() {
        let mut rng = SplitMix(21);
        for (k, n, nr) in [(1, 1, 8), (255, 9, 8), (256, 16, 16), (257, 33, 16), (600, 70, 32), (513, 5, 64), (0, 7, 8)]
        {
            let b = random::<f64>(&mut rng, k * n);
            let (lines, len) = packed_lines(&b, k, n, nr);
            assert_eq!(len, k * n.next_multiple_of(nr));
            let packed = elems::<f64>(&lines, len);
            // The padding is zeros (the sentinel 0xA5… bytes are gone).
            let wide = n.next_multiple_of(nr);
            for pc in (0..k).step_by(KC) {
                let kc = KC.min(k - pc);
                let last = &packed[pc * wide + (wide / nr - 1) * kc * nr..pc * wide + wide * kc];
                for row in last.chunks(nr) {
                    assert!(row[nr - (wide - n)..].iter().all(|x| x.to_bits() == 0), "{k}×{n} in {nr}");
                }
            }
            let mut back = vec![0.0; k * n];
            unpack_b_panels(packed, k, n, nr, &mut back);
            assert_eq!(bits(&back), bits(&b), "{k}×{n} in panels of {nr}");
        }
    }

    #[test]
    fn packed_gemm_takes_only_its_own_panels() {
        let (m, k, n) = (7, 300, 21);
        let mut rng = SplitMix(22);
        let (a, b) = (random::<f64>(&mut rng, m * k), random::<f64>(&mut rng, k * n));
        let Some(nr) = dgemm_panel_width() else { return };
        let mut want = vec![0.0; m * n];
        assert!(dgemm(&a, &b, &mut want, m, k, n, false));
        let (lines, len) = packed_lines(&b, k, n, nr);
        let mut c = vec![f64::NAN; m * n];
        assert!(dgemm_packed(&a, elems(&lines, len), &mut c, m, k, n, nr, false));
        assert_eq!(bits(&c), bits(&want));
        // Other panels: refused, C untouched.
        let (other, other_len) = packed_lines(&b, k, n, 2 * nr);
        let mut c = vec![f64::NAN; m * n];
        assert!(!dgemm_packed(&a, elems(&other, other_len), &mut c, m, k, n, 2 * nr, false));
        assert!(c.iter().all(|x| x.is_nan()));
        // B at an address off a 64-byte line: taken (through an aligned
        // copy), the same bits.
        let mut off = lines.clone();
        off.push(Line([0; 64]));
        let shifted = elems_mut::<f64>(&mut off, len + 1);
        shifted.copy_within(0..len, 1);
        assert!(dgemm_packed(&a, &shifted[1..], &mut c, m, k, n, nr, false));
        assert_eq!(bits(&c), bits(&want));
    }

    #[test]
    fn blocking_does_not_change_bits_f64() {
        blocking_does_not_matter::<f64, F64>(3);
        blocking_does_not_matter::<f64, F64x32>(3);
    }

    #[test]
    fn blocking_does_not_change_bits_f32() {
        blocking_does_not_matter::<f32, F32>(4);
        blocking_does_not_matter::<f32, F32x64>(4);
    }

    /// Row blocks cover the rows in blocks as even as whole panels allow:
    /// with `A` in L2 never above `MC` (its block must fit the L2 it was
    /// sized for), with `B` in L2 or L3 up to 1.5 × `MC`.
    #[test]
    fn row_blocks_stay_within_their_cap() {
        let blk = |mc, order| Blocking { mc, nc: 8, order };
        // The cuts the docs name.
        assert_eq!(row_block(2000, 6, blk(192, Order::AInL2)), 186);
        assert_eq!(row_block(2048, 6, blk(1008, Order::BInL2)), 1026);
        assert_eq!(row_block(50, 6, blk(12, Order::AInL2)), 12);
        assert_eq!(row_block(50, 6, blk(24, Order::BInL2)), 30);
        // With `B` in L3 as with `B` in L2: 1.5 × MC.
        assert_eq!(row_block(2048, 6, blk(1008, Order::BInL3)), 1026);
        assert_eq!(row_block(4000, 6, blk(3582, Order::BInL3)), 4002);
        for rows in 1..700 {
            for mc in [6, 12, 96, 132, 192, 384] {
                for order in [Order::AInL2, Order::BInL2, Order::BInL3] {
                    let step = row_block(rows, 6, blk(mc, order));
                    let cap = if order == Order::AInL2 { mc } else { mc + mc / 2 / 6 * 6 };
                    assert!(
                        step > 0 && step.is_multiple_of(6) && step <= cap,
                        "{rows} rows, MC {mc}, {order:?}: {step}"
                    );
                    // No more blocks than the cap forces.
                    assert_eq!(rows.div_ceil(step), rows.div_ceil(cap), "{rows} rows, MC {mc}, {order:?}: {step}");
                }
            }
        }
    }

    /// Within `2·k·eps·Σ|a·b|` of the naive loop (the bound of `kernels/tests.rs`'s
    /// tests: both are within `γ_k·Σ|a·b|` of the exact sum), for shapes with
    /// edge tiles in both directions and several depth chunks; and
    /// `accumulate` adds the product to C's old contents.
    fn accuracy<T: Elem, M: Micro<T = T>>(seed: u64) {
        if !M::supported() {
            return;
        }
        let mut rng = SplitMix(seed);
        for (m, k, n) in [(1, 1, 1), (7, 3, 5), (13, 257, 19), (6, 512, 16), (20, 700, 41), (151, 40, 9)] {
            let a = random::<T>(&mut rng, m * k);
            let b = random::<T>(&mut rng, k * n);
            let (want, mag) = naive(&a, &b, m, k, n);
            let got = whole::<T, M>(&a, &b, m, k, n);
            let c0 = random::<T>(&mut rng, m * n);
            let summed = run::<T, M>(&a, &b, &c0, m, k, n, true, M::blocking());
            for idx in 0..m * n {
                let tol = 2.0 * k as f64 * T::EPS * mag[idx];
                let (x, y) = (got[idx].to_f64(), want[idx].to_f64());
                assert!((x - y).abs() <= tol, "{m}x{k}x{n}, element {idx}: {x} vs naive {y}");
                let (x, y) = (summed[idx].to_f64(), c0[idx].to_f64() + want[idx].to_f64());
                let tol = tol + 2.0 * T::EPS * (c0[idx].to_f64().abs() + mag[idx]);
                assert!((x - y).abs() <= tol, "{m}x{k}x{n}, accumulate, element {idx}: {x} vs {y}");
            }
        }
    }

    #[test]
    fn accuracy_f64() {
        accuracy::<f64, F64>(5);
        accuracy::<f64, F64x32>(5);
    }

    #[test]
    fn accuracy_f32() {
        accuracy::<f32, F32>(6);
        accuracy::<f32, F32x64>(6);
    }

    /// Integer-valued data: every product and partial sum is an integer
    /// below 2^24 (|x| ≤ 15, k ≤ 2048: |sum| ≤ 225·2048 < 2^19), exact in
    /// any order with or without FMA, so C equals the naive loop bit for
    /// bit — the property the exact `i64` path of `kernels/integer.rs` relies on.
    fn integers_exact<T: Elem, M: Micro<T = T>>(seed: u64) {
        if !M::supported() {
            return;
        }
        let mut rng = SplitMix(seed);
        for (m, k, n) in [(1, 1, 1), (9, 300, 21), (7, 2048, 17), (40, 513, 35)] {
            let a: Vec<T> = (0..m * k).map(|_| T::from_f64(rng.int(15))).collect();
            let b: Vec<T> = (0..k * n).map(|_| T::from_f64(rng.int(15))).collect();
            assert_eq!(bits(&whole::<T, M>(&a, &b, m, k, n)), bits(&naive(&a, &b, m, k, n).0), "{m}x{k}x{n}");
        }
    }

    #[test]
    fn integers_exact_f64() {
        integers_exact::<f64, F64>(7);
        integers_exact::<f64, F64x32>(7);
    }

    #[test]
    fn integers_exact_f32() {
        integers_exact::<f32, F32>(8);
        integers_exact::<f32, F32x64>(8);
    }

    /// Large integers: sums up to 2^53 - 2^26 stay exact in f64 (the bound
    /// of the exact `i64` path), also when accumulated across chunks and
    /// into C.
    #[test]
    fn large_integers_exact_f64() {
        if !is_supported() {
            return;
        }
        let (m, k, n) = (7, 600, 10);
        let big = (1u64 << 53) as f64 / k as f64;
        let a = vec![(1 << 20) as f64; m * k];
        let b: Vec<f64> = (0..k * n).map(|i| (big / (1 << 20) as f64).floor() - (i % 3) as f64).collect();
        let (want, _) = naive(&a, &b, m, k, n);
        assert!(want.iter().all(|&x| x < (1u64 << 53) as f64 && x > (1u64 << 52) as f64));
        assert_eq!(whole::<f64, F64>(&a, &b, m, k, n), want);
        if F64x32::supported() {
            assert_eq!(whole::<f64, F64x32>(&a, &b, m, k, n), want);
        }
        let mut c = vec![5.0; m * n];
        assert!(dgemm(&a, &b, &mut c, m, k, n, true));
        assert_eq!(c, want.iter().map(|x| x + 5.0).collect::<Vec<_>>());
    }

    /// The AVX-512 kernels run the same chains as the AVX2 ones (module
    /// docs), only more lanes at a time, so they give the same bits: for
    /// shapes with edge tiles of both, several depth chunks and
    /// `accumulate`, and for `-0` from underflow.
    fn avx512_same_bits<T: Elem, M: Micro<T = T>, W: Micro<T = T>>(seed: u64) {
        if !W::supported() {
            return;
        }
        let mut rng = SplitMix(seed);
        for (m, k, n) in [(1, 1, 1), (7, 3, 5), (13, 257, 19), (25, 600, 70), (67, 1000, 1030), (12, 256, 64)] {
            let a = random::<T>(&mut rng, m * k);
            let b = random::<T>(&mut rng, k * n);
            let c0 = random::<T>(&mut rng, m * n);
            assert!(bits(&whole::<T, W>(&a, &b, m, k, n)) == bits(&whole::<T, M>(&a, &b, m, k, n)), "{m}x{k}x{n}");
            let with = |blk| bits(&run::<T, W>(&a, &b, &c0, m, k, n, true, blk));
            let want = bits(&run::<T, M>(&a, &b, &c0, m, k, n, true, M::blocking()));
            assert!(with(W::blocking()) == want, "{m}x{k}x{n}, accumulate");
        }
    }

    #[test]
    fn avx512_same_bits_as_avx2_f64() {
        avx512_same_bits::<f64, F64, F64x32>(13);
    }

    #[test]
    fn avx512_same_bits_as_avx2_f32() {
        avx512_same_bits::<f32, F32, F32x64>(14);
    }

    #[test]
    fn zero_sized_dims() {
        if !is_supported() {
            return;
        }
        // k = 0: C = 0, or unchanged when accumulating.
        let mut c = vec![7.5f64; 6];
        assert!(dgemm(&[], &[], &mut c, 2, 0, 3, false));
        assert_eq!(c, vec![0.0; 6]);
        let mut c = vec![7.5f64; 6];
        assert!(dgemm(&[], &[], &mut c, 2, 0, 3, true));
        assert_eq!(c, vec![7.5; 6]);
        let mut c = vec![f32::NAN; 2];
        assert!(sgemm(&[], &[], &mut c, 1, 0, 2, false));
        assert_eq!(c, vec![0.0; 2]);
        // No rows or no columns: nothing to do.
        assert!(dgemm(&[], &[1.0; 6], &mut [], 0, 2, 3, false));
        assert!(sgemm(&[1.0; 6], &[], &mut [], 3, 2, 0, false));
        assert!(dgemm(&[], &[], &mut [], 0, 0, 0, false));
    }

    #[test]
    #[should_panic(expected = "do not fit")]
    fn wrong_lengths_panic() {
        let _ = dgemm(&[1.0; 5], &[1.0; 6], &mut [0.0; 4], 2, 3, 2, false);
    }

    /// With `KC = 256` and the FMA kernel these are exactly the bits
    /// matrixmultiply 0.3 gives (module docs), NaNs aside: one more check
    /// that no row, position or edge changes the arithmetic. Only on CPUs
    /// where matrixmultiply picks its AVX2+FMA kernel (not AVX-512).
    #[cfg(target_arch = "x86_64")]
    fn same_as_matrixmultiply<T: Elem, M: Micro<T = T>>(seed: u64, mm: RowMajorGemm<T>) {
        if !M::supported() || std::arch::is_x86_feature_detected!("avx512f") || M::KC != 256 {
            return;
        }
        let mut rng = SplitMix(seed);
        for (m, k, n) in [(1, 1, 1), (7, 3, 5), (35, 600, 37), (9, 256, 20), (20, 513, 130)] {
            let a = random::<T>(&mut rng, m * k);
            let b = random::<T>(&mut rng, k * n);
            let mut c = vec![T::default(); m * n];
            mm(&a, &b, &mut c, m, k, n);
            assert_eq!(bits(&whole::<T, M>(&a, &b, m, k, n)), bits(&c), "{m}x{k}x{n}");
        }
    }

    /// `c = a · b` for row-major `m × k`, `k × n`, `m × n` (the last three
    /// arguments are `m`, `k`, `n`).
    #[cfg(target_arch = "x86_64")]
    type RowMajorGemm<T> = fn(&[T], &[T], &mut [T], usize, usize, usize);

    /// Calls a matrixmultiply GEMM with `alpha = 1`, `beta = 0`, row-major.
    #[cfg(target_arch = "x86_64")]
    macro_rules! mm {
        ($gemm:path) => {
            |a, b, c, m, k, n| {
                let (rs_a, rs_b) = (k as isize, n as isize);
                // SAFETY: `a`, `b`, `c` are `m × k`, `k × n`, `m × n`
                // row-major (the test builds them so), which is what these
                // strides describe; `c` is exclusive.
                unsafe { $gemm(m, k, n, 1.0, a.as_ptr(), rs_a, 1, b.as_ptr(), rs_b, 1, 0.0, c.as_mut_ptr(), rs_b, 1) }
            }
        };
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn same_bits_as_matrixmultiply_f64() {
        same_as_matrixmultiply::<f64, F64>(9, mm!(matrixmultiply::dgemm));
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn same_bits_as_matrixmultiply_f32() {
        same_as_matrixmultiply::<f32, F32>(10, mm!(matrixmultiply::sgemm));
    }
}
