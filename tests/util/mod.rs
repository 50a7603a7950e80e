//! Helpers for the integration tests that run the real `procjob` binary
//! (in the spirit of ripgrep's tests/util.rs).
//!
//! - [`TestDir`]: a fresh private folder per test, with a `tmp` parent that
//!   every run gets as `--temp-folder` (and that must be empty again after
//!   each run) and a `files` folder for inputs and outputs.
//! - [`Procjob`]: a command builder for the binary; [`Run`] is its outcome.
//! - `.npy` reading and writing through `procjob_worker::npy`, the pattern
//!   inputs of CLI.md, and a naive reference product.

// Not every test file uses every helper.
#![allow(dead_code)]

use std::ffi::{OsStr, OsString};
use std::fmt::Debug;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use procjob_worker::npy;
use procjob_worker::DType;
use serde_json::Value;

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_procjob");

/// The environment variable naming the default parent of run folders.
pub const TEMP_FOLDER_ENV: &str = "PROCJOB_TEMP_FOLDER";

/// Longest a single run may take before it is killed and the test fails.
const RUN_TIMEOUT: Duration = Duration::from_secs(60);

/// A private folder for one test: `tmp/` is the `--temp-folder` parent of
/// every run, `files/` holds inputs and outputs. Removed on drop.
pub struct TestDir {
    root: tempfile::TempDir,
    tmp: PathBuf,
    files: PathBuf,
}

impl TestDir {
    /// Makes a fresh folder; `name` only shows in its path, for debugging.
    pub fn new(name: &str) -> TestDir {
        let root = tempfile::Builder::new()
            .prefix(&format!("procjob-test-{name}-"))
            .tempdir()
            .expect("cannot create a test folder");
        let tmp = root.path().join("tmp");
        let files = root.path().join("files");
        std::fs::create_dir(&tmp).expect("cannot create tmp/");
        std::fs::create_dir(&files).expect("cannot create files/");
        TestDir { root, tmp, files }
    }

    /// The parent given as `--temp-folder`.
    pub fn tmp(&self) -> &Path {
        &self.tmp
    }

    /// A path in `files/`.
    pub fn file(&self, name: &str) -> PathBuf {
        self.files.join(name)
    }

    /// `procjob matmul --temp-folder <tmp>`; the run checks afterwards that
    /// `tmp` still exists and nothing is left in it.
    pub fn matmul(&self) -> Procjob {
        let mut p = Procjob::new();
        p.arg("matmul").arg("--temp-folder").arg(&self.tmp).expect_clean(&self.tmp);
        p
    }

    /// Asserts that the temp parent exists and holds nothing (in particular
    /// no `procjob-*` run folder).
    pub fn assert_clean(&self, context: &str) {
        assert_clean_parent(&self.tmp, context);
    }
}

/// Whether this system forbids a parent to read its child's memory (Yama
/// `ptrace_scope` 2 or 3), said on stderr: the tests of lent results then
/// skip, as procjob then sends every result through the pipes.
pub fn lending_forbidden() -> bool {
    let forbidden = procjob_worker::array::lending_forbidden_here();
    if forbidden {
        eprintln!("skipping: this system forbids reading a child's memory (Yama ptrace_scope 2 or 3)");
    }
    forbidden
}

/// Asserts that the run's stderr mentions every one of `needles`.
#[track_caller]
pub fn assert_mentions(run: &Run, needles: &[&str]) {
    for needle in needles {
        assert!(
            run.stderr.contains(needle),
            "{}: stderr does not mention {needle:?}\n--- stderr\n{}",
            run.command,
            run.stderr
        );
    }
}

/// Runs `cmd` to its end (up to a minute) and checks that no worker is
/// left (the temp parent is checked by the run itself).
pub fn run_checked(cmd: &Procjob) -> Run {
    let run = cmd.spawn().finish(RUN_TIMEOUT);
    assert_no_workers_left(run.pid, &pids_named(&run.stderr), &run.command);
    run
}

