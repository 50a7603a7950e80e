//! procjob's one-thread kernel against `numpy.dot` on one OpenBLAS thread,
//! in paired runs: `cargo bench --bench vs_numpy [-- SIZES [PAIRS]]`.
//!
//! A Python child (`$PROCJOB_BENCH_PYTHON`, else a venv at
//! `~/.cache/procjob-bench-venv/bin/python` if there is one (made with
//! `python3 -m venv ~/.cache/procjob-bench-venv` and
//! `pip install numpy joblib threadpoolctl psutil`), else `python3`) holds its own random `n × n` matrices and, per
//! request, times one `np.dot` with `time.perf_counter()`. It runs with
//! `OPENBLAS_NUM_THREADS=1` and without `OPENBLAS_CORETYPE` /
//! `OPENBLAS_L2_SIZE`, which slow a current OpenBLAS down on some CPUs. For
//! each dtype and size, after one warm-up each, every pair times one numpy
//! call and one of ours (the order alternating), and the line printed last
//! is the **median of the per-pair ratios** ours/numpy in time (below 1 is
//! faster than numpy), with the range of their middle half: a difference
//! inside it is the machine's spread, not the kernels'. It also says in
//! how many pairs ours was the faster. Pairing keeps a
//! shared machine's drift out of the ratio, and both sides run on the same
//! CPU (on Linux the main thread pins itself to the CPU it is on before
//! starting the child, which inherits that): on a virtual machine one vCPU
//! can be slowed by whatever shares its physical core while the other is not, which made one side of every pair slower
//! for seconds at a time. Without the Python or numpy it says so and exits 0.
//!
//! `--coretype NAME` sets `OPENBLAS_CORETYPE=NAME` in the child alone:
//! OpenBLAS then runs that kernel (`Haswell`, its AVX2 kernel, the one it
//! runs on AMD Zen 1–3; `SkylakeX`, its AVX-512 one), the banner's
//! threadpoolctl line says which it runs. With `PROCJOB_GEMM=avx2` this
//! compares the two AVX2 kernels on an AVX-512 machine.
//!
//! `--out`: both sides write into a `C` allocated once per size
//! (`np.dot(a, b, out=c)`, and our one-thread kernel into an `Array` of
//! ours), so only the kernels are timed. Without it each call allocates its
//! `C` as `np.dot(a, b)` and `procjob::tasks::dot` do, and each side gets
//! the memory its last `C` gave back below 32 MiB (numpy from glibc's heap,
//! ours from the pages a dropped result keeps for the next one of its
//! size); from 32 MiB on (2048² `f64`) both map fresh pages every call.
//!
//! `-- SIZES PAIRS --threads N` (N > 1) compares the whole product on N
//! CPUs instead: numpy on N OpenBLAS threads and joblib's memmapped
//! `parallel_dot` on N loky workers (A and B dumped once per size to
//! /dev/shm and loaded with `mmap_mode='r'`, A split with `np.array_split`,
//! the blocks stacked with `np.vstack`, one BLAS thread per worker; the
//! dumps go when the child ends, unless it is killed) against procjob's `f64` ideal (N threads of
//! this process, as `procjob bench` measures it) and its `memmap` and
//! `memmap-out` modes on N warm worker processes, nothing pinned, and OpenBLAS's idle threads told not to spin between calls
//! (`OPENBLAS_THREAD_TIMEOUT=4`). Each round times one call of each side,
//! in an order that rotates, and the medians of the per-round ratios (with
//! the ranges of their middle halves) are printed last: procjob's time over
//! numpy's, and joblib's time over procjob's memmap modes (the speedup the
//! targets name). Rounds of about a second keep a shared machine's drift,
//! which can move numpy's own time a great deal within a minute, out of the ratios better than medians of
//! separate runs (`docs/performance.md`, "Machines").

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::Instant;

use procjob::matmul::{Inputs, Mode, ModeRunner, RunSettings};
use procjob::DType;

const CHILD: &str = r#"
import os, sys, tempfile, time
import numpy as np
try:
    import threadpoolctl
    info = threadpoolctl.threadpool_info()
    print("numpy", np.__version__, [(i.get("internal_api"), i.get("version"), i.get("architecture"), i.get("num_threads")) for i in info], flush=True)
