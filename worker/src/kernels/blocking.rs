//! `MC` and `NC`, the packed GEMM's cache blocking, derived from the caches
//! the CPU reports (`machine.rs`) with the analytical model of BLIS (Low,
//! Igual, Smith and Quintana-Ortí, "Analytical modeling is enough for
//! high-performance BLIS", ACM TOMS 2016), applied to the loop order of
//! `gemm.rs` that the size of L2 and the vendor pick; today's constants
//! are the fallback when the caches are unknown. `MC`, `NC` and the order
//! only group work, so none of them changes a bit of `C` (`gemm.rs`, point
//! 4); `KC`, which does, stays a constant.
//!
//! # The loop order
//!
//! Where L2 is below [`A_IN_L2_BELOW`] (1 MiB) and L3 is known, the loops
//! keep `A`'s block in L2 ([`Order::AInL2`]). Otherwise, on an AMD CPU
//! with a known L3, they run OpenBLAS's order with `B`'s block sized for
//! L3 ([`Order::BInL3`]); on any other CPU, for L2 ([`Order::BInL2`]).
//! Half of a 512 KiB L2 holds 16 AVX2 `B` panels, so with `B` in L2 each
//! `A` panel brought from L3 served 16 tiles; on the AMD EPYC Zen 3 that
//! order ran 3–14 % slower on one thread than `A` in L2, while on the
//! Intel Xeon (2 MiB L2) `B` in L2 had been the faster, and a `B` block
//! twice the L2's half 30–40 % slower. On the AMD EPYC Zen 4 (1 MiB L2)
//! the opposite held on one thread: the larger `B`'s block, the faster, up
//! to one block of all columns streaming from L3, 3–4 % faster than half
//! of L2 for `f64` and 1–2 % for `f32`; on two processes level, within
//! 2 % either way (docs/kernels.md, "The loop order from the machine").
//! What sets the two L3s apart (how fast each feeds a core) is not among
//! what sysfs reports, so the vendor decides.
//!
//! # The model, `B` in L2
//!
//! The loop order is OpenBLAS's on Skylake-X (`gemm.rs`): the packed
//! `KC × NC` block of `B` is the block that stays in **L2** while the
//! microkernel streams it past one `MR × KC` panel of `A` held in L1; the
//! packed `MC × KC` block of `A` waits in **L3** while the column blocks go
//! by. Low et al. size each resident block by whole *ways* of its cache: a
//! contiguous packed block of `w` ways' bytes fills `w` ways of every set
//! evenly, and under LRU it survives as long as the data streaming past it
//! has the remaining ways to itself. So, with `S` the element size:
//!
//! * **`NC` (L2).** Of L2's `W₂` ways, one is left for the lines of `C` and
//!   `⌈MR·KC·S / way₂⌉` for the `A` panels coming in from L3 (the streaming
//!   operands); the `B` block takes the rest, but **at most half** of the
//!   ways: `NC = min(W₂ − 1 − ⌈MR·KC·S / way₂⌉, ⌊W₂ / 2⌋) · way₂ / (KC·S)`.
//!   The cap is measured, not modelled: a real L2 is not the LRU cache of
//!   the model (its replacement is adaptive, the hardware prefetchers
//!   bring in lines of `C` and of the next `B` rows, a VM's sibling
//!   hyperthread may share it), and on the Intel Xeon (2 MiB 16-way) an
//!   `f64` `B` block of 1.3 MiB ran 2–7 % slower than one of 0.7–1 MiB and
//!   one of 2 MiB 30–40 % slower, while on the AMD EPYC Zen 3 the AVX2
//!   constants, tuned there, were half its 512 KiB L2 (docs/kernels.md).
//!   OpenBLAS and BLIS size their L2 block at about half of L2 too.
//! * **`MC` (L3).** Of L3's `W₃` ways, one is left for `C` and
//!   `⌈KC·NC·S / way₃⌉` for the `B` block passing through; the `A` block
//!   takes the rest, divided among the CPUs that share the L3 (procjob
//!   runs one worker per CPU, each with its own `A` block):
//!   `MC = (W₃ − 1 − ⌈KC·NC·S / way₃⌉) · way₃ / (sharers · KC·S)`.
//!
//! Both are rounded down to multiples of `MR` / `NR` and clamped to
//! [`NC_RANGE`] / [`MC_RANGE`]. L1 sets nothing: its block, the `A` panel,
//! is `MR × KC` with `KC` fixed (12 KiB for `f64`, inside every L1d
//! measured).
//!
//! # The model, `A` in L2
//!
//! BLIS's order: the `MC × KC` block of `A` stays in **L2** while one
//! `KC × NR` panel of `B` in L1 meets each of its panels; the `KC × NC`
//! block of `B` waits in **L3**.
//!
//! * **`MC` (L2).** Of L2's ways, one for `C` and `⌈KC·NR·S / way₂⌉` for
//!   the `B` panel coming in from L3 (and the next one, which `gemm.rs`
//!   fetches meanwhile: 2 × 16 KiB for AVX2, inside one 64 KiB way on the
//!   Zen 3); the `A` block takes the rest (no cap: on the Zen 3, `MC` from
//!   192 to 1008 rows ran within 1–2 %, before that fetch):
//!   `MC = (W₂ − 1 − ⌈KC·NR·S / way₂⌉) · way₂ / (KC·S)`.
//! * **`NC` (L3).** Of L3's ways, one for `C` and `⌈MC·KC·S / way₃⌉` for
//!   the `A` block; the `B` block takes the rest, divided among the CPUs
//!   sharing the L3: `NC = (W₃ − 1 − ⌈MC·KC·S / way₃⌉) · way₃ / (sharers · KC·S)`.
//!
//! Rounded and clamped as above. `gemm.rs` evens the row blocks out up to
//! `MC` in this order (up to 1.5 × `MC` with `B` in L2 or L3), so that the `A`
//! block stays in the ways it was given, and fetches each `B` panel into L2
//! while the tiles of the one before run. On the Zen 3 they pay most
//! together: blocks capped at `MC` without the fetch ran 1.6–2.9 % slower
//! than blocks of up to 1.5 × `MC` (docs/kernels.md, "Tile shapes and
//! blocking").
//!
//! # The model, `B` in L3
//!
//! [`Order::BInL2`]'s loops, with both packed blocks in **L3** and one
//! `A` panel in L1: of L3's ways one is left for `C`, and the rest are
//! split evenly between the `A` block and the `B` block, each divided
//! among the CPUs sharing the L3:
//! `MC = NC = ⌊(W₃ − 1) / 2⌋ · way₃ / (sharers · KC·S)`.
//!
//! Rounded and clamped as above. `gemm.rs` evens the row blocks out up to
//! 1.5 × `MC`, as with `B` in L2 (so a row block may take more than its
//! half: 5370 rows on the Zen 4 VM for `f64`; a 4000-row product there
//! runs as one block, measured 0.96 of the time of the old blocking).
//!
//! `PROCJOB_GEMM_BLOCKING`, for benchmarking only, overrides the result:
//! `fixed` for the constants (with `B` in L2), `MC,NC` (rounded up to
//! whole tiles) in the order the machine chose, or `MC,NC,a` / `MC,NC,b`
//! / `MC,NC,b3` with `A` in L2, `B` in L2 or `B` in L3 (`b` and `b3` run
//! the same loops; they differ in what `describe` prints).