/// Asserts that `parent` is still a directory and is empty: a run removes
/// its own `procjob-<pid>-<random>` folder and nothing else.
pub fn assert_clean_parent(parent: &Path, context: &str) {
    assert!(parent.is_dir(), "{context}: the temp folder parent {} was removed", parent.display());
    let left: Vec<String> = std::fs::read_dir(parent)
        .unwrap_or_else(|e| panic!("{context}: cannot list {}: {e}", parent.display()))
        .map(|e| e.expect("readdir entry").file_name().to_string_lossy().into_owned())
        .collect();
    let run_folders: Vec<&String> = left.iter().filter(|n| n.starts_with("procjob-")).collect();
    assert!(run_folders.is_empty(), "{context}: run folder(s) left in {}: {run_folders:?}", parent.display());
    assert!(left.is_empty(), "{context}: unexpected entries left in {}: {left:?}", parent.display());
}

/// A command line for the `procjob` binary.
pub struct Procjob {
    args: Vec<OsString>,
    env: Vec<(OsString, Option<OsString>)>,
    clean_parent: Option<PathBuf>,
    /// Signals [`Procjob::spawn`] starts the binary with ignored.
    ignored_signals: Vec<i32>,
}

impl Default for Procjob {
    fn default() -> Self {
        Procjob::new()
    }
}

impl Procjob {
    /// The binary with no arguments. `PROCJOB_TEMP_FOLDER` is removed from
    /// its environment unless [`Procjob::env`] sets it.
    pub fn new() -> Procjob {
        Procjob {
            args: Vec::new(),
            env: vec![(TEMP_FOLDER_ENV.into(), None)],
            clean_parent: None,
            ignored_signals: Vec::new(),
        }
    }

    /// Adds one argument.
    pub fn arg(&mut self, a: impl AsRef<OsStr>) -> &mut Procjob {
        self.args.push(a.as_ref().to_owned());
        self
    }

    /// Adds arguments.
    pub fn args<I, S>(&mut self, args: I) -> &mut Procjob
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args.extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    /// Sets an environment variable.
    pub fn env(&mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> &mut Procjob {
        let key = key.as_ref().to_owned();
        self.env.retain(|(k, _)| *k != key);
        self.env.push((key, Some(value.as_ref().to_owned())));
        self
    }

    /// Starts the binary (with [`Procjob::spawn`]) with signal `n` ignored,
    /// as `nohup` does for SIGHUP.
    pub fn ignore_signal(&mut self, n: i32) -> &mut Procjob {
        self.ignored_signals.push(n);
        self
    }

    /// After the run, assert that `parent` exists and is empty.
    pub fn expect_clean(&mut self, parent: &Path) -> &mut Procjob {
        self.clean_parent = Some(parent.to_path_buf());
        self
    }

    /// The command line, for messages.
    pub fn command_line(&self) -> String {
        let mut s = String::from("procjob");
        for a in &self.args {
            s.push(' ');
            s.push_str(&a.to_string_lossy());
        }
        s
    }

    /// Runs the binary to completion (killing it after a minute) and returns
    /// what it did. Checks the temp parent when [`Procjob::expect_clean`] was
    /// given, whatever the exit code.
    pub fn run(&self) -> Run {
        let command = self.command_line();
        let mut cmd = Command::new(BIN);
        cmd.args(&self.args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        for (k, v) in &self.env {
            match v {
                Some(v) => cmd.env(k, v),
                None => cmd.env_remove(k),
            };
        }
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start {BIN}: {e}"));
        let pid = child.id();
        let mut out = child.stdout.take().expect("stdout is piped");
        let mut err = child.stderr.take().expect("stderr is piped");
        let out_reader = std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = out.read_to_end(&mut v);
            v
        });
        let err_reader = std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = err.read_to_end(&mut v);
            v
        });
        let start = Instant::now();
        let status = loop {
            match child.try_wait().expect("waiting for procjob") {
                Some(status) => break status,
                None if start.elapsed() > RUN_TIMEOUT => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("{command}: still running after {RUN_TIMEOUT:?}; killed");
                }
                None => std::thread::sleep(Duration::from_millis(1)),
            }
        };
        let stdout = String::from_utf8(out_reader.join().expect("stdout reader")).expect("stdout is UTF-8");
        let stderr = String::from_utf8_lossy(&err_reader.join().expect("stderr reader")).into_owned();
        let run = Run { command, code: status.code(), stdout, stderr, pid };
        if let Some(parent) = &self.clean_parent {
            assert_clean_parent(parent, &run.command);
        }
        run
    }

    /// Runs with `--json`, asserts success, and returns the parsed lines
    /// (each checked by [`check_report`]).
    pub fn run_json(&mut self) -> Vec<Value> {
        self.arg("--json");
        self.run().assert_ok().json_lines()
    }
}

