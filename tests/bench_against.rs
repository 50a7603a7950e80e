//! `procjob bench --against numpy,joblib` through the real binary: with
//! numpy, the baselines' rows appear beside procjob's modes and every
//! ratio is the median of the paired ratios of the same rounds; without a
//! usable Python (none at the path, no numpy, no joblib) the sweep says so
//! in one line and runs the rest, exiting 0 and leaving nothing behind.

mod util;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use procjob::cli::bench::median;
use serde_json::Value;
use util::{require_numpy, Procjob, Run, TestDir};

/// `procjob bench --sizes 48 --processes 1,2 --modes memmap,memmap-out
/// --repeat 3 --warmup 1 --against <against>` in `dir`, plus `extra`.
fn bench(dir: &TestDir, against: &str, extra: &[&str]) -> Procjob {
    let mut cmd = Procjob::new();
    cmd.args(["bench", "--sizes", "48", "--processes", "1,2", "--modes", "memmap,memmap-out"])
        .args(["--repeat", "3", "--warmup", "1", "--against", against])
        .args(extra)
        .arg("--temp-folder")
        .arg(dir.tmp())
        .expect_clean(dir.tmp());
    cmd
}

fn lines(run: &Run) -> Vec<Value> {
    run.stdout.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}"))).collect()
}

fn times(v: &Value) -> Vec<f64> {
    v["times_s"].as_array().unwrap().iter().map(|t| t.as_f64().unwrap()).collect()
}

/// The median of the paired ratios `baseline[i] / mode[i]`.
fn paired(baseline: &Value, mode: &Value) -> f64 {
    median(&times(baseline).iter().zip(times(mode)).map(|(b, m)| b / m).collect::<Vec<_>>())
}

/// The rounds in which `mode` took less time than `baseline`.
fn faster_rounds(baseline: &Value, mode: &Value) -> u64 {
    times(baseline).iter().zip(times(mode)).filter(|&(b, m)| m < *b).count() as u64
}

/// Equal but for the last digit JSON's decimal text may change.
#[track_caller]
fn assert_close(actual: f64, expected: f64, context: &str) {
    assert!((actual - expected).abs() <= 1e-12 * expected.abs(), "{context}: {actual} != {expected}");
}

fn row<'a>(rows: &'a [Value], mode: &str, processes: u64) -> &'a Value {
    rows.iter()
        .find(|r| r["mode"] == mode && r["processes"] == processes)
        .unwrap_or_else(|| panic!("no {mode} row at P={processes} in {rows:#?}"))
}

fn joblib_available() -> bool {
    Command::new("python3").args(["-c", "import joblib"]).output().is_ok_and(|o| o.status.success())
}

