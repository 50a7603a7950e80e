//! Signals that would end `procjob`, end to end: every one it takes stops
//! the workers, removes the run folder, and exits 128 + its number with one
//! line naming it; a signal ignored at start stays ignored; a SIGBUS from
//! an input truncated while the coordinator reads it names the file
//! (docs/failures.md).
//!
//! Nothing waits with a fixed sleep: the tests wait for the banner line
//! (printed once the run folder is made and the inputs are mapped), for
//! the workers to show in /proc, and on pidfds.

mod util;

use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use procjob::signals::{signal_name, terminating_signals};
use procjob_worker::testkinds::FAULT_ENV;
use util::{assert_no_workers_left, live_workers_of, pids_named, write_npy, Background, Matrix, Run, Stream, TestDir};

/// Longest a run may take to end once signalled.
const RUN: Duration = Duration::from_secs(60);
/// Longest to wait for a run to get under way (a busy machine).
const READY: Duration = Duration::from_secs(30);
/// Workers each run starts.
const PROCESSES: usize = 2;

/// Sends signal number `n` (real-time ones included) to process `pid`.
fn send(pid: u32, n: i32) {
    // SAFETY: kill takes two integers and touches no memory of ours.
    let r = unsafe { libc::kill(pid as i32, n) };
    assert_eq!(r, 0, "cannot send {} to {pid}: {}", signal_name(n), std::io::Error::last_os_error());
}

/// Waits for the banner, printed once the run folder exists and the inputs
/// are ready.
fn wait_banner(bg: &mut Background) {
    bg.wait_for_line(Stream::Stdout, "procjob matmul:", READY);
}

/// Waits until `count` workers of the run show in /proc, and returns them.
fn wait_workers(bg: &Background, count: usize) -> Vec<i32> {
    let start = Instant::now();
    loop {
        let workers = live_workers_of(bg.pid);
        if workers.len() >= count {
            return workers;
        }
        assert!(start.elapsed() < READY, "{}: {count} workers did not start ({workers:?})", bg.command);
        std::thread::yield_now();
    }
}

/// Asserts that stderr is exactly one line saying the run was stopped by
/// `n` (either as the pool unwinds, "workers stopped", or at once,
/// "workers killed").
#[track_caller]
fn assert_one_stop_line(run: &Run, n: i32) {
    let name = signal_name(n);
    let lines: Vec<&str> = run.stderr.lines().collect();
    let ok = lines.len() == 1
        && [
            format!("procjob: stopped by {name}; workers stopped, temp folder removed"),
            format!("procjob: stopped by {name}; workers killed, temp folder removed"),
        ]
        .iter()
        .any(|l| l == lines[0]);
    assert!(ok, "{}: stderr is not one line saying it was stopped by {name}:\n{}", run.command, run.stderr);
}

#[test]
fn every_terminating_signal_stops_workers_removes_the_folder_and_exits_128_plus_n() {
    // Each taken signal, and SIGBUS sent with kill (a fault's SIGBUS is
    // the test below).
    let mut signals = terminating_signals();
    signals.push(libc::SIGBUS);
    for n in signals {
        let dir = TestDir::new("signal");
        // A memmap run far longer than the test, in its own temp parent
        // (which the run checks is empty again after the exit).
        let mut bg = dir
            .matmul()
            .args(["--size", "120", "--mode", "memmap", "--repeat", "100000000", "--quiet"])
            .args(["--processes", &PROCESSES.to_string()])
            .spawn();
        wait_banner(&mut bg);
        let mut workers = wait_workers(&bg, PROCESSES);
        send(bg.pid, n);
        let run = bg.finish(RUN);
        workers.extend(pids_named(&run.stderr));
        assert_no_workers_left(run.pid, &workers, &run.command);
        let run = run.assert_code(128 + n);
        assert_one_stop_line(&run, n);
        println!("{}: exit {}, folder removed, workers gone ... ok", signal_name(n), 128 + n);
    }
}