use std::mem::size_of;

use super::machine::{caches, CacheLevel, Caches};

/// The `MC`/`NC` cache blocking of one kernel. Only groups work (module
/// docs of `gemm.rs`, point 4); the tests shrink it to cross every
/// blocking edge.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Blocking {
    /// Rows packed at a time (with `B` in L2 or L3 up to 1.5 times it, see `gemm.rs`'s `row_block`),
    /// a positive multiple of `MR`.
    pub(super) mc: usize,
    /// Most columns packed at a time, a positive multiple of `NR`.
    pub(super) nc: usize,
    /// The loop order, and the cache `B`'s block is sized for.
    pub(super) order: Order,
}

/// The loop order of the packed GEMM (`gemm.rs`, `drive`) and which
/// packed block it keeps in L2 (or, with `B` in L3, in neither). None
/// changes a bit of `C`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Order {
    /// OpenBLAS's order on Skylake-X: `pc` → `ic` → `jc` → `ir` → `jr`; the
    /// `KC × NC` block of `B` in L2, one `A` panel in L1, the `MC × KC`
    /// block of `A` in L3.
    BInL2,
    /// The same loops as [`Order::BInL2`], with the `KC × NC` block of `B`
    /// sized for L3 beside the `A` block: `B` streams from L3 past one `A`
    /// panel in L1.
    BInL3,
    /// BLIS's order: `jc` → `pc` → `ic` → `jr` → `ir`; the `MC × KC` block
    /// of `A` in L2, one `B` panel in L1, the `KC × NC` block of `B` in L3.
    AInL2,
}

