//! joblib's conveniences, through the public API: `n_jobs(1)` in the
//! calling process, an empty input starting nothing, a nested call inside a
//! task, `verbose`, and defaults from the environment.
//!
//! The tests of `verbose` and of the environment run this test binary again
//! as a child (one ignored test of this file, selected by name), with its
//! stderr on a pipe or a pseudo-terminal, or with the variables set, rather
//! than changing this process's own environment under the other tests.

use std::io::Read;
use std::process::{Command, Stdio};

use procjob::{Access, Array, BatchSize, DType, Error, Parallel, Task};
use serde::{Deserialize, Serialize};

procjob::test_support!();

/// Returns its input squared, and the pid of the process it ran in.
struct SquareWhere;
impl Task for SquareWhere {
    type Input = u64;
    type Output = (u64, u32);
    type Error = String;
    fn run(x: u64) -> Result<(u64, u32), String> {
        Ok((x * x, std::process::id()))
    }
}

struct Square;
impl Task for Square {
    type Input = u64;
    type Output = u64;
    type Error = String;
    fn run(x: u64) -> Result<u64, String> {
        Ok(x * x)
    }
}

/// Fails as told: `Err` for 13, panic for 17.
struct Picky;
impl Task for Picky {
    type Input = u64;
    type Output = u64;
    type Error = String;
    fn describe(x: &u64) -> Option<String> {
        Some(format!("x = {x}"))
    }
    fn run(x: u64) -> Result<u64, String> {
        match x {
            13 => Err(format!("{x} is unlucky")),
            17 => panic!("{x} is too much"),
            x => Ok(x + 1),
        }
    }
}

/// Writes `value` into every element of its array; returns their sum.
struct Fill;
impl Task for Fill {
    type Input = (Array, f64);
    type Output = f64;
    type Error = String;
    fn run((mut a, value): (Array, f64)) -> Result<f64, String> {
        let data = a.as_mut_slice::<f64>().map_err(|e| e.to_string())?;
        data.fill(value);
        Ok(data.iter().sum())
    }
}

/// Returns a 2×2 block filled with its input.
struct Block;
impl Task for Block {
    type Input = f64;
    type Output = Array;
    type Error = String;
    fn run(value: f64) -> Result<Array, String> {
        Ok(Array::from_vec(vec![2, 2], vec![value; 4]))
    }
}

/// Sums `0² + … + (n-1)²` with a `Parallel` call of its own, and says
/// whether that nested call ran in the process of the task.
struct NestedSum;

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct Nested {
    sum: u64,
    in_process: bool,
    pid: u32,
    nested_pids: Vec<u32>,
}

impl Task for NestedSum {
    type Input = u64;
    type Output = Nested;
    type Error = String;
    fn run(n: u64) -> Result<Nested, String> {
        let mut p = Parallel::new().n_jobs(2);
        let out = p.run::<SquareWhere, _>(0..n).map_err(|e| e.to_string())?;
        Ok(Nested {
            sum: out.iter().map(|(s, _)| s).sum(),
            in_process: p.last_call().in_process,
            pid: std::process::id(),
            nested_pids: out.iter().map(|&(_, pid)| pid).collect(),
        })
    }
}

#[test]
fn n_jobs_1_runs_the_tasks_in_the_calling_process_in_order() {
    let mut p = Parallel::new().n_jobs(1);
    assert!(p.runs_in_process().unwrap());
    let out = p.run::<SquareWhere, _>(0..50u64).unwrap();
    let me = std::process::id();
    assert_eq!(out, (0..50u64).map(|x| (x * x, me)).collect::<Vec<_>>());
    let stats = p.last_call();
    assert!(stats.in_process);
    assert_eq!((stats.batches, stats.dumped_arrays, stats.traffic.bytes_to_workers), (0, 0, 0));
    assert!(p.worker_pids().is_empty() && p.worker_reports().is_empty());
    // The streaming forms too.
    let streamed: Vec<u64> = p.run_iter::<Square, _>(0..5u64).unwrap().map(Result::unwrap).collect();
    assert_eq!(streamed, [0, 1, 4, 9, 16]);
    let mut unordered: Vec<(u64, u64)> = p.run_unordered::<Square, _>(0..5u64).unwrap().map(Result::unwrap).collect();
    unordered.sort_unstable();
    assert_eq!(unordered, [(0, 0), (1, 1), (2, 4), (3, 9), (4, 16)]);
    assert_eq!(p.start().unwrap(), std::time::Duration::ZERO);
    assert!(p.worker_pids().is_empty());
}

