//! Integration tests of `procjob matmul` that run the real binary
//! (docs/cli.md is the contract).
//!
//! Every run gets a private `--temp-folder` parent, and every run checks
//! afterwards that the parent still exists and that its run folder is gone.

mod util;

use std::collections::HashSet;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;
use util::{
    assert_bits_eq, assert_clean_parent, matmul_ref, pattern_a, pattern_b, python, read_npy, read_npy_f64,
    read_npy_i64, require_numpy, run_json, write_npy, Elem, Matrix, Procjob, TestDir, TEMP_FOLDER_ENV,
};

const MODES: [&str; 6] = ["seq", "threads", "copy", "memmap", "memmap-out", "fork"];

/// Whether a mode starts worker processes (threads and seq do not).
fn has_workers(mode: &str) -> bool {
    !matches!(mode, "seq" | "threads")
}
const PROCESSES: [usize; 3] = [1, 2, 3];

/// (m, k, n): the smallest product; 7 rows over 3 processes; fewer rows
/// than processes; each dimension zero; non-square; and one large enough
/// to cross the kernel's column (256) and depth (128) tiles.
const SHAPES: [(usize, usize, usize); 8] =
    [(1, 1, 1), (7, 5, 4), (2, 3, 4), (0, 3, 4), (3, 0, 4), (3, 4, 0), (13, 17, 11), (9, 130, 260)];

fn shape_arg((m, k, n): (usize, usize, usize)) -> String {
    format!("{m}x{k}x{n}")
}

fn str_field<'a>(v: &'a Value, name: &str) -> &'a str {
    v[name].as_str().unwrap_or_else(|| panic!("{name} is not a string in {v}"))
}

fn u64_field(v: &Value, name: &str) -> u64 {
    v[name].as_u64().unwrap_or_else(|| panic!("{name} is not an integer in {v}"))
}

/// Checks the `workers` of a report of a mode with workers: at most
/// `processes` of them, distinct non-zero pids other than the coordinator's,
/// and tasks adding up to `blocks` per repetition (the workers stay warm
/// across repetitions, so their task counts add up).
fn check_workers(report: &Value, processes: usize, context: &str) {
    let workers = report["workers"].as_array().expect("workers is a list");
    let coordinator = u64_field(&report["coordinator"], "pid");
    assert!(coordinator != 0, "{context}: coordinator pid 0");
    // With no rows there is nothing to do, so starting no worker is fine too.
    let has_work = u64_field(report, "blocks") > 0;
    assert!(
        (!has_work || !workers.is_empty()) && workers.len() <= processes,
        "{context}: {} workers for --processes {processes}: {report}",
        workers.len()
    );
    let pids: HashSet<u64> = workers.iter().map(|w| u64_field(w, "pid")).collect();
    assert_eq!(pids.len(), workers.len(), "{context}: worker pids are not distinct: {report}");
    assert!(!pids.contains(&0), "{context}: a worker has pid 0: {report}");
    assert!(!pids.contains(&coordinator), "{context}: a worker has the coordinator's pid: {report}");
    let tasks: u64 = workers.iter().map(|w| u64_field(w, "tasks")).sum();
    let repetitions = report["walls_s"].as_array().expect("walls_s is a list").len() as u64;
    assert_eq!(
        tasks,
        u64_field(report, "blocks") * repetitions,
        "{context}: tasks do not add up to blocks × repetitions: {report}"
    );
}

/// Runs the pattern inputs of one dtype in every mode with 1, 2 and 3
/// processes on every shape, and compares each C with the reference bit
/// for bit (the pattern is integer-valued, so floats are exact too).
fn pattern_matrix<T: Elem>() {
    let dtype = T::DTYPE.name();
    let dir = TestDir::new(&format!("matrix-{dtype}"));
    for shape in SHAPES {
        let (m, k, n) = shape;
        let expected = matmul_ref(&pattern_a::<T>(m, k), &pattern_b::<T>(k, n));
        for mode in MODES {
            for processes in PROCESSES {
                let out = dir.file(&format!("c-{mode}-{processes}-{}.npy", shape_arg(shape)));
                let mut cmd = dir.matmul();
                cmd.args(["--mode", mode, "--dtype", dtype, "--shape", &shape_arg(shape)])
                    .arg("--processes")
                    .arg(processes.to_string())
                    .arg("--out")
                    .arg(&out);
                let context = cmd.command_line();
                let reports = cmd.run_json();
                assert_eq!(reports.len(), 1, "{context}: one report per mode");
                let r = &reports[0];
                assert_eq!(str_field(r, "mode"), mode, "{context}");
                assert_eq!(str_field(r, "dtype"), dtype, "{context}");
                assert_eq!([u64_field(r, "m"), u64_field(r, "k"), u64_field(r, "n")], [m, k, n].map(|x| x as u64));
                assert_eq!(r["matches_seq"], Value::Bool(true), "{context}: {r}");
                if mode == "seq" {
                    assert_eq!(u64_field(r, "processes"), 1, "{context}");
                    assert_eq!(r["workers"].as_array().map(Vec::len), Some(0), "{context}: seq has no workers");
                } else {
                    assert_eq!(u64_field(r, "processes"), processes as u64, "{context}");
                    if has_workers(mode) {
                        check_workers(r, processes, &context);
                    } else {
                        assert_eq!(
                            r["workers"].as_array().map(Vec::len),
                            Some(0),
                            "{context}: threads start no worker"
                        );
                    }
                    assert!(u64_field(r, "blocks") as usize <= processes.max(1), "{context}: {r}");
                }
                assert_bits_eq(&read_npy::<T>(&out), &expected, &context);
            }
        }
    }
}