/// `procjob matmul <args> --json` in `dir`: asserts success and returns the
/// reports, one per mode.
pub fn run_json<S: AsRef<OsStr>>(dir: &TestDir, args: &[S]) -> Vec<Value> {
    dir.matmul().args(args).run_json()
}

/// The outcome of a run.
#[derive(Debug)]
pub struct Run {
    /// The command line, for messages.
    pub command: String,
    /// The exit code (`None` when killed by a signal).
    pub code: Option<i32>,
    /// Everything on stdout.
    pub stdout: String,
    /// Everything on stderr.
    pub stderr: String,
    /// The pid of the process (the coordinator).
    pub pid: u32,
}

impl Run {
    /// Asserts exit code 0.
    #[track_caller]
    pub fn assert_ok(self) -> Run {
        self.assert_code(0)
    }

    /// Asserts the exit code.
    #[track_caller]
    pub fn assert_code(self, code: i32) -> Run {
        assert_eq!(
            self.code,
            Some(code),
            "{}: expected exit code {code}\n--- stdout\n{}\n--- stderr\n{}",
            self.command,
            self.stdout,
            self.stderr
        );
        self
    }

    /// Parses stdout as JSON Lines: every line must be one JSON object with
    /// every field of CLI.md, and nothing else may be on stdout.
    #[track_caller]
    pub fn json_lines(&self) -> Vec<Value> {
        assert!(
            self.stdout.is_empty() || self.stdout.ends_with('\n'),
            "{}: stdout does not end with a newline: {:?}",
            self.command,
            self.stdout
        );
        self.stdout
            .lines()
            .map(|line| {
                let v: Value = serde_json::from_str(line).unwrap_or_else(|e| {
                    panic!("{}: stdout line is not JSON ({e}): {line:?}\n--- stdout\n{}", self.command, self.stdout)
                });
                check_report(&v, &self.command);
                v
            })
            .collect()
    }
}

/// Asserts that `v` is a per-mode report with every field of CLI.md, of the
/// right JSON type.
#[track_caller]
pub fn check_report(v: &Value, context: &str) {
    let ctx = format!("{context}: report {v}");
    let obj = v.as_object().unwrap_or_else(|| panic!("{ctx}: not a JSON object"));
    let field = |o: &serde_json::Map<String, Value>, name: &str| -> Value {
        o.get(name).cloned().unwrap_or_else(|| panic!("{ctx}: field {name:?} missing"))
    };
    for name in ["mode", "start_method", "dtype"] {
        assert!(field(obj, name).is_string(), "{ctx}: {name} is not a string");
    }
    for name in ["processes", "m", "k", "n", "blocks", "bytes_to_workers", "bytes_from_workers"] {
        assert!(field(obj, name).is_u64(), "{ctx}: {name} is not a non-negative integer");
    }
    for name in ["wall_s", "cold_wall_s", "gflops"] {
        let x = field(obj, name).as_f64().unwrap_or_else(|| panic!("{ctx}: {name} is not a number"));
        assert!(x.is_finite() && x >= 0.0, "{ctx}: {name} = {x}");
    }
    let walls = field(obj, "walls_s");
    let walls = walls.as_array().unwrap_or_else(|| panic!("{ctx}: walls_s is not a list"));
    assert!(!walls.is_empty(), "{ctx}: walls_s is empty");
    assert!(walls.iter().all(|w| w.as_f64().is_some_and(|w| w >= 0.0)), "{ctx}: walls_s holds a non-number");
    let speedup = field(obj, "speedup_vs_seq");
    assert!(speedup.is_null() || speedup.is_f64(), "{ctx}: speedup_vs_seq is neither null nor a number");
    let lost = field(obj, "lost");
    let lost = lost.as_array().unwrap_or_else(|| panic!("{ctx}: lost is not a list"));
    assert!(lost.iter().all(Value::is_string), "{ctx}: lost holds a non-string");
    let matches = field(obj, "matches_seq");
    assert!(matches.is_null() || matches.is_boolean(), "{ctx}: matches_seq is neither null nor a bool");
    let phases = field(obj, "phases");
    let phases = phases.as_object().unwrap_or_else(|| panic!("{ctx}: phases is not an object"));
    for name in ["dump_s", "spawn_s", "compute_s", "collect_s"] {
        assert!(field(phases, name).as_f64().is_some_and(|x| x >= 0.0), "{ctx}: phases.{name} is not a number ≥ 0");
    }
    let workers = field(obj, "workers");
    let workers = workers.as_array().unwrap_or_else(|| panic!("{ctx}: workers is not a list"));
    for w in workers {
        let w = w.as_object().unwrap_or_else(|| panic!("{ctx}: a worker is not an object"));
        for name in ["index", "pid", "tasks", "peak_rss_bytes", "peak_uss_bytes", "peak_pss_bytes"] {
            assert!(field(w, name).is_u64(), "{ctx}: workers[].{name} is not a non-negative integer");
        }
    }
    let coordinator = field(obj, "coordinator");
    let coordinator = coordinator.as_object().unwrap_or_else(|| panic!("{ctx}: coordinator is not an object"));
    for name in ["pid", "peak_rss_bytes"] {
        assert!(field(coordinator, name).is_u64(), "{ctx}: coordinator.{name} is not a non-negative integer");
    }
}