#[test]
fn in_process_false_keeps_one_worker_process_and_a_timeout_needs_one() {
    let me = std::process::id();
    let mut p = Parallel::new().n_jobs(1).in_process(false);
    assert!(!p.runs_in_process().unwrap());
    let out = p.run::<SquareWhere, _>(0..4u64).unwrap();
    assert!(out.iter().all(|&(_, pid)| pid != me && pid == p.worker_pids()[0]), "{out:?}");
    assert!(!p.last_call().in_process);
    let p = Parallel::new().n_jobs(1).timeout(std::time::Duration::from_secs(60));
    assert!(!p.runs_in_process().unwrap(), "a timeout needs a worker it can kill");
    // And the other way: any n_jobs may be asked to run here.
    let mut p = Parallel::new().n_jobs(2).in_process(true);
    assert!(p.run::<SquareWhere, _>(0..4u64).unwrap().iter().all(|&(_, pid)| pid == me));
}

#[test]
fn an_error_and_a_panic_in_the_calling_process_come_back_as_from_a_worker() {
    for in_process in [true, false] {
        let mut p = Parallel::new().n_jobs(1).in_process(in_process);
        let err = p.run::<Picky, _>([1u64, 13, 2]).unwrap_err();
        assert_eq!(err.task_index(), Some(1), "{err}");
        assert_eq!(err.task_error::<String>().as_deref(), Some("13 is unlucky"));
        assert!(err.to_string().contains("task 1 (x = 13)"), "{err}");
        let err = p.run::<Picky, _>([1u64, 2, 17]).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, Error::Task { .. }), "{msg}");
        assert_eq!(err.task_index(), Some(2), "{msg}");
        assert!(msg.contains("task 2 (x = 17)") && msg.contains("panicked at"), "{msg}");
        assert!(msg.contains("parallel_conveniences.rs") && msg.contains("17 is too much"), "{msg}");
        if in_process {
            assert!(msg.contains(&format!("(pid {})", std::process::id())), "{msg}");
        }
        // The caller goes on: the next call works.
        assert_eq!(p.run::<Picky, _>([1u64, 2]).unwrap(), [2, 3]);
    }
}

#[test]
fn arrays_reach_a_task_in_the_calling_process_as_they_reach_a_worker() {
    for in_process in [true, false] {
        // A small array travels inline, and the task may not write it.
        let small = Array::from_vec(vec![4], vec![1.0f64; 4]);
        let mut p = Parallel::new().n_jobs(1).in_process(in_process);
        let err = p.run::<Fill, _>([(small.clone(), 5.0)]).unwrap_err();
        assert!(err.to_string().contains("not writable"), "{err}");
        assert_eq!(small.as_slice::<f64>().unwrap(), &[1.0; 4], "the caller's array is untouched");
        // Above max_nbytes, read-only: a worker maps it read-only, so
        // writing is refused in both.
        let large = Array::from_vec(vec![1 << 18], vec![1.0f64; 1 << 18]);
        let err = p.run::<Fill, _>([(large.clone(), 5.0)]).unwrap_err();
        assert!(err.to_string().contains("not writable") || err.to_string().contains("read-only"), "{err}");
        // Copy-on-write: the task writes its private view.
        let mut p = p.mmap_mode(Access::CopyOnWrite);
        let out = p.run::<Fill, _>([(large.clone(), 5.0)]).unwrap();
        assert_eq!(out, [5.0 * (1 << 18) as f64]);
        assert!(large.as_slice::<f64>().unwrap().iter().all(|&v| v == 1.0));
        // A shared output: each task writes its rows of one read-write map.
        let dir = tempfile::tempdir().unwrap();
        let out = Array::create_npy(&dir.path().join("out.npy"), DType::F64, vec![8, 4]).unwrap();
        p.run::<Fill, _>((0..4).map(|i| (out.rows(2 * i..2 * i + 2).unwrap(), i as f64))).unwrap();
        for (row, chunk) in out.as_slice::<f64>().unwrap().chunks(4).enumerate() {
            assert!(chunk.iter().all(|&v| v == (row / 2) as f64), "in_process {in_process}, row {row}: {chunk:?}");
        }
        // Outputs landed in rows of a shared output.
        let landed = Array::create_npy(&dir.path().join("landed.npy"), DType::F64, vec![6, 2]).unwrap();
        let inputs = (0..3).map(|i| 10.0 + i as f64);
        let got: Vec<_> = p
            .run_unordered_into::<Block, _>(inputs, &landed, |i| 2 * i as usize..2 * i as usize + 2)
            .unwrap()
            .map(Result::unwrap)
            .collect();
        assert_eq!(got.len(), 3);
        for (i, a) in &got {
            assert_eq!(a.file_location().map(|l| l.0), landed.file_location().map(|l| l.0), "task {i}");
        }
        let rows: Vec<f64> = landed.as_slice::<f64>().unwrap().to_vec();
        assert_eq!(rows, [10.0, 10.0, 10.0, 10.0, 11.0, 11.0, 11.0, 11.0, 12.0, 12.0, 12.0, 12.0]);
    }
}

