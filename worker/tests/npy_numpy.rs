//! Interoperability of `procjob_worker::npy` with numpy itself: files saved
//! by `numpy.save` are read back exactly, files written by `npy::write` and
//! `npy::create` load in `numpy.load(..., mmap_mode='r')` with the right
//! dtype, shape and values, and numpy files we must refuse are refused.
//!
//! Needs `python3` with numpy. Without it the test is skipped with a message,
//! unless the `CI` environment variable is set, where it fails instead so a
//! misconfigured CI cannot silently skip it.

use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use procjob_worker::npy::{self, HeaderError, NpyError};
use procjob_worker::DType;

/// The shapes exercised in both directions.
const SHAPES: &[&[usize]] = &[&[7, 5], &[0, 3], &[4], &[], &[2, 3, 4]];

/// Python helpers shared by every script: the same value formulas as
/// [`value_bytes`], evaluated by numpy, so both sides check actual values.
const PY_PRELUDE: &str = r#"
import sys, os
import numpy as np
def values(code, n):
    kind = code[1]
    if kind in 'iu':
        v = [(i * 1000003 - 17) * (-1) ** i for i in range(n)]
        if n >= 2:
            v[0], v[1] = -2**63, 2**63 - 1
        return np.array(v, dtype='<i8').astype(code)  # narrower types wrap, as Rust's `as`
    if kind == 'b':
        return np.array([i % 3 == 0 for i in range(n)], dtype='|b1')
    re = np.array([(i - 7) / 3.0 for i in range(n)], dtype='<f8')
    if kind == 'c':
        return (re + 1j * np.array([i * 0.5 + 1.0 for i in range(n)], dtype='<f8')).astype(code)
    return re.astype(code)
def make(code, shape):
    n = 1
    for d in shape:
        n *= d
    return values(code, n).reshape(shape)
"#;

/// Little-endian bytes of the `n` values the Python `values` function makes.
fn value_bytes(dtype: DType, n: usize) -> Vec<u8> {
    (0..n)
        .flat_map(|i| {
            let int = match (i, n >= 2) {
                (0, true) => i64::MIN,
                (1, true) => i64::MAX,
                _ => (i as i64 * 1_000_003 - 17) * if i % 2 == 0 { 1 } else { -1 },
            };
            // Same IEEE operations in the same order as Python: exact match.
            let re = (i as f64 - 7.0) / 3.0;
            let im = i as f64 * 0.5 + 1.0;
            match dtype {
                // Narrower integers wrap, as numpy's astype does.
                DType::I8 => (int as i8).to_le_bytes().to_vec(),
                DType::I16 => (int as i16).to_le_bytes().to_vec(),
                DType::I32 => (int as i32).to_le_bytes().to_vec(),
                DType::I64 => int.to_le_bytes().to_vec(),
                DType::U8 => (int as u8).to_le_bytes().to_vec(),
                DType::U16 => (int as u16).to_le_bytes().to_vec(),
                DType::U32 => (int as u32).to_le_bytes().to_vec(),
                DType::U64 => (int as u64).to_le_bytes().to_vec(),
                DType::F64 => re.to_le_bytes().to_vec(),
                DType::F32 => (re as f32).to_le_bytes().to_vec(),
                DType::Bool => vec![u8::from(i % 3 == 0)],
                DType::C64 => [(re as f32).to_le_bytes(), (im as f32).to_le_bytes()].concat(),
                DType::C128 => [re.to_le_bytes(), im.to_le_bytes()].concat(),
                other => panic!("no test values for {other}"),
            }
        })
        .collect()
}

fn shape_name(shape: &[usize]) -> String {
    if shape.is_empty() {
        "scalar".to_owned()
    } else {
        shape.iter().map(|d| d.to_string()).collect::<Vec<_>>().join("x")
    }
}

fn file_name(dtype: DType, shape: &[usize]) -> String {
    format!("{}_{}.npy", dtype.name(), shape_name(shape))
}

fn py_shape(shape: &[usize]) -> String {
    match shape {
        [d] => format!("({d},)"),
        _ => format!("({})", shape.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", ")),
    }
}

/// Whether numpy is usable; decides skip-or-fail as described in the module docs.
fn numpy_available() -> bool {
    let ok = Command::new("python3").args(["-c", "import numpy"]).output().map(|o| o.status.success()).unwrap_or(false);
    if !ok {
        if std::env::var_os("CI").is_some() {
            panic!("numpy is required in CI: python3 -c 'import numpy' failed");
        }
        println!("skipping: numpy not available (pip install numpy)");
    }
    ok
}