except ImportError:
    print("numpy", np.__version__, flush=True)
# The inputs of the latest size, one set for numpy and one for joblib.
numpy_inputs, joblib_inputs, outs = {}, {}, {}
dumps = None
for line in sys.stdin:
    words = line.split()
    if words[0] == "joblib":
        # The classic parallel_dot on joblib's loky workers: A and B dumped
        # once per size and memory-mapped ('r'), A split into `jobs` row
        # blocks, the blocks stacked; one BLAS thread per worker (set
        # explicitly: the OPENBLAS_NUM_THREADS this child has would
        # otherwise pass on to the workers).
        import joblib
        n, jobs = int(words[1]), int(words[2])
        if n not in joblib_inputs:
            if dumps is not None:
                dumps.cleanup()
            dumps = tempfile.TemporaryDirectory(prefix="procjob-vs-joblib-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
            rng = np.random.default_rng(1)
            paths = [os.path.join(dumps.name, f"{x}.pkl") for x in "AB"]
            for path in paths:
                joblib.dump(rng.random((n, n)), path)
            joblib_inputs = {n: tuple(joblib.load(path, mmap_mode="r") for path in paths)}
        a, b = joblib_inputs[n]
        with joblib.parallel_config(backend="loky", inner_max_num_threads=1):
            t = time.perf_counter()
            np.vstack(joblib.Parallel(n_jobs=jobs)(joblib.delayed(np.dot)(block, b) for block in np.array_split(a, jobs)))
            print(time.perf_counter() - t, flush=True)
        continue
    n, dtype = words[:2]
    key = (int(n), dtype)
    if key not in numpy_inputs:
        rng = np.random.default_rng(1)
        numpy_inputs = {key: tuple(rng.random((key[0], key[0])).astype(dtype) for _ in range(2))}
        outs = {key: np.empty((key[0], key[0]), dtype=dtype)}
    a, b = numpy_inputs[key]
    if len(words) > 2:
        t = time.perf_counter()
        np.dot(a, b, out=outs[key])
    else:
        t = time.perf_counter()
        np.dot(a, b)
    print(time.perf_counter() - t, flush=True)
"#;

fn main() {
    procjob::init();
    let all: Vec<String> = std::env::args().skip(1).collect();
    let threads: usize = all
        .iter()
        .position(|a| a == "--threads")
        .map_or(1, |i| all.get(i + 1).and_then(|t| t.parse().ok()).expect("--threads N: N, an integer"));
    let args: Vec<String> = all
        .iter()
        .enumerate()
        .filter(|&(i, a)| !a.starts_with("--") && (i == 0 || (all[i - 1] != "--threads" && all[i - 1] != "--coretype")))
        .map(|(_, a)| a.clone())
        .collect();
    let sizes: Vec<usize> = match args.first() {
        Some(list) => list.split(',').map(|s| s.parse().expect("SIZES: comma-separated integers")).collect(),
        None => vec![1000, 2048],
    };
    let pairs: usize = args.get(1).map_or(7, |p| p.parse().expect("PAIRS: an integer"));
    let out = all.iter().any(|a| a == "--out");
    assert!(!out || threads == 1, "--out is for the one-thread comparison, not --threads {threads}");
    assert!(pairs > 0, "PAIRS: at least one");
    let python = std::env::var("PROCJOB_BENCH_PYTHON").unwrap_or_else(|_| {
        let venv = format!("{}/.cache/procjob-bench-venv/bin/python", std::env::var("HOME").unwrap_or_default());
        if std::path::Path::new(&venv).exists() {
            venv
        } else {
            "python3".to_string()
        }
    });
    // `--coretype NAME`: OpenBLAS forced to one of its kernels (Haswell for
    // the AVX2 path, SkylakeX for AVX-512), where it otherwise picks its own.
    let coretype = all.iter().position(|a| a == "--coretype").map(|i| all.get(i + 1).expect("--coretype NAME").clone());
    let cpu = if threads == 1 { pin_to_current_cpu() } else { None };
    let mut command = Command::new(&python);
    match &coretype {
        Some(name) => command.env("OPENBLAS_CORETYPE", name),
        None => command.env_remove("OPENBLAS_CORETYPE"),
    };
    let child = command
        .args(["-c", CHILD])
        .env("OPENBLAS_NUM_THREADS", threads.to_string())
        .env("OMP_NUM_THREADS", threads.to_string())
        // After a call OpenBLAS's idle threads spin for a while, which
        // slowed whichever of ours ran next. The shortest timeout puts them
        // to sleep at once; numpy's own times did not change with it
        // (`docs/performance-journal.md`, "Intel Xeon (AVX-512), 2026-12-01,
        // third session: C written over").
        .env("OPENBLAS_THREAD_TIMEOUT", "4")
        .env_remove("OPENBLAS_L2_SIZE")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(child) => child,
        Err(e) => {
            println!("vs_numpy: skipped, cannot run {python}: {e} (set PROCJOB_BENCH_PYTHON to a Python with numpy and joblib)");
            return;
        }
    };
    let mut to_numpy = child.stdin.take().expect("piped");
    let mut from_numpy = BufReader::new(child.stdout.take().expect("piped")).lines();
    let Some(Ok(banner)) = from_numpy.next() else {
        println!(
            "vs_numpy: skipped, {python} has no numpy (set PROCJOB_BENCH_PYTHON to a Python with numpy and joblib)"
        );
        return;
    };
    println!("{banner}");
    // One request to the child, one time back.
    let mut ask = |request: &str| -> f64 {
        writeln!(to_numpy, "{request}").expect("numpy child gone");
        from_numpy.next().expect("numpy child gone").expect("read").trim().parse().expect("a time")
    };
    if threads > 1 {
        on_threads(threads, &sizes, pairs, &mut ask);
        return;
    }
    let mut numpy = |n: usize, dtype: &str| ask(&format!("{n} {dtype}{}", if out { " out" } else { "" }));
    match cpu {
        Some(cpu) => println!("both sides pinned to CPU {cpu}"),
        None => println!("could not pin to one CPU; pairs may run on different CPUs"),
    }
    if out {
        println!("both sides write into a C allocated once per size");
    }
    println!("{:<5} {:>5} {:>13} {:>13} {:>11}", "dtype", "n", "ours GFLOP/s", "numpy GFLOP/s", "ours/numpy");
    for (dtype, name) in [(DType::F64, "float64"), (DType::F32, "float32")] {
        for &n in &sizes {
            let inputs = Inputs::random(dtype, n, n, n, 1).expect("inputs fit in memory");
            let mut c = procjob::Array::zeros(dtype, vec![n, n]);
            let mut ours = || {
                let t = Instant::now();
                if out {
                    procjob::matmul::multiply_threads_into(&inputs, std::slice::from_ref(&(0..n)), 1, &mut c)
                        .expect("kernel");
                } else {
                    procjob::tasks::dot(&inputs.a, &inputs.b).expect("dot");
                }
                t.elapsed().as_secs_f64()
            };
            let flop = 2.0 * (n as f64).powi(3);
            numpy(n, name);
            ours();
            let mut ratios = Vec::with_capacity(pairs);
            for pair in 0..pairs {
                let (t_ours, t_numpy) = if pair % 2 == 0 {
                    let t = ours();
                    (t, numpy(n, name))
                } else {
                    let t = numpy(n, name);
                    (ours(), t)
                };
                ratios.push(t_ours / t_numpy);
                println!(
                    "{:<5} {n:>5} {:>13.1} {:>13.1} {:>11.3}",
                    dtype.name(),
                    flop / t_ours / 1e9,
                    flop / t_numpy / 1e9,
                    t_ours / t_numpy
                );
            }
            let faster = ratios.iter().filter(|&&x| x < 1.0).count();
            println!(
                "{:<5} {n:>5} median of {pairs} paired ratios ours/numpy (time): {}; {faster} of {pairs} faster",
                dtype.name(),
                median_and_middle_half(ratios)
            );
        }
    }
}

