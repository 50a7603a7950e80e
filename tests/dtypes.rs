//! Every dtype, end to end through the public API: arrays of each travel to
//! a worker and back (inline and, above `max_nbytes`, as a memory map),
//! round-trip through numpy's `.npy` files in both directions with their
//! values checked, and view as `ndarray` arrays without a copy, mapped
//! ones included. The matmul CLI still multiplies only i64, f64 and f32.
//!
//! The numpy tests need `python3` with numpy; without it they are skipped
//! with a message (and fail under `CI`, as worker/tests/npy_numpy.rs does).

use std::path::{Path, PathBuf};
use std::process::Command;

use procjob::{Access, Array, ArrayError, Complex, DType, Element, Parallel, Task};
use serde::{Deserialize, Serialize};

procjob::test_support!();

/// Elements per test array: rows × cols.
const ROWS: usize = 6;
const COLS: usize = 7;

/// The test values of every element type: distinct, covering the range
/// (the extremes of each integer type, negative numbers, fractions,
/// complex parts), and the same formulas as the Python `values` below.
trait Sample: Element {
    fn sample(i: usize) -> Self;
}

/// The integer the formula gives for element `i`; narrower types wrap it.
fn int(i: usize) -> i64 {
    match i {
        0 => i64::MIN,
        1 => i64::MAX,
        _ => (i as i64 * 1_000_003 - 17) * if i.is_multiple_of(2) { 1 } else { -1 },
    }
}

macro_rules! int_sample {
    ($($t:ty),*) => {$(
        impl Sample for $t {
            fn sample(i: usize) -> $t {
                int(i) as $t
            }
        }
    )*};
}
int_sample!(i8, i16, i32, i64, u8, u16, u32, u64);

impl Sample for f64 {
    fn sample(i: usize) -> f64 {
        (i as f64 - 7.0) / 3.0
    }
}
impl Sample for f32 {
    fn sample(i: usize) -> f32 {
        f64::sample(i) as f32
    }
}
impl Sample for bool {
    fn sample(i: usize) -> bool {
        i.is_multiple_of(3)
    }
}
impl Sample for Complex<f64> {
    fn sample(i: usize) -> Complex<f64> {
        Complex::new(f64::sample(i), i as f64 * 0.5 + 1.0)
    }
}
impl Sample for Complex<f32> {
    fn sample(i: usize) -> Complex<f32> {
        Complex::new(f32::sample(i), (i as f64 * 0.5 + 1.0) as f32)
    }
}

fn samples<T: Sample>(n: usize) -> Vec<T> {
    (0..n).map(T::sample).collect()
}

/// Runs `check::<T>()` for the Rust element type of every dtype, and
/// checks that none was left out.
macro_rules! for_every_dtype {
    ($check:ident $(, $arg:expr)*) => {{
        let mut seen = vec![
            $check::<i8>($($arg),*),
            $check::<i16>($($arg),*),
            $check::<i32>($($arg),*),
            $check::<i64>($($arg),*),
            $check::<u8>($($arg),*),
            $check::<u16>($($arg),*),
            $check::<u32>($($arg),*),
            $check::<u64>($($arg),*),
            $check::<f32>($($arg),*),
            $check::<f64>($($arg),*),
            $check::<bool>($($arg),*),
            $check::<Complex<f32>>($($arg),*),
            $check::<Complex<f64>>($($arg),*),
        ];
        seen.sort_by_key(|d: &DType| d.name());
        let mut all = DType::ALL.to_vec();
        all.sort_by_key(|d| d.name());
        assert_eq!(seen, all, "every dtype is checked once");
    }};
}

/// Echoes its arrays back, rows reversed, in a fresh owned array of the
/// same dtype; says whether the input arrived as a map and whether an
/// `ndarray` view of it is the very bytes the worker received (no copy).
struct Reverse;

#[derive(Debug, Serialize, Deserialize)]
struct Reversed {
    rows_reversed: Array,
    same: Array,
    mapped: bool,
    view_is_in_place: bool,
}

impl Task for Reverse {
    type Input = Array;
    type Output = Reversed;
    type Error = String;
    fn run(a: Array) -> Result<Reversed, String> {
        let mut out = Array::try_zeros(a.dtype(), a.shape().to_vec()).map_err(|e| e.to_string())?;
        let row_bytes = a.nbytes() / a.shape()[0];
        let (src, dst) = (a.as_bytes(), out.as_bytes_mut().map_err(|e| e.to_string())?);
        for (to, from) in dst.chunks_exact_mut(row_bytes).zip(src.chunks_exact(row_bytes).rev()) {
            to.copy_from_slice(from);
        }
        // A bool array's bytes are checked before they are bools.
        if a.dtype() == DType::Bool {
            a.as_slice::<bool>().map_err(|e| e.to_string())?;
        }
        let view_is_in_place = view_address(&a)? == a.as_bytes().as_ptr() as usize;
        Ok(Reversed { rows_reversed: out, mapped: a.is_mapped(), view_is_in_place, same: a })
    }
}

