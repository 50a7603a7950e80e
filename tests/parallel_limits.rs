//! The `Parallel` API at its limits: an input too large for a frame
//! travels as a file; a batch too large for a frame fails the call at once,
//! naming the task and the limit, and the pool serves the next call.

use procjob::{BatchSize, Error, Parallel, Task};

procjob::test_support!();

/// Sums a vector that travels inside the frame (serde, not an `Array`).
struct SumVec;

impl Task for SumVec {
    type Input = Vec<f64>;
    type Output = f64;
    type Error = String;
    fn run(v: Vec<f64>) -> Result<f64, String> {
        Ok(v.iter().sum())
    }
}

#[test]
fn an_input_over_the_frame_limit_travels_as_a_file() {
    let mut p = Parallel::new().n_jobs(2);
    // 8.4 million f64 is 67.2 MB of payload: over the 64 MiB frame limit.
    let sums = p.run::<SumVec, _>(vec![vec![1.0f64; 10], vec![1.0f64; 8_400_000]]).unwrap();
    assert_eq!(sums, [10.0, 8_400_000.0]);
    assert!(p.last_call().traffic.bytes_to_workers < 1 << 20, "{:?}", p.last_call().traffic);
}

#[test]
fn a_batch_over_the_frame_limit_fails_at_once_and_the_pool_goes_on() {
    let mut p = Parallel::new().n_jobs(2).batch_size(BatchSize::Fixed(80));
    // 80 inputs of 1,048,000 bytes each, each small enough to travel in the
    // frame: 84 MB together, over the 64 MiB frame limit.
    let err = p.run::<SumVec, _>(vec![vec![1.0f64; 131_000]; 80]).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::Codec { .. }), "{msg}");
    assert_eq!(err.task_index(), Some(0), "{msg}");
    assert!(msg.contains("frame payload limit") && msg.contains("procjob::Array"), "{msg}");
    // Nothing reached a worker: the same workers serve the next call.
    let pids = p.worker_pids();
    assert_eq!(p.run::<SumVec, _>(vec![vec![1.0f64; 10]; 3]).unwrap(), vec![10.0; 3]);
    assert_eq!(p.worker_pids(), pids);
}

/// A task whose name is longer than workers accept.
struct LongName;

impl Task for LongName {
    type Input = u64;
    type Output = u64;
    type Error = String;
    fn name() -> &'static str {
        static NAME: std::sync::OnceLock<String> = std::sync::OnceLock::new();
        NAME.get_or_init(|| "x".repeat(1000))
    }
    fn run(x: u64) -> Result<u64, String> {
        Ok(x)
    }
}

#[test]
fn a_task_name_over_the_workers_limit_is_refused_before_anything_starts() {
    let mut p = Parallel::new().n_jobs(2);
    let err = p.run::<LongName, _>(vec![1u64, 2]).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::Config(_)) && msg.contains("1000 bytes long"), "{msg}");
    assert!(p.worker_pids().is_empty(), "workers were started");
}