/// The element types, with what the tests need of each.
pub trait Elem: Copy + PartialEq + Debug + Send + 'static {
    /// Its dtype.
    const DTYPE: DType;
    /// Zero.
    fn zero() -> Self;
    /// `acc + x * y`, wrapping for `i64`, each operation rounded on its own
    /// for floats (the kernels' summation-order invariant).
    fn mul_add(acc: Self, x: Self, y: Self) -> Self;
    /// An exact small integer as this type.
    fn from_i64(v: i64) -> Self;
    /// From little-endian bytes (exactly the element size).
    fn from_le(bytes: &[u8]) -> Self;
    /// Appends the little-endian bytes.
    fn push_le(self, out: &mut Vec<u8>);
    /// The bit pattern, for bit-for-bit comparisons.
    fn bits(self) -> u64;
}

impl Elem for i64 {
    const DTYPE: DType = DType::I64;
    fn zero() -> i64 {
        0
    }
    fn mul_add(acc: i64, x: i64, y: i64) -> i64 {
        acc.wrapping_add(x.wrapping_mul(y))
    }
    fn from_i64(v: i64) -> i64 {
        v
    }
    fn from_le(bytes: &[u8]) -> i64 {
        i64::from_le_bytes(bytes.try_into().expect("8 bytes"))
    }
    fn push_le(self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_le_bytes());
    }
    fn bits(self) -> u64 {
        self as u64
    }
}

impl Elem for f64 {
    const DTYPE: DType = DType::F64;
    fn zero() -> f64 {
        0.0
    }
    fn mul_add(acc: f64, x: f64, y: f64) -> f64 {
        acc + x * y
    }
    fn from_i64(v: i64) -> f64 {
        v as f64
    }
    fn from_le(bytes: &[u8]) -> f64 {
        f64::from_le_bytes(bytes.try_into().expect("8 bytes"))
    }
    fn push_le(self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_le_bytes());
    }
    fn bits(self) -> u64 {
        self.to_bits()
    }
}

impl Elem for f32 {
    const DTYPE: DType = DType::F32;
    fn zero() -> f32 {
        0.0
    }
    fn mul_add(acc: f32, x: f32, y: f32) -> f32 {
        acc + x * y
    }
    fn from_i64(v: i64) -> f32 {
        v as f32
    }
    fn from_le(bytes: &[u8]) -> f32 {
        f32::from_le_bytes(bytes.try_into().expect("4 bytes"))
    }
    fn push_le(self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_le_bytes());
    }
    fn bits(self) -> u64 {
        u64::from(self.to_bits())
    }
}

