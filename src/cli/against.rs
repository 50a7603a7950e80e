//! `procjob bench --against numpy,joblib`: numpy's matmul on N BLAS
//! threads and joblib's memmapped `parallel_dot` on N workers, run by a
//! small Python driver on the very matrices procjob multiplies, timed in
//! the same interleaved rounds as procjob's modes.
//!
//! The driver ([`DRIVER`]) is embedded here and run with `python -c`: one
//! driver process per BLAS thread count (the count is fixed when numpy
//! starts, by `OPENBLAS_NUM_THREADS` and its kin set in the driver's
//! environment only), which loads A and B from `.npy` files in the run
//! folder and answers one request a line on stdin (`numpy` or `joblib`)
//! with the seconds the product took and the sum of its C. The sum is
//! checked against procjob's own (sum over k of A's column sums times B's
//! row sums): a wrong or differently-ordered input would not pass. The
//! driver sits in its own process group, so a Ctrl-C at the terminal
//! reaches procjob alone, which then closes the driver's stdin: it stops
//! joblib's workers and exits.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use procjob_worker::{DType, Element};

use crate::error::Error;
use crate::matmul::Inputs;

/// Where the Python to run comes from when `--python` is not given.
pub const PYTHON_ENV: &str = "PROCJOB_BENCH_PYTHON";

/// The baselines a sweep can be run against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Baseline {
    /// `np.matmul(A, B, out=C)` on N BLAS threads.
    Numpy,
    /// joblib's `parallel_dot` on N loky workers, A and B memory-mapped.
    Joblib,
}

impl Baseline {
    /// The row's name, and the request's.
    pub fn name(self) -> &'static str {
        match self {
            Baseline::Numpy => "numpy",
            Baseline::Joblib => "joblib",
        }
    }
}

/// The baselines asked for by `--against`: `numpy`, `joblib` or both.
pub fn parse(names: &[String]) -> Result<Vec<Baseline>, String> {
    let mut wanted = Vec::new();
    for name in names {
        let b = match name.trim() {
            "numpy" => Baseline::Numpy,
            "joblib" => Baseline::Joblib,
            other => return Err(format!("--against: {other:?} is not one of numpy, joblib")),
        };
        if !wanted.contains(&b) {
            wanted.push(b);
        }
    }
    Ok(wanted)
}

/// A Python found with numpy (and, when asked and present, joblib).
#[derive(Debug, Clone)]
pub struct Against {
    /// The interpreter.
    pub python: PathBuf,
    /// The baselines that will run, in the order asked.
    pub baselines: Vec<Baseline>,
}

/// What looking for Python found: the baselines to run or none, and the
/// one line that says so.
#[derive(Debug, Clone)]
pub struct Found {
    /// `None` when no Python with numpy was found.
    pub against: Option<Against>,
    /// One line for the user: what runs, or why nothing does.
    pub notice: String,
}

