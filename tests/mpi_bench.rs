//! `procjob bench` across the ranks of `mpirun`, a Rust panic in a rank,
//! and `n_jobs(-1)` under MPI, on this machine: each rank is made a node of
//! its own (`PROCJOB_MPI_NODE=rank`), so workers run under agents of other
//! ranks and every frame crosses MPI. Needs the `mpi` feature
//! (`cargo test --features mpi --test mpi_bench`) and Open MPI's `mpirun`
//! (each test says it skips, and passes, when `mpirun` is not found). Every
//! `mpirun` runs under a hard `timeout`.
#![cfg(feature = "mpi")]

mod mpi_util;
mod util;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use mpi_util::{build_example, describe, json_lines, marked_after_the_end};
use serde_json::Value;
use util::{assert_clean_parent, TestDir, BIN};

/// Longest an mpirun may take (then `timeout` ends it, and the test fails).
const LIMIT_S: u32 = 120;

/// Whether `mpirun` can be run; when not, says so (the test then skips).
fn have_mpirun(test: &str) -> bool {
    let found = Command::new("mpirun").arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status();
    if found.is_ok_and(|s| s.success()) {
        return true;
    }
    eprintln!("{test}: skipped: `mpirun` was not found on PATH (install openmpi-bin; see docs/scale-out.md)");
    false
}

/// `timeout -k 10 <limit> mpirun …` with the settings this machine needs
/// (as root, more ranks than CPUs, no binding), `ranks` ranks each a node
/// of its own, extra environment `env`, running `program` with `args`.
fn mpirun(limit_s: u32, ranks: usize, env: &[(&str, &str)], program: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new("timeout");
    cmd.args(["-k", "10", &limit_s.to_string(), "mpirun", "--oversubscribe", "--bind-to", "none"]);
    cmd.env("OMPI_ALLOW_RUN_AS_ROOT", "1").env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1");
    cmd.args(["-n", &ranks.to_string(), "-x", "PROCJOB_MPI_NODE=rank"]);
    for (k, v) in env {
        cmd.args(["-x", &format!("{k}={v}")]);
    }
    cmd.arg(program).args(args).stdin(Stdio::null());
    cmd
}

fn run(cmd: &mut Command) -> (Output, String) {
    let out = cmd.output().expect("cannot run timeout/mpirun");
    (out.clone(), describe(cmd, &out))
}

fn bin() -> PathBuf {
    PathBuf::from(BIN)
}

/// Under `mpirun -n 2`, `bench --backend mpi` spreads each worker mode's
/// pool over both ranks, every case's C equals seq's, and the JSON says
/// backend mpi, 2 ranks, where the workers ran and the bytes that crossed
/// between ranks (copy moves A and B, memmap only references).
#[test]
fn bench_under_mpirun_spreads_its_pools_over_the_ranks() {
    if !have_mpirun("bench_under_mpirun_spreads_its_pools_over_the_ranks") {
        return;
    }
    for dtype in ["f64", "i64"] {
        let dir = TestDir::new("mpi-bench");
        let tmp = dir.tmp().display().to_string();
        let args = [
            "bench",
            "--backend",
            "mpi",
            "--sizes",
            "67",
            "--processes",
            "3",
            "--modes",
            "copy,memmap,memmap-out",
            "--dtype",
            dtype,
            "--repeat",
            "2",
            "--warmup",
            "0",
            "--json",
            "--temp-folder",
            &tmp,
        ];
        let (out, text) = run(&mut mpirun(LIMIT_S, 2, &[], &bin(), &args));
        assert!(out.status.success(), "{text}");
        let lines = json_lines(&out);
        let modes: Vec<&str> = lines.iter().map(|l| l["mode"].as_str().unwrap()).collect();
        assert_eq!(modes, ["seq", "copy", "memmap", "memmap-out"], "{text}");
        for l in &lines {
            let mode = l["mode"].as_str().unwrap();
            assert_eq!(l["matches_seq"], Value::Bool(true), "{mode}: {text}");
            assert_eq!(l["backend"], "mpi", "{text}");
            assert_eq!(l["ranks"].as_u64(), Some(2), "{text}");
            if mode == "seq" {
                assert_eq!(l["nodes"], Value::Array(Vec::new()), "{text}");
                continue;
            }
            let nodes = l["nodes"].as_array().unwrap();
            let ranks: Vec<u64> = nodes.iter().map(|n| n["rank"].as_u64().unwrap()).collect();
            assert_eq!(ranks, [0, 1], "{mode}: workers not on both ranks: {text}");
            let workers: u64 = nodes.iter().map(|n| n["workers"].as_u64().unwrap()).sum();
            assert_eq!(workers, 3, "{mode}: {text}");
            assert!(nodes.iter().all(|n| n["host"].as_str().is_some_and(|h| !h.is_empty())), "{text}");
            assert!(l["bytes_between_ranks_out"].as_u64().unwrap() > 0, "{mode}: {text}");
            assert!(l["bytes_between_ranks_in"].as_u64().unwrap() > 0, "{mode}: {text}");
        }
        let out_of =
            |m: &str| lines.iter().find(|l| l["mode"] == m).unwrap()["bytes_between_ranks_out"].as_u64().unwrap();
        assert!(out_of("copy") > 3 * out_of("memmap"), "{text}");
        assert_clean_parent(dir.tmp(), &text);
    }
}