/// A 2-D (or any-D) array read from or written to `.npy`.
#[derive(Debug, Clone, PartialEq)]
pub struct Matrix<T> {
    /// The shape.
    pub shape: Vec<usize>,
    /// The elements, row-major.
    pub data: Vec<T>,
}

impl<T: Elem> Matrix<T> {
    /// A rows × cols matrix of `f(i, j)`.
    pub fn from_fn(rows: usize, cols: usize, mut f: impl FnMut(usize, usize) -> T) -> Matrix<T> {
        let mut data = Vec::with_capacity(rows * cols);
        for i in 0..rows {
            for j in 0..cols {
                data.push(f(i, j));
            }
        }
        Matrix { shape: vec![rows, cols], data }
    }

    /// Rows (2-D only).
    pub fn rows(&self) -> usize {
        self.shape[0]
    }

    /// Columns (2-D only).
    pub fn cols(&self) -> usize {
        self.shape[1]
    }

    /// Every element's bit pattern.
    pub fn bits(&self) -> Vec<u64> {
        self.data.iter().map(|x| x.bits()).collect()
    }
}

/// Reads a `.npy` file of element type `T` with `procjob_worker::npy`,
/// asserting the dtype.
#[track_caller]
pub fn read_npy<T: Elem>(path: &Path) -> Matrix<T> {
    let (mut file, header) =
        npy::read_header(path).unwrap_or_else(|e| panic!("cannot read the header of {}: {e}", path.display()));
    assert_eq!(header.dtype, T::DTYPE, "{}: dtype", path.display());
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    assert_eq!(bytes.len(), header.data_len(), "{}: data length", path.display());
    let data = bytes.chunks_exact(T::DTYPE.size()).map(T::from_le).collect();
    Matrix { shape: header.shape, data }
}

/// [`read_npy`] for `i64`.
pub fn read_npy_i64(path: &Path) -> Matrix<i64> {
    read_npy(path)
}

/// [`read_npy`] for `f64`.
pub fn read_npy_f64(path: &Path) -> Matrix<f64> {
    read_npy(path)
}

/// [`read_npy`] for `f32`.
pub fn read_npy_f32(path: &Path) -> Matrix<f32> {
    read_npy(path)
}

/// Writes `m` as a `.npy` file with `procjob_worker::npy::write` (the path
/// must not exist).
#[track_caller]
pub fn write_npy<T: Elem>(path: &Path, m: &Matrix<T>) {
    let mut bytes = Vec::with_capacity(m.data.len() * T::DTYPE.size());
    for &x in &m.data {
        x.push_le(&mut bytes);
    }
    npy::write(path, T::DTYPE, &m.shape, &bytes).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
}

/// The pattern A of CLI.md: `A[i,j] = (31·i + 17·j) mod 10`.
pub fn pattern_a<T: Elem>(m: usize, k: usize) -> Matrix<T> {
    Matrix::from_fn(m, k, |i, j| T::from_i64(((31 * i + 17 * j) % 10) as i64))
}

/// The pattern B of CLI.md: `B[i,j] = (7·i + 13·j) mod 10`.
pub fn pattern_b<T: Elem>(k: usize, n: usize) -> Matrix<T> {
    Matrix::from_fn(k, n, |i, j| T::from_i64(((7 * i + 13 * j) % 10) as i64))
}

/// The naive product: for each element, `acc = 0` then `acc = acc + a·b`
/// for p = 0, 1, …, k-1. The kernels match it exactly for integer-valued
/// data (and i64), and within rounding error otherwise (they may use FMA).
pub fn matmul_ref<T: Elem>(a: &Matrix<T>, b: &Matrix<T>) -> Matrix<T> {
    let (m, k, n) = (a.rows(), a.cols(), b.cols());
    assert_eq!(b.rows(), k, "inner dimensions");
    Matrix::from_fn(m, n, |i, j| {
        let mut acc = T::zero();
        for p in 0..k {
            acc = T::mul_add(acc, a.data[i * k + p], b.data[p * n + j]);
        }
        acc
    })
}

