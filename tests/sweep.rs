//! The stale-folder sweep through the real binary: a run removes only
//! folders that are provably procjob's and provably abandoned (its name,
//! its lock file, and that lock free), never a user's folder with a
//! procjob-like name, and never the folder of a run that lives, even in
//! another PID namespace where its pid means nothing (docs/failures.md,
//! src/store.rs).

mod util;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use nix::fcntl::{Flock, FlockArg};
use nix::sys::signal::Signal;
use procjob::run_folder::{LOCK_FILE, LOCK_FILE_HEADER};
use procjob_worker::testkinds::FAULT_ENV;
use util::{assert_no_workers_left, live_workers_of, pids_named, run_folders_in, Procjob, Run, Stream, TestDir, BIN};

const RUN: Duration = Duration::from_secs(60);
const READY: Duration = Duration::from_secs(30);

/// `procjob matmul --size 50 --mode seq --temp-folder <parent>`, to its end.
fn seq_run(parent: &Path) -> Run {
    let mut cmd = Procjob::new();
    cmd.arg("matmul").arg("--temp-folder").arg(parent).args(["--size", "50", "--mode", "seq"]);
    cmd.run().assert_ok()
}

/// A folder `parent/name` holding `file` and, when `lock` is true, a lock
/// file as procjob writes it (its header), which nothing holds.
fn folder(parent: &Path, name: &str, lock: bool, file: &str) -> PathBuf {
    let dir = parent.join(name);
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join(file), b"precious").unwrap();
    if lock {
        std::fs::write(dir.join(LOCK_FILE), format!("{LOCK_FILE_HEADER}pid 2147483646\n")).unwrap();
    }
    dir
}

