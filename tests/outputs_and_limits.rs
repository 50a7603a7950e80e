//! Failure handling, round two, through the real binary: sizes that
//! overflow, memory and process limits, output paths that are not plain
//! files, standard output that cannot be written, a temp folder that fills
//! up during the run, non-UTF-8 paths, and a coordinator paused past its
//! tasks' timeout. Each case checks the exit code, the message, and that no
//! run folder or worker is left.

mod util;

use std::os::unix::fs::{FileTypeExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use util::*;

const RUN: Duration = Duration::from_secs(60);

#[test]
fn sizes_that_overflow_are_refused_at_once_naming_them() {
    let dir = TestDir::new("limits-overflow");
    let cases: [(&[&str], &str); 4] = [
        (&["--size", "4294967296", "--mode", "seq"], "4294967296×4294967296"),
        (&["--shape", "2305843009213693952x1x1", "--mode", "seq"], "2305843009213693952×1"),
        (&["--size", "99999999999"], "99999999999×99999999999"),
        (&["--shape", "1x4611686018427387904x2", "--mode", "memmap"], "1×4611686018427387904"),
    ];
    for (args, shape) in cases {
        let mut cmd = dir.matmul();
        cmd.args(args);
        let started = Instant::now();
        let run = run_checked(&cmd).assert_code(2);
        assert_mentions(&run, &[shape, "more than one array can hold"]);
        assert!(run.stdout.is_empty(), "{}: got as far as printing:\n{}", run.command, run.stdout);
        assert!(started.elapsed() < Duration::from_secs(10), "{}: took {:?}", run.command, started.elapsed());
    }
}

/// `procjob matmul` with an address-space limit (as `ulimit -v`).
fn under_memory_limit(dir: &TestDir, bytes: u64, args: &[&str]) -> Run {
    let mut cmd = Command::new(BIN);
    cmd.arg("matmul").arg("--temp-folder").arg(dir.tmp()).args(args).stdin(Stdio::null());
    // SAFETY: setrlimit is async-signal-safe; nothing else runs before exec.
    unsafe {
        cmd.pre_exec(move || {
            nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_AS, bytes, bytes)
                .map_err(std::io::Error::from)
        });
    }
    let out = cmd.output().expect("run procjob");
    Run {
        command: format!("ulimit -v {} && procjob matmul {}", bytes / 1024, args.join(" ")),
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        pid: 0,
    }
}

#[test]
fn an_allocation_refused_by_a_memory_limit_is_a_clear_error() {
    let dir = TestDir::new("limits-memory");
    // 400 MB of address space: the binary runs, 4000² i64 (128 MB each for
    // A, B and C) does not fit.
    let run = under_memory_limit(&dir, 400 << 20, &["--size", "4000", "--mode", "seq", "--quiet"]);
    let run = run.assert_code(2);
    assert_mentions(&run, &["cannot allocate", "out of memory", "4000×4000 i64"]);
    assert!(!run.stderr.contains("panicked") && !run.stderr.contains("memory allocation of"), "{}", run.stderr);
    dir.assert_clean(&run.command);
}

#[test]
fn a_huge_timeout_is_refused_or_no_limit_never_a_panic() {
    let dir = TestDir::new("limits-timeout");
    for t in ["1e20", "1e300"] {
        let mut cmd = dir.matmul();
        cmd.args(["--size", "20", "--mode", "memmap", "--timeout", t]);
        let run = run_checked(&cmd).assert_code(2);
        assert_mentions(&run, &["--timeout", "too large"]);
    }
    // 1e19 s fits a Duration but not an Instant: no deadline at all.
    let mut cmd = dir.matmul();
    cmd.args(["--size", "20", "--mode", "memmap", "--timeout", "1e19", "--quiet"]);
    let run = run_checked(&cmd).assert_ok();
    assert!(!run.stderr.contains("panicked"), "{}", run.stderr);
}

#[test]
fn blocks_and_processes_above_the_rows_are_clamped_with_a_note() {
    let dir = TestDir::new("limits-clamp");
    let mut cmd = dir.matmul();
    cmd.args(["--size", "10", "--blocks", "100000", "--processes", "50", "--mode", "memmap"]);
    let run = run_checked(&cmd).assert_ok();
    assert_mentions(&run, &["--blocks 100000 is more than A's 10 rows; running 10 blocks"]);
    assert_mentions(&run, &["--processes 50 is more than A's 10 rows; 40 workers will idle"]);
    assert!(run.stdout.contains("50 processes, 10 blocks"), "{}: header:\n{}", run.command, run.stdout);
    let mut cmd = dir.matmul();
    cmd.args(["--size", "10", "--blocks", "100000", "--mode", "memmap"]);
    let reports = cmd.run_json();
    assert_eq!(reports[0]["blocks"], 10);
}