/// A kernel's tile and depth, and its element size: what the model needs.
#[derive(Clone, Copy, Debug)]
pub(super) struct Tile {
    /// Rows of a microtile.
    pub(super) mr: usize,
    /// Columns of a microtile.
    pub(super) nr: usize,
    /// The depth chunk.
    pub(super) kc: usize,
    /// Bytes per element.
    pub(super) elem: usize,
}

impl Tile {
    /// The tile of a kernel over `T`.
    pub(super) const fn of<T>(mr: usize, nr: usize, kc: usize) -> Tile {
        Tile { mr, nr, kc, elem: size_of::<T>() }
    }
}

/// Rows of `A` the model may choose (before rounding to `MR`).
pub(super) const MC_RANGE: (usize, usize) = (96, 4096);
/// Columns of `B` the model may choose (before rounding to `NR`).
pub(super) const NC_RANGE: (usize, usize) = (64, 4096);

/// L2 size below which the loops keep `A`'s block in L2 ([`Order::AInL2`])
/// rather than `B`'s (module docs, "The loop order").
pub(super) const A_IN_L2_BELOW: usize = 1 << 20;

/// The environment variable that overrides the blocking, for benchmarking.
pub(super) const BLOCKING_ENV: &str = "PROCJOB_GEMM_BLOCKING";

impl Blocking {
    /// The blocking of a kernel with tile `tile` on this machine: derived
    /// from its caches, `fixed` where they are unknown, unless
    /// `PROCJOB_GEMM_BLOCKING` overrides it. Reads sysfs and the environment;
    /// callers cache the answer.
    pub(super) fn for_machine(tile: Tile, fixed: Blocking) -> Blocking {
        let derived = Blocking::derive(&caches(), tile, fixed);
        let requested = std::env::var(BLOCKING_ENV).ok();
        let (blk, warning) = Blocking::overridden(requested.as_deref(), tile, fixed, derived);
        if let Some(warning) = warning {
            eprintln!("procjob: {warning}");
        }
        blk
    }

    /// The model of the module docs for `caches`: the loop order from the
    /// size of L2 and the vendor, then `MC` and `NC` for it. Each of `MC`
    /// and `NC` is `fixed`'s where the cache it is sized for is unknown (or
    /// too small for the model to leave it a way); [`Order::AInL2`] and
    /// [`Order::BInL3`] need both L2 and L3 known.
    pub(super) fn derive(caches: &Caches, tile: Tile, fixed: Blocking) -> Blocking {
        if let (Some(l2), Some(l3)) = (caches.l2, caches.l3) {
            let blk = if l2.size < A_IN_L2_BELOW {
                Blocking::a_in_l2(l2, l3, tile)
            } else if caches.amd {
                Blocking::b_in_l3(l3, tile)
            } else {
                None
            };
            if let Some(blk) = blk {
                return blk;
            }
        }
        Blocking::b_in_l2(caches, tile, fixed)
    }

    /// [`Order::BInL3`]: `MC` and `NC` from this CPU's share of half of the
    /// L3 ways left after one for `C`; `None` where that leaves no way.
    fn b_in_l3(l3: CacheLevel, tile: Tile) -> Option<Blocking> {
        let Tile { mr, nr, kc, elem } = tile;
        let each = ways_left(l3, 0)? / 2;
        let rows = (each > 0).then(|| each * l3.way_bytes() / (l3.sharers * kc * elem))?;
        Some(Blocking { mc: clamp_to(rows, MC_RANGE, mr), nc: clamp_to(rows, NC_RANGE, nr), order: Order::BInL3 })
    }

    /// [`Order::BInL2`]: `NC` from L2's ways (at most half of them), then
    /// `MC` from this CPU's share of L3's.
    fn b_in_l2(caches: &Caches, tile: Tile, fixed: Blocking) -> Blocking {
        let Tile { mr, nr, kc, elem } = tile;
        let nc = caches
            .l2
            .and_then(|l2| {
                // A way left needs three ways or more, so half is ≥ 1 too.
                let for_b = ways_left(l2, mr * kc * elem)?.min(l2.ways / 2);
                Some(clamp_to(for_b * l2.way_bytes() / (kc * elem), NC_RANGE, nr))
            })
            .unwrap_or(fixed.nc);
        let mc = caches
            .l3
            .and_then(|l3| {
                let for_a = ways_left(l3, kc * nc * elem)?;
                Some(clamp_to(for_a * l3.way_bytes() / (l3.sharers * kc * elem), MC_RANGE, mr))
            })
            .unwrap_or(fixed.mc);
        Blocking { mc, nc, order: Order::BInL2 }
    }