#[test]
fn an_empty_input_starts_no_worker_and_makes_no_folder() {
    let parent = tempfile::tempdir().unwrap();
    let mut p = Parallel::new().n_jobs(2).temp_folder(parent.path());
    let none: Vec<u64> = Vec::new();
    assert_eq!(p.run::<Square, _>(none.clone()).unwrap(), Vec::<u64>::new());
    assert_eq!(p.run_iter::<Square, _>(none.clone()).unwrap().count(), 0);
    assert_eq!(p.run_unordered::<Square, _>(none).unwrap().count(), 0);
    assert!(p.worker_pids().is_empty() && p.worker_reports().is_empty(), "no worker started");
    assert_eq!(std::fs::read_dir(parent.path()).unwrap().count(), 0, "no run folder made");
    assert_eq!(p.last_call(), &procjob::CallStats::default());
    // Settings are still checked.
    let err = Parallel::new().n_jobs(0).run::<Square, _>(Vec::new()).unwrap_err();
    assert!(err.to_string().contains("n_jobs = 0"), "{err}");
}

#[test]
fn a_parallel_call_inside_a_task_runs_sequentially_in_its_worker() {
    let mut p = Parallel::new().n_jobs(2).in_process(false);
    let out = p.run::<NestedSum, _>([3u64, 10, 0, 5]).unwrap();
    let workers = p.worker_pids();
    for (n, o) in [3u64, 10, 0, 5].into_iter().zip(&out) {
        assert_eq!(o.sum, (0..n).map(|x| x * x).sum::<u64>(), "{o:?}");
        assert!(workers.contains(&o.pid) && o.pid != std::process::id(), "{o:?} {workers:?}");
        assert!(o.nested_pids.iter().all(|&pid| pid == o.pid), "the nested tasks ran in the worker: {o:?}");
        assert!(o.in_process, "{o:?}");
    }
    // The same results with the outer call in this process (nested twice).
    let here = Parallel::new().n_jobs(1).run::<NestedSum, _>([3u64, 10, 0, 5]).unwrap();
    assert_eq!(here.iter().map(|o| o.sum).collect::<Vec<_>>(), out.iter().map(|o| o.sum).collect::<Vec<_>>());
}

/// The variable that makes [`child`] do something, and says what.
const CHILD_ENV: &str = "PROCJOB_CONVENIENCES_CHILD";

/// Runs [`child`] in a fresh process of this test binary doing `what`,
/// with `env` set (and the variables of the defaults unset otherwise).
fn child_command(what: &str, env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["child", "--exact", "--include-ignored", "--nocapture", "--test-threads=1", "-q"])
        .env(CHILD_ENV, what)
        .env_remove("PROCJOB_N_JOBS")
        .env_remove("PROCJOB_MAX_NBYTES")
        .env_remove("PROCJOB_TEMP_FOLDER")
        .stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

/// Runs the child with stdout and stderr on pipes; panics unless it passed.
fn run_child(what: &str, env: &[(&str, &str)]) -> (String, String) {
    let out = child_command(what, env).output().unwrap();
    let (stdout, stderr) =
        (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned());
    assert!(out.status.success(), "child {what} failed:\n{stdout}\n{stderr}");
    (stdout, stderr)
}

/// The other side of the tests below, run in a child process with its
/// environment set: does nothing unless [`CHILD_ENV`] says what to do.
#[test]
#[ignore = "run as a child by the tests of verbose and of the environment"]
fn child() {
    let Ok(what) = std::env::var(CHILD_ENV) else { return };
    match what.split_once(':') {
        Some(("verbose", level)) => {
            let level: u32 = level.parse().unwrap();
            let mut p = Parallel::new().n_jobs(2).verbose(level).batch_size(BatchSize::Fixed(4));
            assert_eq!(p.run::<Square, _>(0..40u64).unwrap().len(), 40);
        }
        Some(("env", expect)) => check_env_child(expect),
        _ => panic!("unknown child {what}"),
    }
}