#[test]
fn out_writes_through_a_device_and_a_fifo_and_never_replaces_them() {
    let dir = TestDir::new("out-special");
    // A copy of /dev/null's node (as root), written through, still a node.
    let null = dir.file("null");
    let made = nix::sys::stat::mknod(
        &null,
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::from_bits_truncate(0o666),
        nix::sys::stat::makedev(1, 3),
    );
    match made {
        Ok(()) => {
            let mut cmd = dir.matmul();
            cmd.args(["--size", "30", "--mode", "copy", "--quiet", "--out"]).arg(&null);
            run_checked(&cmd).assert_ok();
            let kind = std::fs::symlink_metadata(&null).unwrap().file_type();
            assert!(kind.is_char_device(), "--out {}: the device node was replaced", null.display());
        }
        Err(e) => eprintln!("out_writes_through_a_device...: mknod not permitted ({e}); device case skipped"),
    }
    // A FIFO: a reader gets the .npy bytes; the FIFO stays a FIFO.
    let fifo = dir.file("c.fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let reader_path = fifo.clone();
    let reader = std::thread::spawn(move || std::fs::read(reader_path).unwrap());
    let mut cmd = dir.matmul();
    cmd.args(["--size", "30", "--mode", "memmap", "--quiet", "--out"]).arg(&fifo);
    let run = run_checked(&cmd);
    // Should the run not have opened the FIFO, a writer of our own ends the
    // reader's wait (opening without blocking fails once it has gone).
    if let Ok(unblock) = std::fs::OpenOptions::new().write(true).custom_flags(nix::libc::O_NONBLOCK).open(&fifo) {
        drop(unblock);
    }
    let bytes = reader.join().unwrap();
    run.assert_ok();
    assert!(bytes.starts_with(b"\x93NUMPY"), "the FIFO's reader got {} bytes, not a .npy", bytes.len());
    assert!(std::fs::symlink_metadata(&fifo).unwrap().file_type().is_fifo());
}

#[test]
fn out_keeps_a_replaced_files_mode_follows_links_and_refuses_folders() {
    let dir = TestDir::new("out-regular");
    let expected = matmul_ref(&pattern_a::<i64>(12, 12), &pattern_b::<i64>(12, 12));
    // A read-only file behind a symbolic link: the file is replaced with C
    // and keeps its mode; the link stays a link.
    let target = dir.file("c.npy");
    std::fs::write(&target, b"old").unwrap();
    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o640)).unwrap();
    let link = dir.file("link.npy");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let mut cmd = dir.matmul();
    cmd.args(["--size", "12", "--mode", "seq", "--quiet", "--out"]).arg(&link);
    run_checked(&cmd).assert_ok();
    assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink(), "the link was replaced");
    assert_bits_eq(&read_npy_i64(&target), &expected, "C written through the link");
    let mode = std::fs::metadata(&target).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode, 0o640, "the replaced file's mode");
    // A new file: 0666 less the umask, like np.save's.
    let new = dir.file("new.npy");
    let mut cmd = dir.matmul();
    cmd.args(["--size", "12", "--mode", "seq", "--quiet", "--out"]).arg(&new);
    run_checked(&cmd).assert_ok();
    let umask = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o022));
    nix::sys::stat::umask(umask);
    let mode = std::fs::metadata(&new).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o666 & !umask.bits(), "a new file's mode");
    // A dangling link and a folder are refused before any work.
    let dangling = dir.file("dangling.npy");
    std::os::unix::fs::symlink(dir.file("nowhere.npy"), &dangling).unwrap();
    let folder = dir.file("folder");
    std::fs::create_dir(&folder).unwrap();
    for (path, needle) in [(&dangling, "does not exist"), (&folder, "is a folder")] {
        for flag in ["--out", "--trace"] {
            let mut cmd = dir.matmul();
            cmd.args(["--size", "12", "--mode", "memmap", flag]).arg(path);
            let run = run_checked(&cmd).assert_code(2);
            assert_mentions(&run, &[flag, needle]);
            assert!(run.stdout.is_empty(), "{}: the run started:\n{}", run.command, run.stdout);
        }
    }
    assert!(dir.file("nowhere.npy").symlink_metadata().is_err(), "the dangling link's target was created");
}

