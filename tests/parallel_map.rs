//! Plain functions as tasks, end to end through the public API: `map` and
//! its kin with function items and capture-free closures, errors of the
//! types applications already use (with their message, chain and task
//! index), a value shared by every task sent once per worker, and a dump
//! reused across calls.

use std::error::Error as _;

use procjob::{Array, Error, Parallel, TaskError};

procjob::test_support!();

fn square(x: u64) -> u64 {
    x * x
}

#[test]
fn map_runs_a_plain_function_in_the_workers() {
    let mut p = Parallel::new().n_jobs(2);
    let squares = p.map(square, 0..100u64).unwrap();
    assert_eq!(squares, (0..100u64).map(|x| x * x).collect::<Vec<_>>());
    // It ran in other processes.
    let pids = p.map(|_: u8| std::process::id(), [0u8; 8]).unwrap();
    assert!(pids.iter().all(|&pid| pid != std::process::id()), "{pids:?}");
}

#[test]
fn map_runs_a_closure_that_captures_nothing_and_keeps_arrays_mapped() {
    let mut p = Parallel::new().n_jobs(2).max_nbytes(Some(1024));
    let big = Array::from_vec([4096], (0..4096).map(f64::from).collect::<Vec<_>>());
    let sums = p
        .map(|(a, k): (Array, usize)| (a.is_mapped(), a.as_slice::<f64>().unwrap()[..k].iter().sum::<f64>()), {
            let big = big.clone();
            (1..=4).map(move |k| (big.clone(), k))
        })
        .unwrap();
    assert_eq!(sums, [(true, 0.0), (true, 1.0), (true, 3.0), (true, 6.0)]);
    assert_eq!(p.last_call().dumped_arrays, 1);
    // The streaming forms.
    let ordered: Vec<u64> = p.map_iter(square, 0..10u64).unwrap().map(Result::unwrap).collect();
    assert_eq!(ordered, (0..10u64).map(square).collect::<Vec<_>>());
    let mut unordered: Vec<(u64, u64)> = p.map_unordered(square, 0..10u64).unwrap().map(Result::unwrap).collect();
    unordered.sort_unstable();
    assert_eq!(unordered, (0..10u64).map(|x| (x, x * x)).collect::<Vec<_>>());
}

/// The chain of sources of an error, outermost first, its own message
/// left out.
fn chain(e: &Error) -> Vec<String> {
    let mut out = Vec::new();
    let mut next = e.source();
    while let Some(s) = next {
        out.push(s.to_string());
        next = s.source();
    }
    out
}

fn read_config(n: u32) -> anyhow::Result<u32> {
    use anyhow::Context as _;
    if n == 3 {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file: /etc/model-3.toml");
        return Err(io).context("cannot load model 3");
    }
    Ok(n)
}

#[test]
fn try_map_reports_an_anyhow_error_with_its_chain_and_task_index() {
    let mut p = Parallel::new().n_jobs(2);
    assert_eq!(p.try_map(read_config, [0, 1, 2]).unwrap(), [0, 1, 2]);
    let err = p.try_map(read_config, 0..6).unwrap_err();
    assert_eq!(err.task_index(), Some(3));
    assert_eq!(err.task_message(), Some("cannot load model 3"));
    assert!(err.to_string().contains("task 3") && err.to_string().contains("cannot load model 3"), "{err}");
    assert_eq!(chain(&err), ["no such file: /etc/model-3.toml"]);
    let typed: TaskError = err.task_error().expect("a function's error comes back as a TaskError");
    assert_eq!(typed.sources, ["no such file: /etc/model-3.toml"]);
    assert!(format!("{err:?}").contains("caused by: no such file"), "{err:?}");
}