#[test]
fn pattern_every_mode_processes_and_shape_i64() {
    pattern_matrix::<i64>();
}

#[test]
fn pattern_every_mode_processes_and_shape_f64() {
    pattern_matrix::<f64>();
}

#[test]
fn pattern_every_mode_processes_and_shape_f32() {
    pattern_matrix::<f32>();
}

#[test]
fn default_dtype_is_i64_and_mode_all_agrees() {
    let dir = TestDir::new("all");
    let out = dir.file("c.npy");
    let mut cmd = dir.matmul();
    cmd.args(["--shape", "7x5x4", "--processes", "3"]).arg("--out").arg(&out);
    let context = cmd.command_line();
    let reports = cmd.run_json();
    let modes: Vec<&str> = reports.iter().map(|r| str_field(r, "mode")).collect();
    assert_eq!(modes, MODES, "{context}: --mode all is the default and runs every mode in order");
    for r in &reports {
        assert_eq!(str_field(r, "dtype"), "i64", "{context}");
        assert_eq!(r["matches_seq"], Value::Bool(true), "{context}: {r}");
    }
    assert_bits_eq(&read_npy_i64(&out), &matmul_ref(&pattern_a(7, 5), &pattern_b(5, 4)), &context);
}

/// Random f64 inputs: C does not depend on the process count, the number of
/// blocks or the mode, bit for bit.
#[test]
fn random_f64_bit_identical_across_processes_blocks_and_modes() {
    let dir = TestDir::new("random");
    let mut first: Option<(String, Matrix<f64>)> = None;
    for blocks in [None, Some(5), Some(7)] {
        for processes in PROCESSES {
            for mode in MODES {
                let out = dir.file(&format!("c-{mode}-{processes}-{blocks:?}.npy"));
                let mut cmd = dir.matmul();
                cmd.args(["--seed", "42", "--dtype", "f64", "--size", "67", "--mode", mode])
                    .arg("--processes")
                    .arg(processes.to_string())
                    .arg("--out")
                    .arg(&out);
                if let Some(b) = blocks {
                    cmd.arg("--blocks").arg(b.to_string());
                }
                let context = cmd.command_line();
                let reports = cmd.run_json();
                assert_eq!(reports.len(), 1, "{context}");
                assert_eq!(reports[0]["matches_seq"], Value::Bool(true), "{context}: {}", reports[0]);
                if mode != "seq" {
                    let expected_blocks = blocks.unwrap_or(processes) as u64;
                    assert_eq!(u64_field(&reports[0], "blocks"), expected_blocks, "{context}");
                }
                if has_workers(mode) {
                    check_workers(&reports[0], processes, &context);
                }
                let c = read_npy_f64(&out);
                assert_eq!(c.shape, [67, 67], "{context}");
                match &first {
                    None => first = Some((context, c)),
                    Some((first_context, first_c)) => {
                        assert_bits_eq(&c, first_c, &format!("{context} vs {first_context}"));
                    }
                }
            }
        }
    }
    let (_, c) = first.expect("at least one run");
    // Digits in [0, 10): every element is an integer in [0, 81·67].
    assert!(c.data.iter().all(|&x| x.fract() == 0.0 && (0.0..=81.0 * 67.0).contains(&x)));
    // The seed is used: it is not the pattern's C, and another seed differs.
    let pattern = matmul_ref(&pattern_a::<f64>(67, 67), &pattern_b::<f64>(67, 67));
    assert_ne!(c.bits(), pattern.bits(), "--seed 42 gave the pattern's C");
    let other = dir.file("c-seed-43.npy");
    dir.matmul()
        .args(["--seed", "43", "--dtype", "f64", "--size", "67", "--mode", "seq", "--out"])
        .arg(&other)
        .run_json();
    assert_ne!(read_npy_f64(&other).bits(), c.bits(), "--seed 43 gave the same C as --seed 42");
}