    /// [`Order::AInL2`]: `MC` from L2's ways, then `NC` from this CPU's
    /// share of L3's; `None` where either cache leaves its block no way.
    fn a_in_l2(l2: CacheLevel, l3: CacheLevel, tile: Tile) -> Option<Blocking> {
        let Tile { mr, nr, kc, elem } = tile;
        let for_a = ways_left(l2, kc * nr * elem)?;
        let mc = clamp_to(for_a * l2.way_bytes() / (kc * elem), MC_RANGE, mr);
        let for_b = ways_left(l3, mc * kc * elem)?;
        let nc = clamp_to(for_b * l3.way_bytes() / (l3.sharers * kc * elem), NC_RANGE, nr);
        Some(Blocking { mc, nc, order: Order::AInL2 })
    }

    /// `derived`, or what `requested` (the value of
    /// `PROCJOB_GEMM_BLOCKING`) asks for, and a warning when it is ignored.
    pub(super) fn overridden(
        requested: Option<&str>,
        tile: Tile,
        fixed: Blocking,
        derived: Blocking,
    ) -> (Blocking, Option<String>) {
        let Some(value) = requested.map(str::trim).filter(|s| !s.is_empty()) else {
            return (derived, None);
        };
        if value == "fixed" {
            return (fixed, None);
        }
        let mut parts = value.split(',').map(str::trim);
        let size = |x: Option<&str>| x?.parse::<usize>().ok().filter(|&x| x > 0 && x <= 1 << 16);
        let (mc, nc) = (size(parts.next()), size(parts.next()));
        let order = match parts.next() {
            None => Some(derived.order),
            Some("b") => Some(Order::BInL2),
            Some("a") => Some(Order::AInL2),
            Some("b3") => Some(Order::BInL3),
            Some(_) => None,
        };
        match (mc, nc, order, parts.next()) {
            (Some(mc), Some(nc), Some(order), None) => {
                (Blocking { mc: mc.next_multiple_of(tile.mr), nc: nc.next_multiple_of(tile.nr), order }, None)
            }
            _ => (derived, Some(format!("ignoring {BLOCKING_ENV}={value:?}: expected `fixed` or `MC,NC[,a|b|b3]`"))),
        }
    }
}

/// The ways of `level` left for the resident block after one for the lines
/// of `C` and those that `streaming` bytes of the other operand take; `None`
/// when none is left (the model of the module docs).
fn ways_left(level: CacheLevel, streaming: usize) -> Option<usize> {
    level.ways.checked_sub(1 + streaming.div_ceil(level.way_bytes())).filter(|&w| w > 0)
}

/// `x` clamped to `range`, then rounded down to a multiple of `step` (at
/// least `step`).
fn clamp_to(x: usize, (lo, hi): (usize, usize), step: usize) -> usize {
    (x.clamp(lo, hi) / step * step).max(step)
}

#[cfg(test)]
mod tests {
    use super::super::machine::CacheLevel;
    use super::*;

    const KIB: usize = 1 << 10;
    const MIB: usize = 1 << 20;

    fn level(size: usize, ways: usize, sharers: usize) -> Option<CacheLevel> {
        Some(CacheLevel { size, ways, sharers })
    }

    const fn b_in_l2(mc: usize, nc: usize) -> Blocking {
        Blocking { mc, nc, order: Order::BInL2 }
    }

    /// The four kernels' tiles and constants, as in `gemm.rs`.
    const F64_AVX2: (Tile, Blocking) = (Tile::of::<f64>(6, 8, 256), b_in_l2(1008, 128));
    const F32_AVX2: (Tile, Blocking) = (Tile::of::<f32>(6, 16, 256), b_in_l2(1008, 256));
    const F64_AVX512: (Tile, Blocking) = (Tile::of::<f64>(6, 32, 256), b_in_l2(1008, 384));
    const F32_AVX512: (Tile, Blocking) = (Tile::of::<f32>(6, 64, 256), b_in_l2(1008, 768));

    fn derive(caches: &Caches, (tile, fixed): (Tile, Blocking)) -> Blocking {
        let blk = Blocking::derive(caches, tile, fixed);
        assert!(blk.mc.is_multiple_of(tile.mr) && blk.nc.is_multiple_of(tile.nr), "{blk:?}");
        blk
    }

