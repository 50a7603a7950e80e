//! What this machine offers the packed GEMM, each read once per process:
//! the data caches core 0 reports (Linux sysfs,
//! `/sys/devices/system/cpu/cpu0/cache/index*/`) and whether the CPU is
//! AMD's (CPUID), from which `blocking.rs` derives the loop order, `MC` and
//! `NC`, and which of its kernels the GEMM
//! runs (the best the CPU has, or the one `PROCJOB_GEMM` asks for).
//!
//! Neither changes a bit of `C`: the blocking only groups work, and every
//! x86-64 kernel of `gemm.rs` computes the same chains (its module docs).
//! Only `PROCJOB_GEMM=portable` does, on a CPU that has AVX2 and FMA: the
//! fallback rounds differently.

use std::path::Path;
use std::sync::OnceLock;

/// One cache level as the OS describes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct CacheLevel {
    /// Bytes.
    pub(super) size: usize,
    /// Ways of associativity (at least 1).
    pub(super) ways: usize,
    /// Logical CPUs sharing it (at least 1).
    pub(super) sharers: usize,
}

impl CacheLevel {
    /// Bytes of one way: the share of the cache one contiguous block of
    /// that size fills evenly, set by set.
    pub(super) fn way_bytes(self) -> usize {
        self.size / self.ways
    }
}

/// The data (or unified) caches of one core, and the CPU's vendor where
/// the model needs it; `None` for a level the OS does
/// not describe, or describes oddly.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Caches {
    /// The level-1 data cache.
    pub(super) l1d: Option<CacheLevel>,
    /// The level-2 cache.
    pub(super) l2: Option<CacheLevel>,
    /// The level-3 cache.
    pub(super) l3: Option<CacheLevel>,
    /// Whether the CPU is AMD's (CPUID vendor `AuthenticAMD`, or Hygon's,
    /// which is the same design): the one thing the model reads that the
    /// sizes do not tell. On the AMD EPYC Zen 4 a `B` block streamed from
    /// L3 fed the microkernel as well as one held in L2, where the Intel
    /// Xeon's L3 did not (`blocking.rs`, "The loop order").
    pub(super) amd: bool,
}

/// The caches of this machine's CPU 0, read from sysfs on the first call
/// (with the vendor from CPUID); every level `None` where sysfs is missing
/// (not Linux, a sandbox).
pub(super) fn caches() -> Caches {
    static CACHES: OnceLock<Caches> = OnceLock::new();
    *CACHES.get_or_init(|| Caches { amd: is_amd(), ..read_caches(Path::new("/sys/devices/system/cpu/cpu0/cache")) })
}

/// Whether CPUID names AMD (or Hygon) as the vendor.
fn is_amd() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        // Leaf 0 exists on every x86-64 CPU; the vendor string is EBX, EDX,
        // ECX.
        #[allow(unused_unsafe)]
        // SAFETY: CPUID is available on every x86-64 CPU (it is `unsafe` on
        // older toolchains only).
        let id = unsafe { std::arch::x86_64::__cpuid(0) };
        let mut vendor = [0u8; 12];
        for (part, register) in vendor.chunks_exact_mut(4).zip([id.ebx, id.edx, id.ecx]) {
            part.copy_from_slice(&register.to_le_bytes());
        }
        &vendor == b"AuthenticAMD" || &vendor == b"HygonGenuine"
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

impl Caches {
    /// The levels in words, for a benchmark's header: `L1d 32 KiB 8-way,
    /// L2 512 KiB 8-way, L3 32 MiB 16-way shared by 2 CPUs`; `None` when no
    /// level is known.
    pub(super) fn describe(&self) -> Option<String> {
        let size = |b: usize| {
            if b >= 1 << 20 && b.is_multiple_of(1 << 20) {
                format!("{} MiB", b >> 20)
            } else {
                format!("{} KiB", b >> 10)
            }
        };
        let levels: Vec<String> = [("L1d", self.l1d), ("L2", self.l2), ("L3", self.l3)]
            .into_iter()
            .filter_map(|(name, level)| {
                let l = level?;
                let shared = if l.sharers > 1 { format!(" shared by {} CPUs", l.sharers) } else { String::new() };
                Some(format!("{name} {} {}-way{shared}", size(l.size), l.ways))
            })
            .collect();
        let vendor = if self.amd { " (AMD)" } else { "" };
        (!levels.is_empty()).then(|| format!("{}{vendor}", levels.join(", ")))
    }
}

