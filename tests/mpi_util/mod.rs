//! Helpers shared by the multi-rank tests (`tests/mpi.rs`,
//! `tests/mpi_bench.rs`): reading a run's output, finding a job's
//! processes by the mark their environment carries, and building an
//! example to run under `mpirun`.

// Not every test file uses every helper.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The variable a test sets in a job's ranks (workers inherit it) to find
/// that job's processes again.
pub const MARK_ENV: &str = "PROCJOB_MPI_TEST_RUN";

/// The command, its status and both outputs, for assertion messages.
pub fn describe(cmd: &Command, out: &Output) -> String {
    format!(
        "{cmd:?}\nstatus {}\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The JSON lines of a run's standard output.
pub fn json_lines(out: &Output) -> Vec<Value> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect()
}

/// Every process whose environment carries the test's `mark` in
/// [`MARK_ENV`].
pub fn marked(mark: &str) -> Vec<u32> {
    let wanted = format!("{MARK_ENV}={mark}");
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        let Ok(env) = std::fs::read(format!("/proc/{pid}/environ")) else { continue };
        if env.split(|&b| b == 0).any(|v| v == wanted.as_bytes()) {
            out.push(pid);
        }
    }
    out
}

/// The marked processes still there once those that are ending have
/// ended: workers go with their agent (parent-death signal), ranks with
/// mpirun, a moment after the job's end; waits up to 10 s for none.
pub fn marked_after_the_end(mark: &str) -> Vec<u32> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = marked(mark);
        if left.is_empty() || Instant::now() >= deadline {
            return left;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Builds the example `name` with the `mpi` feature in this test binary's
/// profile (`cargo test --test …` builds no example) and returns its path.
pub fn build_example(name: &str) -> PathBuf {
    let mut build = Command::new(env!("CARGO"));
    build.args(["build", "--features", "mpi", "--example", name, "--manifest-path"]);
    build.arg(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"));
    if !cfg!(debug_assertions) {
        build.arg("--release");
    }
    let built = build.output().expect("cannot run cargo");
    assert!(built.status.success(), "{}", String::from_utf8_lossy(&built.stderr));
    let example = std::path::Path::new(env!("CARGO_BIN_EXE_procjob")).with_file_name("examples").join(name);
    assert!(example.exists(), "{} was not built", example.display());
    example
}
