//! Failure handling of `procjob matmul`, end to end: workers that die,
//! fail, hang or break the protocol; SIGINT, SIGTERM and SIGKILL; bad
//! inputs and options; the temp folder's privacy and the stale-folder
//! sweep (docs/cli.md is the contract, exit codes included).
//!
//! Faults are injected with `PROCJOB_TEST_FAULT` (the worker crate's
//! `test-tasks` feature, on in the binary `cargo test` builds). Every test
//! uses its own temp parent, and checks afterwards that no `procjob-*`
//! folder is left in it and that no worker process is left: the pids named
//! in the messages and every process /proc shows as a worker of the run's
//! coordinator are waited on with a pidfd. Nothing waits with a fixed sleep:
//! tests wait for a readiness line on the child's stderr or stdout, on
//! pidfds, or on the exit.

mod util;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use procjob_worker::npy;
use procjob_worker::testkinds::FAULT_ENV;
use procjob_worker::DType;
use util::{
    assert_bits_eq, assert_mentions, assert_no_workers_left, live_workers_of, matmul_ref, pattern_a, pattern_b,
    pids_named, read_npy_i64, run_checked, run_folders_in, wait_process_gone, write_npy, Background, Matrix, Procjob,
    Run, Stream, TestDir,
};

/// Longest a run may take before the test fails.
const RUN: Duration = Duration::from_secs(60);
/// Longest to wait for a readiness line (workers starting on a busy machine).
const READY: Duration = Duration::from_secs(30);
/// How long a process may take to go after it should (pidfd waits).
const GONE: Duration = Duration::from_secs(10);
/// What a hanging task prints on stderr before it parks.
const HANGING: &str = "procjob-test: hanging in pid";

/// `procjob matmul` in `dir` on the 100×100 pattern in 4 row blocks
/// (rows 0..25, 25..50, 50..75, 75..100) on 2 workers in memmap mode, with
/// `fault` injected (row 30 is in task 1, rows 25..50).
fn faulty(dir: &TestDir, fault: &str) -> Procjob {
    let mut cmd = dir.matmul();
    cmd.args(["--size", "100", "--blocks", "4", "--processes", "2", "--mode", "memmap"]).env(FAULT_ENV, fault);
    cmd
}

/// The pid in "worker K (pid N)" of the error message; asserts there is one
/// and that it is not the coordinator's.
#[track_caller]
fn worker_pid_named(run: &Run) -> i32 {
    let at = run.stderr.find("worker ").unwrap_or_else(|| panic!("{}: no worker named:\n{}", run.command, run.stderr));
    let rest = &run.stderr[at..];
    let pid = rest
        .split_once(" (pid ")
        .filter(|(head, _)| head["worker ".len()..].chars().all(|c| c.is_ascii_digit()))
        .and_then(|(_, tail)| tail.split_once(')'))
        .and_then(|(pid, _)| pid.parse::<i32>().ok())
        .unwrap_or_else(|| panic!("{}: no \"worker K (pid N)\" in the message:\n{}", run.command, run.stderr));
    assert_ne!(pid, run.pid as i32, "{}: the worker named is the coordinator", run.command);
    pid
}

/// Waits for a hanging task's readiness line and returns the worker's pid.
fn wait_hanging(bg: &mut Background) -> i32 {
    let line = bg.wait_for_line(Stream::Stderr, HANGING, READY);
    *pids_named(&line).first().unwrap_or_else(|| panic!("{}: no pid in {line:?}", bg.command))
}

/// The reference C of the n×n pattern (i64).
fn pattern_c(n: usize) -> Matrix<i64> {
    matmul_ref(&pattern_a::<i64>(n, n), &pattern_b::<i64>(n, n))
}

#[test]
fn worker_killed_mid_task_reports_signal_rows_and_exits_1() {
    let dir = TestDir::new("fail-kill");
    let run = run_checked(&faulty(&dir, "kill@30")).assert_code(1);
    assert_mentions(&run, &["killed by SIGKILL", "rows 25..50", "worker ", "(pid ", "the system may be out of memory"]);
    assert!(
        !run.stderr.contains("procjob killed it"),
        "{}: a kill from outside blamed on procjob:\n{}",
        run.command,
        run.stderr
    );
    worker_pid_named(&run);
}