/// Says where its array was mapped from (`None`: it came inline).
struct MappedFrom;
impl Task for MappedFrom {
    type Input = Array;
    type Output = Option<String>;
    type Error = String;
    fn run(a: Array) -> Result<Option<String>, String> {
        Ok(a.file_location().map(|(p, _, _)| p.display().to_string()))
    }
}

/// What the child checks for each environment.
fn check_env_child(expect: &str) {
    let four_kib = || Array::from_vec(vec![512], vec![1.0f64; 512]);
    match expect {
        "n_jobs=3,max_nbytes=1K" => {
            let mut p = Parallel::new();
            assert_eq!(p.workers().unwrap(), 3);
            assert!(p.run::<MappedFrom, _>([four_kib()]).unwrap()[0].is_some(), "4 KiB is above 1K: mapped");
            assert_eq!(p.last_call().dumped_arrays, 1);
            // Explicit settings win.
            let mut p = Parallel::new().n_jobs(2).max_nbytes(None);
            assert_eq!(p.workers().unwrap(), 2);
            assert_eq!(p.run::<MappedFrom, _>([four_kib()]).unwrap(), [None]);
            assert_eq!(p.last_call().dumped_arrays, 0);
        }
        "n_jobs=1" => assert!(Parallel::new().runs_in_process().unwrap()),
        "max_nbytes=None" => {
            let mut p = Parallel::new().n_jobs(1).in_process(false);
            let large = Array::from_vec(vec![1 << 18], vec![1.0f64; 1 << 18]);
            assert_eq!(p.run::<MappedFrom, _>([large]).unwrap(), [None], "None: never dumped");
        }
        "bad" => {
            let err = Parallel::new().run::<Square, _>([1u64]).unwrap_err();
            let msg = err.to_string();
            assert!(err.is_usage(), "{msg}");
            assert!(msg.contains("PROCJOB_N_JOBS=\"lots\" cannot be used"), "{msg}");
            let err = Parallel::new().n_jobs(2).run::<Square, _>([1u64]).unwrap_err();
            assert!(err.to_string().contains("PROCJOB_MAX_NBYTES=\"12Q\" cannot be used"), "{err}");
            assert!(Parallel::new().workers().unwrap_err().to_string().contains("PROCJOB_N_JOBS"));
            // Both set on the builder: the variables are not used.
            let out = Parallel::new().n_jobs(2).max_nbytes(Some(1 << 20)).run::<Square, _>([3u64]).unwrap();
            assert_eq!(out, [9]);
        }
        "temp_folder" => {
            let parent = std::fs::canonicalize(std::env::var("PROCJOB_TEMP_FOLDER").unwrap()).unwrap();
            let mut p = Parallel::new().n_jobs(1).in_process(false).max_nbytes(Some(1024));
            let from = p.run::<MappedFrom, _>([four_kib()]).unwrap().remove(0).unwrap();
            assert!(from.starts_with(&parent.join("procjob-").display().to_string()), "{from}");
            // The setting wins.
            let other = tempfile::tempdir().unwrap();
            let mut p = p.temp_folder(other.path());
            let from = p.run::<MappedFrom, _>([four_kib()]).unwrap().remove(0).unwrap();
            let other = std::fs::canonicalize(other.path()).unwrap();
            assert!(from.starts_with(&other.display().to_string()), "{from}");
        }
        "temp_folder_bad" => {
            // Checked by every call on workers, dumps or not.
            for max_nbytes in [Some(1024), None] {
                let mut p = Parallel::new().n_jobs(1).in_process(false).max_nbytes(max_nbytes);
                let msg = p.run::<MappedFrom, _>([four_kib()]).unwrap_err().to_string();
                assert!(msg.contains("/nonexistent/procjob-parent") && msg.contains("PROCJOB_TEMP_FOLDER"), "{msg}");
            }
            // A call in this process dumps nothing: not checked.
            assert_eq!(Parallel::new().n_jobs(1).run::<Square, _>([2u64]).unwrap(), [4]);
            // The setting wins.
            let dir = tempfile::tempdir().unwrap();
            let mut p = Parallel::new().n_jobs(1).in_process(false).temp_folder(dir.path());
            assert!(p.run::<MappedFrom, _>([four_kib()]).is_ok());
        }
        other => panic!("unknown expectation {other}"),
    }
}