    const fn b_in_l3(mc: usize, nc: usize) -> Blocking {
        Blocking { mc, nc, order: Order::BInL3 }
    }

    /// AMD EPYC Zen 4 (a whole CCX of 8 cores, 16 threads, sharing the
    /// L3): an L2 of 1 MiB and an AMD L3, so both blocks in L3: of its 16
    /// ways of 2 MiB, one for `C`, 7 for each block, shared by 16 (896 KiB
    /// each).
    #[test]
    fn zen4() {
        let caches =
            Caches { l1d: level(32 * KIB, 8, 2), l2: level(MIB, 8, 2), l3: level(32 * MIB, 16, 16), amd: true };
        assert_eq!(derive(&caches, F64_AVX512), b_in_l3(444, 448));
        assert_eq!(derive(&caches, F32_AVX512), b_in_l3(894, 896));
        assert_eq!(derive(&caches, F64_AVX2), b_in_l3(444, 448));
        assert_eq!(derive(&caches, F32_AVX2), b_in_l3(894, 896));
        // The 2-vCPU VM this was measured on, its L3 shared by its two CPUs:
        // 7 MiB each, all the columns of a 2000-wide `f64` B in one block.
        let vm = Caches { l3: level(32 * MIB, 16, 2), ..caches };
        assert_eq!(derive(&vm, F64_AVX512), b_in_l3(3582, 3584));
        assert_eq!(derive(&vm, F32_AVX512), b_in_l3(4092, 4096));
        // The same caches on a CPU of another vendor: `B` in half of L2 (6
        // of the 8 ways of 128 KiB left, 4 taken), the `A` block in L3.
        let other = Caches { amd: false, ..caches };
        assert_eq!(derive(&other, F64_AVX512), b_in_l2(894, 256));
        assert_eq!(derive(&other, F32_AVX512), b_in_l2(1788, 512));
        assert_eq!(derive(&Caches { amd: false, ..vm }, F64_AVX512), b_in_l2(4092, 256));
        // An L3 of two ways leaves one, which does not split in two.
        let small = Caches { l3: level(4 * MIB, 2, 2), ..caches };
        assert_eq!(derive(&small, F64_AVX512).order, Order::BInL2);
    }

    const fn a_in_l2(mc: usize, nc: usize) -> Blocking {
        Blocking { mc, nc, order: Order::AInL2 }
    }

    /// AMD EPYC Zen 1 (family 23 model 1: 512 KiB 8-way L2, 8 MiB 16-way L3
    /// per CCX of 4 cores, 8 threads): an L2 below 1 MiB, so `A`'s block
    /// stays in it: of its 8 ways of 64 KiB, one for `C` and one for the
    /// `B` panel passing through, 6 (384 KiB) for `A`; of the L3's 16 ways
    /// of 512 KiB, one for `C` and one for the `A` block, 14 shared by 8.
    #[test]
    fn zen1() {
        let caches =
            Caches { l1d: level(32 * KIB, 8, 2), l2: level(512 * KIB, 8, 2), l3: level(8 * MIB, 16, 8), amd: true };
        assert_eq!(derive(&caches, F64_AVX2), a_in_l2(192, 448));
        assert_eq!(derive(&caches, F32_AVX2), a_in_l2(384, 896));
    }

    /// AMD EPYC Zen 3 (family 25 model 1), the 2-vCPU VM it was measured on:
    /// 512 KiB 8-way L2, 32 MiB 16-way L3 shared by the 2 vCPUs. The same
    /// `MC` as the Zen 1; `NC` clamped.
    #[test]
    fn zen3() {
        let caches =
            Caches { l1d: level(32 * KIB, 8, 1), l2: level(512 * KIB, 8, 1), l3: level(32 * MIB, 16, 2), amd: true };
        assert_eq!(derive(&caches, F64_AVX2), a_in_l2(192, 4096));
        assert_eq!(derive(&caches, F32_AVX2), a_in_l2(384, 4096));
        // Without a known L3 there is no `NC` for that order: `B` in L2.
        let no_l3 = Caches { l3: None, ..caches };
        assert_eq!(derive(&no_l3, F64_AVX2), b_in_l2(1008, 128));
        // Nor with an L3 that the `A` block and `C` fill: one way of 64 KiB.
        let full_l3 = Caches { l3: level(128 * KIB, 2, 1), ..caches };
        assert_eq!(derive(&full_l3, F64_AVX2), b_in_l2(1008, 128));
    }