/// How a C is checked against the naive reference [`matmul_ref`]: `i64`
/// (wrapping) always bit for bit; floats bit for bit where the data is
/// integer-valued, within rounding error otherwise (the kernels fix each
/// element's summation order across blocks and processes, but it is not the
/// naive loop's, and it may use FMA).
trait Reference: Elem {
    /// Machine epsilon, or `None` for `i64` (always exact).
    const EPS: Option<f64>;
    /// 2^(mantissa digits): integer-valued sums of products below this in
    /// magnitude are exact in any order, with or without FMA.
    const EXACT_BELOW: f64;
    /// The value as `f64` (exact for `f32`).
    fn as_f64(self) -> f64;
}

impl Reference for i64 {
    const EPS: Option<f64> = None;
    const EXACT_BELOW: f64 = 0.0;
    fn as_f64(self) -> f64 {
        self as f64
    }
}

impl Reference for f64 {
    const EPS: Option<f64> = Some(f64::EPSILON);
    const EXACT_BELOW: f64 = (1u64 << f64::MANTISSA_DIGITS) as f64;
    fn as_f64(self) -> f64 {
        self
    }
}

impl Reference for f32 {
    const EPS: Option<f64> = Some(f32::EPSILON as f64);
    const EXACT_BELOW: f64 = (1u64 << f32::MANTISSA_DIGITS) as f64;
    fn as_f64(self) -> f64 {
        f64::from(self)
    }
}

/// Asserts that `c` is `a · b`: bit for bit equal to [`matmul_ref`] for
/// `i64`, and for a float element whose inputs are all integer-valued with
/// `Σ_p |a_ip·b_pj|` below 2^mantissa (every partial sum is then an exact
/// integer, whatever the order); otherwise within `2·k·eps·Σ_p |a_ip·b_pj|`
/// of it. That bound holds because any evaluation of a k-term dot product
/// (any order, with or without FMA) is within `γ_k·Σ|a·b|` of the exact value,
/// `γ_k = k·u/(1 - k·u) ≤ k·eps` for `u = eps/2` and `k·u ≤ 1/2` (Higham,
/// Accuracy and Stability of Numerical Algorithms, §3.1), and both the
/// kernel's result and the reference's obey it.
#[track_caller]
fn assert_product<T: Reference>(c: &Matrix<T>, a: &Matrix<T>, b: &Matrix<T>, context: &str) {
    let expected = matmul_ref(a, b);
    let Some(eps) = T::EPS else {
        assert_bits_eq(c, &expected, context);
        return;
    };
    assert_eq!(c.shape, expected.shape, "{context}: shape");
    let (k, n) = (a.cols(), b.cols());
    for (idx, (&x, &y)) in c.data.iter().zip(&expected.data).enumerate() {
        let (i, j) = (idx / n, idx % n);
        let terms = (0..k).map(|p| (a.data[i * k + p].as_f64(), b.data[p * n + j].as_f64()));
        let integer_valued = terms.clone().all(|(u, v)| u.fract() == 0.0 && v.fract() == 0.0);
        let magnitude: f64 = terms.map(|(u, v)| (u * v).abs()).sum();
        if integer_valued && magnitude < T::EXACT_BELOW {
            assert_eq!(x.bits(), y.bits(), "{context}: C[{i}][{j}] is {x:?} but should be exactly {y:?}");
        } else {
            let tolerance = 2.0 * k as f64 * eps * magnitude;
            let diff = (x.as_f64() - y.as_f64()).abs();
            assert!(
                diff <= tolerance,
                "{context}: C[{i}][{j}] is {x:?} but the reference is {y:?}: off by {diff:e}, more than {tolerance:e}"
            );
        }
    }
}