/// The human table under MPI names the backend, the ranks and each node,
/// where each process count's workers run, and the bytes between ranks.
#[test]
fn bench_table_under_mpirun_says_where_the_workers_ran() {
    if !have_mpirun("bench_table_under_mpirun_says_where_the_workers_ran") {
        return;
    }
    let dir = TestDir::new("mpi-bench-table");
    let tmp = dir.tmp().display().to_string();
    let args = [
        "bench",
        "--sizes",
        "40",
        "--processes",
        "2",
        "--modes",
        "copy,memmap",
        "--repeat",
        "1",
        "--warmup",
        "0",
        "--temp-folder",
        &tmp,
    ];
    let (out, text) = run(&mut mpirun(LIMIT_S, 2, &[], &bin(), &args));
    assert!(out.status.success(), "{text}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("backend mpi, 2 ranks, 2 nodes: rank 0 on "), "{text}");
    assert!(stdout.contains("; rank 1 on "), "{text}");
    assert!(stdout.contains("  workers: 1 on rank 0 ("), "{text}");
    assert!(stdout.contains(", 1 on rank 1 ("), "{text}");
    assert!(stdout.contains("MPI, per run"), "{text}");
    assert_clean_parent(dir.tmp(), &text);
}

/// `--backend local` under mpirun: rank 0 runs the sweep alone (backend
/// local, 1 rank, no bytes between ranks); `--modes fork` under MPI is a
/// usage error; `--backend mpi` outside mpirun says how to start it; and
/// bench's default process counts go up to the CPUs of every node.
#[test]
fn bench_backend_choice_and_default_counts() {
    if !have_mpirun("bench_backend_choice_and_default_counts") {
        return;
    }
    let dir = TestDir::new("mpi-bench-local");
    let tmp = dir.tmp().display().to_string();
    let base = ["bench", "--sizes", "16", "--repeat", "1", "--warmup", "0", "--json", "--temp-folder", &tmp];

    let local: Vec<&str> = base.iter().copied().chain(["--backend", "local", "--processes", "2"]).collect();
    let (out, text) = run(&mut mpirun(LIMIT_S, 2, &[], &bin(), &local));
    assert!(out.status.success(), "{text}");
    let lines = json_lines(&out);
    assert_eq!(lines.len(), 4, "{text}");
    for l in &lines {
        assert_eq!(l["backend"], "local", "{text}");
        assert_eq!(l["ranks"].as_u64(), Some(1), "{text}");
        assert_eq!(l["nodes"], Value::Array(Vec::new()), "{text}");
        assert_eq!(l["bytes_between_ranks_out"].as_u64(), Some(0), "{text}");
        assert_eq!(l["matches_seq"], Value::Bool(true), "{text}");
    }

    let fork: Vec<&str> = base.iter().copied().chain(["--modes", "fork", "--processes", "2"]).collect();
    let (out, text) = run(&mut mpirun(LIMIT_S, 2, &[], &bin(), &fork));
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("fork does not apply under MPI"), "{text}");

    let outside = Command::new(BIN).args(["bench", "--sizes", "8", "--backend", "mpi"]).output().unwrap();
    assert_eq!(outside.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&outside.stderr).contains("mpirun -n R procjob"));

    // The largest default count, alone and under 2 ranks of a node each.
    let most = |out: &Output| json_lines(out).iter().filter_map(|l| l["processes"].as_u64()).max().unwrap();
    let copy: Vec<&str> = base.iter().copied().chain(["--modes", "copy"]).collect();
    let alone = Command::new(BIN).args(&copy).output().unwrap();
    assert!(alone.status.success(), "{}", String::from_utf8_lossy(&alone.stderr));
    let (out, text) = run(&mut mpirun(LIMIT_S, 2, &[], &bin(), &copy));
    assert!(out.status.success(), "{text}");
    assert_eq!(most(&out), 2 * most(&alone), "{text}");
    assert_clean_parent(dir.tmp(), &text);
}

/// Open MPI's shared-memory segment files in `dir`.
fn vader_segments(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("vader_segment"))
                .collect()
        })
        .unwrap_or_default()
}