#[test]
fn a_signal_ignored_at_start_stays_ignored() {
    // As under nohup: SIGHUP is ignored when procjob starts, so it must not
    // stop the run. A task hangs so the run is surely under way.
    let dir = TestDir::new("signal-ignored");
    let mut cmd = dir.matmul();
    cmd.args(["--size", "100", "--blocks", "4", "--processes", "2", "--mode", "memmap"])
        .env(FAULT_ENV, "hang@30")
        .ignore_signal(libc::SIGHUP);
    let mut bg = cmd.spawn();
    let line = bg.wait_for_line(Stream::Stderr, "procjob-test: hanging in pid", READY);
    let mut workers = live_workers_of(bg.pid);
    workers.extend(pids_named(&line));
    // An ignored signal that is not blocked is discarded when it is sent.
    send(bg.pid, libc::SIGHUP);
    bg.signal(Signal::SIGTERM);
    let run = bg.finish(RUN);
    assert_no_workers_left(run.pid, &workers, &run.command);
    // Had SIGHUP been taken, the first signal would be SIGHUP (exit 129),
    // or SIGTERM, second, would have stopped it at once ("workers killed").
    let run = run.assert_code(143);
    assert_eq!(
        run.stderr.lines().last(),
        Some("procjob: stopped by SIGTERM; workers stopped, temp folder removed"),
        "{}:\n{}",
        run.command,
        run.stderr
    );
}

/// Writes the f64 n×n matrices A and B (all ones) as .npy files in `dir`.
fn ones(dir: &TestDir, n: usize) -> (std::path::PathBuf, std::path::PathBuf) {
    let (a, b) = (dir.file("A.npy"), dir.file("B.npy"));
    write_npy(&a, &Matrix::from_fn(n, n, |_, _| 1.0f64));
    write_npy(&b, &Matrix::from_fn(n, n, |_, _| 1.0f64));
    (a, b)
}

/// Truncates `path` to 100 bytes (inside the .npy header), as
/// `open(f, 'r+b').truncate(100)` does.
fn truncate(path: &Path) {
    std::fs::OpenOptions::new().write(true).open(path).unwrap().set_len(100).unwrap();
}

#[test]
fn an_input_truncated_while_the_coordinator_reads_it_is_named() {
    // seq reads A on the coordinator's main thread, threads on several
    // threads at once (each may fault; one message).
    for mode in ["seq", "threads"] {
        let dir = TestDir::new("sigbus");
        let (a, b) = ones(&dir, 300);
        let a_canonical = std::fs::canonicalize(&a).unwrap();
        // The banner comes after A is mapped (and checked to be whole). From
        // then on the coordinator reads all of A in each repetition, and a
        // hundred million of them cannot end before the truncation: the read
        // is under way when A shrinks, and the pages past the new end are
        // taken out of the map, so the next read of them faults.
        let mut bg = dir
            .matmul()
            .arg("--a")
            .arg(&a)
            .arg("--b")
            .arg(&b)
            .args(["--mode", mode, "--repeat", "100000000", "--quiet", "--processes", "2"])
            .spawn();
        wait_banner(&mut bg);
        truncate(&a);
        let run = bg.finish(RUN);
        assert_no_workers_left(run.pid, &pids_named(&run.stderr), &run.command);
        let run = run.assert_code(1);
        let expected = format!(
            "procjob: error: {} changed while procjob was reading it (it was truncated or replaced; a mapped \
             input must not change during a run)\n",
            a_canonical.display()
        );
        assert_eq!(run.stderr, expected, "{}", run.command);
        println!("{mode}: SIGBUS names {} ... ok", a.display());
    }
}

#[test]
fn a_forked_worker_reading_a_truncated_input_still_dies_of_sigbus() {
    // Forked workers inherit the coordinator's SIGBUS handler and its map
    // of A. The handler must see it runs in a worker and let SIGBUS kill
    // it (the coordinator then names the worker and the signal), not park
    // the worker for good. With --no-check the coordinator itself does not
    // read A; the workers read all of A in every repetition.
    let dir = TestDir::new("sigbus-fork");
    let (a, b) = ones(&dir, 300);
    let mut bg = dir
        .matmul()
        .arg("--a")
        .arg(&a)
        .arg("--b")
        .arg(&b)
        .args(["--mode", "fork", "--no-check", "--repeat", "100000000", "--quiet", "--processes", "2"])
        .spawn();
    wait_banner(&mut bg);
    truncate(&a);
    let run = bg.finish(RUN);
    assert_no_workers_left(run.pid, &pids_named(&run.stderr), &run.command);
    let run = run.assert_code(1);
    assert!(
        run.stderr.starts_with("procjob: error: worker ")
            && run.stderr.contains(" was killed by SIGBUS while running task "),
        "{}: expected a worker killed by SIGBUS:\n{}",
        run.command,
        run.stderr
    );
}