/// A worker whose output is gone but which lives on (it closed its
/// protocol stream and hangs): procjob kills it once the grace after its
/// input closed has passed, and the death says so, not that the system may
/// be out of memory.
#[test]
fn a_worker_procjob_had_to_kill_is_reported_as_such() {
    let dir = TestDir::new("fail-mute");
    let run = run_checked(&faulty(&dir, "mute@30")).assert_code(1);
    assert_mentions(
        &run,
        &["killed by SIGKILL", "rows 25..50", "procjob killed it: it was still running 2 s after its input was closed"],
    );
    assert!(!run.stderr.contains("out of memory"), "{}: a misleading hint:\n{}", run.command, run.stderr);
    worker_pid_named(&run);
}

#[test]
fn worker_aborting_or_exiting_mid_task_is_reported() {
    let dir = TestDir::new("fail-abort-exit");
    let run = run_checked(&faulty(&dir, "abort@30")).assert_code(1);
    assert_mentions(&run, &["killed by SIGABRT", "rows 25..50", "worker ", "(pid "]);
    worker_pid_named(&run);

    let run = run_checked(&faulty(&dir, "exit@30")).assert_code(1);
    assert_mentions(&run, &["exited with code 7", "rows 25..50", "worker ", "(pid "]);
    worker_pid_named(&run);
}

#[test]
fn retries_rerun_a_lost_task_and_give_the_right_c() {
    let dir = TestDir::new("fail-retries");
    let marker = dir.file("killed-once");
    let out = dir.file("c.npy");
    let mut cmd = faulty(&dir, &format!("kill@30@once={}", marker.display()));
    cmd.args(["--retries", "1", "--out"]).arg(&out);
    let run = run_checked(&cmd).assert_ok();
    assert!(marker.exists(), "{}: the fault never fired (no marker {})", run.command, marker.display());
    assert_bits_eq(&read_npy_i64(&out), &pattern_c(100), &run.command);
    // The loss is said, though the run succeeded.
    assert_mentions(
        &run,
        &["procjob: memmap: worker ", "killed by SIGKILL", "rows 25..50", "ran it again on a fresh worker"],
    );
    assert_eq!(run.stderr.matches("ran it again").count(), 1, "{}: one loss, said once:\n{}", run.command, run.stderr);

    // The same fault without --retries fails the run, and writes no C.
    let marker = dir.file("killed-once-no-retries");
    let out = dir.file("c-no-retries.npy");
    let mut cmd = faulty(&dir, &format!("kill@30@once={}", marker.display()));
    cmd.arg("--out").arg(&out);
    let run = run_checked(&cmd).assert_code(1);
    assert!(marker.exists(), "{}: the fault never fired", run.command);
    assert_mentions(&run, &["killed by SIGKILL", "rows 25..50"]);
    assert!(!out.exists(), "{}: C was written by a failed run", run.command);
}

#[test]
fn task_panic_and_task_error_are_shown_with_message_and_location() {
    let dir = TestDir::new("fail-panic-error");
    let run = run_checked(&faulty(&dir, "panic@30")).assert_code(1);
    assert_mentions(&run, &["rows 25..50", "panicked at", "testkinds.rs", "task 30 panicked on purpose"]);
    worker_pid_named(&run);

    let run = run_checked(&faulty(&dir, "error@30")).assert_code(1);
    assert_mentions(&run, &["rows 25..50", "returned an error", "value 30 is not welcome"]);
    worker_pid_named(&run);
}

#[test]
fn hung_task_times_out_and_names_the_task() {
    let dir = TestDir::new("fail-timeout");
    let mut cmd = faulty(&dir, "hang@30");
    cmd.args(["--timeout", "1"]);
    let mut bg = cmd.spawn();
    let hung = wait_hanging(&mut bg);
    let run = bg.finish(RUN);
    assert_no_workers_left(run.pid, &[hung], &run.command);
    let run = run.assert_code(1);
    assert_mentions(&run, &["rows 25..50", "timeout", "killed"]);
    assert_eq!(worker_pid_named(&run), hung, "{}: the message names another worker:\n{}", run.command, run.stderr);
}