/// An `io::Error` that wraps another error, as `io::Error::other` does.
#[derive(Debug, thiserror::Error)]
#[error("bad header in part {0}")]
struct BadHeader(u64, #[source] std::num::ParseIntError);

fn parse_part(i: u64) -> std::io::Result<u64> {
    if i == 5 {
        let inner = "x12".parse::<u64>().unwrap_err();
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, BadHeader(i, inner)));
    }
    Ok(i)
}

#[test]
fn try_map_reports_an_io_error_with_its_chain_and_task_index() {
    let err = Parallel::new().n_jobs(2).try_map(parse_part, 0..8u64).unwrap_err();
    assert_eq!(err.task_index(), Some(5));
    assert_eq!(err.task_message(), Some("bad header in part 5"));
    // io::Error's source is the error it wraps' own source.
    assert_eq!(chain(&err), ["invalid digit found in string"]);
}

/// `?` on an `ArrayError` in a function whose error is a `String`.
fn first_of(a: Array) -> Result<f64, String> {
    let xs = a.as_slice::<f64>()?;
    xs.first().copied().ok_or_else(|| "empty".to_string())
}

#[test]
fn an_array_error_converts_with_the_question_mark() {
    let mut p = Parallel::new().n_jobs(1);
    let ok = p.try_map(first_of, [Array::from_vec([2], vec![7.0f64, 8.0])]).unwrap();
    assert_eq!(ok, [7.0]);
    let err = p.try_map(first_of, [Array::from_vec([2], vec![7i64, 8])]).unwrap_err();
    assert!(err.task_message().unwrap().contains("i64"), "{err}");
}

#[test]
fn the_shared_value_crosses_once_per_worker_not_once_per_task() {
    let table: Vec<f64> = (0..100_000).map(f64::from).collect(); // 800 KB encoded
    let table_bytes = 800_000;
    let tasks = 200usize;
    let mut p = Parallel::new().n_jobs(2).max_nbytes(None);
    let out = p.map_with(&table, |t: &Vec<f64>, i: usize| t[i * 10], 0..tasks).unwrap();
    assert_eq!(out, (0..tasks).map(|i| (i * 10) as f64).collect::<Vec<_>>());
    let sent = p.last_call().traffic.bytes_to_workers;
    // Once to each of the (at most) two workers: at least once, never a
    // third time; per task it would be 200 times.
    assert!(sent > table_bytes && sent < 2 * table_bytes + 100_000, "{sent} bytes sent for a {table_bytes}-byte table");
    // The same as an input of each task instead: once per task.
    let per_task = p.map(|(t, i): (Vec<f64>, usize)| t[i], (0..20).map(|i| (table.clone(), i))).unwrap();
    assert_eq!(per_task.len(), 20);
    assert!(p.last_call().traffic.bytes_to_workers > 20 * table_bytes);
}

#[test]
fn a_shared_array_above_max_nbytes_is_dumped_once_and_mapped() {
    let b = Array::from_vec([1000, 100], vec![1.0f64; 100_000]);
    let mut p = Parallel::new().n_jobs(2).max_nbytes(Some(1 << 16));
    let out = p
        .try_map_with(
            &b,
            |b: &Array, row: usize| -> Result<(bool, f64), String> {
                Ok((b.is_mapped(), b.as_slice::<f64>()?[row * 100..(row + 1) * 100].iter().sum()))
            },
            0..50,
        )
        .unwrap();
    assert!(out.iter().all(|&(mapped, sum)| mapped && sum == 100.0), "{out:?}");
    assert_eq!(p.last_call().dumped_arrays, 1);
    assert!(p.last_call().traffic.bytes_to_workers < 100_000, "{:?}", p.last_call().traffic);
}

fn total(a: Array) -> f64 {
    a.as_slice::<f64>().unwrap().iter().sum()
}