    /// The Intel Xeon the AVX-512 kernels were tuned on (Sapphire Rapids
    /// class: 48 KiB L1d, 2 MiB 16-way L2; L3 taken as 1.875 MiB a core,
    /// 105 MiB 15-way over 56 cores).
    #[test]
    fn xeon() {
        let caches = Caches {
            l1d: level(48 * KIB, 12, 2),
            l2: level(2 * MIB, 16, 2),
            l3: level(105 * MIB, 15, 112),
            amd: false,
        };
        let blk = derive(&caches, F64_AVX512);
        assert_eq!(blk.nc, 512, "14 ways of 128 KiB left for B, which takes 8 (half)");
        assert_eq!(derive(&caches, F32_AVX512).nc, 1024);
        assert!((96..=1008).contains(&blk.mc), "{blk:?}");
    }

    /// Nothing known: the constants. Only an L2: `NC` derived, `MC` fixed.
    /// An L2 too small to leave `B` a way: `NC` fixed.
    #[test]
    fn fallback_when_nothing_is_known() {
        for kernel in [F64_AVX2, F32_AVX2, F64_AVX512, F32_AVX512] {
            assert_eq!(derive(&Caches::default(), kernel), kernel.1);
        }
        let l2_only = Caches { l2: level(MIB, 8, 1), ..Caches::default() };
        assert_eq!(derive(&l2_only, F64_AVX512), b_in_l2(1008, 256));
        let tiny = Caches { l2: level(16 * KIB, 2, 1), l3: level(64 * KIB, 2, 1), ..Caches::default() };
        assert_eq!(derive(&tiny, F64_AVX512), F64_AVX512.1);
        // A huge cache is clamped.
        let huge = Caches { l2: level(64 * MIB, 16, 1), l3: level(512 * MIB, 16, 1), ..Caches::default() };
        assert_eq!(derive(&huge, F64_AVX512), b_in_l2(4092, 4096));
        assert_eq!(derive(&Caches { amd: true, ..huge }, F64_AVX512), b_in_l3(4092, 4096));
        // An AMD CPU without a known L3: `B` in L2, `MC` fixed.
        assert_eq!(derive(&Caches { amd: true, ..l2_only }, F64_AVX512), b_in_l2(1008, 256));
    }

    #[test]
    fn environment_override() {
        let (tile, fixed) = F64_AVX512;
        let derived = b_in_l2(600, 512);
        assert_eq!(Blocking::overridden(None, tile, fixed, derived), (derived, None));
        assert_eq!(Blocking::overridden(Some("fixed"), tile, fixed, derived), (fixed, None));
        assert_eq!(Blocking::overridden(Some("100, 100"), tile, fixed, derived), (b_in_l2(102, 128), None));
        assert_eq!(Blocking::overridden(Some("100,100,a"), tile, fixed, derived), (a_in_l2(102, 128), None));
        // Without an order, the machine's.
        let derived_a = a_in_l2(192, 4096);
        assert_eq!(Blocking::overridden(Some("100,100"), tile, fixed, derived_a), (a_in_l2(102, 128), None));
        assert_eq!(Blocking::overridden(Some("fixed"), tile, fixed, derived_a), (fixed, None));
        assert_eq!(Blocking::overridden(Some("100,100, b"), tile, fixed, derived), (b_in_l2(102, 128), None));
        // `B` in L3 derived: `MC,NC` keeps it; `b` asks for `B` in L2 (the same loops).
        let derived_l3 = b_in_l3(3582, 3584);
        assert_eq!(Blocking::overridden(Some("100,100"), tile, fixed, derived_l3), (b_in_l3(102, 128), None));
        assert_eq!(Blocking::overridden(Some("100,100,b"), tile, fixed, derived_l3), (b_in_l2(102, 128), None));
        // `b3` names `B` in L3 on any machine.
        assert_eq!(Blocking::overridden(Some("100,100,b3"), tile, fixed, derived), (b_in_l3(102, 128), None));
        assert_eq!(Blocking::overridden(Some("100,100, b3"), tile, fixed, derived_a), (b_in_l3(102, 128), None));
        for bad in ["0,32", "x", "12", "1,2,3", "1,2,a,b", "1,2,b4", "1,2,l3"] {
            let (blk, warning) = Blocking::overridden(Some(bad), tile, fixed, derived);
            assert_eq!(blk, derived, "{bad}");
            assert!(warning.is_some(), "{bad}");
        }
    }
}