/// The `--threads N` comparison (module docs): rounds of numpy on N
/// threads, joblib's memmapped `parallel_dot` on N loky workers, and
/// procjob's ideal, memmap and memmap-out on N.
fn on_threads(threads: usize, sizes: &[usize], rounds: usize, ask: &mut dyn FnMut(&str) -> f64) {
    println!(
        "numpy on {threads} OpenBLAS threads and joblib memmap on {threads} workers against procjob on {threads} \
         threads / processes, f64, nothing pinned"
    );
    let settings = RunSettings::with_processes(threads);
    // The sides of a round: numpy and joblib (asked of the child), then
    // procjob's modes.
    let ours = [Mode::Threads, Mode::Memmap, Mode::MemmapOut];
    let names = ["numpy", "joblib", "ideal", "memmap", "memmap-out"];
    for &n in sizes {
        let inputs = Inputs::random(DType::F64, n, n, n, 1).expect("inputs fit in memory");
        let folder = procjob::run_folder::RunFolder::create(None, 3 * (n * n * 8) as u64).expect("a run folder");
        let mut runners: Vec<ModeRunner> =
            ours.iter().map(|&m| ModeRunner::new(m, &inputs, &settings, &folder)).collect();
        let numpy = format!("{n} float64");
        let joblib = format!("joblib {n} {threads}");
        // Warm up: numpy's pool, joblib's workers and dumps, ours.
        ask(&numpy);
        ask(&joblib);
        for r in &mut runners {
            r.time_once().expect("a repetition");
        }
        let mut times: Vec<Vec<f64>> = vec![Vec::with_capacity(rounds); names.len()];
        println!("{:>5} {}", "n", names.map(|s| format!("{s:>11}")).join(""));
        for round in 0..rounds {
            // Who goes first rotates.
            for slot in 0..names.len() {
                let side = (slot + round) % names.len();
                let t = match side {
                    0 => ask(&numpy),
                    1 => ask(&joblib),
                    i => runners[i - 2].time_once().expect("a repetition").wall.as_secs_f64(),
                };
                times[side].push(t);
            }
            println!("{n:>5} {}", times.iter().map(|t| format!("{:>9.1}ms", t[round] * 1e3)).collect::<String>());
        }
        for r in runners {
            r.finish();
        }
        for (i, name) in names.iter().enumerate().skip(2) {
            let to_numpy: Vec<f64> = times[i].iter().zip(&times[0]).map(|(ours, np)| ours / np).collect();
            let faster = to_numpy.iter().filter(|&&x| x < 1.0).count();
            println!(
                "f64 {n:>5} {name:<10} median of {rounds} per-round ratios procjob/numpy (time): {}; {faster} of {rounds} faster",
                median_and_middle_half(to_numpy)
            );
        }
        for (i, name) in [(3, "memmap"), (4, "memmap-out")] {
            let speedup: Vec<f64> = times[1].iter().zip(&times[i]).map(|(joblib, ours)| joblib / ours).collect();
            println!(
                "f64 {n:>5} {name:<10} median of {rounds} per-round speedups over joblib memmap (joblib/procjob time): {}",
                median_and_middle_half(speedup)
            );
        }
    }
}

/// `r`'s median and, for judging it, the range of its middle half (the
/// lower and upper quartiles, nearest rank): `1.021 (middle half
/// 0.998–1.040)`. A difference inside the range is the machine's spread.
fn median_and_middle_half(mut r: Vec<f64>) -> String {
    r.sort_by(f64::total_cmp);
    let at = |q: f64| r[((r.len() - 1) as f64 * q).round() as usize];
    format!("{:.3} (middle half {:.3}–{:.3})", at(0.5), at(0.25), at(0.75))
}

/// Pins the calling thread (and so the children it starts, and our kernel,
/// which runs on it) to the CPU it runs on now; that CPU, or `None` when it
/// cannot.
#[cfg(target_os = "linux")]
fn pin_to_current_cpu() -> Option<usize> {
    use nix::sched::{sched_getcpu, sched_setaffinity, CpuSet};
    let cpu = sched_getcpu().ok()?;
    let mut set = CpuSet::new();
    set.set(cpu).ok()?;
    sched_setaffinity(nix::unistd::Pid::from_raw(0), &set).ok()?;
    Some(cpu)
}

#[cfg(not(target_os = "linux"))]
fn pin_to_current_cpu() -> Option<usize> {
    None
}
