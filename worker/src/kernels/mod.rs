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
//! On x86-64 CPUs with AVX2 and FMA (checked at run time), [`gemm`]:
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
//! write-back also put `C` and `s` in different operand orders); it makes
//! each tile's NaNs canonical as it writes the tile with the last depth
//! chunk (`gemm.rs`, point 6), and matrixmultiply's block gets the pass.
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
//!
//! # Rooms
//!
//! `dispatch` holds the [`Kernel`] trait and which kernel each
//! element type runs; `machine` what the CPU offers [`gemm`] (its caches,
//! read from sysfs, and the instruction set, or the one `PROCJOB_GEMM`
//! forces); `blocking` the `MC`/`NC` derived from those caches; `float` the `f64`/`f32` wrappers around [`gemm`] and
//! matrixmultiply; `integer` the two `i64` paths; `tiled` the cache-blocked
//! scalar kernel the wrapping path runs; `tests` the tests of all of them
//! against [`matmul_naive`].

mod blocking;
mod dispatch;
mod float;
pub mod gemm;
mod integer;
mod machine;
mod tiled;
mod wide;

#[cfg(test)]
mod tests;

pub use dispatch::{matmul_block, matmul_naive, pack_b, pack_b_part, Kernel};
pub use gemm::{packed_b_len, PACKED_B_DEPTH};
pub use integer::i64_fits_f64_exactly;