fn names_in(parent: &Path) -> Vec<String> {
    let mut v: Vec<String> =
        std::fs::read_dir(parent).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

#[test]
fn a_users_folder_with_a_procjob_like_name_survives_a_run() {
    let dir = TestDir::new("sweep-user");
    let parent = dir.tmp();
    // The reproduction of issue 19: a user's own folder.
    let user = folder(parent, "procjob-2024-results", false, "data.csv");
    // Names whose "pid" has a sign or a leading zero are not procjob's,
    // even with procjob's lock file in them.
    let signed = folder(parent, "procjob-+99994-x", true, "data.csv");
    let zero = folder(parent, "procjob-099993-x", true, "data.csv");
    // A folder of procjob's form without the lock file: an older version's
    // or a user's; never removed.
    let old = folder(parent, "procjob-2147483646-oldVersion", false, "memmap-A-1.npy");
    let run = seq_run(parent);
    for kept in [&user, &signed, &zero] {
        assert_eq!(std::fs::read(kept.join("data.csv")).unwrap(), b"precious", "{}: {}", run.command, kept.display());
    }
    assert!(old.join("memmap-A-1.npy").is_file(), "{}", run.command);
    assert_eq!(
        names_in(parent),
        ["procjob-+99994-x", "procjob-099993-x", "procjob-2024-results", "procjob-2147483646-oldVersion"],
        "{}",
        run.command
    );
}

#[test]
fn a_dead_runs_folder_is_swept_and_a_locked_one_kept_whatever_its_pid() {
    let dir = TestDir::new("sweep-lock");
    let parent = dir.tmp();
    // Both name a pid that exists nowhere (above the kernel's maximum).
    let dead = folder(parent, "procjob-2147483646-deadRun001", true, "memmap-A-1.npy");
    let live = folder(parent, "procjob-2147483646-liveRun001", true, "memmap-A-1.npy");
    // This test process holds the live one's lock, as its run would.
    let held = Flock::lock(File::open(live.join(LOCK_FILE)).unwrap(), FlockArg::LockExclusiveNonblock).unwrap();
    let run = seq_run(parent);
    assert!(!dead.exists(), "{}: the dead run's folder was not swept", run.command);
    assert!(live.join("memmap-A-1.npy").is_file(), "{}: the locked folder was swept", run.command);
    assert_eq!(names_in(parent), ["procjob-2147483646-liveRun001"], "{}", run.command);
    // Its run gone (the lock released), the next run sweeps it.
    drop(held);
    let run = seq_run(parent);
    assert_eq!(names_in(parent), Vec::<String>::new(), "{}", run.command);
}

/// Whether `unshare --pid --fork --mount-proc` works here; prints why not.
fn unshare_works() -> bool {
    match Command::new("unshare").args(["--pid", "--fork", "--mount-proc", "true"]).stderr(Stdio::piped()).output() {
        Ok(out) if out.status.success() => true,
        Ok(out) => {
            println!(
                "skipped: unshare --pid --fork --mount-proc is not permitted here ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
            false
        }
        Err(e) => {
            println!("skipped: cannot run unshare: {e}");
            false
        }
    }
}

#[test]
fn a_live_run_in_another_pid_namespace_keeps_its_folder() {
    if !unshare_works() {
        return;
    }
    let dir = TestDir::new("sweep-pidns");
    // The live run: its task 1 hangs, so it is surely under way and stays.
    let mut cmd = dir.matmul();
    cmd.args(["--size", "100", "--blocks", "4", "--processes", "2", "--mode", "memmap"]).env(FAULT_ENV, "hang@30");
    let mut live = cmd.spawn();
    let line = live.wait_for_line(Stream::Stderr, "procjob-test: hanging in pid", READY);
    let mut workers = live_workers_of(live.pid);
    workers.extend(pids_named(&line));
    let prefix = format!("procjob-{}-", live.pid);
    let folders = run_folders_in(dir.tmp());
    assert!(
        folders.len() == 1 && folders[0].file_name().unwrap().to_string_lossy().starts_with(&prefix),
        "{}: expected one run folder {prefix}*, found {folders:?}",
        live.command
    );
    let live_folder = folders[0].clone();
    let live_files = names_in(&live_folder);
    // A dead run's folder beside it, to show the inner run does sweep.
    let dead = folder(dir.tmp(), "procjob-2147483646-deadRun002", true, "memmap-A-1.npy");

    // In a new PID namespace the live run's pid does not exist (with a /proc
    // of its own, nothing of the outer namespace shows).
    let unshare = |args: &[&std::ffi::OsStr]| {
        Command::new("unshare")
            .args(["--pid", "--fork", "--mount-proc"])
            .args(args)
            .env_remove(util::TEMP_FOLDER_ENV)
            .stdin(Stdio::null())
            .output()
            .expect("cannot run unshare")
    };
    let probe = format!("test -e /proc/{}", live.pid);
    let seen = unshare(&["sh".as_ref(), "-c".as_ref(), probe.as_ref()]);
    assert!(!seen.status.success(), "pid {} is visible inside the new PID namespace", live.pid);
    let inner = unshare(&[
        BIN.as_ref(),
        "matmul".as_ref(),
        "--size".as_ref(),
        "50".as_ref(),
        "--mode".as_ref(),
        "seq".as_ref(),
        "--temp-folder".as_ref(),
        dir.tmp().as_os_str(),
    ]);
    assert!(
        inner.status.success(),
        "procjob in a new PID namespace failed ({}):\n{}",
        inner.status,
        String::from_utf8_lossy(&inner.stderr)
    );
    assert!(!dead.exists(), "the run in the new PID namespace did not sweep the dead run's folder");
    assert_eq!(
        names_in(&live_folder),
        live_files,
        "the run in the new PID namespace touched the live run's folder {}",
        live_folder.display()
    );
    assert_eq!(run_folders_in(dir.tmp()), vec![live_folder.clone()]);

    // The live run is unharmed: it still stops cleanly, removing its folder
    // (the run checks that its temp parent is empty afterwards).
    live.signal_group(Signal::SIGINT);
    let run = live.finish(RUN);
    assert_no_workers_left(run.pid, &workers, &run.command);
    run.assert_code(130);
}