#[test]
fn a_trace_that_cannot_be_written_does_not_lose_c() {
    let dir = TestDir::new("out-trace-fails");
    // /dev/full takes the open and fails every write, after the run.
    if !Path::new("/dev/full").exists() {
        eprintln!("a_trace_that_cannot_be_written...: no /dev/full; skipped");
        return;
    }
    let out = dir.file("c.npy");
    let mut cmd = dir.matmul();
    cmd.args(["--size", "40", "--mode", "memmap", "--quiet", "--trace", "/dev/full", "--out"]).arg(&out);
    let run = run_checked(&cmd).assert_code(1);
    assert_mentions(&run, &["--trace /dev/full"]);
    let expected = matmul_ref(&pattern_a::<i64>(40, 40), &pattern_b::<i64>(40, 40));
    assert_bits_eq(&read_npy_i64(&out), &expected, "C written although the trace failed");
}

#[test]
fn bench_plot_creates_its_folder() {
    let dir = TestDir::new("out-plot");
    let plots = dir.file("plots/new");
    let mut cmd = Procjob::new();
    cmd.args(["bench", "--sizes", "16", "--processes", "1", "--modes", "memmap", "--repeat", "1", "--warmup", "0"])
        .arg("--temp-folder")
        .arg(dir.tmp())
        .arg("--plot")
        .arg(&plots);
    let run = run_checked(&cmd).assert_ok();
    assert!(plots.join("speedup-16.svg").is_file(), "{}: no chart in {}", run.command, plots.display());
    dir.assert_clean(&run.command);
}

/// `procjob matmul --size 20 --mode seq --json` with stdout on `stdout`.
fn with_stdout(dir: &TestDir, stdout: Stdio) -> std::process::Output {
    Command::new(BIN)
        .args(["matmul", "--size", "20", "--mode", "memmap", "--json", "--temp-folder"])
        .arg(dir.tmp())
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(Stdio::piped())
        .output()
        .expect("run procjob")
}

#[test]
fn a_failed_write_to_stdout_is_an_error_but_a_closed_pipe_is_quiet() {
    let dir = TestDir::new("stdout");
    if let Ok(full) = std::fs::OpenOptions::new().write(true).open("/dev/full") {
        let out = with_stdout(&dir, Stdio::from(full));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "> /dev/full: {stderr}");
        assert!(stderr.contains("cannot write to standard output"), "> /dev/full: {stderr}");
        dir.assert_clean("> /dev/full");
    }
    // A pipe whose reader is gone before anything is written (`| head -0`).
    let (read, write) = nix::unistd::pipe().unwrap();
    drop(read);
    let out = with_stdout(&dir, Stdio::from(write));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "| (closed): {stderr}");
    assert!(stderr.is_empty(), "| (closed): {stderr}");
    dir.assert_clean("| (closed)");
}

#[test]
fn a_temp_folder_whose_name_is_not_utf8_works() {
    use std::os::unix::ffi::OsStrExt;
    let dir = TestDir::new("non-utf8");
    let odd = dir.tmp().join(std::ffi::OsStr::from_bytes(b"bad\xffx"));
    std::fs::create_dir(&odd).unwrap();
    let mut cmd = Procjob::new();
    cmd.args(["matmul", "--size", "50", "--mode", "memmap", "--blocks", "3", "--temp-folder"]).arg(&odd);
    let reports = cmd.expect_clean(&odd).run_json();
    assert_eq!(reports[0]["matches_seq"], true);
    std::fs::remove_dir(&odd).unwrap();
}

