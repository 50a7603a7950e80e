//! `procjob demo` against the real binary: it runs to the end, narrates
//! every mode and the warning case, cleans up, fits an 80-column terminal,
//! and its figures come from the run (two sizes, two sets of figures).

use std::path::Path;
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_procjob");

/// Runs `procjob demo <args> --temp-folder <parent>`.
fn demo(parent: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .arg("demo")
        .args(args)
        .arg("--temp-folder")
        .arg(parent)
        .env_remove("PROCJOB_TEMP_FOLDER")
        .output()
        .expect("cannot run procjob")
}

/// Runs the demo and returns its stdout, after checking that it succeeded,
/// left nothing in the temp parent, and fits 80 columns.
fn demo_ok(args: &[&str]) -> String {
    let parent = tempfile::tempdir().unwrap();
    let out = demo(parent.path(), args);
    let stdout = String::from_utf8(out.stdout).expect("stdout is UTF-8");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "demo {args:?} failed\nstdout:\n{stdout}\nstderr:\n{stderr}");
    let left: Vec<String> = std::fs::read_dir(parent.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(left.is_empty(), "demo {args:?} left {left:?} in its temp folder parent");
    for (i, line) in stdout.lines().enumerate() {
        let width = line.chars().count();
        assert!(width <= 80, "demo {args:?}: line {} is {width} columns wide:\n{line}", i + 1);
    }
    stdout
}

/// Lines that start with `prefix` (after leading spaces).
fn lines_starting<'a>(text: &'a str, prefix: &str) -> Vec<&'a str> {
    text.lines().filter(|l| l.trim_start().starts_with(prefix)).collect()
}

#[test]
fn demo_runs_every_mode_and_the_warning_case_and_cleans_up() {
    let out = demo_ok(&["--size", "200", "--processes", "2"]);
    let headings: Vec<&str> = out.lines().filter(|l| l.chars().next().is_some_and(|c| c.is_ascii_digit())).collect();
    for mode in ["seq:", "threads:", "copy:", "memmap:", "memmap-out:", "fork:"] {
        assert!(headings.iter().any(|h| h.contains(mode)), "no section for {mode} in {headings:#?}");
    }
    assert!(headings.iter().any(|h| h.contains("When parallel loses")), "no warning section in {headings:#?}");
    assert!(headings.last().is_some_and(|h| h.contains("What next")), "the tour did not end: {headings:#?}");
    // Every process mode names its workers' pids, and every mode's C matched.
    let started = lines_starting(&out, "started 2 workers in");
    assert_eq!(started.len(), 4, "{started:#?}");
    for line in started {
        let pids: Vec<u32> = line.rsplit(": pids ").next().unwrap().split(", ").map(|p| p.parse().unwrap()).collect();
        assert_eq!(pids.len(), 2, "{line}");
        assert!(pids.iter().all(|&p| p > 0 && p != std::process::id()), "{line}");
    }
    assert_eq!(lines_starting(&out, "C is identical to seq's, byte for byte: yes").len(), 5, "{out}");
    assert!(lines_starting(&out, "C identical in all three: yes").len() == 1, "{out}");
    assert!(!out.contains(": NO"), "{out}");
    // The private folder is shown with its 0700 mode, and the files in it.
    assert!(out.contains("drwx------ (0700"), "{out}");
    assert!(lines_starting(&out, "-rw").iter().any(|l| l.ends_with("A.npy")), "{out}");
    // The task descriptor sits next to the B it would otherwise carry.
    assert!(!lines_starting(&out, "one task descriptor:").is_empty(), "{out}");
    assert!(lines_starting(&out, "B alone:").iter().all(|l| l.contains("320,000 bytes")), "{out}");
}

#[test]
fn two_sizes_give_different_figures() {
    let small = demo_ok(&["--size", "200", "--processes", "2"]);
    let large = demo_ok(&["--size", "300", "--processes", "2"]);
    // Figures that depend on the size but not on timing.
    assert!(small.contains("B: 200×200 i64 = 320,000 bytes"), "{small}");
    assert!(large.contains("B: 300×300 i64 = 720,000 bytes"), "{large}");
    for prefix in ["A:", "B:", "work:", "blocks:", "to workers:", "B alone:", "Now B is"] {
        let (a, b) = (lines_starting(&small, prefix), lines_starting(&large, prefix));
        assert!(!a.is_empty(), "no {prefix:?} line in\n{small}");
        assert_ne!(a, b, "the {prefix:?} lines are the same for --size 200 and 300");
    }
}

#[test]
fn processes_change_the_plan_and_the_workers() {
    let out = demo_ok(&["--size", "90", "--processes", "3"]);
    assert!(out.contains("blocks: 3 (rows 0..30, 30..60, 60..90)"), "{out}");
    assert_eq!(lines_starting(&out, "started 3 workers in").len(), 4, "{out}");
}

#[test]
fn bad_options_are_usage_errors() {
    let parent = tempfile::tempdir().unwrap();
    for args in [&["--processes", "0"][..], &["--dtype", "u8"], &["--size", "0"]] {
        let out = demo(parent.path(), args);
        assert_eq!(out.status.code(), Some(2), "demo {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        assert!(String::from_utf8_lossy(&out.stderr).contains("procjob: error:"), "demo {args:?}");
    }
    assert_eq!(std::fs::read_dir(parent.path()).unwrap().count(), 0);
}
