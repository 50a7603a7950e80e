//! The human tables of `procjob matmul` and `procjob bench` fit an
//! 80-column terminal unless the terminal (or `COLUMNS`) is wider, when
//! they show every column.

mod util;

use util::*;

/// The lines of `text` longer than `width` characters, but those that
/// carry a path (which is as long as it is).
fn too_wide(text: &str, width: usize) -> Vec<String> {
    text.lines()
        .filter(|l| !l.contains("temp folder ") && !l.starts_with("wrote "))
        .filter(|l| l.chars().count() > width)
        .map(str::to_string)
        .collect()
}

#[test]
fn matmul_fits_80_columns_and_shows_every_column_when_wider() {
    let dir = TestDir::new("columns-matmul");
    let mut cmd = dir.matmul();
    cmd.args(["--size", "60", "--repeat", "2", "--quiet"]).env("COLUMNS", "80");
    let run = cmd.run().assert_ok();
    assert_eq!(too_wide(&run.stdout, 80), Vec::<String>::new(), "{}:\n{}", run.command, run.stdout);
    for heading in ["mode", "phases", "memory", "dump", "compute", "C = seq"] {
        assert!(run.stdout.contains(heading), "{}: no {heading:?}:\n{}", run.command, run.stdout);
    }
    let mut cmd = dir.matmul();
    cmd.args(["--size", "60", "--quiet"]).env("COLUMNS", "200");
    let run = cmd.run().assert_ok();
    let header = run.stdout.lines().find(|l| l.starts_with("mode")).expect("a table header");
    assert!(header.contains("dump") && header.contains("collect"), "the wide table has the phases: {header}");
    assert!(!run.stdout.contains("\nphases"), "no separate phases table when wide:\n{}", run.stdout);
}

#[test]
fn bench_fits_80_columns() {
    let dir = TestDir::new("columns-bench");
    let mut cmd = Procjob::new();
    cmd.args(["bench", "--sizes", "48", "--processes", "1,2", "--modes", "copy,memmap", "--repeat", "2"])
        .arg("--temp-folder")
        .arg(dir.tmp())
        .env("COLUMNS", "80")
        .expect_clean(dir.tmp());
    let run = cmd.run().assert_ok();
    assert_eq!(too_wide(&run.stdout, 80), Vec::<String>::new(), "{}:\n{}", run.command, run.stdout);
    assert!(run.stdout.contains("ideal") && !run.stdout.contains("1.00× faster"), "{}", run.stdout);
}

/// `procjob bench` says above its table on what it ran: the CPU and the
/// GEMM's kernel, tile, loop order and block sizes, and where they came
/// from (the caches, or an environment variable that forced them) — so a
/// sweep pasted elsewhere names its machine. Not in `--json` output.
#[test]
fn bench_names_the_machine_and_the_kernel_it_ran() {
    let dir = TestDir::new("bench-machine");
    let bench = |env: &[(&str, &str)], extra: &[&str]| {
        let mut cmd = Procjob::new();
        cmd.args(["bench", "--sizes", "24", "--processes", "1", "--modes", "memmap", "--repeat", "1"])
            .args(extra)
            .arg("--temp-folder")
            .arg(dir.tmp())
            .env("COLUMNS", "200")
            .expect_clean(dir.tmp());
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.run().assert_ok()
    };
    // The header's paragraph that starts `start`, its wrapped lines joined.
    let line = |run: &Run, start: &str| {
        let from = run.stdout.find(start).unwrap_or_else(|| panic!("{}: no {start:?}:\n{}", run.command, run.stdout));
        let rest = &run.stdout[from..];
        let end = ["\nkernel: ", "\n\n"].iter().filter_map(|m| rest.find(m)).min().unwrap_or(rest.len());
        rest[..end].replace('\n', " ")
    };
    let run = bench(&[], &[]);
    assert!(line(&run, "machine: ").contains(" CPU"), "{}", run.stdout);
    let kernel = line(&run, "kernel: f64 ");
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        assert!(kernel.contains(" tiles, ") && kernel.contains("KC 256)"), "{}", run.stdout);
        let forced = bench(&[("PROCJOB_GEMM", "avx2"), ("PROCJOB_GEMM_BLOCKING", "12,40,a")], &[]);
        let kernel = line(&forced, "kernel: f64 ");
        assert!(kernel.contains("f64 AVX2+FMA, 6 × 8 tiles, A's block in L2 (MC 12, NC 40, KC 256)"), "{kernel}");
        assert!(kernel.contains("PROCJOB_GEMM=avx2, PROCJOB_GEMM_BLOCKING=12,40,a"), "{kernel}");
    }
    if std::path::Path::new("/sys/devices/system/cpu/cpu0/cache/index0").exists() {
        assert!(kernel.contains("caches L1d "), "{kernel}");
    }
    let portable = bench(&[("PROCJOB_GEMM", "portable")], &["--dtype", "f32"]);
    let kernel = line(&portable, "kernel: f32 matrixmultiply's kernel");
    assert!(kernel.contains("PROCJOB_GEMM=portable"), "{kernel}");
    let json = bench(&[], &["--json"]);
    assert!(!json.stdout.contains("machine: ") && !json.stdout.contains("kernel: "), "{}", json.stdout);
}