/// Finds the Python to run (`python`, else [`PYTHON_ENV`], else `python3`
/// on PATH) and asks it which of `wanted` it can run.
pub fn find(wanted: &[Baseline], python: Option<&Path>) -> Found {
    let python = match python {
        Some(p) => p.to_path_buf(),
        None => match std::env::var_os(PYTHON_ENV) {
            Some(p) if !p.is_empty() => PathBuf::from(p),
            _ => PathBuf::from("python3"),
        },
    };
    let shown = python.display().to_string();
    let without =
        |why: String| Found { against: None, notice: format!("against: {why}; running procjob's modes only") };
    let out = match Command::new(&python).arg("-c").arg(DRIVER).arg("probe").stdin(Stdio::null()).output() {
        Ok(out) => out,
        Err(e) => return without(format!("cannot run {shown} ({e})")),
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    let info: Option<serde_json::Value> = stdout.lines().next().and_then(|l| serde_json::from_str(l).ok());
    let has_numpy = info.as_ref().is_some_and(|i| i.get("numpy").is_some_and(|v| v.is_string()));
    let Some(info) = info.clone().filter(|_| has_numpy) else {
        let why = info
            .as_ref()
            .and_then(|i| i.get("error"))
            .and_then(|e| e.as_str())
            .map(str::to_string)
            .or_else(|| {
                String::from_utf8_lossy(&out.stderr).lines().rev().find(|l| !l.trim().is_empty()).map(str::to_string)
            })
            .unwrap_or_else(|| format!("it exited with {}", out.status));
        return without(format!("{shown} has no numpy ({})", why.trim()));
    };
    let text = |key: &str| info.get(key).and_then(|v| v.as_str()).map(str::to_string);
    let numpy = text("numpy").unwrap_or_default();
    let blas = text("blas").map(|b| format!(" ({b})")).unwrap_or_default();
    let joblib = text("joblib");
    let mut baselines = wanted.to_vec();
    let mut notice = format!("against: numpy {numpy}{blas}");
    if wanted.contains(&Baseline::Joblib) {
        match &joblib {
            Some(v) => notice.push_str(&format!(", joblib {v}")),
            None => {
                baselines.retain(|&b| b != Baseline::Joblib);
                if !baselines.contains(&Baseline::Numpy) {
                    baselines.insert(0, Baseline::Numpy);
                }
                let why = text("joblib_error").unwrap_or_else(|| "not importable".into());
                notice.push_str(&format!("; no joblib ({why}), so numpy only"));
            }
        }
    }
    notice.push_str(&format!(", in {shown}"));
    Found { against: Some(Against { python, baselines }), notice }
}

/// The sum of C = A × B's elements, from A's column sums and B's row sums
/// (exact for the sweep's small integer inputs): what a driver's product
/// must add up to.
pub(crate) fn product_sum(inputs: &Inputs) -> Result<f64, Error> {
    fn typed<T: Element>(inputs: &Inputs, value: impl Fn(T) -> f64) -> Result<f64, Error> {
        let (_, k, n) = inputs.dims();
        let a = inputs.a.as_slice::<T>().map_err(|source| Error::Array { what: "A".into(), source })?;
        let b = inputs.b.as_slice::<T>().map_err(|source| Error::Array { what: "B".into(), source })?;
        let mut col_a = vec![0.0f64; k];
        for row in a.chunks_exact(k.max(1)) {
            for (s, &x) in col_a.iter_mut().zip(row) {
                *s += value(x);
            }
        }
        let row_b = b.chunks_exact(n.max(1)).map(|row| row.iter().map(|&x| value(x)).sum::<f64>());
        Ok(col_a.iter().zip(row_b).map(|(a, b)| a * b).sum())
    }
    match inputs.dtype() {
        DType::I64 => typed::<i64>(inputs, |x| x as f64),
        DType::F64 => typed::<f64>(inputs, |x| x),
        DType::F32 => typed::<f32>(inputs, f64::from),
        other => Err(Error::Config(crate::matmul::not_a_matmul_dtype(other))),
    }
}

/// The environment variables that set a BLAS's thread count at start.
const THREAD_VARS: [&str; 5] =
    ["OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS", "VECLIB_MAXIMUM_THREADS"];

/// The variable that sets how long OpenBLAS's idle threads spin before they
/// sleep (2^N cycles).
const SPIN_VAR: &str = "OPENBLAS_THREAD_TIMEOUT";

/// How long a driver may take to stop once its stdin is closed.
const STOP_WAIT: Duration = Duration::from_secs(20);

/// One running driver: numpy on `threads` BLAS threads, joblib on
/// `threads` workers.
pub(crate) struct Driver {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
    python: String,
    expected_sum: f64,
}

impl std::fmt::Debug for Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Driver").field("pid", &self.child.id()).field("python", &self.python).finish_non_exhaustive()
    }
}

