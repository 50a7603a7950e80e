//! One clock for every process of a run: `CLOCK_MONOTONIC`, which Linux
//! keeps system-wide, so a worker's timestamps and the coordinator's can be
//! put on one timeline (the `--trace` of `procjob matmul`).

/// Nanoseconds on the system's monotonic clock (0 if it cannot be read).
pub fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map_or(0, |t| (t.tv_sec() as u64).saturating_mul(1_000_000_000).saturating_add(t.tv_nsec() as u64))
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_clock_moves_forward() {
        let a = super::monotonic_ns();
        let b = super::monotonic_ns();
        assert!(a > 0 && b >= a);
    }
}