/// Asserts that two matrices have the same shape and the same bits,
/// naming the first differing element.
#[track_caller]
pub fn assert_bits_eq<T: Elem>(actual: &Matrix<T>, expected: &Matrix<T>, context: &str) {
    assert_eq!(actual.shape, expected.shape, "{context}: shape");
    if let Some(idx) = actual.data.iter().zip(&expected.data).position(|(x, y)| x.bits() != y.bits()) {
        let cols = actual.shape.get(1).copied().unwrap_or(1).max(1);
        panic!(
            "{context}: element [{}, {}] is {:?} but should be {:?}",
            idx / cols,
            idx % cols,
            actual.data[idx],
            expected.data[idx]
        );
    }
}

/// Whether `python3` with numpy is available.
pub fn numpy_available() -> bool {
    Command::new("python3")
        .args(["-c", "import numpy"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Returns true when numpy can be used. Without it: panics when the `CI`
/// variable is set, else prints why the test is skipped and returns false.
pub fn require_numpy(test: &str) -> bool {
    if numpy_available() {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("{test}: python3 with numpy is required when CI is set");
    }
    eprintln!("{test}: skipping: numpy not available (pip install numpy)");
    false
}

/// Runs a Python script with `args`; asserts it exits 0 and returns stdout.
#[track_caller]
pub fn python(script: &str, args: &[&Path]) -> String {
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run python3: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "python3 failed ({})\n--- script\n{script}\n--- stdout\n{stdout}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

// ---------------------------------------------------------------------------
// Runs in the background, signals, and leak checks (for the failure tests).
// ---------------------------------------------------------------------------

/// How long [`Background::finish`] waits for stdout and stderr to close after
/// the coordinator exited. Workers inherit stderr, so a pipe that stays open
/// means some worker is still alive.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Which output stream a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

enum Piece {
    Line(Stream, String),
    Eof(Stream),
}

impl Procjob {
    /// Starts the binary in the background, in a new process group of its
    /// own (its pid is the group id), with stdout and stderr read line by
    /// line. See [`Background`].
    pub fn spawn(&self) -> Background {
        use std::os::unix::process::CommandExt;
        let command = self.command_line();
        let mut cmd = Command::new(BIN);
        cmd.args(&self.args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).process_group(0);
        for (k, v) in &self.env {
            match v {
                Some(v) => cmd.env(k, v),
                None => cmd.env_remove(k),
            };
        }
        // Every signal with its default action but those asked ignored,
        // whatever the test runner was started with (nohup, `&` in a script).
        let ignored = self.ignored_signals.clone();
        let last = libc::SIGRTMAX();
        // SAFETY: only sigaction, which is async-signal-safe, runs between
        // fork and exec; `ignored` was allocated before the fork.
        unsafe {
            cmd.pre_exec(move || {
                for n in 1..=last {
                    let mut action: libc::sigaction = std::mem::zeroed();
                    action.sa_sigaction = if ignored.contains(&n) { libc::SIG_IGN } else { libc::SIG_DFL };
                    // Fails for SIGKILL, SIGSTOP and glibc's own: left as they are.
                    libc::sigaction(n, &action, std::ptr::null_mut());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start {BIN}: {e}"));
        let (tx, lines) = std::sync::mpsc::channel();
        let out = child.stdout.take().expect("stdout is piped");
        let err = child.stderr.take().expect("stderr is piped");
        forward_lines(out, Stream::Stdout, tx.clone());
        forward_lines(err, Stream::Stderr, tx);
        Background {
            command,
            pid: child.id(),
            child,
            lines,
            open: 2,
            stdout: String::new(),
            stderr: String::new(),
            status: None,
            clean_parent: self.clean_parent.clone(),
        }
    }
}

fn forward_lines(r: impl Read + Send + 'static, stream: Stream, tx: std::sync::mpsc::Sender<Piece>) {
    std::thread::spawn(move || {
        use std::io::BufRead;
        let mut r = std::io::BufReader::new(r);
        let mut line = Vec::new();
        loop {
            line.clear();
            match r.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    if tx.send(Piece::Line(stream, String::from_utf8_lossy(&line).into_owned())).is_err() {
                        return;
                    }
                }
            }
        }
        let _ = tx.send(Piece::Eof(stream));
    });
}

/// A `procjob` run in the background ([`Procjob::spawn`]). Dropping it
/// before [`Background::finish`] kills the coordinator with SIGKILL (its
/// workers follow through their parent-death signal).
pub struct Background {
    /// The command line, for messages.
    pub command: String,
    /// The coordinator's pid, also its process group id.
    pub pid: u32,
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<Piece>,
    open: usize,
    /// What came on stdout so far.
    pub stdout: String,
    /// What came on stderr so far.
    pub stderr: String,
    status: Option<std::process::ExitStatus>,
    clean_parent: Option<PathBuf>,
}

impl Background {
    fn take(&mut self, piece: Piece) -> Option<(Stream, String)> {
        match piece {
            Piece::Line(stream, line) => {
                match stream {
                    Stream::Stdout => self.stdout.push_str(&line),
                    Stream::Stderr => self.stderr.push_str(&line),
                }
                Some((stream, line))
            }
            Piece::Eof(_) => {
                self.open -= 1;
                None
            }
        }
    }

    /// Waits (up to `timeout`) for a line on `stream` that contains
    /// `needle` and returns it; panics, showing the output so far, when the
    /// stream ends or the time is up first.
    #[track_caller]
    pub fn wait_for_line(&mut self, stream: Stream, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let piece = match self.lines.recv_timeout(left) {
                Ok(p) => p,
                Err(_) => panic!(
                    "{}: no {stream:?} line containing {needle:?} within {timeout:?}\n--- stdout\n{}\n--- stderr\n{}",
                    self.command, self.stdout, self.stderr
                ),
            };
            let ended = matches!(piece, Piece::Eof(s) if s == stream);
            if let Some((s, line)) = self.take(piece) {
                if s == stream && line.contains(needle) {
                    return line;
                }
            }
            assert!(
                !ended,
                "{}: {stream:?} ended without a line containing {needle:?}\n--- stdout\n{}\n--- stderr\n{}",
                self.command, self.stdout, self.stderr
            );
        }
    }

    /// Sends `signal` to the coordinator.
    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid as i32), signal)
            .unwrap_or_else(|e| panic!("{}: cannot send {signal} to pid {}: {e}", self.command, self.pid));
    }

    /// Sends `signal` to the coordinator's whole process group, as a
    /// terminal does for Ctrl-C.
    pub fn signal_group(&self, signal: nix::sys::signal::Signal) {
        nix::sys::signal::killpg(nix::unistd::Pid::from_raw(self.pid as i32), signal)
            .unwrap_or_else(|e| panic!("{}: cannot send {signal} to process group {}: {e}", self.command, self.pid));
    }

    /// Waits (up to `timeout`, on a pidfd) for the coordinator to exit and
    /// returns its status; panics when it is still running then.
    #[track_caller]
    pub fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        if let Some(s) = self.status {
            return s;
        }
        assert!(
            wait_process_gone(self.pid as i32, timeout),
            "{}: still running after {timeout:?}\n--- stdout\n{}\n--- stderr\n{}",
            self.command,
            self.stdout,
            self.stderr
        );
        let status = self.child.wait().expect("waiting for procjob");
        self.status = Some(status);
        status
    }

    /// Waits for the exit (up to `timeout`) and for stdout and stderr to
    /// close, and returns the outcome. A stream still open 10 s after the
    /// exit means a process holding it (a worker) lives on: that fails.
    /// Checks the temp parent when [`Procjob::expect_clean`] was given.
    #[track_caller]
    pub fn finish(mut self, timeout: Duration) -> Run {
        let status = self.wait_exit(timeout);
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        while self.open > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(piece) => {
                    self.take(piece);
                }
                Err(_) => panic!(
                    "{}: stdout/stderr still open {DRAIN_TIMEOUT:?} after the coordinator exited: a worker \
                     holding them is alive\n--- stdout\n{}\n--- stderr\n{}",
                    self.command, self.stdout, self.stderr
                ),
            }
        }
        let run = Run {
            command: std::mem::take(&mut self.command),
            code: status.code(),
            stdout: std::mem::take(&mut self.stdout),
            stderr: std::mem::take(&mut self.stderr),
            pid: self.pid,
        };
        if let Some(parent) = &self.clean_parent {
            assert_clean_parent(parent, &run.command);
        }
        run
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if self.status.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A pidfd for process `pid`, or `None` when there is no such process
/// (ESRCH: it has been reaped).
pub fn pidfd_open(pid: i32) -> Option<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor
    // or -1; it touches no memory of ours.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        let e = std::io::Error::last_os_error();
        assert_eq!(e.raw_os_error(), Some(libc::ESRCH), "pidfd_open({pid}): {e}");
        return None;
    }
    // SAFETY: pidfd_open just returned this descriptor; nothing else owns it.
    Some(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) })
}