#[test]
fn threads_that_cannot_start_are_a_clear_error() {
    let dir = TestDir::new("limits-threads");
    let uid = nix::unistd::Uid::current();
    if !uid.is_root() {
        eprintln!("threads_that_cannot_start...: needs root to run as another user; skipped");
        return;
    }
    // As an unprivileged user (root ignores RLIMIT_NPROC) with room for the
    // main thread and the signal thread only.
    let nobody = nix::unistd::User::from_name("nobody").ok().flatten();
    let Some(nobody) = nobody else {
        eprintln!("threads_that_cannot_start...: no user nobody; skipped");
        return;
    };
    std::fs::set_permissions(dir.tmp(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let mut parent = dir.tmp().to_path_buf();
    while parent.pop() {
        if parent.starts_with(std::env::temp_dir()) && parent != std::env::temp_dir() {
            std::fs::set_permissions(&parent, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
    }
    let (user, group) = (nobody.uid, nobody.gid);
    let mut cmd = Command::new(BIN);
    cmd.args(["matmul", "--size", "200", "--mode", "threads", "--processes", "4", "--temp-folder"])
        .arg(dir.tmp())
        .stdin(Stdio::null());
    // SAFETY: setrlimit, setgid and setuid are async-signal-safe; nothing
    // else runs before exec.
    unsafe {
        cmd.pre_exec(move || {
            nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NPROC, 2, 2)
                .map_err(std::io::Error::from)?;
            nix::unistd::setgid(group).map_err(std::io::Error::from)?;
            nix::unistd::setuid(user).map_err(std::io::Error::from)
        });
    }
    let out = match cmd.output() {
        Ok(out) => out,
        Err(e) => {
            eprintln!("threads_that_cannot_start...: cannot start procjob as nobody ({e}); skipped");
            return;
        }
    };
    let stderr = String::from_utf8_lossy(&out.stderr);
    if stderr.contains("Permission denied") && out.status.code() == Some(2) {
        eprintln!("threads_that_cannot_start...: nobody cannot reach the test folder ({stderr}); skipped");
        return;
    }
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("cannot start thread") && !stderr.contains("panicked"), "{stderr}");
    dir.assert_clean("threads under RLIMIT_NPROC");
}

#[test]
fn a_paused_coordinator_does_not_time_out_tasks_that_answered() {
    let dir = TestDir::new("pause");
    let mut cmd = dir.matmul();
    cmd.args([
        "--size",
        "600",
        "--dtype",
        "f64",
        "--mode",
        "memmap",
        "--no-check",
        "--repeat",
        "200",
        "--timeout",
        "0.3",
        "--quiet",
    ]);
    let mut bg = cmd.spawn();
    bg.wait_for_line(Stream::Stdout, "procjob matmul:", RUN);
    // Ctrl-Z and `fg` three times, each pause well past the timeout (a task
    // takes milliseconds; the timeout leaves room for a loaded machine): the
    // pause is the stimulus here, not a wait for an event.
    for _ in 0..3 {
        bg.signal(Signal::SIGSTOP);
        std::thread::sleep(Duration::from_millis(1500));
        bg.signal(Signal::SIGCONT);
        std::thread::sleep(Duration::from_millis(100));
    }
    let run = bg.finish(RUN);
    assert_no_workers_left(run.pid, &pids_named(&run.stderr), &run.command);
    let run = run.assert_ok();
    assert!(!run.stderr.contains("timeout"), "{}", run.stderr);
}

/// A tmpfs of `bytes` mounted on a new folder, unmounted on drop.
struct Tmpfs(tempfile::TempDir);

impl Tmpfs {
    fn mount(bytes: u64) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().ok()?;
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}")])
            .arg("tmpfs")
            .arg(dir.path())
            .stderr(Stdio::null())
            .status()
            .ok()?;
        status.success().then_some(Tmpfs(dir))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.0.path()).status();
    }
}

#[test]
fn a_temp_folder_filled_during_the_run_is_named_as_full() {
    let dir = TestDir::new("full");
    let Some(tmpfs) = Tmpfs::mount(40 << 20) else {
        eprintln!("a_temp_folder_filled_during_the_run...: cannot mount a tmpfs here; skipped");
        return;
    };
    let parent = tmpfs.0.path();
    // Inputs of our own, mapped in place: the run folder gets only C (32 MB).
    let (a, b) = (dir.file("a.npy"), dir.file("b.npy"));
    write_npy(&a, &pattern_a::<f64>(2000, 2000));
    write_npy(&b, &pattern_b::<f64>(2000, 2000));
    let mut cmd = Procjob::new();
    cmd.args(["matmul", "--mode", "memmap-out", "--processes", "2", "--a"])
        .arg(&a)
        .arg("--b")
        .arg(&b)
        .arg("--temp-folder")
        .arg(parent)
        .expect_clean(parent);
    let mut bg = cmd.spawn();
    // The banner is printed just before the seq check, which runs before C
    // is made: stop the run there, fill the folder, and let it go on.
    bg.wait_for_line(Stream::Stdout, "procjob matmul:", RUN);
    bg.signal(Signal::SIGSTOP);
    let filler = parent.join("filler");
    let free = nix::sys::statvfs::statvfs(parent).map(|s| s.blocks_available() * s.fragment_size()).unwrap();
    let f = std::fs::File::create(&filler).unwrap();
    let _ = nix::fcntl::posix_fallocate(&f, 0, free as i64);
    bg.signal(Signal::SIGCONT);
    let status = bg.wait_exit(RUN);
    std::fs::remove_file(&filler).unwrap();
    let run = bg.finish(RUN);
    assert_no_workers_left(run.pid, &pids_named(&run.stderr), &run.command);
    assert_eq!(status.code(), Some(2), "{}\n--- stderr\n{}", run.command, run.stderr);
    let shown = parent.display().to_string();
    assert_mentions(&run, &["temp folder", &shown, "is full", "--temp-folder", "PROCJOB_TEMP_FOLDER"]);
}