#[test]
fn three_calls_over_one_array_dump_it_once() {
    let parent = tempfile::tempdir().unwrap();
    let mut a = Array::from_vec([1 << 18], vec![0.5f64; 1 << 18]); // 2 MiB, above the default max_nbytes
    let mut p = Parallel::new().n_jobs(2).temp_folder(parent.path());
    let mut written = 0;
    for call in 0..3 {
        let sums = p.map(total, vec![a.clone(); 4]).unwrap();
        assert_eq!(sums, [(1 << 17) as f64; 4]);
        written += p.last_call().dumped_bytes;
        assert_eq!(p.last_call().dumped_arrays, u64::from(call == 0), "call {call}");
    }
    assert_eq!(written, a.nbytes() as u64);
    let files = |dir: &std::path::Path| walk(dir).iter().filter(|p| p.extension().is_some_and(|e| e == "npy")).count();
    assert_eq!(files(parent.path()), 1, "one dump file for three calls");
    // Kept unchanged: the array cannot be written while its dump is kept…
    assert!(a.as_mut_slice::<f64>().is_err());
    // …until the Parallel forgets it, which removes the file.
    p.forget_dumps();
    assert_eq!(files(parent.path()), 0);
    a.as_mut_slice::<f64>().unwrap()[0] = 1.5;
    assert_eq!(p.map(total, [a.clone()]).unwrap(), [(1 << 17) as f64 + 1.0]);
    assert_eq!(p.last_call().dumped_arrays, 1, "written again after a change");
    // A dump whose array the caller dropped goes at the end of the next call.
    drop(a);
    p.map(square, [1u64]).unwrap();
    assert_eq!(files(parent.path()), 0);
    assert_eq!(std::fs::read_dir(parent.path()).unwrap().count(), 0, "the run folder is gone too");
}

/// Every file below `dir`.
fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let path = e.unwrap().path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}

fn sum(v: Vec<f64>) -> f64 {
    v.iter().sum()
}

#[test]
fn a_100_mb_input_returns_the_right_answer() {
    let n = 12_500_000; // 100 MB of f64, over the 64 MiB frame limit
    let v: Vec<f64> = (0..n).map(|i| (i % 7) as f64).collect();
    let want: f64 = v.iter().sum();
    let mut p = Parallel::new().n_jobs(2);
    assert_eq!(p.map(sum, [vec![1.0; 3], v]).unwrap(), [3.0, want]);
    // It travelled as a file, not through the pipe.
    assert!(p.last_call().traffic.bytes_to_workers < 1 << 20, "{:?}", p.last_call().traffic);
}

#[test]
fn a_shared_value_over_the_frame_limit_travels_as_a_file() {
    let table: Vec<f64> = (0..10_000_000).map(|i| f64::from(i % 5)).collect(); // 80 MB encoded
    let want: f64 = table.iter().sum();
    let mut p = Parallel::new().n_jobs(2).max_nbytes(None);
    let sums = p.map_with(&table, |t: &Vec<f64>, k: usize| t.iter().sum::<f64>() * k as f64, 0..4).unwrap();
    assert_eq!(sums, [0.0, want, 2.0 * want, 3.0 * want]);
    assert!(p.last_call().traffic.bytes_to_workers < 1 << 20, "{:?}", p.last_call().traffic);
}

#[test]
fn map_with_runs_in_the_calling_process_with_n_jobs_1() {
    let table: Vec<u64> = (0..1000).map(|i| i * 3).collect();
    let mut p = Parallel::new().n_jobs(1);
    let out = p.map_with(&table, |t: &Vec<u64>, i: usize| (t[i], std::process::id()), [0usize, 10, 999]).unwrap();
    assert_eq!(out, vec![(0, std::process::id()), (30, std::process::id()), (2997, std::process::id())]);
    assert!(p.last_call().in_process);
    // A failing function with a shared value, in the calling process too.
    let err = p
        .try_map_with(&table, |t: &Vec<u64>, i: usize| t.get(i).copied().ok_or(format!("no entry {i}")), [1usize, 5000])
        .unwrap_err();
    assert_eq!(err.task_message(), Some("no entry 5000"), "{err}");
}