/// Polls a pidfd for POLLIN (the process has exited) up to `timeout`.
pub fn pidfd_wait(fd: &std::os::fd::OwnedFd, timeout: Duration) -> bool {
    use std::os::fd::AsRawFd;
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let mut pfd = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        let ms = left.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd, and its count.
        let r = unsafe { libc::poll(&mut pfd, 1, ms) };
        match r {
            1.. => return true,
            0 => return false,
            _ => {
                let e = std::io::Error::last_os_error();
                assert_eq!(e.kind(), std::io::ErrorKind::Interrupted, "poll on a pidfd: {e}");
            }
        }
    }
}

/// Waits up to `timeout` for process `pid` to end, on a pidfd. True when it
/// is gone: it had already been reaped (`pidfd_open` fails with ESRCH) or it
/// exits (a zombie counts as ended) in time.
pub fn wait_process_gone(pid: i32, timeout: Duration) -> bool {
    pidfd_open(pid).is_none_or(|fd| pidfd_wait(&fd, timeout))
}

/// Whether live process `pid` is a worker started by coordinator
/// `coordinator` (its environment has `PROCJOB_WORKER=<coordinator>`). False
/// for a process that is gone or a zombie (its environment reads empty).
pub fn is_worker_of(pid: i32, coordinator: u32) -> bool {
    let Ok(environ) = std::fs::read(format!("/proc/{pid}/environ")) else { return false };
    let wanted = format!("{}={coordinator}", procjob_worker::serve::WORKER_ENV);
    environ.split(|&b| b == 0).any(|var| var == wanted.as_bytes())
}