/// The address of the first element of an `ndarray` view of `a`, of its
/// own element type.
fn view_address(a: &Array) -> Result<usize, String> {
    fn address<T: Element>(a: &Array) -> Result<usize, String> {
        Ok(a.view::<T>().map_err(|e| e.to_string())?.as_ptr() as usize)
    }
    match a.dtype() {
        DType::I8 => address::<i8>(a),
        DType::I16 => address::<i16>(a),
        DType::I32 => address::<i32>(a),
        DType::I64 => address::<i64>(a),
        DType::U8 => address::<u8>(a),
        DType::U16 => address::<u16>(a),
        DType::U32 => address::<u32>(a),
        DType::U64 => address::<u64>(a),
        DType::F32 => address::<f32>(a),
        DType::F64 => address::<f64>(a),
        DType::Bool => address::<bool>(a),
        DType::C64 => address::<Complex<f32>>(a),
        DType::C128 => address::<Complex<f64>>(a),
        other => Err(format!("no element type for {other}")),
    }
}

fn round_trip_through_a_worker<T: Sample>(p: &mut Parallel) -> DType {
    let values = samples::<T>(ROWS * COLS);
    let a = Array::from_vec(vec![ROWS, COLS], values.clone());
    let nbytes = a.nbytes();
    // Inline: at max_nbytes exactly. As a map: one byte above.
    for (max, as_map) in [(nbytes, false), (nbytes - 1, true)] {
        let context = format!("{} with max_nbytes {max}", T::DTYPE);
        // The builder keeps the pool: the workers stay warm.
        *p = std::mem::take(p).max_nbytes(Some(max));
        let out = p.run::<Reverse, _>([a.clone()]).unwrap_or_else(|e| panic!("{context}: {e}"));
        let r = &out[0];
        assert_eq!(r.mapped, as_map, "{context}");
        assert!(r.view_is_in_place, "{context}: the ndarray view is a copy");
        assert_eq!((r.same.dtype(), r.same.shape()), (T::DTYPE, &[ROWS, COLS][..]), "{context}");
        assert_eq!(r.same.as_slice::<T>().unwrap(), &values[..], "{context}");
        let expected: Vec<T> = values.chunks(COLS).rev().flatten().copied().collect();
        assert_eq!(r.rows_reversed.to_vec::<T>().unwrap(), expected, "{context}");
        for (i, row) in r.rows_reversed.iter_rows::<T>().unwrap().enumerate() {
            assert_eq!(row, a.row::<T>(ROWS - 1 - i).unwrap(), "{context}: row {i}");
        }
    }
    T::DTYPE
}

#[test]
fn every_dtype_round_trips_through_a_worker_inline_and_mapped() {
    let mut p = Parallel::new().n_jobs(2);
    for_every_dtype!(round_trip_through_a_worker, &mut p);
}

/// A bool array whose bytes are not all 0 or 1 is refused, in the worker
/// as here, with an error naming the element.
#[test]
fn a_bool_array_with_a_byte_other_than_0_or_1_is_refused() {
    let mut a = Array::from_vec(vec![2, 2], vec![true, false, true, true]);
    a.as_bytes_mut().unwrap()[2] = 7;
    match a.as_slice::<bool>() {
        Err(ArrayError::NotBool { index: 2, byte: 7 }) => {}
        other => panic!("expected NotBool at element 2, got {other:?}"),
    }
    assert!(a.view::<bool>().is_err() && a.iter_rows::<bool>().is_err());
    let err = Parallel::new().n_jobs(1).run::<Reverse, _>([a]).unwrap_err().to_string();
    assert!(err.contains("bool") && err.contains("0x07") && err.contains("element 2"), "{err}");
}

// ---------------------------------------------------------------------------
// numpy

/// Whether numpy is usable; without it a test says so and passes, except
/// under CI.
fn numpy_available() -> bool {
    let ok = Command::new("python3").args(["-c", "import numpy"]).output().is_ok_and(|o| o.status.success());
    if !ok {
        if std::env::var_os("CI").is_some() {
            panic!("numpy is required in CI: python3 -c 'import numpy' failed");
        }
        println!("skipping: numpy not available (python3 -c 'import numpy' failed)");
    }
    ok
}

/// The Python twin of [`Sample`].
const PY_VALUES: &str = r#"
import sys, os
import numpy as np
def values(code, n):
    kind = code[1]
    if kind in 'iu':
        v = [(i * 1000003 - 17) * (-1) ** i for i in range(n)]
        v[0], v[1] = -2**63, 2**63 - 1
        return np.array(v, dtype='<i8').astype(code)
    if kind == 'b':
        return np.array([i % 3 == 0 for i in range(n)], dtype='|b1')
    re = np.array([(i - 7) / 3.0 for i in range(n)], dtype='<f8')
    if kind == 'c':
        return (re + 1j * np.array([i * 0.5 + 1.0 for i in range(n)], dtype='<f8')).astype(code)
    return re.astype(code)