impl Driver {
    /// Starts a driver on A and B (`.npy` files in `folder`), numpy on
    /// `threads` BLAS threads, joblib (when `joblib`) on `threads` workers
    /// with one BLAS thread each, its temp files in `folder`.
    pub(crate) fn start(
        python: &Path,
        (a, b): (&Path, &Path),
        threads: usize,
        joblib: bool,
        folder: &Path,
        expected_sum: f64,
    ) -> Result<Driver, Error> {
        use std::os::unix::process::CommandExt;
        let shown = python.display().to_string();
        let mut cmd = Command::new(python);
        cmd.arg("-c").arg(DRIVER).arg(a).arg(b).arg(threads.to_string()).arg(if joblib { "1" } else { "0" });
        for var in THREAD_VARS {
            cmd.env(var, threads.to_string());
        }
        // OpenBLAS's idle threads spin after each call, about 2^28 cycles
        // (0.13 s of a CPU after each 2000² product on 2 threads, Intel
        // Xeon): in interleaved rounds that lands on whatever runs next
        // (joblib, which then looked slower). They sleep at once instead,
        // as in `cargo bench --bench vs_numpy`, unless the caller chose.
        if std::env::var_os(SPIN_VAR).is_none() {
            cmd.env(SPIN_VAR, "4");
        }
        cmd.env("JOBLIB_TEMP_FOLDER", folder);
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::inherit()).process_group(0);
        let mut child = cmd
            .spawn()
            .map_err(|source| Error::System { what: format!("start the numpy baseline ({shown})"), source })?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(Error::Internal("the driver's pipes were not made".into()));
        };
        let mut driver =
            Driver { child, stdin: Some(stdin), stdout: BufReader::new(stdout), python: shown, expected_sum };
        let ready = driver.reply("start")?;
        if ready.get("ready").and_then(|v| v.as_bool()) != Some(true) {
            return Err(driver.failed(format!("unexpected first answer {ready}")));
        }
        Ok(driver)
    }

    /// Runs `baseline` once; returns its seconds.
    pub(crate) fn time(&mut self, baseline: Baseline) -> Result<f64, Error> {
        let name = baseline.name();
        let sent = self.stdin.as_mut().map(|s| writeln!(s, "{name}").and_then(|()| s.flush()));
        if let Some(Err(e)) = sent {
            return Err(self.failed(format!("cannot send the request: {e}")));
        }
        let answer = self.reply(name)?;
        let (Some(seconds), Some(sum)) =
            (answer.get("s").and_then(|v| v.as_f64()), answer.get("sum").and_then(|v| v.as_f64()))
        else {
            return Err(self.failed(format!("{name}: unexpected answer {answer}")));
        };
        if (sum - self.expected_sum).abs() > 1e-9 * self.expected_sum.abs().max(1.0) {
            return Err(self.failed(format!(
                "{name}'s C sums to {sum}, procjob's to {}: not the same product",
                self.expected_sum
            )));
        }
        Ok(seconds)
    }

    /// The next answer, a JSON object; its `error` as an error.
    fn reply(&mut self, what: &str) -> Result<serde_json::Value, Error> {
        let mut line = String::new();
        match self.stdout.read_line(&mut line) {
            Ok(0) => return Err(self.failed(format!("{what}: it ended (its message, if any, is above)"))),
            Err(e) => return Err(self.failed(format!("{what}: cannot read its answer: {e}"))),
            Ok(_) => {}
        }
        let value: serde_json::Value = serde_json::from_str(line.trim())
            .map_err(|e| self.failed(format!("{what}: unreadable answer {:?} ({e})", line.trim())))?;
        if let Some(error) = value.get("error").and_then(|e| e.as_str()) {
            return Err(self.failed(format!("{what}: {error}")));
        }
        Ok(value)
    }

    fn failed(&self, why: String) -> Error {
        Error::System {
            what: format!("run the numpy/joblib baseline in {}", self.python),
            source: std::io::Error::other(why),
        }
    }
}