/// The live workers of `coordinator`, found by scanning /proc for processes
/// of this user whose environment says so.
pub fn live_workers_of(coordinator: u32) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()))
        .filter(|&pid| is_worker_of(pid, coordinator))
        .collect()
}

/// Every pid a message names as "pid N".
pub fn pids_named(text: &str) -> Vec<i32> {
    let mut pids: Vec<i32> = text
        .match_indices("pid ")
        .filter_map(|(i, m)| {
            let digits: String = text[i + m.len()..].chars().take_while(char::is_ascii_digit).collect();
            digits.parse().ok()
        })
        .collect();
    pids.sort_unstable();
    pids.dedup();
    pids
}

/// Asserts that no worker of the coordinator `run.pid` is left: each pid
/// in `pids` (e.g. named in the messages) and every process that /proc
/// shows as its worker must end within 10 s (waited on with a pidfd). A pid
/// that now belongs to some other process (reused) counts as gone.
#[track_caller]
pub fn assert_no_workers_left(coordinator: u32, pids: &[i32], context: &str) {
    let mut all: Vec<i32> = pids.iter().copied().filter(|&p| p != coordinator as i32).collect();
    all.extend(live_workers_of(coordinator));
    all.sort_unstable();
    all.dedup();
    for pid in all {
        let Some(fd) = pidfd_open(pid) else { continue };
        // The pidfd pins the process: if it is not a worker of this
        // coordinator now, the pid was reused (or it has exited already).
        if !is_worker_of(pid, coordinator) {
            continue;
        }
        assert!(
            pidfd_wait(&fd, Duration::from_secs(10)),
            "{context}: worker pid {pid} of coordinator {coordinator} is still running 10 s after the run"
        );
    }
}

/// The `procjob-*` entries in `parent`.
pub fn run_folders_in(parent: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(parent)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", parent.display()))
        .map(|e| e.expect("readdir entry").path())
        .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("procjob-")))
        .collect();
    v.sort();
    v
}