"#;

fn python(script: &str, dir: &Path) -> String {
    let out = Command::new("python3")
        .arg("-c")
        .arg(format!("{PY_VALUES}\nd = sys.argv[1]\n{script}"))
        .arg(dir)
        .output()
        .expect("run python3");
    assert!(out.status.success(), "python failed:\n{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("utf-8")
}

fn numpy_file(dir: &Path, dtype: DType) -> PathBuf {
    dir.join(format!("numpy-{}.npy", dtype.name()))
}

fn procjob_file(dir: &Path, dtype: DType) -> PathBuf {
    dir.join(format!("procjob-{}.npy", dtype.name()))
}

/// numpy's file is read (mapped) with the right dtype, shape and values;
/// procjob's file is written for numpy to check.
fn read_numpy_and_write_for_numpy<T: Sample>(dir: &Path) -> DType {
    let a = Array::open_npy(&numpy_file(dir, T::DTYPE), Access::ReadOnly).unwrap();
    assert!(a.is_mapped());
    assert_eq!((a.dtype(), a.shape()), (T::DTYPE, &[ROWS, COLS][..]));
    assert_eq!(a.to_vec::<T>().unwrap(), samples::<T>(ROWS * COLS), "{} from numpy", T::DTYPE);
    // A view of the mapped file: the map's own bytes, not a copy.
    let (map, offset) = a.storage_bytes();
    assert_eq!(a.view2::<T>().unwrap().as_ptr().cast::<u8>(), map[offset..].as_ptr(), "{}", T::DTYPE);
    Array::from_vec(vec![ROWS, COLS], samples::<T>(ROWS * COLS)).save_npy(&procjob_file(dir, T::DTYPE)).unwrap();
    T::DTYPE
}

#[test]
fn every_dtype_round_trips_through_numpy_files() {
    if !numpy_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut script = String::new();
    for dtype in DType::ALL {
        script += &format!(
            "np.save({:?}, values('{}', {}).reshape({ROWS}, {COLS}))\n",
            numpy_file(dir.path(), dtype).to_str().unwrap(),
            dtype.npy_descr(),
            ROWS * COLS
        );
    }
    python(&script, dir.path());

    for_every_dtype!(read_numpy_and_write_for_numpy, dir.path());

    let mut check = String::new();
    for dtype in DType::ALL {
        check += &format!(
            "a = np.load({:?}, mmap_mode='r')\n\
             good = isinstance(a, np.memmap) and a.dtype.str == '{code}' and a.shape == ({ROWS}, {COLS}) \
             and np.array_equal(np.asarray(a), values('{code}', {n}).reshape({ROWS}, {COLS}))\n\
             print('ok' if good else 'BAD', '{name}', a.dtype.str, a.shape)\n",
            procjob_file(dir.path(), dtype).to_str().unwrap(),
            code = dtype.npy_descr(),
            n = ROWS * COLS,
            name = dtype.name(),
        );
    }
    let out = python(&check, dir.path());
    assert_eq!(out.lines().count(), DType::ALL.len(), "{out}");
    for line in out.lines() {
        assert!(line.starts_with("ok "), "numpy disagrees: {line}\n{out}");
    }
}

// ---------------------------------------------------------------------------
// The matmul CLI keeps its three dtypes.

#[test]
fn matmul_refuses_npy_inputs_and_dtypes_it_does_not_multiply() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a.npy"), dir.path().join("b.npy"));
    for dtype in [DType::U8, DType::I32, DType::Bool, DType::C128] {
        let _ = std::fs::remove_file(&a);
        let _ = std::fs::remove_file(&b);
        Array::zeros(dtype, vec![3, 3]).save_npy(&a).unwrap();
        Array::zeros(dtype, vec![3, 3]).save_npy(&b).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_procjob"))
            .args(["matmul", "--mode", "seq", "--quiet", "--a"])
            .arg(&a)
            .arg("--b")
            .arg(&b)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{dtype}: {stderr}");
        for needle in ["--a", "a.npy", "unsupported dtype", dtype.npy_descr(), "'<i8' (i64), '<f8' (f64), '<f4' (f32)"]
        {
            assert!(stderr.contains(needle), "{dtype}: {needle:?} not in {stderr}");
        }

        let out = Command::new(env!("CARGO_BIN_EXE_procjob"))
            .args(["matmul", "--mode", "seq", "--quiet", "--size", "4", "--dtype", dtype.name()])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "--dtype {dtype}: {stderr}");
        assert!(stderr.contains(&format!("--dtype {:?} is not one of: i64, f64, f32", dtype.name())), "{stderr}");
    }
}