/// Non-integer (floats) and wrapping (i64) inputs written as .npy by this
/// test, given with --a/--b; C read back; then one run's --out used as the
/// next run's --a. Every run's C (and C·D) has the same bits as the first
/// run's, whatever the mode, process count and block count; each is `a · b`
/// as [`assert_product`] checks.
fn npy_round_trip<T: Reference>(a: Matrix<T>, b: Matrix<T>, d: Matrix<T>) {
    let dtype = T::DTYPE.name();
    let dir = TestDir::new(&format!("roundtrip-{dtype}"));
    let (a_path, b_path, d_path) = (dir.file("a.npy"), dir.file("b.npy"), dir.file("d.npy"));
    write_npy(&a_path, &a);
    write_npy(&b_path, &b);
    write_npy(&d_path, &d);
    let a_bytes = std::fs::read(&a_path).unwrap();
    let mut first: Option<(String, Matrix<T>, Matrix<T>)> = None;
    for mode in MODES {
        for (processes, blocks) in [(1, 1), (2, 2), (3, 3), (3, 5)] {
            let c_path = dir.file(&format!("c-{mode}-{processes}-{blocks}.npy"));
            let mut cmd = dir.matmul();
            cmd.args(["--mode", mode, "--a"])
                .arg(&a_path)
                .arg("--b")
                .arg(&b_path)
                .arg("--processes")
                .arg(processes.to_string())
                .arg("--blocks")
                .arg(blocks.to_string())
                .arg("--out")
                .arg(&c_path);
            let context = cmd.command_line();
            let reports = cmd.run_json();
            assert_eq!(str_field(&reports[0], "dtype"), dtype, "{context}: the dtype comes from the files");
            assert_eq!(reports[0]["matches_seq"], Value::Bool(true), "{context}");
            let c = read_npy::<T>(&c_path);
            assert_product(&c, &a, &b, &context);
            assert_eq!(std::fs::read(&a_path).unwrap(), a_bytes, "{context}: the input file was modified");

            // C as the next run's A.
            let c2_path = dir.file(&format!("c2-{mode}-{processes}-{blocks}.npy"));
            let mut cmd = dir.matmul();
            cmd.args(["--mode", mode, "--a"])
                .arg(&c_path)
                .arg("--b")
                .arg(&d_path)
                .arg("--processes")
                .arg(processes.to_string())
                .arg("--out")
                .arg(&c2_path);
            let context2 = cmd.command_line();
            cmd.run_json();
            let c2 = read_npy::<T>(&c2_path);
            assert_product(&c2, &c, &d, &context2);

            match &first {
                None => first = Some((context, c, c2)),
                Some((first_context, first_c, first_c2)) => {
                    assert_bits_eq(&c, first_c, &format!("{context} vs {first_context}"));
                    assert_bits_eq(&c2, first_c2, &format!("{context2} vs the C·D of {first_context}"));
                }
            }
        }
    }
}

#[test]
fn npy_round_trip_f64() {
    // Non-integer values: rounding happens, so the bit-identity across runs
    // checks that the summation order does not depend on the blocks.
    let a = Matrix::<f64>::from_fn(11, 9, |i, j| (i as f64 * 0.37 - j as f64 * 1.13) / 7.0 + 1e-3);
    let b = Matrix::<f64>::from_fn(9, 6, |i, j| ((i * 6 + j) as f64).sin() * 1e3);
    let d = Matrix::<f64>::from_fn(6, 4, |i, j| ((i + 2 * j) as f64).cos() / 3.0);
    npy_round_trip(a, b, d);
}

#[test]
fn npy_round_trip_f32() {
    let a = Matrix::<f32>::from_fn(11, 9, |i, j| (i as f32 * 0.37 - j as f32 * 1.13) / 7.0 + 1e-3);
    let b = Matrix::<f32>::from_fn(9, 6, |i, j| ((i * 6 + j) as f32).sin() * 1e3);
    let d = Matrix::<f32>::from_fn(6, 4, |i, j| ((i + 2 * j) as f32).cos() / 3.0);
    npy_round_trip(a, b, d);
}

#[test]
fn npy_round_trip_i64_wrapping() {
    let big = |i: usize, j: usize, salt: u64| {
        ((i as u64 * 31 + j as u64 * 7 + salt).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (salt << 40)) as i64
    };
    let a = Matrix::<i64>::from_fn(11, 9, |i, j| big(i, j, 1));
    let b = Matrix::<i64>::from_fn(9, 6, |i, j| big(i, j, 2));
    let d = Matrix::<i64>::from_fn(6, 4, |i, j| big(i, j, 3));
    npy_round_trip(a, b, d);
}

/// numpy writes A and B, procjob multiplies them, numpy reads C and
/// compares it with its own A @ B.
fn numpy_case(dir: &TestDir, name: &str, make_inputs: &str, check_dtype: &str) {
    let (a, b, c) =
        (dir.file(&format!("{name}-a.npy")), dir.file(&format!("{name}-b.npy")), dir.file(&format!("{name}-c.npy")));
    python(
        &format!("import sys\nimport numpy as np\n{make_inputs}\nnp.save(sys.argv[1], A)\nnp.save(sys.argv[2], B)\n"),
        &[&a, &b],
    );
    for mode in MODES {
        let _ = std::fs::remove_file(&c);
        let mut cmd = dir.matmul();
        cmd.args(["--mode", mode, "--processes", "3", "--a"]).arg(&a).arg("--b").arg(&b).arg("--out").arg(&c);
        let context = cmd.command_line();
        let reports = cmd.run_json();
        assert_eq!(str_field(&reports[0], "dtype"), check_dtype, "{context}");
        let verdict = python(
            "import sys\nimport numpy as np\n\
             A = np.load(sys.argv[1]); B = np.load(sys.argv[2]); C = np.load(sys.argv[3], mmap_mode='r')\n\
             ok = C.dtype == A.dtype and C.shape == (A.shape[0], B.shape[1]) and np.array_equal(C, A @ B)\n\
             print('equal' if ok else f'DIFFERENT dtype={C.dtype} shape={C.shape}')\n",
            &[&a, &b, &c],
        );
        assert_eq!(verdict.trim(), "equal", "{context}: numpy's A @ B differs from procjob's C");
    }
}