/// Starts a run whose task 1 hangs, waits until it does, sends `signal`
/// (to the whole process group, as a terminal does, or to the coordinator
/// only), and returns the outcome after checking no worker is left.
fn interrupt_hanging_run(dir: &TestDir, signal: Signal, to_group: bool) -> Run {
    let mut bg = faulty(dir, "hang@30").spawn();
    let hung = wait_hanging(&mut bg);
    let mut workers = live_workers_of(bg.pid);
    assert!(workers.contains(&hung), "{}: the hanging pid {hung} is not a worker ({workers:?})", bg.command);
    if to_group {
        bg.signal_group(signal);
    } else {
        bg.signal(signal);
    }
    let run = bg.finish(RUN);
    workers.extend(pids_named(&run.stderr));
    assert_no_workers_left(run.pid, &workers, &run.command);
    run
}

#[test]
fn sigint_to_the_process_group_stops_workers_and_exits_130() {
    let dir = TestDir::new("fail-sigint");
    let run = interrupt_hanging_run(&dir, Signal::SIGINT, true).assert_code(130);
    assert_mentions(&run, &["stopped by SIGINT"]);
    assert!(
        !run.stderr.contains("killed by SIGINT"),
        "{}: a worker was reported as killed by the terminal's SIGINT:\n{}",
        run.command,
        run.stderr
    );
}

#[test]
fn sigterm_exits_143() {
    let dir = TestDir::new("fail-sigterm");
    let run = interrupt_hanging_run(&dir, Signal::SIGTERM, false).assert_code(143);
    assert_mentions(&run, &["stopped by SIGTERM"]);
    assert!(!run.stderr.contains("killed by SIGTERM"), "{}:\n{}", run.command, run.stderr);
}