/// Runs a Python script (after the prelude) with `dir` as `sys.argv[1]` and
/// returns its stdout; panics with stderr if it fails.
fn python(script: &str, dir: &Path) -> String {
    let out = Command::new("python3")
        .arg("-c")
        .arg(format!("{PY_PRELUDE}\n{script}"))
        .arg(dir)
        .output()
        .expect("run python3");
    assert!(out.status.success(), "python failed:\n{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("python output is utf-8")
}

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("procjob-npy-numpy-{}-{name}", std::process::id()));
        std::fs::create_dir(&dir).expect("create temp dir");
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn npy_reads_numpy_saved_files_exactly() {
    if !numpy_available() {
        return;
    }
    let dir = TempDir::new("from-numpy");
    let mut script = String::from("d = sys.argv[1]\n");
    for dtype in DType::ALL {
        for &shape in SHAPES {
            script += &format!(
                "np.save(os.path.join(d, '{}'), make('{}', {}))\n",
                file_name(dtype, shape),
                dtype.npy_descr(),
                py_shape(shape)
            );
        }
    }
    // Files numpy writes that we must refuse, each with its specific error.
    script += r#"
np.save(os.path.join(d, 'fortran.npy'), np.asfortranarray(np.zeros((3, 4))))
np.save(os.path.join(d, 'bigendian.npy'), np.zeros(3, dtype='>f8'))
np.save(os.path.join(d, 'float16.npy'), np.zeros(3, dtype='<f2'))
np.save(os.path.join(d, 'object.npy'), np.array([1, 'a', None], dtype=object))
np.save(os.path.join(d, 'datetime.npy'), np.zeros(3, dtype='<M8[ns]'))
"#;
    python(&script, &dir.0);

    for dtype in DType::ALL {
        for &shape in SHAPES {
            let path = dir.0.join(file_name(dtype, shape));
            let (mut file, header) = npy::read_header(&path).unwrap_or_else(|e| panic!("{}", e));
            assert_eq!(header.dtype, dtype, "{}", path.display());
            assert_eq!(header.shape, shape, "{}", path.display());
            assert_eq!(header.data_offset % npy::ALIGN, 0);
            let mut data = Vec::new();
            file.read_to_end(&mut data).expect("read data");
            let n: usize = shape.iter().product();
            assert_eq!(data, value_bytes(dtype, n), "{}", path.display());
        }
    }

    let refused = |name: &str| match npy::read_header(&dir.0.join(name)) {
        Err(NpyError::Header { source, .. }) => source,
        other => panic!("{name}: expected a header error, got {other:?}"),
    };
    assert_eq!(refused("fortran.npy"), HeaderError::FortranOrder);
    assert_eq!(refused("bigendian.npy"), HeaderError::NonNativeByteOrder { descr: ">f8".into() });
    for (name, descr) in [("float16.npy", "<f2"), ("object.npy", "|O"), ("datetime.npy", "<M8[ns]")] {
        assert_eq!(refused(name), HeaderError::UnsupportedDtype { descr: descr.into() });
    }
}

#[test]
fn npy_written_files_load_in_numpy() {
    if !numpy_available() {
        return;
    }
    let dir = TempDir::new("to-numpy");
    let mut script = String::from("d = sys.argv[1]\n");
    let mut expected = 0;
    for dtype in DType::ALL {
        for &shape in SHAPES {
            let name = file_name(dtype, shape);
            let n: usize = shape.iter().product();
            npy::write(&dir.0.join(&name), dtype, shape, &value_bytes(dtype, n)).unwrap_or_else(|e| panic!("{}", e));
            script += &format!("check('{name}', '{}', {})\n", dtype.npy_descr(), py_shape(shape));
            expected += 1;
        }
        // A file made by create() and filled in place, as workers fill
        // shared outputs, must be just as valid.
        let name = format!("created_{}.npy", dtype.name());
        let (file, header) = npy::create(&dir.0.join(&name), dtype, &[7, 5]).expect("create");
        file.write_all_at(&value_bytes(dtype, 35), header.data_offset as u64).expect("fill");
        drop(file);
        script += &format!("check('{name}', '{}', (7, 5))\n", dtype.npy_descr());
        // And an unfilled one is all zeros.
        let name = format!("zeros_{}.npy", dtype.name());
        npy::create(&dir.0.join(&name), dtype, &[3, 2]).expect("create");
        script += &format!(
            "a = np.load(os.path.join(d, '{name}'), mmap_mode='r')\n\
             print('ok' if a.shape == (3, 2) and not a.any() else 'BAD', '{name}')\n"
        );
        expected += 2;
    }
    let prelude = r#"
def check(name, code, shape):
    a = np.load(os.path.join(d, name), mmap_mode='r', allow_pickle=False)
    good = (a.dtype.str == code and a.shape == shape and a.flags.c_contiguous
            and isinstance(a, np.memmap) and np.array_equal(np.asarray(a), make(code, shape)))
    print('ok' if good else 'BAD', name, a.dtype.str, a.shape)
"#;
    let out = python(&format!("{prelude}\n{script}"), &dir.0);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), expected, "{out}");
    for line in lines {
        assert!(line.starts_with("ok "), "numpy disagrees: {line}\n{out}");
    }
}