#[test]
fn numpy_reads_our_npy_and_we_read_numpys() {
    if !require_numpy("numpy_reads_our_npy_and_we_read_numpys") {
        return;
    }
    let dir = TestDir::new("numpy");
    // Integer-valued f64: the product is exact, so any summation order agrees.
    numpy_case(
        &dir,
        "f64",
        "rng = np.random.default_rng(7)\n\
         A = rng.integers(0, 10, size=(37, 23)).astype(np.float64)\n\
         B = rng.integers(0, 10, size=(23, 19)).astype(np.float64)",
        "f64",
    );
    // i64 over the whole range: the products and sums wrap, in numpy too.
    numpy_case(
        &dir,
        "i64",
        "rng = np.random.default_rng(8)\n\
         info = np.iinfo(np.int64)\n\
         A = rng.integers(info.min, info.max, size=(37, 23), dtype=np.int64)\n\
         B = rng.integers(info.min, info.max, size=(23, 19), dtype=np.int64)",
        "i64",
    );
    // And our reader agrees with numpy's files and our own reference.
    let a = read_npy_i64(&dir.file("i64-a.npy"));
    let b = read_npy_i64(&dir.file("i64-b.npy"));
    assert_eq!((a.shape.as_slice(), b.shape.as_slice()), ([37, 23].as_slice(), [23, 19].as_slice()));
    assert_bits_eq(&read_npy_i64(&dir.file("i64-c.npy")), &matmul_ref(&a, &b), "numpy's i64 inputs, our reference");
    let a = read_npy_f64(&dir.file("f64-a.npy"));
    let b = read_npy_f64(&dir.file("f64-b.npy"));
    assert_bits_eq(&read_npy_f64(&dir.file("f64-c.npy")), &matmul_ref(&a, &b), "numpy's f64 inputs, our reference");
}

/// The run folder named on the first line of the human output.
fn announced_run_folder(stdout: &str, context: &str) -> std::path::PathBuf {
    let line = stdout
        .lines()
        .find(|l| l.contains("temp folder "))
        .unwrap_or_else(|| panic!("{context}: the human output does not name the temp folder:\n{stdout}"));
    let path = line.rsplit_once("temp folder ").expect("found above").1.trim();
    std::path::PathBuf::from(path)
}

fn check_run_folder_name(folder: &Path, parent: &Path, pid: u32, context: &str) {
    assert_eq!(folder.parent(), Some(parent), "{context}: run folder {} is not in the parent", folder.display());
    let name = folder.file_name().expect("a name").to_string_lossy();
    let prefix = format!("procjob-{pid}-");
    assert!(
        name.starts_with(&prefix) && name.len() > prefix.len(),
        "{context}: run folder {name} is not procjob-<pid>-<random> for pid {pid}"
    );
    assert!(!folder.exists(), "{context}: run folder {} still exists", folder.display());
}

#[test]
fn temp_folder_is_removed_and_parent_kept() {
    let dir = TestDir::new("tempfolder");
    // --temp-folder: the parent keeps what it held before, and only the run
    // folder is removed, in every mode.
    let parent = dir.file("parent");
    std::fs::create_dir(&parent).unwrap();
    std::fs::write(parent.join("keep.txt"), "mine").unwrap();
    std::fs::create_dir(parent.join("keep-dir")).unwrap();
    let mut cmd = Procjob::new();
    cmd.args(["matmul", "--shape", "9x4x5", "--processes", "2", "--temp-folder"]).arg(&parent);
    let run = cmd.run().assert_ok();
    let folder = announced_run_folder(&run.stdout, &run.command);
    check_run_folder_name(&folder, &parent, run.pid, &run.command);
    assert_eq!(std::fs::read_to_string(parent.join("keep.txt")).unwrap(), "mine", "{}", run.command);
    assert!(parent.join("keep-dir").is_dir(), "{}", run.command);
    let mut left: Vec<_> = std::fs::read_dir(&parent).unwrap().map(|e| e.unwrap().file_name()).collect();
    left.sort();
    assert_eq!(left, ["keep-dir", "keep.txt"], "{}: the parent holds something new", run.command);

    // A private parent stays empty, run after run (checked by every run).
    for mode in MODES {
        let run = dir.matmul().args(["--shape", "6x3x2", "--processes", "2", "--mode", mode]).run().assert_ok();
        check_run_folder_name(&announced_run_folder(&run.stdout, &run.command), dir.tmp(), run.pid, &run.command);
    }

    // A run that fails after making its folder removes it too: --out names a
    // directory, so C cannot be written.
    let out_dir = dir.file("out-is-a-dir");
    std::fs::create_dir(&out_dir).unwrap();
    let run = dir.matmul().args(["--shape", "4x3x2", "--processes", "2", "--out"]).arg(&out_dir).run();
    assert_ne!(run.code, Some(0), "{}: writing C over a directory succeeded", run.command);
    assert!(out_dir.is_dir(), "{}: the directory given as --out was replaced", run.command);
    dir.assert_clean(&run.command);
}