/// A Rust panic in rank `rank` (through the test-only knob
/// `PROCJOB_MPI_TEST_PANIC`): the panic hook calls `MPI_Abort`, so the job
/// ends with the hook's code 101 well within the hard timeout (which would
/// end it with 124), the message names the rank and its host, and no
/// procjob process, run folder or shared-memory segment of the job is left.
/// The segments go to a folder of the test's own
/// (`btl_vader_backing_directory`), so other jobs on the machine do not
/// count; the test also sees them made there while the job runs.
fn a_panic_in_rank_aborts_the_job(rank: usize) {
    let dir = TestDir::new("mpi-panic");
    let tmp = dir.tmp().display().to_string();
    let shm = dir.file("shm");
    std::fs::create_dir(&shm).unwrap();
    let mark = format!("panic-{rank}-{}", std::process::id());
    let rank_text = rank.to_string();
    let env = [
        ("PROCJOB_MPI_TEST_RUN", mark.as_str()),
        ("PROCJOB_MPI_TEST_PANIC", rank_text.as_str()),
        ("OMPI_MCA_btl_vader_backing_directory", shm.to_str().unwrap()),
    ];
    // Copy alone (no shared-filesystem probe first), with the check: seq's
    // C is computed first on rank 0, so the job lives a while before its
    // workers start (and the panic comes).
    let args = ["matmul", "--size", "800", "--mode", "copy", "--quiet", "--temp-folder", &tmp];
    const BOUND_S: u32 = 30;
    let mut cmd = mpirun(BOUND_S, 2, &env, &bin(), &args);
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let mut seen_segments = false;
    let started = Instant::now();
    // Until the job ends: whether its segments showed up in `shm`.
    while child.try_wait().unwrap().is_none() {
        seen_segments |= !vader_segments(&shm).is_empty();
        std::thread::sleep(Duration::from_millis(2));
    }
    let took = started.elapsed();
    let out = child.wait_with_output().unwrap();
    let text = describe(&cmd, &out);
    // 124: `timeout` ended a job that hung; 101: the hook's MPI_Abort.
    assert_eq!(out.status.code(), Some(101), "rank {rank}'s panic (after {took:?}):\n{text}");
    assert!(text.contains(&format!("PROCJOB_MPI_TEST_PANIC={rank}: rank {rank} panics on purpose")), "{text}");
    assert!(text.contains(&format!("procjob: rank {rank} (host ")), "{text}");
    assert!(text.contains("panicked; aborting the MPI job"), "{text}");
    // Workers go with their parent (parent-death signal), ranks with
    // mpirun: give the kernel a moment to finish them.
    assert_eq!(marked_after_the_end(&mark), Vec::<u32>::new(), "processes left after rank {rank} panicked:\n{text}");
    assert_clean_parent(dir.tmp(), &text);
    assert!(seen_segments, "the job's shared-memory segments never showed up in {}:\n{text}", shm.display());
    assert_eq!(vader_segments(&shm), Vec::<String>::new(), "segments left after rank {rank} panicked:\n{text}");
}

#[test]
fn a_panic_in_rank_0_aborts_the_job_and_leaves_nothing() {
    if have_mpirun("a_panic_in_rank_0_aborts_the_job_and_leaves_nothing") {
        a_panic_in_rank_aborts_the_job(0);
    }
}

#[test]
fn a_panic_in_an_agent_rank_aborts_the_job_and_leaves_nothing() {
    if have_mpirun("a_panic_in_an_agent_rank_aborts_the_job_and_leaves_nothing") {
        a_panic_in_rank_aborts_the_job(1);
    }
}

/// `Parallel::new()` (n_jobs -1) under `mpirun -n 2`, each rank a node:
/// the `monte_carlo_pi` example runs twice the workers it runs alone, the
/// CPUs of both nodes.
#[test]
fn n_jobs_minus_one_counts_the_cpus_of_every_node() {
    if !have_mpirun("n_jobs_minus_one_counts_the_cpus_of_every_node") {
        return;
    }
    let example = build_example("monte_carlo_pi");
    let dir = TestDir::new("mpi-n-jobs");
    let tmp = dir.tmp().display().to_string();
    // "… in 200 tasks on N workers, …"
    let workers = |out: &Output| -> usize {
        let stdout = String::from_utf8_lossy(&out.stdout);
        let at = stdout.find(" workers,").unwrap_or_else(|| panic!("no worker count in {stdout:?}"));
        stdout[..at].rsplit(' ').next().unwrap().parse().unwrap()
    };
    let mut alone = Command::new("timeout");
    alone.args(["60", example.to_str().unwrap(), "200", "1000"]).env("PROCJOB_TEMP_FOLDER", &tmp);
    let (out, alone_text) = run(&mut alone);
    assert!(out.status.success(), "{alone_text}");
    let one_node = workers(&out);
    let (out, text) = run(&mut mpirun(LIMIT_S, 2, &[("PROCJOB_TEMP_FOLDER", &tmp)], &example, &["200", "1000"]));
    assert!(out.status.success(), "{text}");
    assert_eq!(workers(&out), 2 * one_node, "alone:\n{alone_text}\nunder mpirun:\n{text}");
    assert_clean_parent(dir.tmp(), &text);
}