/// Reads `dir/index*/{level,type,size,ways_of_associativity,
/// coherency_line_size,shared_cpu_list}`. A level is kept only when its
/// figures are sane: a size of 1 KiB to 1 GiB, at least one way, whole
/// 64-byte lines (the line size the GEMM's packing assumes) and a size that
/// divides evenly into ways of lines.
fn read_caches(dir: &Path) -> Caches {
    let mut caches = Caches::default();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return caches;
    };
    for entry in entries.flatten() {
        if !entry.file_name().to_string_lossy().starts_with("index") {
            continue;
        }
        let path = entry.path();
        let read = |name: &str| std::fs::read_to_string(path.join(name)).map(|s| s.trim().to_owned()).ok();
        let Some(kind) = read("type") else { continue };
        if kind != "Data" && kind != "Unified" {
            continue;
        }
        let level = read("level").and_then(|s| s.parse::<u32>().ok());
        let size = read("size").as_deref().and_then(parse_size);
        let ways = read("ways_of_associativity").and_then(|s| s.parse::<usize>().ok());
        let line = read("coherency_line_size").and_then(|s| s.parse::<usize>().ok());
        let sharers = read("shared_cpu_list").as_deref().and_then(count_cpus).unwrap_or(1);
        let (Some(level), Some(size), Some(ways), Some(line)) = (level, size, ways, line) else {
            continue;
        };
        let Some(found) = sane_level(size, ways, line, sharers) else {
            continue;
        };
        match level {
            1 => caches.l1d = Some(found),
            2 => caches.l2 = Some(found),
            3 => caches.l3 = Some(found),
            _ => {}
        }
    }
    caches
}

/// A [`CacheLevel`] when the figures make sense (see [`read_caches`]).
fn sane_level(size: usize, ways: usize, line: usize, sharers: usize) -> Option<CacheLevel> {
    let ok = (1 << 10..=1 << 30).contains(&size)
        && ways >= 1
        && line == 64
        && size.is_multiple_of(ways * line)
        && sharers >= 1;
    ok.then_some(CacheLevel { size, ways, sharers })
}

/// `"32K"`, `"1024K"`, `"2M"` or a plain byte count.
fn parse_size(s: &str) -> Option<usize> {
    let (digits, unit) = match s.as_bytes().last()? {
        b'K' => (&s[..s.len() - 1], 1 << 10),
        b'M' => (&s[..s.len() - 1], 1 << 20),
        b'G' => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    digits.parse::<usize>().ok()?.checked_mul(unit)
}

/// The number of CPUs in a list such as `"0-3,8-11"` or `"5"`.
fn count_cpus(list: &str) -> Option<usize> {
    let mut count = 0;
    for part in list.split(',') {
        count += match part.split_once('-') {
            Some((lo, hi)) => hi.parse::<usize>().ok()?.checked_sub(lo.parse::<usize>().ok()?)? + 1,
            None => part.parse::<usize>().map(|_| 1).ok()?,
        };
    }
    Some(count)
}

/// Which of the GEMM's instruction sets runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Isa {
    /// The AVX-512 microkernels (6 × 32 `f64`, 6 × 64 `f32`).
    Avx512,
    /// The AVX2+FMA microkernels (6 × 8, 6 × 16).
    Avx2,
    /// None of ours: the caller falls back to matrixmultiply.
    Portable,
}

/// The environment variable that forces a kernel: `avx512`, `avx2` or
/// `portable`.
pub(super) const GEMM_ENV: &str = "PROCJOB_GEMM";