impl Drop for Driver {
    /// Closes the driver's stdin, its sign to stop joblib's workers and
    /// exit; kills it if it has not within [`STOP_WAIT`].
    fn drop(&mut self) {
        drop(self.stdin.take());
        let start = Instant::now();
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) => return,
                Ok(None) if start.elapsed() < STOP_WAIT => std::thread::sleep(Duration::from_millis(5)),
                _ => break,
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// "vs numpy 1.04× faster (11/15), vs joblib 1.31× faster (15/15)" under
/// a mode's row: each the median of the paired ratios baseline's time /
/// the mode's, in the `rounds` they shared, and in how many of them the
/// mode was the faster. `None` when the row has none.
/// Where the two do not fit 80 columns together, each has a line of its
/// own.
pub fn ratio_line(vs_numpy: Option<(f64, usize)>, vs_joblib: Option<(f64, usize)>, rounds: usize) -> Option<String> {
    let parts: Vec<String> = SHOWN
        .into_iter()
        .zip([vs_numpy, vs_joblib])
        .filter_map(|(b, ratio)| ratio.map(|(r, won)| format!("vs {} {} ({won}/{rounds})", b.name(), faster(r))))
        .collect();
    if parts.is_empty() {
        return None;
    }
    let indent = " ".repeat(15);
    let one = format!("{indent}{}", parts.join(", "));
    Some(if one.chars().count() <= 80 { one } else { format!("{indent}{}", parts.join(&format!(",\n{indent}"))) })
}

/// The order in which [`ratio_line`] and [`legend`] name the baselines.
const SHOWN: [Baseline; 2] = [Baseline::Numpy, Baseline::Joblib];

/// The two lines above the tables that say how to read [`ratio_line`],
/// naming the baselines that run, in its order.
pub fn legend(baselines: &[Baseline]) -> String {
    let names: Vec<&str> = SHOWN.into_iter().filter(|b| baselines.contains(b)).map(|b| b.name()).collect();
    format!(
        "ratios to {}: median over the rounds of its time / the mode's\n\
         (× faster; × slower is the inverse); (k/n): the mode faster in k of n rounds",
        names.join(", ")
    )
}

/// "1.04× faster", "1.10× slower", or "level" when the ratio rounds to 1.
fn faster(ratio: f64) -> String {
    super::faster_or_slower(ratio, "", "")
}

/// The Python driver. `probe` prints what it has; otherwise it loads A and
/// B and answers requests until its stdin closes. joblib's `parallel_dot`
/// is the classic demo's (row blocks by `np.array_split`, `np.vstack` of
/// the blocks), on A and B memory-mapped from the `.npy` files, which
/// joblib hands to its workers by reference.
pub const DRIVER: &str = r#"
import json, signal, sys, time
signal.signal(signal.SIGINT, signal.SIG_IGN)

def say(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()

def why(e):
    return "%s: %s" % (type(e).__name__, e)

try:
    import numpy as np
except Exception as e:
    say({"error": why(e)})
    sys.exit(0)

def blas():
    try:
        from threadpoolctl import threadpool_info
        for d in threadpool_info():
            if d.get("user_api") == "blas":
                arch = d.get("architecture")
                return "%s %s%s" % (d.get("internal_api"), d.get("version"), ", %s kernel" % arch if arch else "")
    except Exception:
        pass
    try:
        cfg = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        return "%s %s" % (cfg.get("name"), cfg.get("version"))
    except Exception:
        return None

probe = sys.argv[1] == "probe"
info = {"numpy": np.__version__, "joblib": None}
if probe or sys.argv[4] == "1":
    try:
        import joblib
        from joblib import Parallel, delayed, parallel_config
        info["joblib"] = joblib.__version__
    except Exception as e:
        info["joblib_error"] = why(e)
if probe:
    info["blas"] = blas()
    say(info)
    sys.exit(0)

jobs = int(sys.argv[3])
try:
    A = np.load(sys.argv[1])
    B = np.load(sys.argv[2])
    C = np.empty((A.shape[0], B.shape[1]), dtype=np.result_type(A, B))
    Am = np.load(sys.argv[1], mmap_mode="r")
    Bm = np.load(sys.argv[2], mmap_mode="r")
except Exception as e:
    say({"error": why(e)})
    sys.exit(0)

def parallel_dot(A, B, n_jobs):
    parallelizer = Parallel(n_jobs=n_jobs, max_nbytes="1M")
    tasks = (delayed(np.dot)(block, B) for block in np.array_split(A, n_jobs))
    return np.vstack(parallelizer(tasks))

def serve():
    say({"ready": True})
    for line in sys.stdin:
        what = line.strip()
        try:
            if what == "numpy":
                t = time.perf_counter()
                np.matmul(A, B, out=C)
                s = time.perf_counter() - t
                R = C
            elif what == "joblib" and info["joblib"] is not None:
                t = time.perf_counter()
                R = parallel_dot(Am, Bm, jobs)
                s = time.perf_counter() - t
            else:
                say({"error": "cannot run %r" % what})
                continue
            say({"s": s, "sum": float(R.sum(dtype=np.float64))})
            del R
        except Exception as e:
            say({"error": why(e)})

if info["joblib"] is None:
    serve()
else:
    with parallel_config(backend="loky", inner_max_num_threads=1):
        serve()
    try:
        from joblib.externals.loky import get_reusable_executor
        get_reusable_executor().shutdown(wait=True)
    except Exception:
        pass
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_takes_numpy_and_joblib_once_each() {
        let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(parse(&names(&["numpy", "joblib", "numpy"])).unwrap(), vec![Baseline::Numpy, Baseline::Joblib]);
        assert!(parse(&names(&["torch"])).unwrap_err().contains("\"torch\""));
    }

    #[test]
    fn product_sum_is_the_sum_of_c() {
        for dtype in [DType::I64, DType::F64, DType::F32] {
            let inputs = Inputs::pattern(dtype, 7, 5, 3).unwrap();
            let c = crate::matmul::multiply_seq(&inputs).unwrap();
            let direct: f64 = match dtype {
                DType::I64 => c.as_slice::<i64>().unwrap().iter().map(|&x| x as f64).sum(),
                DType::F64 => c.as_slice::<f64>().unwrap().iter().sum(),
                DType::F32 => c.as_slice::<f32>().unwrap().iter().map(|&x| x as f64).sum(),
                other => unreachable!("only matmul's dtypes are listed, not {other}"),
            };
            assert_eq!(product_sum(&inputs).unwrap(), direct, "{dtype}");
        }
    }

    #[test]
    fn ratio_lines_say_faster_slower_or_level() {
        assert_eq!(ratio_line(None, None, 15), None);
        let line = ratio_line(Some((1.043, 11)), Some((0.5, 0)), 15).unwrap();
        assert_eq!(line.trim_start(), "vs numpy 1.04× faster (11/15), vs joblib 2.00× slower (0/15)");
        assert_eq!(ratio_line(Some((1.001, 8)), None, 15).unwrap().trim_start(), "vs numpy level (8/15)");
        // Too wide for one line of 80 columns: one line each.
        let wide = ratio_line(Some((1.5, 150)), Some((12.5, 150)), 150).unwrap();
        let lines: Vec<&str> = wide.lines().collect();
        assert_eq!(lines.len(), 2, "{wide}");
        assert!(lines.iter().all(|l| l.chars().count() <= 80), "{wide}");
        assert_eq!(lines[1].trim_start(), "vs joblib 12.50× faster (150/150)");
    }

    #[test]
    fn the_legend_names_the_baselines_that_run_in_the_lines_order() {
        let both = legend(&[Baseline::Joblib, Baseline::Numpy]);
        assert!(both.starts_with("ratios to numpy, joblib: "), "{both}");
        assert!(both.lines().all(|l| l.chars().count() <= 80), "{both}");
        assert!(legend(&[Baseline::Numpy]).starts_with("ratios to numpy: "));
    }
}
