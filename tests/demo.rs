//! `procjob demo` against the real binary: it runs to the end, narrates
//! every mode and the warning case, cleans up, fits an 80-column terminal,
//! and its figures come from the run (two sizes, two sets of figures).

mod util;

use std::path::Path;
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_procjob");

/// The variable that stands in for the measured load of other programs.
const OTHER_CPUS: &str = "PROCJOB_OTHER_CPUS";

/// Runs `procjob demo <args> --temp-folder <parent>` with `envs` set.
fn demo_with(parent: &Path, args: &[&str], envs: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.arg("demo").args(args).arg("--temp-folder").arg(parent).env_remove("PROCJOB_TEMP_FOLDER");
    cmd.env_remove(OTHER_CPUS).envs(envs.iter().copied());
    cmd.output().expect("cannot run procjob")
}

/// Runs `procjob demo <args> --temp-folder <parent>`.
fn demo(parent: &Path, args: &[&str]) -> Output {
    demo_with(parent, args, &[])
}

/// Runs the demo and returns its stdout, after checking that it succeeded,
/// left nothing in the temp parent, and fits 80 columns.
fn demo_ok(args: &[&str]) -> String {
    demo_ok_with(args, &[])
}

/// [`demo_ok`] with `envs` set.
fn demo_ok_with(args: &[&str], envs: &[(&str, &str)]) -> String {
    let parent = tempfile::tempdir().unwrap();
    let out = demo_with(parent.path(), args, envs);
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

#[test]
fn every_timed_mode_shows_its_median_and_spread() {
    let out = demo_ok(&["--size", "120", "--processes", "2", "--repeat", "3"]);
    // One line per mode in its own section: cold run, then the warm median
    // and spread over the 3 warm runs.
    let warm = lines_starting(&out, "warm runs: median ");
    assert_eq!(warm.len(), 6, "{out}");
    for line in &warm {
        assert!(line.contains(", spread ") && line.contains("–") && line.ends_with("over 3 runs"), "{line}");
    }
    assert_eq!(lines_starting(&out, "cold run: ").len(), 6, "{out}");
    // The side-by-side table: a spread for every mode.
    for mode in ["seq ", "threads ", "copy ", "memmap ", "memmap-out ", "fork "] {
        let row = out
            .lines()
            .skip_while(|l| !l.starts_with("mode "))
            .find(|l| l.starts_with(mode))
            .unwrap_or_else(|| panic!("no {mode:?} row in the table:\n{out}"));
        assert!(row.contains("–"), "no spread in {row:?}");
    }
    // Every mode but seq is compared with seq: a tie, faster or slower.
    let against = lines_starting(&out, "against seq: ");
    assert_eq!(against.len(), 5, "{out}");
    assert!(against
        .iter()
        .all(|l| l.contains("a tie (spreads overlap)") || l.contains("faster") || l.contains("slower")));
    // --repeat changes the number of warm runs.
    let two = demo_ok(&["--size", "60", "--processes", "2", "--repeat", "2"]);
    assert_eq!(lines_starting(&two, "warm runs: median ").iter().filter(|l| l.ends_with("over 2 runs")).count(), 6);
}

#[test]
fn a_busy_machine_is_said_in_one_line_and_an_idle_one_is_not() {
    let args = ["--size", "60", "--processes", "2", "--repeat", "1"];
    let busy = demo_ok_with(&args, &[(OTHER_CPUS, "1.5")]);
    let flat = |text: &str| text.split_whitespace().collect::<Vec<_>>().join(" ");
    // Said before the timing and again beside the timings.
    assert!(busy.lines().filter(|l| l.starts_with("busy machine: other programs used 1.5 of ")).count() >= 1, "{busy}");
    assert!(flat(&busy).contains("Other load: other programs used 1.5 CPUs"), "{busy}");
    let idle = demo_ok_with(&args, &[(OTHER_CPUS, "0")]);
    assert!(!idle.contains("busy machine"), "{idle}");
    assert!(flat(&idle).contains("Other load: hardly any in this run"), "{idle}");
}

#[test]
fn each_process_mode_has_a_picture_with_its_bytes_each_way() {
    let out = demo_ok(&["--size", "100", "--processes", "2", "--repeat", "1"]);
    // 100×100 i64: B is 80,000 bytes; a copy-mode task carries 50 rows of A
    // (40,000) and B, plus framing; its block of C is 40,000 bytes back.
    let to: Vec<u64> = out
        .lines()
        .filter(|l| l.contains("├── pipe ─"))
        .map(|l| l.split(" B ─▶").next().unwrap().rsplit(' ').next().unwrap().replace(',', "").parse().unwrap())
        .collect();
    assert_eq!(to.len(), 4 * 2, "two workers in each of four process modes:\n{out}");
    assert!(to[..2].iter().all(|&b| (120_000..120_200).contains(&b)), "copy: {to:?}");
    assert!(to[2..].iter().all(|&b| b < 1_000), "descriptors only: {to:?}");
    let back: Vec<u64> = out
        .lines()
        .filter(|l| l.contains("│   ◀─"))
        .map(|l| l.split(" B ──").next().unwrap().rsplit(' ').next().unwrap().replace(',', "").parse().unwrap())
        .collect();
    assert_eq!(back.len(), 8, "{out}");
    // copy, memmap: blocks of C; memmap-out: "done"; fork: blocks of C.
    for (i, b) in back.iter().enumerate() {
        let c_block = !(4..6).contains(&i);
        assert_eq!(c_block, (40_000..40_200).contains(b), "reply {i}: {b} bytes in {back:?}");
    }
    assert!(out.contains("[C.npy, 80,000 B] mapped read-write"), "{out}");
}

/// Blocks of C of 4 MiB or more are lent by the workers: the picture says,
/// under each worker's line back, how many of those bytes were copied out
/// of its memory rather than read from the pipe — every block of copy,
/// memmap and fork, and nothing of memmap-out, which returns none. With
/// `PROCJOB_LEND=0` every block comes through the pipes, and it says none.
#[test]
fn the_picture_says_which_bytes_came_out_of_a_workers_memory() {
    if util::lending_forbidden() {
        return;
    }
    let args = ["--size", "1100", "--processes", "2", "--repeat", "1"];
    let lent_lines = |out: &str| -> Vec<String> {
        out.lines().filter(|l| l.contains("copied out of its memory, not the pipe")).map(String::from).collect()
    };
    let out = demo_ok_with(&args, &[("PROCJOB_LEND", "1")]);
    let block = 550 * 1100 * 8;
    let lent = lent_lines(&out);
    assert_eq!(lent.len(), 3 * 2, "two workers in copy, memmap and fork:\n{out}");
    let grouped = format!("{},{:03},{:03} B of them", block / 1_000_000, block / 1000 % 1000, block % 1000);
    assert!(lent.iter().all(|l| l.contains(&grouped)), "{grouped}: {lent:?}");
    let out = demo_ok_with(&args, &[("PROCJOB_LEND", "0")]);
    assert!(lent_lines(&out).is_empty(), "lent with PROCJOB_LEND=0:\n{out}");
}

#[test]
fn an_installed_binary_names_procjob_commands_not_cargo() {
    let parent = tempfile::tempdir().unwrap();
    let installed = parent.path().join("bin");
    std::fs::create_dir(&installed).unwrap();
    let copy = installed.join("procjob");
    std::fs::copy(BIN, &copy).unwrap();
    let temp = parent.path().join("tmp");
    std::fs::create_dir(&temp).unwrap();
    let out = Command::new(&copy)
        .args(["demo", "--size", "40", "--processes", "2", "--repeat", "1", "--temp-folder"])
        .arg(&temp)
        .env_remove("PROCJOB_TEMP_FOLDER")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    let next = stdout.split("What next").nth(1).expect("a last section");
    assert!(next.contains("  procjob demo --size 80") && !next.contains("cargo run"), "{next}");
    // From the build tree it names the cargo commands.
    let built = demo_ok(&["--size", "40", "--processes", "2", "--repeat", "1"]);
    assert!(built.split("What next").nth(1).unwrap().contains("cargo run --release -- demo --size 80"), "{built}");
}