/// The kernel this process runs: the best `best` allows, unless
/// `PROCJOB_GEMM` asks for one the CPU can run. Read once; an unknown value,
/// or one this CPU cannot run, is ignored with one warning on stderr.
pub(super) fn chosen_isa(best: impl FnOnce() -> Isa) -> Isa {
    static CHOSEN: OnceLock<Isa> = OnceLock::new();
    *CHOSEN.get_or_init(|| {
        let requested = std::env::var(GEMM_ENV).ok();
        let (isa, warning) = choose_isa(requested.as_deref(), best());
        if let Some(warning) = warning {
            eprintln!("procjob: {warning}");
        }
        isa
    })
}

/// The kernel for a requested name (`None` or empty: not set) on a CPU
/// whose best is `best`, and a warning when the request is ignored.
pub(super) fn choose_isa(requested: Option<&str>, best: Isa) -> (Isa, Option<String>) {
    let Some(name) = requested.map(str::trim).filter(|s| !s.is_empty()) else {
        return (best, None);
    };
    let wanted = match name.to_ascii_lowercase().as_str() {
        "avx512" => Isa::Avx512,
        "avx2" => Isa::Avx2,
        "portable" => Isa::Portable,
        _ => {
            return (
                best,
                Some(format!("ignoring {GEMM_ENV}={name:?}: expected avx512, avx2 or portable; using {}", best.name())),
            )
        }
    };
    let runnable = match wanted {
        Isa::Avx512 => best == Isa::Avx512,
        Isa::Avx2 => best != Isa::Portable,
        Isa::Portable => true,
    };
    if runnable {
        (wanted, None)
    } else {
        (best, Some(format!("ignoring {GEMM_ENV}={name}: this CPU cannot run it; using {}", best.name())))
    }
}

impl Isa {
    /// The name `PROCJOB_GEMM` takes.
    pub(super) fn name(self) -> &'static str {
        match self {
            Isa::Avx512 => "avx512",
            Isa::Avx2 => "avx2",
            Isa::Portable => "portable",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// CPUID's vendor is the one the kernel names in `/proc/cpuinfo`.
    #[test]
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    fn the_vendor_is_the_kernels() {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").expect("/proc/cpuinfo");
        let vendor = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("vendor_id").and_then(|v| v.split(':').nth(1)))
            .map(str::trim)
            .expect("a vendor_id line");
        assert_eq!(is_amd(), matches!(vendor, "AuthenticAMD" | "HygonGenuine"), "vendor_id {vendor}");
    }

    /// The caches in words: sizes in KiB or whole MiB, ways, and the CPUs
    /// that share a level when more than one does; nothing known, `None`.
    #[test]
    fn caches_are_described_level_by_level() {
        let level = |size, ways, sharers| Some(CacheLevel { size, ways, sharers });
        let zen3 =
            Caches { l1d: level(32 << 10, 8, 1), l2: level(512 << 10, 8, 1), l3: level(32 << 20, 16, 2), amd: true };
        assert_eq!(
            zen3.describe().as_deref(),
            Some("L1d 32 KiB 8-way, L2 512 KiB 8-way, L3 32 MiB 16-way shared by 2 CPUs (AMD)")
        );
        let other = Caches { amd: false, ..zen3 };
        assert_eq!(
            other.describe().as_deref(),
            Some("L1d 32 KiB 8-way, L2 512 KiB 8-way, L3 32 MiB 16-way shared by 2 CPUs")
        );
        let odd = Caches { l2: level(1280 << 10, 20, 1), ..Caches::default() };
        assert_eq!(odd.describe().as_deref(), Some("L2 1280 KiB 20-way"));
        assert_eq!(Caches::default().describe(), None);
    }