/// A script at `dir/name` that runs `body` with /bin/sh, executable.
fn script(dir: &TestDir, name: &str, body: &str) -> PathBuf {
    let path = dir.file(name);
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// Asserts one `against:` line mentioning `needle`, and procjob's modes
/// without any baseline row or ratio.
#[track_caller]
fn assert_ran_without_baselines(run: &Run, needle: &str) {
    let notices: Vec<&str> = run.stdout.lines().filter(|l| l.starts_with("against:")).collect();
    assert_eq!(notices.len(), 1, "{}: one notice expected\n{}", run.command, run.stdout);
    assert!(notices[0].contains(needle), "{}: notice {:?} does not mention {needle:?}", run.command, notices[0]);
    assert!(notices[0].contains("procjob's modes only"), "{}", notices[0]);
    for mode in ["seq", "memmap", "memmap-out"] {
        assert!(
            run.stdout.lines().any(|l| l.trim_start().starts_with(mode)),
            "{}: no {mode}\n{}",
            run.command,
            run.stdout
        );
    }
    assert!(!run.stdout.contains("vs numpy") && !run.stdout.contains("  numpy "), "{}", run.stdout);
}

#[test]
fn baselines_run_in_the_same_rounds_and_every_ratio_is_their_paired_median() {
    if !require_numpy("baselines_run_in_the_same_rounds_and_every_ratio_is_their_paired_median") {
        return;
    }
    let dir = TestDir::new("against-json");
    let run = bench(&dir, "numpy,joblib", &["--json"]).run().assert_ok();
    let rows = lines(&run);
    let joblib = joblib_available();
    assert!(run.stderr.contains("against: numpy "), "{}", run.stderr);
    let seq = row(&rows, "seq", 1);
    assert_eq!(seq.get("vs_joblib"), None, "seq runs against numpy on one thread only");
    for p in [1, 2] {
        let numpy = row(&rows, "numpy", p);
        assert_eq!(times(numpy).len(), 3);
        assert_eq!(numpy["blocks"], 1);
        if joblib {
            assert_eq!(row(&rows, "joblib", p)["blocks"], p);
        }
        for mode in ["memmap", "memmap-out"] {
            let r = row(&rows, mode, p);
            assert_close(r["vs_numpy"].as_f64().unwrap(), paired(numpy, r), &format!("{mode} P={p} vs numpy"));
            assert_eq!(r["vs_numpy_faster_rounds"], faster_rounds(numpy, r), "{mode} P={p}");
            match joblib {
                true => {
                    let joblib = row(&rows, "joblib", p);
                    assert_close(
                        r["vs_joblib"].as_f64().unwrap(),
                        paired(joblib, r),
                        &format!("{mode} P={p} vs joblib"),
                    );
                    assert_eq!(r["vs_joblib_faster_rounds"], faster_rounds(joblib, r), "{mode} P={p}");
                }
                false => {
                    assert_eq!(r.get("vs_joblib"), None);
                    assert_eq!(r.get("vs_joblib_faster_rounds"), None);
                }
            }
        }
    }
    // seq's rounds were seq, numpy on one thread: its numpy times are not
    // the P=1 row's, so only its presence is checked here.
    assert!(seq["vs_numpy"].as_f64().unwrap() > 0.0);
    // Every ratio and its count agree in direction: over 3 rounds the
    // median of baseline/mode is above 1 exactly when the mode was the
    // faster in 2 or 3 of them.
    for r in rows.iter().filter(|r| r.get("vs_numpy").is_some()) {
        for base in ["numpy", "joblib"] {
            let (Some(ratio), Some(k)) =
                (r[format!("vs_{base}")].as_f64(), r[format!("vs_{base}_faster_rounds")].as_u64())
            else {
                continue;
            };
            assert!(k <= 3 && (ratio > 1.0) == (k >= 2), "{base}: ratio {ratio}, {k} of 3 faster in {r}");
        }
    }
}

#[test]
fn the_table_shows_the_baselines_and_each_modes_ratios_within_80_columns() {
    if !require_numpy("the_table_shows_the_baselines_and_each_modes_ratios_within_80_columns") {
        return;
    }
    let dir = TestDir::new("against-table");
    let run = bench(&dir, "numpy", &[]).env("COLUMNS", "80").run().assert_ok();
    let too_wide: Vec<&str> = run.stdout.lines().filter(|l| l.chars().count() > 80).collect();
    assert!(too_wide.is_empty(), "{}: lines over 80 columns: {too_wide:?}", run.command);
    let numpy_rows = run.stdout.lines().filter(|l| l.trim_start().starts_with("numpy ")).count();
    assert_eq!(numpy_rows, 2, "a numpy row at P=1 and P=2\n{}", run.stdout);
    // seq and each mode at each P: 1 + 2 × 2 ratio lines, numpy only.
    let ratios: Vec<&str> = run.stdout.lines().filter(|l| l.trim_start().starts_with("vs numpy")).collect();
    assert_eq!(ratios.len(), 5, "{}", run.stdout);
    assert!(ratios.iter().all(|l| !l.contains("joblib")), "{ratios:?}");
    // Each says in how many of the 3 rounds the mode was the faster, in
    // the direction of its ratio.
    for line in &ratios {
        let k = line.rsplit_once('(').and_then(|(_, k)| k.strip_suffix("/3)")).and_then(|k| k.parse::<u32>().ok());
        let Some(k) = k.filter(|&k| k <= 3) else { panic!("no (k/3) at the end of {line:?}") };
        assert!(!line.contains("faster") || k >= 2, "{line:?}");
        assert!(!line.contains("slower") || k <= 1, "{line:?}");
    }
    assert!(run.stdout.contains("(k/n): the mode faster in k of n rounds"), "{}", run.stdout);
}

#[test]
fn a_python_that_does_not_exist_is_one_notice_and_the_sweep_runs() {
    let dir = TestDir::new("against-nopython");
    let missing = dir.file("no-such-python");
    let run = bench(&dir, "numpy,joblib", &["--python", missing.to_str().unwrap()]).run().assert_ok();
    assert_ran_without_baselines(&run, missing.to_str().unwrap());
}

#[test]
fn a_python_without_numpy_is_one_notice_and_the_sweep_runs() {
    let dir = TestDir::new("against-nonumpy");
    // Answers every script as a Python without numpy would.
    let fake = script(
        &dir,
        "python-without-numpy",
        "echo 'Traceback (most recent call last):' >&2\n\
         echo \"ModuleNotFoundError: No module named 'numpy'\" >&2\nexit 1",
    );
    let run = bench(&dir, "numpy", &[]).env(PYTHON_ENV, &fake).run().assert_ok();
    assert_ran_without_baselines(&run, "No module named 'numpy'");
    assert!(run.stdout.contains(fake.to_str().unwrap()), "{}", run.stdout);
}

#[test]
fn a_python_without_joblib_runs_numpy_only() {
    if !require_numpy("a_python_without_joblib_runs_numpy_only") {
        return;
    }
    let dir = TestDir::new("against-nojoblib");
    // python3 with a joblib on its path that cannot be imported.
    let hide = dir.file("hide");
    std::fs::create_dir(&hide).unwrap();
    std::fs::write(hide.join("joblib.py"), "raise ImportError('joblib hidden by the test')\n").unwrap();
    let fake = script(&dir, "python-without-joblib", &format!("PYTHONPATH={} exec python3 \"$@\"", path(&hide)));
    let run = bench(&dir, "numpy,joblib", &["--python", &path(&fake)]).run().assert_ok();
    let notice = run.stdout.lines().find(|l| l.starts_with("against:")).unwrap_or_default();
    assert!(notice.contains("no joblib") && notice.contains("joblib hidden by the test"), "{notice:?}");
    assert!(run.stdout.contains("vs numpy"), "{}", run.stdout);
    assert!(!run.stdout.lines().any(|l| l.trim_start().starts_with("joblib ")), "no joblib row\n{}", run.stdout);
    assert!(!run.stdout.contains("vs joblib"), "{}", run.stdout);
}

#[test]
fn an_unknown_baseline_is_a_usage_error() {
    let dir = TestDir::new("against-unknown");
    let run = bench(&dir, "numpy,torch", &[]).run().assert_code(2);
    assert!(run.stderr.contains("\"torch\"") && run.stderr.contains("numpy, joblib"), "{}", run.stderr);
}

const PYTHON_ENV: &str = "PROCJOB_BENCH_PYTHON";

fn path(p: &Path) -> String {
    p.to_str().unwrap().to_string()
}
