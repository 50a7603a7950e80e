//! The runner's own costs: `cargo bench --bench runtime`.
//!
//! - `spawn_and_handshake`: start one worker process and complete the
//!   handshake (then stop it), per worker.
//! - `empty_task_round_trip`: one no-op task on a warm worker.
//! - `empty_task_in_process`: one no-op task with `n_jobs(1)`, which runs
//!   it in the calling process.
//! - `pipe_throughput`: 64 MiB inline to a worker and its length back;
//!   read "MB/s" from the byte counter.
//! - `result_throughput`: the other way, a 64 MiB array returned by a
//!   worker (a fresh `Array::zeros`, which the worker hands to the pipe by
//!   reference) and read into a new array here.
//! - `tiny_tasks_batched`: 100,000 no-op tasks on all CPUs with automatic
//!   batching; read tasks per second from the item counter.
//! - `tiny_tasks_in_process`: the same tasks with `n_jobs(1)`, in the
//!   calling process.
//! - `output_pages`: readying 16 MB of a file-backed output for writing
//!   (map it read-write, fault its pages in at once), as a memmap-out
//!   worker does with its rows of C at 2000²: in a new file of the run
//!   folder (on /dev/shm where there is room), whose pages must be
//!   allocated and zeroed, and in a file whose pages are already there, as
//!   a repetition finds the last one's C.

use divan::counter::{BytesCount, ItemsCount};
use divan::Bencher;
use procjob::{Array, BatchSize, Parallel, Task};

fn main() {
    procjob::init();
    divan::main();
}

struct Noop;
impl Task for Noop {
    type Input = u64;
    type Output = u64;
    type Error = String;
    fn run(x: u64) -> Result<u64, String> {
        Ok(x)
    }
}

struct Len;
impl Task for Len {
    type Input = Array;
    type Output = u64;
    type Error = String;
    fn run(a: Array) -> Result<u64, String> {
        Ok(a.nbytes() as u64)
    }
}

#[divan::bench(sample_count = 30)]
fn spawn_and_handshake(bencher: Bencher) {
    bencher.bench_local(|| {
        let mut p = Parallel::new().n_jobs(1).in_process(false);
        p.start().unwrap();
        p.shutdown();
    });
}

#[divan::bench(sample_count = 200)]
fn empty_task_round_trip(bencher: Bencher) {
    let mut p = Parallel::new().n_jobs(1).in_process(false).batch_size(BatchSize::Fixed(1));
    p.start().unwrap();
    bencher.bench_local(|| p.run::<Noop, _>([1u64]).unwrap());
}

#[divan::bench(sample_count = 200)]
fn empty_task_in_process(bencher: Bencher) {
    let mut p = Parallel::new().n_jobs(1);
    bencher.bench_local(|| p.run::<Noop, _>([1u64]).unwrap());
}

#[divan::bench(sample_count = 20)]
fn pipe_throughput(bencher: Bencher) {
    const BYTES: usize = 64 << 20;
    let a = Array::from_vec(vec![BYTES / 8], vec![1.0f64; BYTES / 8]);
    let mut p = Parallel::new().n_jobs(1).in_process(false).max_nbytes(None);
    p.start().unwrap();
    bencher.counter(BytesCount::new(BYTES)).bench_local(|| p.run::<Len, _>([a.clone()]).unwrap());
}

struct Zeros;
impl Task for Zeros {
    type Input = u64;
    type Output = Array;
    type Error = String;
    fn run(len: u64) -> Result<Array, String> {
        Ok(Array::zeros(procjob::DType::F64, vec![len as usize]))
    }
}

#[divan::bench(sample_count = 20)]
fn result_throughput(bencher: Bencher) {
    const BYTES: usize = 64 << 20;
    let mut p = Parallel::new().n_jobs(1).in_process(false);
    p.start().unwrap();
    bencher.counter(BytesCount::new(BYTES)).bench_local(|| p.run::<Zeros, _>([(BYTES / 8) as u64]).unwrap());
}

#[divan::bench(sample_count = 10)]
fn tiny_tasks_batched(bencher: Bencher) {
    const TASKS: u64 = 100_000;
    let mut p = Parallel::new();
    p.start().unwrap();
    bencher.counter(ItemsCount::new(TASKS)).bench_local(|| p.run::<Noop, _>(0..TASKS).unwrap());
}

#[divan::bench(sample_count = 10)]
fn tiny_tasks_in_process(bencher: Bencher) {
    const TASKS: u64 = 100_000;
    let mut p = Parallel::new().n_jobs(1);
    bencher.counter(ItemsCount::new(TASKS)).bench_local(|| p.run::<Noop, _>(0..TASKS).unwrap());
}

// One iteration per sample: divan makes a sample's inputs before running
// any of them, and each input here is a file to remove before the next.
#[divan::bench(args = ["new file", "pages already there"], sample_count = 30, sample_size = 1)]
fn output_pages(bencher: Bencher, file: &str) {
    const LEN: usize = 2_000_000; // 16 MB of f64
    let folder = procjob::run_folder::RunFolder::create(None, 2 * 8 * LEN as u64).unwrap();
    let existing = folder.file("existing.npy");
    Array::create_npy(&existing, procjob::DType::F64, vec![LEN]).unwrap().prefault();
    let mut count = 0;
    bencher
        .counter(BytesCount::new(8 * LEN))
        .with_inputs(|| {
            count += 1;
            let path = folder.file(&format!("new-{count}.npy"));
            let _ = std::fs::remove_file(folder.file(&format!("new-{}.npy", count - 1)));
            path
        })
        .bench_local_values(|path| {
            let out = if file == "new file" {
                Array::create_npy(&path, procjob::DType::F64, vec![LEN]).unwrap()
            } else {
                Array::open_npy(&existing, procjob::Access::ReadWrite).unwrap()
            };
            out.prefault();
            out
        });
}