#[test]
fn temp_folder_from_environment() {
    let dir = TestDir::new("tempenv");
    let env_parent = dir.file("from-env");
    std::fs::create_dir(&env_parent).unwrap();
    let mut cmd = Procjob::new();
    cmd.args(["matmul", "--shape", "5x4x3", "--processes", "2"])
        .env(TEMP_FOLDER_ENV, &env_parent)
        .expect_clean(&env_parent);
    let run = cmd.run().assert_ok();
    check_run_folder_name(&announced_run_folder(&run.stdout, &run.command), &env_parent, run.pid, &run.command);

    // --temp-folder wins over the environment, which is then left alone.
    let mut cmd = dir.matmul();
    cmd.args(["--shape", "5x4x3", "--processes", "2"]).env(TEMP_FOLDER_ENV, &env_parent);
    let run = cmd.run().assert_ok();
    check_run_folder_name(&announced_run_folder(&run.stdout, &run.command), dir.tmp(), run.pid, &run.command);
    assert_clean_parent(&env_parent, &run.command);
}

/// Whether process `pid` is gone (a zombie counts as gone: it has exited).
fn process_gone(pid: u64) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        // The state follows the ")" that closes the command name.
        Ok(stat) => stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X'])),
    }
}

#[test]
fn workers_are_distinct_processes() {
    let dir = TestDir::new("workers");
    for mode in ["copy", "memmap", "memmap-out"] {
        let mut cmd = dir.matmul();
        cmd.args(["--mode", mode, "--processes", "3", "--blocks", "6", "--shape", "12x8x8"]).arg("--json");
        let run = cmd.run().assert_ok();
        let reports = run.json_lines();
        assert_eq!(reports.len(), 1, "{}", run.command);
        let r = &reports[0];
        let context = &run.command;
        assert_eq!(
            u64_field(&r["coordinator"], "pid"),
            u64::from(run.pid),
            "{context}: coordinator.pid is not procjob's pid"
        );
        let workers = r["workers"].as_array().unwrap();
        assert_eq!(workers.len(), 3, "{context}: {r}");
        assert_eq!(u64_field(r, "blocks"), 6, "{context}: {r}");
        check_workers(r, 3, context);
        let mut indices: Vec<u64> = workers.iter().map(|w| u64_field(w, "index")).collect();
        indices.sort_unstable();
        assert_eq!(indices, [0, 1, 2], "{context}: worker indices");
        // The workers do not outlive the coordinator.
        let deadline = Instant::now() + Duration::from_secs(5);
        for w in workers {
            let pid = u64_field(w, "pid");
            while !process_gone(pid) {
                assert!(Instant::now() < deadline, "{context}: worker {pid} is still running after the run");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

#[test]
fn json_lines_have_every_field_and_nothing_else() {
    let dir = TestDir::new("json");
    let mut cmd = dir.matmul();
    cmd.args(["--shape", "9x6x5", "--processes", "2", "--repeat", "2", "--mode", "all", "--json"]);
    let run = cmd.run().assert_ok();
    let context = &run.command;
    let reports = run.json_lines(); // every line parses and has every field
    assert_eq!(reports.len(), MODES.len(), "{context}: one line per mode:\n{}", run.stdout);
    for (r, mode) in reports.iter().zip(MODES) {
        assert_eq!(str_field(r, "mode"), mode, "{context}");
        assert_eq!(str_field(r, "dtype"), "i64", "{context}");
        assert_eq!([u64_field(r, "m"), u64_field(r, "k"), u64_field(r, "n")], [9, 6, 5], "{context}");
        assert_eq!(r["matches_seq"], Value::Bool(true), "{context}: {r}");
        assert_eq!(r["lost"], Value::Array(Vec::new()), "{context}: no worker died: {r}");
        assert_eq!(u64_field(&r["coordinator"], "pid"), u64::from(run.pid), "{context}");
        let walls = r["walls_s"].as_array().unwrap();
        assert_eq!(walls.len(), 2, "{context}: --repeat 2 gives two walls: {r}");
        assert_eq!(r["cold_wall_s"], walls[0], "{context}: cold_wall_s is the first repetition: {r}");
        assert!(walls.contains(&r["wall_s"]), "{context}: wall_s is one of walls_s: {r}");
        let wall = r["wall_s"].as_f64().unwrap();
        if wall > 0.0 {
            let gflops = 2.0 * 9.0 * 6.0 * 5.0 / wall / 1e9;
            let reported = r["gflops"].as_f64().unwrap();
            assert!((reported - gflops).abs() <= 1e-9 * gflops, "{context}: gflops {reported} vs {gflops}");
        }
        assert!(r["speedup_vs_seq"].is_f64(), "{context}: seq was run, so speedup_vs_seq is a number: {r}");
        if mode == "seq" {
            assert_eq!(u64_field(r, "processes"), 1, "{context}");
            assert_eq!(r["speedup_vs_seq"].as_f64(), Some(1.0), "{context}");
            assert_eq!(u64_field(r, "bytes_to_workers") + u64_field(r, "bytes_from_workers"), 0, "{context}");
        } else if mode == "threads" {
            assert_eq!(u64_field(r, "processes"), 2, "{context}: --processes sets the threads");
            assert_eq!(str_field(r, "start_method"), "none", "{context}");
            assert_eq!(u64_field(r, "blocks"), 2, "{context}: --blocks defaults to --processes");
            assert_eq!(u64_field(r, "bytes_to_workers") + u64_field(r, "bytes_from_workers"), 0, "{context}");
            assert_eq!(r["workers"].as_array().map(Vec::len), Some(0), "{context}: threads start no worker");
        } else {
            assert_eq!(u64_field(r, "processes"), 2, "{context}");
            let start = if mode == "fork" { "fork" } else { "spawn" };
            assert_eq!(str_field(r, "start_method"), start, "{context}: the default start method");
            assert_eq!(u64_field(r, "blocks"), 2, "{context}: --blocks defaults to --processes");
            assert!(u64_field(r, "bytes_to_workers") > 0, "{context}: nothing crossed the pipes: {r}");
            check_workers(r, 2, context);
        }
    }

    // --no-check: matches_seq is null; without seq, speedup_vs_seq is null.
    let reports = run_json(&dir, &["--shape", "9x6x5", "--processes", "2", "--mode", "copy", "--no-check"]);
    assert_eq!(reports.len(), 1);
    assert!(reports[0]["matches_seq"].is_null(), "--no-check: {}", reports[0]);
    assert!(reports[0]["speedup_vs_seq"].is_null(), "seq not run: {}", reports[0]);
}

#[test]
fn a_mode_s_c_is_not_held_through_the_modes_after_it() {
    // C is 16 MB, and checking it against seq's touches all of it, so a C
    // of an earlier mode still held shows in a later mode's coordinator
    // peak RSS. memmap-out runs last but one under --mode all; alone, it
    // holds only the reference, as it should under --mode all too.
    let dir = TestDir::new("c_dropped");
    let args = ["--dtype", "f64", "--shape", "1000x10x2000", "--processes", "2", "--mode"];
    let peak = |mode: &str| {
        let reports = run_json(&dir, &[&args[..], &[mode]].concat());
        let r = reports.iter().find(|r| str_field(r, "mode") == "memmap-out").expect("memmap-out ran");
        u64_field(&r["coordinator"], "peak_rss_bytes")
    };
    let (after_others, alone) = (peak("all"), peak("memmap-out"));
    let c_bytes = 1000 * 2000 * 8;
    assert!(alone > c_bytes, "the reference alone is {c_bytes} bytes, but the peak was {alone}: RSS not measured?");
    assert!(
        after_others < alone + c_bytes / 2,
        "memmap-out's coordinator peak after the other modes, {after_others}, is its peak alone, {alone}, plus a \
         C or more: an earlier mode's C is still held"
    );
}

fn mentions_shape(text: &str, rows: usize, cols: usize) -> bool {
    [format!("{rows}×{cols}"), format!("{rows}x{cols}"), format!("({rows}, {cols})"), format!("[{rows}, {cols}]")]
        .iter()
        .any(|s| text.contains(s.as_str()))
}

#[test]
fn bad_input_exits_2_and_names_the_problem() {
    let dir = TestDir::new("bad");
    let a = dir.file("a.npy");
    let b = dir.file("b.npy");
    write_npy(&a, &Matrix::<f64>::from_fn(3, 4, |i, j| (i + j) as f64));
    write_npy(&b, &Matrix::<f64>::from_fn(5, 2, |i, j| (i * j) as f64));
    let text = dir.file("notes.txt");
    std::fs::write(&text, "these are not the numbers you are looking for\n").unwrap();
    let out = dir.file("never.npy");
    let (a_s, b_s, text_s) = (a.to_str().unwrap(), b.to_str().unwrap(), text.to_str().unwrap());

    // (arguments, what the message must mention, whether it must name A's
    // and B's shapes)
    let cases: [(&[&str], &[&str], bool); 5] = [
        (&["--processes", "0", "--shape", "2x2x2"], &["--processes"], false),
        (&["--a", a_s], &["--b"], false),
        (&["--a", text_s, "--b", b_s], &[text_s], false),
        (&["--a", a_s, "--b", b_s], &[], true),
        (&["--shape", "3x4"], &["--shape", "3x4"], false),
    ];
    for (args, needles, names_shapes) in cases {
        let mut cmd = dir.matmul();
        cmd.args(args).arg("--json").arg("--out").arg(&out);
        let run = cmd.run().assert_code(2);
        let context = &run.command;
        assert!(run.stdout.is_empty(), "{context}: stdout on an error:\n{}", run.stdout);
        assert!(!run.stderr.trim().is_empty(), "{context}: no message");
        for &needle in needles {
            assert!(run.stderr.contains(needle), "{context}: the message does not mention {needle:?}:\n{}", run.stderr);
        }
        if names_shapes {
            let msg = run.stderr.to_lowercase();
            assert!(
                msg.contains("dimension") && mentions_shape(&msg, 3, 4) && mentions_shape(&msg, 5, 2),
                "{context}: the message should name the inner dimensions and both shapes:\n{}",
                run.stderr
            );
        }
        assert!(!out.exists(), "{context}: --out was written on an error");
    }
}

/// `PROCJOB_GEMM` and `PROCJOB_GEMM_BLOCKING` (docs/kernels.md) change which
/// kernel and blocking run, never C: forcing the AVX2 kernels on a CPU with
/// AVX-512, the fixed or tiny blockings, or either loop order, gives the
/// bits of the default run (non-integer data, two depth chunks, edge tiles,
/// several processes).
/// `portable` (the fallback, other bits) gives the product within rounding;
/// an unknown value is ignored with a warning.
fn forced_kernels_and_blockings_agree<T: Reference>(a: Matrix<T>, b: Matrix<T>) {
    let dtype = T::DTYPE.name();
    let dir = TestDir::new(&format!("forced-{dtype}"));
    let (a_path, b_path) = (dir.file("a.npy"), dir.file("b.npy"));
    write_npy(&a_path, &a);
    write_npy(&b_path, &b);
    let run = |name: &str, env: &[(&str, &str)], mode: &str| {
        let c_path = dir.file(&format!("c-{name}-{mode}.npy"));
        let mut cmd = dir.matmul();
        cmd.args(["--mode", mode, "--processes", "2", "--a"])
            .arg(&a_path)
            .arg("--b")
            .arg(&b_path)
            .arg("--out")
            .arg(&c_path)
            .arg("--json");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let run = cmd.run().assert_ok();
        let c = read_npy::<T>(&c_path);
        assert_product(&c, &a, &b, &run.command);
        (run, c)
    };
    let (_, want) = run("default", &[], "seq");
    for mode in ["seq", "memmap"] {
        for (name, env) in [
            ("avx2", &[("PROCJOB_GEMM", "avx2")][..]),
            ("avx512", &[("PROCJOB_GEMM", "avx512")]),
            ("fixed", &[("PROCJOB_GEMM_BLOCKING", "fixed")]),
            ("tiny", &[("PROCJOB_GEMM_BLOCKING", "6,8")]),
            ("avx2-tiny", &[("PROCJOB_GEMM", "avx2"), ("PROCJOB_GEMM_BLOCKING", "12,40")]),
            // Each loop order, whichever this machine picks.
            ("a-in-l2", &[("PROCJOB_GEMM_BLOCKING", "12,40,a")]),
            ("b-in-l2", &[("PROCJOB_GEMM_BLOCKING", "12,40,b")]),
            ("avx2-a-in-l2", &[("PROCJOB_GEMM", "avx2"), ("PROCJOB_GEMM_BLOCKING", "6,16,a")]),
        ] {
            let (run, c) = run(name, env, mode);
            assert_bits_eq(&c, &want, &run.command);
        }
    }
    run("portable", &[("PROCJOB_GEMM", "portable")], "seq");
    let (bogus, c) = run("bogus", &[("PROCJOB_GEMM", "sse9")], "seq");
    assert!(bogus.stderr.contains("ignoring PROCJOB_GEMM=\"sse9\""), "{}: {}", bogus.command, bogus.stderr);
    assert_bits_eq(&c, &want, &bogus.command);
}

#[test]
fn forced_kernels_and_blockings_agree_f64() {
    let a = Matrix::<f64>::from_fn(37, 600, |i, j| ((i * 600 + j) as f64 * 0.618).sin() / 3.0);
    let b = Matrix::<f64>::from_fn(600, 75, |i, j| ((i * 75 + j) as f64 * 0.377).cos() * 7.0);
    forced_kernels_and_blockings_agree(a, b);
}

#[test]
fn forced_kernels_and_blockings_agree_f32() {
    let a = Matrix::<f32>::from_fn(37, 600, |i, j| ((i * 600 + j) as f32 * 0.618).sin() / 3.0);
    let b = Matrix::<f32>::from_fn(600, 75, |i, j| ((i * 75 + j) as f32 * 0.377).cos() * 7.0);
    forced_kernels_and_blockings_agree(a, b);
}