/// Whether `signal` is pending for the whole process `pid` (not yet taken
/// by its `sigwait` thread), from /proc/PID/status.
fn signal_pending(pid: u32, signal: Signal) -> bool {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else { return false };
    let mask = status
        .lines()
        .find_map(|l| l.strip_prefix("ShdPnd:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .unwrap_or(0);
    mask & (1 << (signal as u32 - 1)) != 0
}

#[test]
fn second_sigint_kills_at_once() {
    // Without --no-check, a worker mode first computes seq's C in the
    // coordinator as the reference to compare against; on 5000×5000 i64
    // (250 G operations, about 7 s even on the fast exact path) that keeps
    // it busy in its own computation, with no worker and no check for
    // signals, for far longer than the test. So the first SIGINT cannot end it by
    // itself before the forced stop 2 s later (signals::FORCE_AFTER); a
    // second SIGINT must end it at once.
    let dir = TestDir::new("fail-second-sigint");
    let mut bg =
        dir.matmul().args(["--mode", "memmap", "--processes", "2", "--size", "5000", "--dtype", "i64"]).spawn();
    // The banner comes after the signal handler is installed and the run
    // folder made, just before the inputs are made and the reference
    // computed.
    bg.wait_for_line(Stream::Stdout, "procjob matmul:", READY);
    let first = Instant::now();
    bg.signal(Signal::SIGINT);
    // Standard signals do not queue: send the second only once the signal
    // thread has taken the first, or both would count as one. There is no
    // event for that to wait on, so watch the pending mask.
    while signal_pending(bg.pid, Signal::SIGINT) {
        assert!(first.elapsed() < GONE, "{}: the first SIGINT was never taken", bg.command);
        std::thread::yield_now();
    }
    bg.signal(Signal::SIGINT);
    bg.wait_exit(RUN);
    let took = first.elapsed();
    let run = bg.finish(RUN);
    assert_no_workers_left(run.pid, &[], &run.command);
    let run = run.assert_code(130);
    assert_mentions(&run, &["stopped by SIGINT"]);
    assert!(
        took < Duration::from_millis(1500),
        "{}: took {took:?} to stop after two SIGINTs; the second should stop it at once, well before \
         the forced stop 2 s after the first",
        run.command
    );
}

#[test]
fn coordinator_sigkill_makes_workers_exit_and_next_run_sweeps_its_folder() {
    let dir = TestDir::new("fail-sigkill");
    // The run to be killed: not expect_clean, its folder is meant to stay.
    let mut first = Procjob::new();
    first
        .arg("matmul")
        .arg("--temp-folder")
        .arg(dir.tmp())
        .args(["--size", "100", "--blocks", "4", "--processes", "2", "--mode", "memmap"])
        .env(FAULT_ENV, "hang@30");
    let mut bg = first.spawn();
    let hung = wait_hanging(&mut bg);
    let workers = live_workers_of(bg.pid);
    assert!(workers.contains(&hung) && workers.len() == 2, "{}: workers {workers:?}, hanging {hung}", bg.command);
    let folders = run_folders_in(dir.tmp());
    let prefix = format!("procjob-{}-", bg.pid);
    assert!(
        folders.len() == 1 && file_name(&folders[0]).starts_with(&prefix),
        "{}: expected one run folder {prefix}*, found {folders:?}",
        bg.command
    );
    let dead_folder = folders[0].clone();

    bg.signal(Signal::SIGKILL);
    let status = bg.wait_exit(RUN);
    assert_eq!(std::os::unix::process::ExitStatusExt::signal(&status), Some(libc::SIGKILL), "{}", bg.command);
    for &w in &workers {
        assert!(
            wait_process_gone(w, GONE),
            "{}: worker {w} still runs {GONE:?} after its coordinator was killed (no parent-death signal?)",
            bg.command
        );
    }
    let killed = bg.finish(RUN);
    assert_no_workers_left(killed.pid, &workers, &killed.command);
    assert!(dead_folder.is_dir(), "{}: a SIGKILLed coordinator cannot remove its folder", killed.command);

    // A second run that stays alive (hangs) in the same parent. Starting,
    // it sweeps the dead coordinator's folder (a new run sweeps before it
    // makes its own folder).
    let mut live = faulty(&dir, "hang@30").spawn();
    let live_hung = wait_hanging(&mut live);
    let live_prefix = format!("procjob-{}-", live.pid);
    let live_folder = run_folders_in(dir.tmp())
        .into_iter()
        .find(|f| file_name(f).starts_with(&live_prefix))
        .unwrap_or_else(|| panic!("{}: no run folder {live_prefix}* in {}", live.command, dir.tmp().display()));
    assert!(!dead_folder.exists(), "{}: did not sweep {}", live.command, file_name(&dead_folder));

    // Another stale folder of the dead coordinator, with a file in it and
    // procjob's lock file (free), for the third run to find next to the
    // live run's folder.
    let stale = dir.tmp().join(format!("procjob-{}-staleFoldr", killed.pid));
    std::fs::create_dir(&stale).unwrap();
    std::fs::write(stale.join(procjob::run_folder::LOCK_FILE), procjob::run_folder::LOCK_FILE_HEADER).unwrap();
    std::fs::write(stale.join("memmap-A-1.npy"), b"left behind").unwrap();

    // A third, normal run sweeps the dead coordinator's folder, never the
    // live one's.
    let mut third = Procjob::new();
    third.arg("matmul").arg("--temp-folder").arg(dir.tmp()).args(["--size", "50", "--processes", "2"]);
    third.args(["--mode", "memmap"]);
    let run = third.spawn().finish(RUN);
    assert_no_workers_left(run.pid, &pids_named(&run.stderr), &run.command);
    let run = run.assert_ok();
    assert!(!stale.exists(), "{}: the dead coordinator's folder {} was not swept", run.command, file_name(&stale));
    assert!(live_folder.is_dir(), "{}: the live run's folder {} was removed", run.command, file_name(&live_folder));
    assert!(
        std::fs::read_dir(&live_folder).unwrap().next().is_some(),
        "{}: the live run's folder was emptied",
        run.command
    );
    assert_eq!(run_folders_in(dir.tmp()), vec![live_folder.clone()], "{}", run.command);

    // The live run still stops cleanly (and its run checks the parent is empty).
    live.signal_group(Signal::SIGINT);
    let run = live.finish(RUN);
    assert_no_workers_left(run.pid, &[live_hung], &run.command);
    run.assert_code(130);
}

fn file_name(p: &Path) -> String {
    p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

#[test]
fn worker_writing_garbage_is_a_clear_protocol_error() {
    let dir = TestDir::new("fail-garbage");
    let run = run_checked(&faulty(&dir, "garbage@30")).assert_code(1);
    assert!(
        run.stderr.contains("bad frame magic") || run.stderr.contains("lost contact"),
        "{}: the message does not say the stream broke:\n{}",
        run.command,
        run.stderr
    );
    assert_mentions(&run, &["worker ", "(pid "]);
    worker_pid_named(&run);
}

/// A worker that names an address it does not map for a lent result: the
/// coordinator's copy out of its memory fails, and the run stops with that
/// said about that worker, as for any broken stream.
#[test]
fn a_result_lent_at_a_bad_address_is_a_clear_error() {
    if util::lending_forbidden() {
        return;
    }
    let dir = TestDir::new("fail-lent");
    let mut cmd = faulty(&dir, "lent@30");
    cmd.env("PROCJOB_LEND", "1");
    let run = run_checked(&cmd).assert_code(1);
    assert_mentions(&run, &["lent at 0x8 from the worker's memory", "worker ", "(pid "]);
    worker_pid_named(&run);
}

/// A worker gone after answering and before its lent result was read:
/// the coordinator's copy out of its memory finds no process (`ESRCH`),
/// which is a worker lost mid-reply. With `--retries` the block runs again
/// on a fresh worker and C is right; without, the run fails naming the
/// worker, how it ended and the rows, and writes no C. The `lent-exit`
/// fault makes the worker exit as soon as its reply is out, and the
/// coordinator (same test feature) wait for that exit before reading, so
/// the read finds it gone every time. Blocks of 512 × 1024 `i64` (4 MiB)
/// are large enough to be lent.
#[test]
fn a_worker_gone_before_its_lent_result_was_read_is_lost_mid_reply() {
    if util::lending_forbidden() {
        return;
    }
    let dir = TestDir::new("fail-lent-exit");
    let (m, k, n) = (1024, 8, 1024);
    let expected = matmul_ref(&pattern_a::<i64>(m, k), &pattern_b::<i64>(k, n));
    let lent_exit = |marker: &Path| {
        let mut cmd = dir.matmul();
        cmd.args(["--shape", &format!("{m}x{k}x{n}"), "--blocks", "2", "--processes", "2", "--mode", "memmap"])
            .env(FAULT_ENV, format!("lent-exit@600@once={}", marker.display()))
            .env("PROCJOB_LEND", "1");
        cmd
    };
    // The pid the fault fired in, from its marker; that process is gone.
    let fired_in = |run: &Run, marker: &Path| {
        let held = std::fs::read_to_string(marker)
            .unwrap_or_else(|e| panic!("{}: the fault never fired (marker {}: {e})", run.command, marker.display()));
        let pid: i32 = held.trim().parse().unwrap_or_else(|_| panic!("{}: marker holds {held:?}", run.command));
        assert!(wait_process_gone(pid, GONE), "{}: worker {pid} outlived the run", run.command);
        pid
    };

    let marker = dir.file("lent-exit-retried");
    let out = dir.file("c.npy");
    let mut cmd = lent_exit(&marker);
    cmd.args(["--retries", "1", "--json", "--out"]).arg(&out);
    let run = run_checked(&cmd).assert_ok();
    let pid = fired_in(&run, &marker);
    assert_bits_eq(&read_npy_i64(&out), &expected, &run.command);
    let loss = format!("worker 1 (pid {pid}) exited with code 7 while running task 1 (rows 512..1024)");
    assert_mentions(&run, &[&format!("procjob: memmap: {loss}; ran it again on a fresh worker (--retries)")]);
    // The JSON line says the same loss.
    let lines = run.json_lines();
    assert_eq!(lines[0]["lost"], serde_json::json!([loss]), "{}", run.command);

    let marker = dir.file("lent-exit-no-retries");
    let out = dir.file("c-no-retries.npy");
    let mut cmd = lent_exit(&marker);
    cmd.arg("--out").arg(&out);
    let run = run_checked(&cmd).assert_code(1);
    let pid = fired_in(&run, &marker);
    assert_mentions(&run, &["exited with code 7", "rows 512..1024"]);
    assert_eq!(worker_pid_named(&run), pid, "{}: another worker is named", run.command);
    assert!(!out.exists(), "{}: C was written by a failed run", run.command);
}

/// A `.npy` file from a header dict written by hand (format 1.0: magic,
/// version, u16 length, the dict padded with spaces to a multiple of 64
/// bytes with a final newline) and `data_len` zero bytes.
fn hand_npy(path: &Path, dict: &str, data_len: usize) -> PathBuf {
    let unpadded = 10 + dict.len() + 1;
    let total = unpadded.div_ceil(64) * 64;
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    bytes.extend_from_slice(&u16::try_from(total - 10).expect("a short header").to_le_bytes());
    bytes.extend_from_slice(dict.as_bytes());
    bytes.resize(total - 1, b' ');
    bytes.push(b'\n');
    bytes.resize(total + data_len, 0);
    std::fs::write(path, bytes).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
    path.to_path_buf()
}

/// A `.npy` file from `npy::encode_header` and `data_len` zero bytes.
fn encoded_npy(path: &Path, dtype: DType, shape: &[usize], data_len: usize) -> PathBuf {
    let mut bytes = npy::encode_header(dtype, shape);
    bytes.resize(bytes.len() + data_len, 0);
    std::fs::write(path, bytes).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
    path.to_path_buf()
}

fn dict(descr: &str, fortran: bool, shape: &str) -> String {
    let order = if fortran { "True" } else { "False" };
    format!("{{'descr': '{descr}', 'fortran_order': {order}, 'shape': {shape}, }}")
}

#[test]
fn bad_input_files_are_refused_before_any_worker_starts() {
    let dir = TestDir::new("fail-bad-input");
    let good_b = dir.file("b.npy");
    write_npy(&good_b, &Matrix::<f64>::from_fn(4, 2, |i, j| (i + j) as f64));
    let good_a = dir.file("a.npy");
    write_npy(&good_a, &Matrix::<f64>::from_fn(3, 4, |i, j| (i * j) as f64));

    let missing = dir.file("missing.npy");
    let text = dir.file("notes.npy");
    std::fs::write(&text, "3 4\n1 2 3 4\n").unwrap();
    let object = hand_npy(&dir.file("object.npy"), &dict("|O", false, "(3, 4)"), 3 * 4 * 8);
    let complex = hand_npy(&dir.file("complex.npy"), &dict("<c16", false, "(3, 4)"), 3 * 4 * 16);
    let int32 = hand_npy(&dir.file("int32.npy"), &dict("<i4", false, "(3, 4)"), 3 * 4 * 4);
    let big_endian = hand_npy(&dir.file("big-endian.npy"), &dict(">f8", false, "(3, 4)"), 3 * 4 * 8);
    let fortran = hand_npy(&dir.file("fortran.npy"), &dict("<f8", true, "(3, 4)"), 3 * 4 * 8);
    // A valid file cut short: its header promises more bytes than are there.
    let truncated = dir.file("truncated.npy");
    write_npy(&truncated, &Matrix::<f64>::from_fn(3, 4, |i, j| (i + j) as f64));
    let len = std::fs::metadata(&truncated).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&truncated).unwrap().set_len(len - 8).unwrap();
    let wide = dir.file("wide.npy");
    write_npy(&wide, &Matrix::<f64>::from_fn(3, 5, |i, j| (i + j) as f64));
    let single = dir.file("a-f32.npy");
    write_npy(&single, &Matrix::<f32>::from_fn(3, 4, |i, j| (i + j) as f32));
    let one_d = encoded_npy(&dir.file("one-d.npy"), DType::F64, &[12], 12 * 8);
    let three_d = encoded_npy(&dir.file("three-d.npy"), DType::F64, &[2, 3, 4], 24 * 8);
    // A 1-D header written by hand too.
    let one_d_hand = hand_npy(&dir.file("one-d-hand.npy"), &dict("<f8", false, "(4,)"), 4 * 8);

    // (A, extra arguments, what the message must mention besides A's path,
    // and whether A's path must be in it)
    let cases: Vec<(&Path, &[&str], Vec<&str>, bool)> = vec![
        (&missing, &[], vec!["No such file"], true),
        (&text, &[], vec!["not an accepted .npy file", "magic"], true),
        (&object, &[], vec!["unsupported dtype", "'|O'", "'<f8'"], true),
        (&complex, &[], vec!["unsupported dtype", "'<c16'", "'<f8'"], true),
        (&int32, &[], vec!["unsupported dtype", "'<i4'", "'<i8'", "'<f8'", "'<f4'"], true),
        (&big_endian, &[], vec!["big-endian", "'>f8'", "'<f8'"], true),
        (&fortran, &[], vec!["Fortran"], true),
        (&truncated, &[], vec!["bytes", "truncated"], true),
        (&wide, &[], vec!["inner dimensions", "3×5", "4×2"], true),
        (&single, &[], vec!["same dtype", "f32", "f64"], true),
        // The message names the dtypes, not the file: the file is fine.
        (&good_a, &["--dtype", "f32"], vec!["--dtype", "disagrees", "f64"], false),
        (&one_d, &[], vec!["1-D", "2-D"], true),
        (&one_d_hand, &[], vec!["1-D", "2-D"], true),
        (&three_d, &[], vec!["3-D", "2-D"], true),
    ];
    let out = dir.file("never.npy");
    for (a, extra, needles, names_a) in cases {
        let mut cmd = dir.matmul();
        cmd.args(["--mode", "memmap", "--processes", "2", "--a"])
            .arg(a)
            .arg("--b")
            .arg(&good_b)
            .args(extra)
            .arg("--out")
            .arg(&out);
        let run = cmd.run();
        assert_no_workers_left(run.pid, &[], &run.command);
        let run = run.assert_code(2);
        // The banner (naming the run folder) comes before any worker starts.
        assert!(run.stdout.is_empty(), "{}: the run got as far as printing:\n{}", run.command, run.stdout);
        if names_a {
            assert_mentions(&run, &[&a.display().to_string()]);
        }
        assert_mentions(&run, &needles);
        assert!(!out.exists(), "{}: --out was written", run.command);
    }
}

#[test]
fn bad_options_exit_2_with_a_clear_message() {
    let dir = TestDir::new("fail-bad-options");
    let plain_file = dir.file("plain-file");
    std::fs::write(&plain_file, "not a folder").unwrap();
    let missing_dir = dir.file("no-such-folder");
    let good = dir.file("a.npy");
    write_npy(&good, &Matrix::<f64>::from_fn(3, 3, |i, j| (i + j) as f64));
    let out_in_missing = missing_dir.join("c.npy");
    let (plain_s, missing_s, good_s, out_s) = (
        plain_file.to_str().unwrap(),
        missing_dir.to_str().unwrap(),
        good.to_str().unwrap(),
        out_in_missing.to_str().unwrap(),
    );

    // (arguments after `matmul --mode memmap`, whether to add
    // --temp-folder <tmp>, what the message must mention)
    let cases: Vec<(Vec<&str>, bool, Vec<&str>)> = vec![
        (vec!["--processes", "0", "--size", "10"], true, vec!["--processes 0", "at least one"]),
        (vec!["--processes", "2", "--size", "10", "--temp-folder", missing_s], false, vec!["temp folder", missing_s]),
        (
            vec!["--processes", "2", "--size", "10", "--temp-folder", plain_s],
            false,
            vec!["temp folder", plain_s, "not a directory"],
        ),
        (vec!["--processes", "2", "--size", "10", "--out", out_s], true, vec!["--out", missing_s, "does not exist"]),
        (vec!["--processes", "2", "--a", good_s], true, vec!["--b"]),
        (vec!["--processes", "2", "--size", "10", "--timeout", "0"], true, vec!["--timeout 0", "positive"]),
    ];
    for (args, temp_folder, needles) in cases {
        let mut cmd = if temp_folder { dir.matmul() } else { fresh(&dir) };
        cmd.args(["--mode", "memmap"]).args(&args);
        let run = cmd.run();
        assert_no_workers_left(run.pid, &[], &run.command);
        let run = run.assert_code(2);
        assert!(run.stdout.is_empty(), "{}: the run got as far as printing:\n{}", run.command, run.stdout);
        assert_mentions(&run, &needles);
        assert!(!missing_dir.exists(), "{}: {} was created", run.command, missing_s);
        assert!(plain_file.is_file(), "{}: {} was changed", run.command, plain_s);
    }
}

/// `procjob matmul` with no `--temp-folder`, checking `dir`'s temp parent
/// stays clean anyway.
fn fresh(dir: &TestDir) -> Procjob {
    let mut cmd = Procjob::new();
    cmd.arg("matmul").expect_clean(dir.tmp());
    cmd
}

#[test]
fn more_workers_than_rows_is_fine() {
    let dir = TestDir::new("fail-more-workers");
    let out = dir.file("c.npy");
    let mut cmd = dir.matmul();
    cmd.args(["--size", "3", "--processes", "5", "--mode", "all", "--out"]).arg(&out);
    let run = run_checked(&cmd).assert_ok();
    assert_bits_eq(&read_npy_i64(&out), &pattern_c(3), &run.command);
}

#[test]
fn not_enough_room_fails_before_workers_start() {
    let dir = TestDir::new("fail-room");
    // 300000² f64 in every mode: A and B dumps and a C file, terabytes.
    let free = nix::sys::statvfs::statvfs(dir.tmp())
        .map(|s| s.blocks_available().saturating_mul(s.fragment_size()))
        .unwrap_or(0);
    let needs = 3 * 300_000u64 * 300_000 * 8;
    if free >= needs {
        eprintln!("not_enough_room_fails_before_workers_start: skipped, {} has {free} bytes free", dir.tmp().display());
        return;
    }
    let mut cmd = dir.matmul();
    cmd.args(["--size", "300000", "--dtype", "f64", "--processes", "2"]);
    let started = Instant::now();
    let run = cmd.spawn().finish(RUN);
    let took = started.elapsed();
    assert_no_workers_left(run.pid, &[], &run.command);
    let run = run.assert_code(2);
    assert_mentions(&run, &["needs", "free", &dir.tmp().display().to_string()]);
    // Refused up front: no banner, no inputs made (they alone would take
    // minutes and terabytes), no folder (checked by the run).
    assert!(run.stdout.is_empty(), "{}: the run got as far as printing:\n{}", run.command, run.stdout);
    assert!(took < Duration::from_secs(10), "{}: took {took:?} to refuse", run.command);
}

#[test]
fn temp_files_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = TestDir::new("fail-private");
    let mut bg = faulty(&dir, "hang@30").spawn();
    let hung = wait_hanging(&mut bg);
    // The inputs are dumped before any task is sent, so they are there now.
    let folders = run_folders_in(dir.tmp());
    let prefix = format!("procjob-{}-", bg.pid);
    assert!(
        folders.len() == 1 && file_name(&folders[0]).starts_with(&prefix),
        "{}: expected one run folder {prefix}*, found {folders:?}",
        bg.command
    );
    let folder = &folders[0];
    let mode = std::fs::symlink_metadata(folder).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode, 0o700, "{}: run folder {} has mode {mode:o}", bg.command, folder.display());
    let mut files = 0;
    for entry in std::fs::read_dir(folder).unwrap() {
        let entry = entry.unwrap();
        let meta = entry.path().symlink_metadata().unwrap();
        let mode = meta.permissions().mode() & 0o7777;
        assert!(meta.is_file(), "{}: {} is not a plain file", bg.command, entry.path().display());
        assert_eq!(mode, 0o600, "{}: {} has mode {mode:o}", bg.command, entry.path().display());
        files += 1;
    }
    assert!(files >= 2, "{}: memmap mode dumped only {files} file(s) in {}", bg.command, folder.display());
    bg.signal_group(Signal::SIGINT);
    let run = bg.finish(RUN);
    assert_no_workers_left(run.pid, &[hung], &run.command);
    run.assert_code(130);
}