#[test]
fn environment_variables_give_defaults_that_settings_override() {
    run_child("env:n_jobs=3,max_nbytes=1K", &[("PROCJOB_N_JOBS", "3"), ("PROCJOB_MAX_NBYTES", "1K")]);
    run_child("env:n_jobs=1", &[("PROCJOB_N_JOBS", "1")]);
    run_child("env:max_nbytes=None", &[("PROCJOB_MAX_NBYTES", "None")]);
    run_child("env:bad", &[("PROCJOB_N_JOBS", "lots"), ("PROCJOB_MAX_NBYTES", "12Q")]);
}

#[test]
fn the_temp_folder_variable_is_used_by_the_first_dump_and_a_bad_one_is_named() {
    let parent = tempfile::tempdir().unwrap();
    run_child("env:temp_folder", &[("PROCJOB_TEMP_FOLDER", parent.path().to_str().unwrap())]);
    assert_eq!(std::fs::read_dir(parent.path()).unwrap().count(), 0, "the run folder is removed");
    run_child("env:temp_folder_bad", &[("PROCJOB_TEMP_FOLDER", "/nonexistent/procjob-parent")]);
}

#[test]
fn verbose_writes_plain_lines_from_level_10_and_nothing_below_it_off_a_terminal() {
    let (_, quiet) = run_child("verbose:5", &[]);
    assert!(!quiet.contains("[Parallel"), "level 5 on a pipe writes nothing: {quiet:?}");
    let (_, lines) = run_child("verbose:10", &[]);
    let ours: Vec<&str> = lines.lines().filter(|l| l.starts_with("[Parallel(n_jobs=2)]: Done")).collect();
    assert!(ours.len() >= 2, "one line per batch and one at the end: {lines:?}");
    let last = ours.last().unwrap();
    assert!(last.starts_with("[Parallel(n_jobs=2)]: Done 40 out of 40 tasks | elapsed:"), "{last}");
    assert!(last.ends_with("s finished"), "{last}");
    assert!(!lines.contains('\r'), "plain lines are not rewritten in place: {lines:?}");
}

#[test]
fn verbose_rewrites_one_line_in_place_on_a_terminal() {
    let (master, slave) = open_pty();
    let mut cmd = child_command("verbose:5", &[]);
    cmd.stdout(Stdio::null()).stderr(Stdio::from(slave));
    let mut child = cmd.spawn().unwrap();
    drop(cmd); // our copy of the slave: the master reads EOF (EIO) once the child is gone
    let mut master = std::fs::File::from(master);
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match master.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => seen.extend_from_slice(&buf[..n]),
            // Linux reports the last slave's closing as EIO.
            Err(e) if e.raw_os_error() == Some(libc::EIO) => break,
            Err(e) => panic!("reading the pty: {e}"),
        }
    }
    assert!(child.wait().unwrap().success());
    let text = String::from_utf8_lossy(&seen);
    assert!(text.matches("\r[Parallel(n_jobs=2)]: Done").count() >= 2, "rewritten in place: {text:?}");
    let last = text.rsplit('\r').find(|s| s.starts_with("[Parallel")).unwrap();
    assert!(last.starts_with("[Parallel(n_jobs=2)]: Done 40 out of 40 tasks | elapsed:"), "{text:?}");
    assert!(text.contains("s finished |"), "the last line says finished, with its bar: {text:?}");
    assert_eq!(text.matches('\n').count(), 1, "one line, ended once: {text:?}");
}

/// A pseudo-terminal: its master and its slave.
fn open_pty() -> (std::os::fd::OwnedFd, std::os::fd::OwnedFd) {
    use std::os::fd::FromRawFd;
    // SAFETY: posix_openpt, grantpt, unlockpt and ptsname_r take a flag or
    // the descriptor just opened and a buffer of the length given; each
    // descriptor is owned once.
    unsafe {
        let master = libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC);
        assert!(master >= 0, "posix_openpt: {}", std::io::Error::last_os_error());
        let master = std::os::fd::OwnedFd::from_raw_fd(master);
        let fd = std::os::fd::AsRawFd::as_raw_fd(&master);
        assert_eq!(libc::grantpt(fd), 0);
        assert_eq!(libc::unlockpt(fd), 0);
        let mut name = [0 as libc::c_char; 128];
        assert_eq!(libc::ptsname_r(fd, name.as_mut_ptr(), name.len()), 0);
        let path = std::ffi::CStr::from_ptr(name.as_ptr()).to_str().unwrap().to_owned();
        let slave = std::fs::OpenOptions::new().read(true).write(true).open(path).unwrap();
        (master, slave.into())
    }
}
