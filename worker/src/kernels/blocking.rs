//! `MC` and `NC`, the packed GEMM's cache blocking, derived from the caches
//! the CPU reports (`machine.rs`) with the analytical model of BLIS (Low,
//! Igual, Smith and Quintana-Ortí, "Analytical modeling is enough for
//! high-performance BLIS", ACM TOMS 2016), applied to the loop order of
//! `gemm.rs`; today's constants are the fallback when the caches are
//! unknown. `MC` and `NC` only group work, so no blocking changes a bit of
//! `C` (`gemm.rs`, point 4); `KC`, which does, stays a constant.
//!
//! # The model
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
//! `PROCJOB_GEMM_BLOCKING`, for benchmarking only, overrides the result:
//! `fixed` for the constants, or `MC,NC` (rounded up to whole tiles).

use std::mem::size_of;

use super::machine::{caches, Caches};

/// The `MC`/`NC` cache blocking of one kernel. Only groups work (module
/// docs of `gemm.rs`, point 4); the tests shrink it to cross every
/// blocking edge.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Blocking {
    /// Rows packed at a time (up to 1.5 times it, see `gemm.rs`'s `drive`),
    /// a positive multiple of `MR`.
    pub(super) mc: usize,
    /// Most columns packed at a time, a positive multiple of `NR`.
    pub(super) nc: usize,
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

    /// The model of the module docs for `caches`; each of `MC` and `NC` is
    /// `fixed`'s where the cache it is sized for is unknown (or too small
    /// for the model to leave it a way).
    pub(super) fn derive(caches: &Caches, tile: Tile, fixed: Blocking) -> Blocking {
        let Tile { mr, nr, kc, elem } = tile;
        let nc = caches
            .l2
            .and_then(|l2| {
                let way = l2.way_bytes();
                let left = l2.ways.checked_sub(1 + (mr * kc * elem).div_ceil(way)).filter(|&w| w > 0)?;
                // `left` ≥ 1 needs three ways or more, so half is ≥ 1 too.
                let for_b = left.min(l2.ways / 2);
                Some(clamp_to(for_b * way / (kc * elem), NC_RANGE, nr))
            })
            .unwrap_or(fixed.nc);
        let mc = caches
            .l3
            .and_then(|l3| {
                let way = l3.way_bytes();
                let for_a = l3.ways.checked_sub(1 + (kc * nc * elem).div_ceil(way)).filter(|&w| w > 0)?;
                Some(clamp_to(for_a * way / (l3.sharers * kc * elem), MC_RANGE, mr))
            })
            .unwrap_or(fixed.mc);
        Blocking { mc, nc }
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
        let parsed = value
            .split_once(',')
            .and_then(|(mc, nc)| Some((mc.trim().parse::<usize>().ok()?, nc.trim().parse::<usize>().ok()?)))
            .filter(|&(mc, nc)| mc > 0 && nc > 0 && mc <= 1 << 16 && nc <= 1 << 16);
        match parsed {
            Some((mc, nc)) => (Blocking { mc: mc.next_multiple_of(tile.mr), nc: nc.next_multiple_of(tile.nr) }, None),
            None => (derived, Some(format!("ignoring {BLOCKING_ENV}={value:?}: expected `fixed` or `MC,NC`"))),
        }
    }
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

    /// The four kernels' tiles and constants, as in `gemm.rs`.
    const F64_AVX2: (Tile, Blocking) = (Tile::of::<f64>(6, 8, 256), Blocking { mc: 1008, nc: 128 });
    const F32_AVX2: (Tile, Blocking) = (Tile::of::<f32>(6, 16, 256), Blocking { mc: 1008, nc: 256 });
    const F64_AVX512: (Tile, Blocking) = (Tile::of::<f64>(6, 32, 256), Blocking { mc: 1008, nc: 384 });
    const F32_AVX512: (Tile, Blocking) = (Tile::of::<f32>(6, 64, 256), Blocking { mc: 1008, nc: 768 });

    fn derive(caches: &Caches, (tile, fixed): (Tile, Blocking)) -> Blocking {
        let blk = Blocking::derive(caches, tile, fixed);
        assert!(blk.mc.is_multiple_of(tile.mr) && blk.nc.is_multiple_of(tile.nr), "{blk:?}");
        blk
    }

    /// AMD EPYC Zen 4 (a whole CCX of 8 cores, 16 threads, sharing the
    /// L3): 128 KiB L2 ways, 6 left for `B`, of which it takes half the L2's
    /// 8 (512 KiB); 2 MiB L3 ways, 14 for `A`, shared 16 ways.
    #[test]
    fn zen4() {
        let caches = Caches { l1d: level(32 * KIB, 8, 2), l2: level(MIB, 8, 2), l3: level(32 * MIB, 16, 16) };
        assert_eq!(derive(&caches, F64_AVX512), Blocking { mc: 894, nc: 256 });
        assert_eq!(derive(&caches, F32_AVX512), Blocking { mc: 1788, nc: 512 });
        assert_eq!(derive(&caches, F64_AVX2), Blocking { mc: 894, nc: 256 });
        assert_eq!(derive(&caches, F32_AVX2), Blocking { mc: 1788, nc: 512 });
        // The 2-vCPU VM this was measured on, its L3 shared by its two CPUs:
        // the A block is capped.
        let vm = Caches { l3: level(32 * MIB, 16, 2), ..caches };
        assert_eq!(derive(&vm, F64_AVX512), Blocking { mc: 4092, nc: 256 });
    }

    /// AMD EPYC Zen 1 (family 23 model 1: 512 KiB 8-way L2, 8 MiB 16-way L3
    /// per CCX of 4 cores, 8 threads): 64 KiB L2 ways, 4 (half) for `B`:
    /// 256 KiB, the AVX2 constants tuned on the Zen 3's L2 of the same size.
    #[test]
    fn zen1() {
        let caches = Caches { l1d: level(32 * KIB, 8, 2), l2: level(512 * KIB, 8, 2), l3: level(8 * MIB, 16, 8) };
        assert_eq!(derive(&caches, F64_AVX2), Blocking { mc: 444, nc: 128 });
        assert_eq!(derive(&caches, F32_AVX2), Blocking { mc: 894, nc: 256 });
    }

    /// The Intel Xeon the AVX-512 kernels were tuned on (Sapphire Rapids
    /// class: 48 KiB L1d, 2 MiB 16-way L2; L3 taken as 1.875 MiB a core,
    /// 105 MiB 15-way over 56 cores).
    #[test]
    fn xeon() {
        let caches = Caches { l1d: level(48 * KIB, 12, 2), l2: level(2 * MIB, 16, 2), l3: level(105 * MIB, 15, 112) };
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
        assert_eq!(derive(&l2_only, F64_AVX512), Blocking { mc: 1008, nc: 256 });
        let tiny = Caches { l2: level(16 * KIB, 2, 1), l3: level(64 * KIB, 2, 1), ..Caches::default() };
        assert_eq!(derive(&tiny, F64_AVX512), F64_AVX512.1);
        // A huge cache is clamped.
        let huge = Caches { l2: level(64 * MIB, 16, 1), l3: level(512 * MIB, 16, 1), ..Caches::default() };
        assert_eq!(derive(&huge, F64_AVX512), Blocking { mc: 4092, nc: 4096 });
    }

    #[test]
    fn environment_override() {
        let (tile, fixed) = F64_AVX512;
        let derived = Blocking { mc: 600, nc: 512 };
        assert_eq!(Blocking::overridden(None, tile, fixed, derived), (derived, None));
        assert_eq!(Blocking::overridden(Some("fixed"), tile, fixed, derived), (fixed, None));
        assert_eq!(Blocking::overridden(Some("100, 100"), tile, fixed, derived), (Blocking { mc: 102, nc: 128 }, None));
        for bad in ["0,32", "x", "12", "1,2,3"] {
            let (blk, warning) = Blocking::overridden(Some(bad), tile, fixed, derived);
            assert_eq!(blk, derived, "{bad}");
            assert!(warning.is_some(), "{bad}");
        }
    }
}
