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
