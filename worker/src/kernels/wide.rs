//! Loops over whole blocks compiled for the widest vectors this CPU has,
//! chosen at run time: the `i64` path's scan and conversions
//! (`integer.rs`) and the pass that makes a float block's NaNs canonical
//! (`float.rs`). A plain loop compiled for the baseline (SSE2) runs them two
//! 64-bit lanes at a time, and some not at all (64-bit `abs`, `max` and
//! conversions need AVX-512).

/// Runs `f`, inlined into a copy of this function compiled for the widest
/// vectors the CPU has (AVX-512F, AVX2, or the baseline), so the loops in
/// `f` vectorize as wide as they can: 64-bit `abs`, `max` and conversions
/// need AVX-512; AVX2 has the compare they are built of; SSE2 neither.
#[inline(always)]
pub(super) fn widest<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("avx512dq") {
        // SAFETY: the CPU supports AVX-512F and DQ (checked just above),
        // the only requirement for calling a function compiled with them.
        return unsafe { on_avx512(f) };
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2 (checked just above).
        return unsafe { on_avx2(f) };
    }
    f()
}

/// `f()` compiled with AVX2 (see [`widest`]).
///
/// # Safety
///
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn on_avx2<R>(f: impl FnOnce() -> R) -> R {
    f()
}

/// `f()` compiled with AVX-512F and DQ (see [`widest`]).
///
/// # Safety
///
/// The CPU must support AVX-512F and AVX-512DQ.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512dq,avx2")]
unsafe fn on_avx512<R>(f: impl FnOnce() -> R) -> R {
    f()
}