    #[test]
    fn sizes_and_cpu_lists_parse() {
        assert_eq!(parse_size("32K"), Some(32 << 10));
        assert_eq!(parse_size("32768K"), Some(32 << 20));
        assert_eq!(parse_size("2M"), Some(2 << 20));
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("K"), None);
        assert_eq!(parse_size(""), None);
        assert_eq!(count_cpus("0"), Some(1));
        assert_eq!(count_cpus("0-1"), Some(2));
        assert_eq!(count_cpus("0-3,8-11"), Some(8));
        assert_eq!(count_cpus("3-1"), None);
        assert_eq!(count_cpus("x"), None);
    }

    #[test]
    fn odd_cache_figures_are_dropped() {
        assert_eq!(sane_level(1 << 20, 8, 64, 1), Some(CacheLevel { size: 1 << 20, ways: 8, sharers: 1 }));
        assert_eq!(sane_level(1 << 20, 0, 64, 1), None, "no ways (fully associative reported as 0)");
        assert_eq!(sane_level(1 << 20, 8, 128, 1), None, "not 64-byte lines");
        assert_eq!(sane_level(0, 8, 64, 1), None);
        assert_eq!(sane_level(3 << 20, 7, 64, 1), None, "does not divide into ways");
    }

    /// A fake sysfs tree: this machine's figures (AMD EPYC Zen 4), read
    /// back; an instruction cache and a missing folder are skipped.
    #[test]
    fn reads_a_sysfs_tree() {
        let dir = std::env::temp_dir().join(format!("procjob-caches-{}", std::process::id()));
        let write = |index: &str, files: &[(&str, &str)]| {
            let d = dir.join(index);
            std::fs::create_dir_all(&d).expect("temp dir is writable");
            for (name, value) in files {
                std::fs::write(d.join(name), format!("{value}\n")).expect("temp dir is writable");
            }
        };
        let level = |l, t, s, w, cpus| {
            [
                ("level", l),
                ("type", t),
                ("size", s),
                ("ways_of_associativity", w),
                ("coherency_line_size", "64"),
                ("shared_cpu_list", cpus),
            ]
        };
        write("index0", &level("1", "Data", "32K", "8", "0"));
        write("index1", &level("1", "Instruction", "32K", "8", "0"));
        write("index2", &level("2", "Unified", "1024K", "8", "0"));
        write("index3", &level("3", "Unified", "32768K", "16", "0-15"));
        let got = read_caches(&dir);
        std::fs::remove_dir_all(&dir).expect("temp dir is removable");
        assert_eq!(got.l1d, Some(CacheLevel { size: 32 << 10, ways: 8, sharers: 1 }));
        assert_eq!(got.l2, Some(CacheLevel { size: 1 << 20, ways: 8, sharers: 1 }));
        assert_eq!(got.l3, Some(CacheLevel { size: 32 << 20, ways: 16, sharers: 16 }));
        assert_eq!(read_caches(Path::new("/nonexistent/procjob/cache")), Caches::default());
    }

    #[test]
    fn gemm_env_forces_what_the_cpu_can_run() {
        use Isa::*;
        assert_eq!(choose_isa(None, Avx512), (Avx512, None));
        assert_eq!(choose_isa(Some(""), Avx2), (Avx2, None));
        assert_eq!(choose_isa(Some("avx2"), Avx512), (Avx2, None));
        assert_eq!(choose_isa(Some("AVX2"), Avx512), (Avx2, None));
        assert_eq!(choose_isa(Some("portable"), Avx512), (Portable, None));
        assert_eq!(choose_isa(Some("avx512"), Avx512), (Avx512, None));
        let (isa, warning) = choose_isa(Some("avx512"), Avx2);
        assert_eq!(isa, Avx2);
        assert!(warning.is_some_and(|w| w.contains("cannot run")));
        let (isa, warning) = choose_isa(Some("avx2"), Portable);
        assert_eq!(isa, Portable);
        assert!(warning.is_some());
        let (isa, warning) = choose_isa(Some("sse"), Avx512);
        assert_eq!(isa, Avx512);
        assert!(warning.is_some_and(|w| w.contains("expected avx512, avx2 or portable")));
    }
}
