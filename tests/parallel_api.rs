//! The `Parallel` API, end to end: user-defined tasks from this file run in
//! worker processes that are re-executions of this test binary.

use std::cell::RefCell;
use std::rc::Rc;
use std::time::Duration;

use procjob::{Access, Array, BatchSize, Error, Parallel, PreDispatch, Task};
use serde::{Deserialize, Serialize};

procjob::test_support!();

struct Square;
impl Task for Square {
    type Input = u64;
    type Output = u64;
    type Error = String;
    fn run(x: u64) -> Result<u64, String> {
        if x == 7 {
            println!("a print inside a task goes to stderr and cannot corrupt the stream");
        }
        Ok(x * x)
    }
}

/// Reports where it ran and how its array arrived.
struct Inspect;

#[derive(Debug, Serialize, Deserialize)]
struct Seen {
    pid: u32,
    pgid: i32,
    mapped_from: Option<String>,
    sum: f64,
    omp_threads: Option<String>,
}

impl Task for Inspect {
    type Input = Array;
    type Output = Seen;
    type Error = String;
    fn run(a: Array) -> Result<Seen, String> {
        let sum = a.as_slice::<f32>().map_err(|e| e.to_string())?.iter().map(|&x| f64::from(x)).sum();
        Ok(Seen {
            pid: std::process::id(),
            pgid: nix::unistd::getpgrp().as_raw(),
            mapped_from: a.file_location().map(|(p, _, _)| p.display().to_string()),
            sum,
            omp_threads: std::env::var("OMP_NUM_THREADS").ok(),
        })
    }
}

/// Fails as told: `Err` for 13, panic for 17.
struct Picky;
impl Task for Picky {
    type Input = u64;
    type Output = u64;
    type Error = String;
    fn describe(x: &u64) -> Option<String> {
        Some(format!("value {x}"))
    }
    fn run(x: u64) -> Result<u64, String> {
        match x {
            13 => Err("13 is unlucky".into()),
            17 => panic!("17 is worse"),
            x => Ok(x),
        }
    }
}

/// Writes `value` into every element of its (mapped) array.
struct Fill;
impl Task for Fill {
    type Input = (Array, f64);
    type Output = ();
    type Error = String;
    fn run((mut a, value): (Array, f64)) -> Result<(), String> {
        a.as_mut_slice::<f64>().map_err(|e| e.to_string())?.fill(value);
        Ok(())
    }
}

struct Hang;
impl Task for Hang {
    type Input = u64;
    type Output = u64;
    type Error = String;
    fn run(x: u64) -> Result<u64, String> {
        if x == 1 {
            loop {
                std::thread::park();
            }
        }
        Ok(x)
    }
}

/// Returns a ramp `i·step` of `len` f64 as a `1 × len` fresh zeros array
/// (from 4 MiB on, pages of its own, which the worker hands to the pipe by
/// reference) and a small array `[step; 3]` after it in the same frame.
struct Ramps;
impl Task for Ramps {
    type Input = (u64, f64);
    type Output = (Array, Array);
    type Error = String;
    fn run((len, step): (u64, f64)) -> Result<(Array, Array), String> {
        let mut ramp = Array::zeros(procjob::DType::F64, vec![1, len as usize]);
        for (i, x) in ramp.as_mut_slice::<f64>().map_err(|e| e.to_string())?.iter_mut().enumerate() {
            *x = i as f64 * step;
        }
        Ok((ramp, Array::from_vec(vec![3], vec![step; 3])))
    }
}

fn f32_array(len: usize) -> Array {
    Array::from_vec(vec![len], vec![1.0f32; len])
}

#[test]
fn user_tasks_run_in_distinct_worker_processes() {
    let mut p = Parallel::new().n_jobs(2);
    let out = p.run::<Square, _>(0..100u64).unwrap();
    assert_eq!(out, (0..100u64).map(|x| x * x).collect::<Vec<_>>());
    let pids = p.worker_pids();
    assert_eq!(pids.len(), 2);
    assert_ne!(pids[0], pids[1]);
    assert!(!pids.contains(&std::process::id()));
}

#[test]
fn n_jobs_counts_back_from_cpus_and_refuses_zero() {
    let cpus = std::thread::available_parallelism().unwrap().get();
    assert_eq!(procjob::__private::resolve_n_jobs(-1, cpus).unwrap(), cpus);
    assert_eq!(procjob::__private::resolve_n_jobs(-2, 8).unwrap(), 7);
    assert_eq!(procjob::__private::resolve_n_jobs(-100, 8).unwrap(), 1);
    let mut p = Parallel::new().n_jobs(0);
    let err = p.run::<Square, _>(0..3u64).unwrap_err();
    assert!(err.to_string().contains("n_jobs = 0"), "{err}");
    let mut p = Parallel::new().n_jobs(3);
    p.run::<Square, _>(0..3u64).unwrap();
    assert_eq!(p.worker_pids().len(), 3);
}

#[test]
fn arrays_up_to_max_nbytes_travel_inline_and_larger_ones_as_files() {
    const MIB: usize = 1 << 20;
    let mut p = Parallel::new().n_jobs(1).in_process(false);
    // Exactly 1 MiB: inline, so its bytes cross the pipe.
    let seen = p.run::<Inspect, _>([f32_array(MIB / 4)]).unwrap();
    assert!(seen[0].mapped_from.is_none());
    let inline = p.last_call().traffic.bytes_to_workers;
    assert!(inline > MIB as u64, "{inline}");
    assert_eq!(p.last_call().dumped_arrays, 0);
    // One element (4 bytes) more: dumped and sent as a file reference.
    let seen = p.run::<Inspect, _>([f32_array(MIB / 4 + 1)]).unwrap();
    assert!(seen[0].mapped_from.is_some());
    assert_eq!(seen[0].sum, (MIB / 4 + 1) as f64);
    let by_ref = p.last_call().traffic.bytes_to_workers;
    assert!(by_ref < 4096, "{by_ref}");
    assert_eq!(p.last_call().dumped_arrays, 1);
    // The threshold is exact to the byte: 1 MiB with max_nbytes = 1 MiB - 1.
    let mut p = p.max_nbytes(Some(MIB - 1));
    let seen = p.run::<Inspect, _>([f32_array(MIB / 4)]).unwrap();
    assert!(seen[0].mapped_from.is_some());
    // None: everything inline, however large.
    let mut p = p.max_nbytes(None);
    let seen = p.run::<Inspect, _>([f32_array(MIB)]).unwrap();
    assert!(seen[0].mapped_from.is_none());
    assert!(p.last_call().traffic.bytes_to_workers > 4 * MIB as u64);
}

#[test]
fn large_result_arrays_arrive_intact_beside_small_ones() {
    // Two tasks per frame; 600,000 and 524,288 f64 are over 4 MiB, 10 is not.
    let inputs = [(600_000u64, 1.0), (10, 2.0), (700_000, 3.0), (524_288, 0.5), (1, 4.0)];
    let mut p = Parallel::new().n_jobs(2).batch_size(BatchSize::Fixed(2));
    for round in 0..2 {
        let out = p.run::<Ramps, _>(inputs).unwrap();
        for ((len, step), (ramp, small)) in inputs.iter().zip(&out) {
            let ramp = ramp.as_slice::<f64>().unwrap();
            assert_eq!(ramp.len() as u64, *len, "round {round}");
            assert!(ramp.iter().enumerate().all(|(i, &x)| x == i as f64 * step), "round {round}: ramp {len} × {step}");
            assert_eq!(small.as_slice::<f64>().unwrap(), &[*step; 3], "round {round}");
        }
    }
}

/// A worker reuses the pages of a large result it sent for its next one,
/// once the coordinator has read them (the worker's side is tested in
/// `serve`): whatever the timing, every result, one task per call or many
/// queued on one worker, is its own product. Each task's inputs differ, so
/// a block written into pages still on their way would show.
#[test]
fn large_results_in_a_row_on_one_worker_are_each_their_own() {
    let (rows, k, n) = (1024, 3, 1024); // an 8 MiB result
    let inputs = |t: usize| {
        let a: Vec<f64> = (0..rows * k).map(|i| ((i * 7 + t * 13) % 11) as f64).collect();
        let b: Vec<f64> = (0..k * n).map(|i| ((i * 5 + t) % 9) as f64).collect();
        (Array::from_vec(vec![rows, k], a), Array::from_vec(vec![k, n], b))
    };
    let expected = |t: usize| {
        let (a, b) = inputs(t);
        let (a, b) = (a.as_slice::<f64>().unwrap().to_vec(), b.as_slice::<f64>().unwrap().to_vec());
        (0..rows * n).map(|e| (0..k).map(|p| a[e / n * k + p] * b[p * n + e % n]).sum::<f64>()).collect::<Vec<_>>()
    };
    let mut p = Parallel::new().n_jobs(1).in_process(false).max_nbytes(None);
    for t in 0..3 {
        let c = p.run::<procjob::tasks::Dot, _>([inputs(t)]).unwrap();
        assert!(c[0].as_slice::<f64>().unwrap() == expected(t).as_slice(), "call {t}");
    }
    let c = p.run::<procjob::tasks::Dot, _>((3..9).map(inputs)).unwrap();
    for (t, c) in (3..9).zip(&c) {
        assert!(c.as_slice::<f64>().unwrap() == expected(t).as_slice(), "task {t} of one call");
    }
}

/// A position-weighted checksum of an f32 array: `Σ x[j]·(j mod 997 + 1)`.
struct Weighted;
impl Task for Weighted {
    type Input = Array;
    type Output = f64;
    type Error = String;
    fn run(a: Array) -> Result<f64, String> {
        Ok(weighted(a.as_slice::<f32>().map_err(|e| e.to_string())?))
    }
}

fn weighted(x: &[f32]) -> f64 {
    x.iter().enumerate().map(|(j, &v)| f64::from(v) * ((j % 997) + 1) as f64).sum()
}

#[test]
fn large_inline_inputs_reach_every_worker_intact() {
    // Four 4 MiB inputs, inline, one per batch on two workers: the batches
    // sent together are written at once, one thread per worker.
    let mut p = Parallel::new().n_jobs(2).max_nbytes(None).batch_size(BatchSize::Fixed(1));
    let inputs: Vec<Array> = (0..4u32)
        .map(|i| Array::from_vec(vec![1 << 20], (0..1u32 << 20).map(|j| (j * (i + 1) % 7) as f32).collect()))
        .collect();
    for _ in 0..2 {
        let seen = p.run::<Weighted, _>(inputs.clone()).unwrap();
        assert_eq!(seen.len(), inputs.len());
        for (sum, a) in seen.iter().zip(&inputs) {
            assert_eq!(*sum, weighted(a.as_slice::<f32>().unwrap()));
        }
        assert!(p.last_call().traffic.bytes_to_workers > 16 << 20);
    }
}

#[test]
fn an_array_shared_by_many_tasks_is_dumped_once() {
    let big = f32_array(1 << 20);
    let mut p = Parallel::new().n_jobs(2);
    let seen = p.run::<Inspect, _>((0..10).map(|_| big.clone())).unwrap();
    assert_eq!(p.last_call().dumped_arrays, 1);
    assert_eq!(p.last_call().dumped_bytes, 4 << 20);
    assert!(seen.iter().all(|s| s.sum == (1 << 20) as f64));
    // Row slices of one array, each above the threshold, share its dump too.
    let mut p = p.max_nbytes(Some(1000));
    let m = Array::from_vec(vec![1024, 512], vec![2.0f32; 1024 * 512]);
    let seen = p.run::<Inspect, _>((0..8).map(|i| m.rows(i * 128..(i + 1) * 128).unwrap())).unwrap();
    assert_eq!(p.last_call().dumped_arrays, 1);
    assert!(seen.iter().all(|s| s.sum == (128 * 512 * 2) as f64));
}

#[test]
fn temp_folder_holds_the_dumps_and_is_emptied_after_the_call() {
    let parent = tempfile::tempdir().unwrap();
    let mut p = Parallel::new().n_jobs(1).in_process(false).temp_folder(parent.path());
    let seen = p.run::<Inspect, _>([f32_array(1 << 19)]).unwrap();
    let from = seen[0].mapped_from.as_deref().unwrap();
    assert!(from.starts_with(&parent.path().join("procjob-").display().to_string()), "{from}");
    assert_eq!(std::fs::read_dir(parent.path()).unwrap().count(), 0);
}

#[test]
fn results_come_ordered_streamed_or_unordered() {
    let mut p = Parallel::new().n_jobs(2).batch_size(BatchSize::Fixed(3));
    let streamed: Vec<u64> = p.run_iter::<Square, _>(0..50u64).unwrap().map(Result::unwrap).collect();
    assert_eq!(streamed, (0..50u64).map(|x| x * x).collect::<Vec<_>>());
    let mut unordered: Vec<(u64, u64)> = p.run_unordered::<Square, _>(0..50u64).unwrap().map(Result::unwrap).collect();
    unordered.sort();
    assert_eq!(unordered, (0..50u64).map(|x| (x, x * x)).collect::<Vec<_>>());
}

#[test]
fn batching_sends_many_tiny_tasks_in_few_frames() {
    let mut p = Parallel::new().n_jobs(2);
    let out = p.run::<Square, _>(0..100_000u64).unwrap();
    assert_eq!(out.len(), 100_000);
    let frames = p.last_call().traffic.frames_to_workers;
    assert!(frames < 1_000, "{frames} frames for 100000 tasks");
    let mut p = p.batch_size(BatchSize::Fixed(1));
    p.run::<Square, _>(0..1_000u64).unwrap();
    assert_eq!(p.last_call().traffic.frames_to_workers, 1_000);
}

#[test]
fn pre_dispatch_bounds_how_far_the_input_is_drawn() {
    let drawn = Rc::new(RefCell::new(0u64));
    let counter = Rc::clone(&drawn);
    let inputs = (0..1000u64).inspect(move |_| *counter.borrow_mut() += 1);
    let mut p = Parallel::new().n_jobs(2).batch_size(BatchSize::Fixed(1)).pre_dispatch(PreDispatch::Batches(4));
    // In completion order, the first result arrives once the first batch
    // is back: by then at most 4 batches (of one task) were ever drawn.
    let mut results = p.run_unordered::<Square, _>(inputs).unwrap();
    let (index, square) = results.next().unwrap().unwrap();
    assert_eq!(square, index * index);
    assert!(*drawn.borrow() <= 4, "drew {} inputs for the first result", drawn.borrow());
    assert_eq!(results.map(Result::unwrap).count(), 999);
    assert_eq!(*drawn.borrow(), 1000);
}

#[test]
fn a_task_error_and_a_panic_come_back_with_their_index_and_keep_the_healthy_workers() {
    let mut p = Parallel::new().n_jobs(2).batch_size(BatchSize::Fixed(1));
    p.run::<Picky, _>(0..4u64).unwrap();
    let pids = p.worker_pids();
    let err = p.run::<Picky, _>((0..100u64).filter(|&x| x != 17)).unwrap_err();
    assert_eq!(err.task_index(), Some(13), "{err}");
    assert!(err.to_string().contains("13 is unlucky") && err.to_string().contains("value 13"), "{err}");
    assert_eq!(err.task_error::<String>().as_deref(), Some("13 is unlucky"));
    let completed = p.last_call().batches;
    assert!(completed < 100, "the rest was cancelled, yet {completed} batches were sent");
    assert_eq!(p.worker_pids(), pids);
    let err = p.run::<Picky, _>(14..100u64).unwrap_err();
    assert_eq!(err.task_index(), Some(3), "{err}"); // input 17 is the 4th
    let msg = err.to_string();
    assert!(msg.contains("panicked at") && msg.contains("17 is worse") && msg.contains("parallel_api.rs"), "{msg}");
    // The worker that panicked is retired (its state may be half-updated)
    // and replaced at once; the healthy one keeps serving.
    let Error::Task { worker, .. } = err else { unreachable!("a task failure") };
    assert_eq!(worker.pid, pids[worker.index], "the error names the worker that panicked");
    let after = p.worker_pids();
    assert_eq!(after.len(), 2, "the panicked worker's slot is refilled: {after:?}");
    assert!(after.iter().all(|&pid| pid != 0), "{after:?}");
    for (slot, (&before, &now)) in pids.iter().zip(&after).enumerate() {
        if slot == worker.index {
            assert_ne!(now, before, "the worker that panicked is not the one serving afterwards");
            assert_eq!(p.worker_reports()[slot].pid, now, "the report names the replacement");
        } else {
            assert_eq!(now, before, "the healthy worker survives");
        }
    }
    assert_eq!(p.last_call().replaced_workers, 1);
    // The next call runs on the replacement, without starting another.
    assert_eq!(p.run::<Picky, _>([1, 2, 3]).unwrap(), vec![1, 2, 3]);
    assert_eq!(p.worker_pids(), after);
    assert_eq!(p.last_call().replaced_workers, 0);
}

#[test]
fn the_pool_stays_warm_across_calls_and_sets_thread_counts() {
    let mut p = Parallel::new().n_jobs(2);
    p.run::<Square, _>(0..10u64).unwrap();
    let pids = p.worker_pids();
    let seen = p.run::<Inspect, _>((0..4).map(|_| f32_array(8))).unwrap();
    assert_eq!(p.worker_pids(), pids);
    let cpus = std::thread::available_parallelism().unwrap().get();
    let expected = (cpus / 2).max(1).to_string();
    for s in &seen {
        assert!(pids.contains(&s.pid));
        // Own process group: a terminal's Ctrl-C reaches only the coordinator.
        assert_eq!(s.pgid, s.pid as i32);
        if std::env::var_os("OMP_NUM_THREADS").is_none() {
            assert_eq!(s.omp_threads.as_deref(), Some(expected.as_str()));
        }
    }
}

#[test]
fn idle_workers_exit_and_the_next_call_starts_new_ones() {
    let mut p = Parallel::new().n_jobs(1).in_process(false).idle_timeout(Some(Duration::from_millis(50)));
    p.run::<Square, _>([1u64]).unwrap();
    let pid = p.worker_pids()[0];
    // Wait for the exit itself: a pidfd becomes readable when the process ends.
    wait_for_exit(pid);
    p.run::<Square, _>([2u64]).unwrap();
    assert_ne!(p.worker_pids()[0], pid);
}

/// A worker that lent a large result (copied out of its memory, not sent
/// through the pipe) is told as soon as it was read, and so still idles
/// out: it holds nothing the coordinator has yet to read. (Whether the
/// result was lent is not visible here; tests/see_it.rs shows that a block
/// of this size is, and with `PROCJOB_LEND=0` this checks the pipe.)
#[test]
fn a_worker_idles_out_after_its_lent_results_were_read() {
    let mut p = Parallel::new().n_jobs(1).in_process(false).idle_timeout(Some(Duration::from_millis(50)));
    let (ramp, _) = p.run::<Ramps, _>([(600_000u64, 2.0)]).unwrap().remove(0);
    assert!(ramp.as_slice::<f64>().unwrap().iter().enumerate().all(|(i, &x)| x == 2.0 * i as f64));
    wait_for_exit(p.worker_pids()[0]);
}

#[test]
fn a_batch_sent_to_a_worker_that_just_idled_out_runs_on_a_fresh_one() {
    let mut p = Parallel::new().n_jobs(1).in_process(false).idle_timeout(Some(Duration::from_millis(50)));
    p.run::<Square, _>([1u64]).unwrap();
    let pid = p.worker_pids()[0];
    // The call starts while the worker lives (its first input, drawn
    // before the start to learn that there is one, is ready); its second
    // input is drawn only once the worker has exited, so a batch meets a
    // closed pipe.
    let inputs = std::iter::once(2u64).chain(std::iter::once(()).flat_map(move |()| {
        wait_for_exit(pid);
        [3u64]
    }));
    assert_eq!(p.run::<Square, _>(inputs).unwrap(), vec![4, 9]);
    assert_ne!(p.worker_pids()[0], pid);
}

fn wait_for_exit(pid: u32) {
    use std::os::fd::{BorrowedFd, FromRawFd, OwnedFd};
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        // ESRCH: it has exited and been reaped already.
        let err = std::io::Error::last_os_error();
        assert_eq!(err.raw_os_error(), Some(libc::ESRCH), "pidfd_open({pid}): {err}");
        return;
    }
    // SAFETY: the fd was just returned to us and is owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let borrowed: BorrowedFd<'_> = std::os::fd::AsFd::as_fd(&fd);
    let mut fds = [nix::poll::PollFd::new(borrowed, nix::poll::PollFlags::POLLIN)];
    let n = nix::poll::poll(&mut fds, nix::poll::PollTimeout::try_from(10_000).unwrap()).unwrap();
    assert_eq!(n, 1, "worker {pid} did not exit within 10 s of its idle timeout");
}

#[test]
fn timeout_kills_a_hung_task_and_names_it() {
    let mut p = Parallel::new().n_jobs(2).batch_size(BatchSize::Fixed(1)).timeout(Duration::from_millis(300));
    let err = p.run::<Hang, _>(0..4u64).unwrap_err();
    assert!(matches!(err, Error::Timeout { .. }), "{err}");
    assert_eq!(err.task_index(), Some(1));
    assert!(err.to_string().contains("task 1") && err.to_string().contains("killed"), "{err}");
    // The pool recovers: the killed worker is replaced on the next call.
    assert_eq!(p.run::<Hang, _>([0u64, 2, 3]).unwrap(), vec![0, 2, 3]);
}

/// Reads the first output of a stream of `Hang` tasks (`[0, 1, 1, 1]`:
/// task 0 answers, the others never do), drops the stream, and returns how
/// long the drop took and the pids it killed.
fn drop_a_stream_mid_call(p: &mut Parallel, ordered: bool) -> (Duration, Vec<u32>) {
    let before = p.worker_pids();
    let inputs = [0u64, 1, 1, 1];
    let took = if ordered {
        let mut stream = p.run_iter::<Hang, _>(inputs).unwrap();
        assert_eq!(stream.next().unwrap().unwrap(), 0);
        let t = std::time::Instant::now();
        drop(stream);
        t.elapsed()
    } else {
        let mut stream = p.run_unordered::<Hang, _>(inputs).unwrap();
        assert_eq!(stream.next().unwrap().unwrap(), (0, 0));
        let t = std::time::Instant::now();
        drop(stream);
        t.elapsed()
    };
    let after = p.worker_pids();
    let killed: Vec<u32> = before.iter().copied().filter(|pid| !after.contains(pid)).collect();
    (took, killed)
}

#[test]
fn dropping_a_stream_kills_its_running_tasks_at_once_and_the_next_call_has_fresh_workers() {
    // On a thread of its own, so that a drop that waits for the hanging
    // tasks fails the test instead of hanging it.
    let (tx, rx) = std::sync::mpsc::channel();
    let handle = std::thread::spawn(move || {
        let mut p = Parallel::new().n_jobs(2).batch_size(BatchSize::Fixed(1));
        p.start().unwrap();
        for ordered in [true, false] {
            let (took, killed) = drop_a_stream_mid_call(&mut p, ordered);
            assert!(took < Duration::from_secs(5), "ordered={ordered}: the drop took {took:?}");
            // Task 1 was running when the stream was dropped: its worker is
            // killed and reaped (its slot is left out until refilled).
            assert!(!killed.is_empty(), "ordered={ordered}: no worker was killed");
            for &pid in &killed {
                let alive = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), None);
                assert_eq!(alive, Err(nix::errno::Errno::ESRCH), "ordered={ordered}: worker {pid} lives on");
            }
            // The next call starts fresh workers in the empty slots.
            assert_eq!(p.run::<Hang, _>([0u64, 2, 3]).unwrap(), vec![0, 2, 3]);
            let pids = p.worker_pids();
            assert_eq!(pids.len(), 2, "{pids:?}");
            assert!(pids.iter().all(|pid| !killed.contains(pid)), "{pids:?} reuses one of {killed:?}");
        }
        let _ = tx.send(());
    });
    match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(()) => handle.join().unwrap(),
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => panic!("dropping a stream waited for its hanging tasks"),
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => std::panic::resume_unwind(handle.join().unwrap_err()),
    }
}

#[test]
fn shared_output_is_filled_in_place_by_workers() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out.npy");
    let out = Array::create_npy(&path, procjob::DType::F64, vec![8, 4]).unwrap();
    let mut p = Parallel::new().n_jobs(2);
    p.run::<Fill, _>((0..4).map(|i| (out.rows(2 * i..2 * i + 2).unwrap(), i as f64))).unwrap();
    let c = out.as_slice::<f64>().unwrap();
    for (row, chunk) in c.chunks(4).enumerate() {
        assert!(chunk.iter().all(|&v| v == (row / 2) as f64), "row {row}: {chunk:?}");
    }
}

#[test]
fn mmap_mode_decides_whether_tasks_may_write_dumped_arrays() {
    let a = Array::from_vec(vec![1 << 18], vec![1.0f64; 1 << 18]);
    // Read-only (default): writing is refused.
    let mut p = Parallel::new().n_jobs(1).in_process(false);
    let err = p.run::<Fill, _>([(a.clone(), 5.0)]).unwrap_err();
    assert!(err.to_string().contains("read-only"), "{err}");
    // Copy-on-write: the task may write its private view; the original is untouched.
    let mut p = p.mmap_mode(Access::CopyOnWrite);
    p.run::<Fill, _>([(a.clone(), 5.0)]).unwrap();
    assert!(a.as_slice::<f64>().unwrap().iter().all(|&v| v == 1.0));
}

#[test]
fn progress_reports_every_batch() {
    // Kept with the Parallel, which is Send: the callback is Send + 'static.
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = std::sync::Arc::clone(&seen);
    let mut p = Parallel::new()
        .n_jobs(2)
        .batch_size(BatchSize::Fixed(10))
        .progress(move |pr| log.lock().unwrap().push((pr.completed, pr.total)));
    p.run::<Square, _>(0..100u64).unwrap();
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 10);
    assert!(seen.windows(2).all(|w| w[0].0 < w[1].0));
    assert_eq!(seen.last(), Some(&(100, Some(100))));
}

#[test]
fn a_progress_callback_for_one_call_may_update_a_local_counter() {
    let builder_calls = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counter = std::sync::Arc::clone(&builder_calls);
    let mut p = Parallel::new().n_jobs(2).batch_size(BatchSize::Fixed(10)).progress(move |_| {
        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    });
    // Neither 'static nor Send: it borrows locals of this function.
    let mut reports = 0;
    let mut last = None;
    let out = p
        .run_with_progress::<Square, _>(0..100u64, |pr| {
            reports += 1;
            last = Some((pr.completed, pr.total));
        })
        .unwrap();
    assert_eq!(out, (0..100u64).map(|x| x * x).collect::<Vec<_>>());
    assert_eq!((reports, last), (10, Some((100, Some(100)))));
    assert_eq!(
        builder_calls.load(std::sync::atomic::Ordering::Relaxed),
        0,
        "the call's callback replaces the builder's"
    );
    // The builder's callback serves the calls without one of their own.
    p.run::<Square, _>(0..20u64).unwrap();
    assert_eq!(builder_calls.load(std::sync::atomic::Ordering::Relaxed), 2);
}

#[test]
fn a_parallel_moves_to_another_thread_with_its_warm_pool() {
    fn is_send<T: Send>(_: &T) {}
    let mut p = Parallel::new().n_jobs(2);
    p.start().unwrap();
    let pids = p.worker_pids();
    is_send(&p);
    let (p, out) = std::thread::spawn(move || {
        let out = p.run::<Square, _>(0..10u64).unwrap();
        (p, out)
    })
    .join()
    .unwrap();
    assert_eq!(out, (0..10u64).map(|x| x * x).collect::<Vec<_>>());
    assert_eq!(p.worker_pids(), pids, "the same workers served the call on the other thread");
}

#[test]
fn a_worker_started_from_a_binary_without_init_fails_loudly() {
    // Re-run this test binary as if it were a worker whose main forgot
    // procjob::init(): it must refuse to start workers of its own.
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["forgetful_child", "--exact", "--nocapture", "--include-ignored"])
        .env("PROCJOB_WORKER", "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(101), "{stderr}");
    assert!(stderr.contains("procjob::init()") && stderr.contains("Refusing to start workers"), "{stderr}");
}

#[test]
#[ignore = "run by a_worker_started_from_a_binary_without_init_fails_loudly"]
fn forgetful_child() {
    let _ = Parallel::new().n_jobs(1).in_process(false).run::<Square, _>([1u64]);
    unreachable!("a worker that did not call init() must not get here");
}

#[test]
fn a_second_registered_task_kind_runs_through_the_same_pool() {
    use procjob_worker::testkinds::Checksum;
    let a = Array::from_vec(vec![3, 2], vec![1i64, 2, 3, 4, 5, 6]);
    let mut p = Parallel::new().n_jobs(2);
    let out = p.run::<Checksum, _>([a.clone(), a.rows(1..3).unwrap()]).unwrap();
    assert_eq!((out[0].sum, out[0].shape.clone()), (21.0, vec![3, 2]));
    assert_eq!((out[1].sum, out[1].shape.clone()), (18.0, vec![2, 2]));
    assert!(p.worker_pids().contains(&out[0].pid));
    // A worker's serve loop never keeps a dropped result's pages for the
    // next (its results may still be in a pipe by reference), while a
    // thread of this process does.
    assert!(out.iter().all(|o| !o.recycles_dropped), "a worker recycles what its serve loop drops");
    assert!(Checksum::run(a).unwrap().recycles_dropped);
}

#[test]
fn the_standalone_worker_runs_registered_kinds_by_name_only() {
    let exe = std::path::Path::new(env!("CARGO_BIN_EXE_procjob")).with_file_name("procjob-worker");
    if !exe.exists() {
        assert!(std::env::var_os("CI").is_none(), "{} was not built", exe.display());
        eprintln!("skipping: {} not built (run cargo test --workspace)", exe.display());
        return;
    }
    let mut p = Parallel::new().n_jobs(1).in_process(false).worker_program(&exe);
    let a = Array::from_vec(vec![1, 2], vec![1.5f64, 2.0]);
    let b = Array::from_vec(vec![2, 1], vec![2.0f64, 3.0]);
    let out = p.run::<procjob::tasks::Dot, _>([(a, b)]).unwrap();
    assert_eq!(out[0].as_slice::<f64>().unwrap(), &[9.0]);
    // A task defined in this file is not in its registry, and its code offset
    // means nothing in another executable: refused, with the known names.
    let err = p.run::<Square, _>([3u64]).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("not known to this worker") && msg.contains("dot, matmul"), "{msg}");
}

/// Kills its own worker with SIGKILL the first time it runs (a marker file
/// remembers), then returns its input.
struct DiesOnce;
impl Task for DiesOnce {
    type Input = (u64, String);
    type Output = u64;
    type Error = String;
    fn describe(input: &(u64, String)) -> Option<String> {
        Some(format!("value {}", input.0))
    }
    fn run((x, marker): (u64, String)) -> Result<u64, String> {
        if x == 5 && std::fs::OpenOptions::new().write(true).create_new(true).open(&marker).is_ok() {
            let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
        }
        Ok(x)
    }
}

#[test]
fn a_worker_killed_mid_task_is_reported_with_the_task_and_signal() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("died").display().to_string();
    let mut p = Parallel::new().n_jobs(2).batch_size(BatchSize::Fixed(1));
    let err = p.run::<DiesOnce, _>((0..10u64).map(|x| (x, marker.clone()))).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::WorkerDied { .. }), "{msg}");
    assert!(msg.contains("was killed by SIGKILL while running task 5 (value 5)"), "{msg}");
    assert!(msg.contains("out of memory"), "{msg}");
}

#[test]
fn retries_rerun_a_lost_task_on_a_fresh_worker() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("died").display().to_string();
    let mut p = Parallel::new().n_jobs(2).batch_size(BatchSize::Fixed(1)).retries(1);
    let out = p.run::<DiesOnce, _>((0..10u64).map(|x| (x, marker.clone()))).unwrap();
    assert_eq!(out, (0..10u64).collect::<Vec<_>>());
    assert_eq!(p.last_call().retried, 1);
    assert_eq!(p.last_call().replaced_workers, 1);
    // The loss the retry made good, as the call would have failed with.
    let lost = &p.last_call().lost;
    assert_eq!(lost.len(), 1, "{lost:?}");
    assert!(lost[0].contains("was killed by SIGKILL while running task 5 (value 5)"), "{lost:?}");
    assert!(p.worker_pids().iter().all(|&pid| pid != 0));
    // The next call starts with none (the marker exists: no death now).
    let out = p.run::<DiesOnce, _>((0..4u64).map(|x| (x, marker.clone()))).unwrap();
    assert_eq!(out, (0..4u64).collect::<Vec<_>>());
    assert!(p.last_call().lost.is_empty() && p.last_call().retried == 0, "{:?}", p.last_call());
}

/// A user task that happens to share a built-in task's name.
struct Shadow;
impl Task for Shadow {
    type Input = u64;
    type Output = String;
    type Error = String;
    fn name() -> &'static str {
        "matmul"
    }
    fn run(x: u64) -> Result<String, String> {
        Ok(format!("user code ran with {x}"))
    }
}

#[test]
fn a_user_task_named_like_a_builtin_runs_the_users_code() {
    let mut p = Parallel::new().n_jobs(1).in_process(false);
    assert_eq!(p.run::<Shadow, _>([4u64]).unwrap(), vec!["user code ran with 4".to_string()]);
}

#[test]
fn arrays_opened_through_a_symlink_travel_by_their_real_path() {
    let dir = tempfile::tempdir().unwrap();
    let real = dir.path().join("real.npy");
    Array::from_vec(vec![2, 2], vec![1.0f32, 2.0, 3.0, 4.0]).save_npy(&real).unwrap();
    let link = dir.path().join("link.npy");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let a = Array::open_npy(&link, Access::ReadOnly).unwrap();
    let seen = Parallel::new().n_jobs(1).in_process(false).run::<Inspect, _>([a]).unwrap();
    assert_eq!(seen[0].sum, 10.0);
    let canonical = std::fs::canonicalize(&real).unwrap().display().to_string();
    assert_eq!(seen[0].mapped_from.as_deref(), Some(canonical.as_str()));
}

/// Returns a 2×3 block filled with its input.
struct Block23;
impl Task for Block23 {
    type Input = f64;
    type Output = (u64, Array);
    type Error = String;
    fn run(x: f64) -> Result<(u64, Array), String> {
        Ok((7, Array::from_vec(vec![2, 3], vec![x; 6])))
    }
}

#[test]
fn outputs_land_straight_in_their_rows_of_a_shared_array() {
    let dir = tempfile::tempdir().unwrap();
    let out = Array::create_npy(&dir.path().join("out.npy"), procjob::DType::F64, vec![8, 3]).unwrap();
    let mut p = Parallel::new().n_jobs(2).batch_size(BatchSize::Fixed(1));
    let results: Vec<(u64, (u64, Array))> = p
        .run_unordered_into::<Block23, _>((0..4).map(f64::from), &out, |i| 2 * i as usize..2 * i as usize + 2)
        .unwrap()
        .map(Result::unwrap)
        .collect();
    for (index, (seven, block)) in &results {
        assert_eq!(*seven, 7);
        // The block is a view of `out`, not a copy.
        assert_eq!(block.storage_id(), out.storage_id(), "task {index}");
        assert_eq!(block.as_slice::<f64>().unwrap(), &[*index as f64; 6]);
    }
    drop(results);
    let all = out.as_slice::<f64>().unwrap();
    for (row, chunk) in all.chunks(3).enumerate() {
        assert_eq!(chunk, &[(row / 2) as f64; 3], "row {row}");
    }
    // An owned output array is refused: there is no file to land in.
    let owned = Array::zeros(procjob::DType::F64, vec![8, 3]);
    assert!(p.run_unordered_into::<Block23, _>([1.0], &owned, |_| 0..2).is_err());
}

#[test]
fn large_outputs_land_intact_in_their_rows() {
    // Rows of 600,000 f64 (4.8 MB): each lent by address by the worker and
    // copied out of its memory into its row here (with PROCJOB_LEND=0,
    // handed to the pipe by reference and spliced into the file); in the
    // second round the worker writes into pages it was given back.
    const LEN: usize = 600_000;
    let dir = tempfile::tempdir().unwrap();
    let out = Array::create_npy(&dir.path().join("out.npy"), procjob::DType::F64, vec![4, LEN]).unwrap();
    let mut p = Parallel::new().n_jobs(2).batch_size(BatchSize::Fixed(2));
    for round in 0..2 {
        let step = |i: u64| (i + 1) as f64 * if round == 0 { 1.0 } else { -0.5 };
        let inputs = (0..4u64).map(|i| (LEN as u64, step(i)));
        let results: Vec<(u64, (Array, Array))> = p
            .run_unordered_into::<Ramps, _>(inputs, &out, |i| i as usize..i as usize + 1)
            .unwrap()
            .map(Result::unwrap)
            .collect();
        for (index, (ramp, small)) in &results {
            assert_eq!(ramp.storage_id(), out.storage_id(), "task {index} landed in place");
            assert_eq!(small.as_slice::<f64>().unwrap(), &[step(*index); 3]);
        }
        drop(results);
        for (row, values) in out.as_slice::<f64>().unwrap().chunks(LEN).enumerate() {
            let s = step(row as u64);
            assert!(values.iter().enumerate().all(|(i, &x)| x == i as f64 * s), "round {round}, row {row}");
        }
    }
}

#[test]
fn an_output_region_outside_the_array_fails_the_call_without_hanging() {
    // Task 1's rows are past the end of the 8-row output: the call must
    // fail with that reason, not wait for a batch it never sent.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let dir = tempfile::tempdir().unwrap();
        let out = Array::create_npy(&dir.path().join("out.npy"), procjob::DType::F64, vec![8, 3]).unwrap();
        let mut p = Parallel::new().n_jobs(2).batch_size(BatchSize::Fixed(1));
        let rows = |i: u64| if i == 1 { 100..102 } else { 2 * i as usize..2 * i as usize + 2 };
        let outcome: Result<Vec<_>, _> =
            p.run_unordered_into::<Block23, _>((0..4).map(f64::from), &out, rows).and_then(|it| it.collect());
        let _ = tx.send(outcome.map(|v| v.len()).map_err(|e| e.to_string()));
    });
    let outcome = rx.recv_timeout(Duration::from_secs(120)).expect("the call hung");
    let err = outcome.expect_err("rows past the end must fail the call");
    assert!(err.contains("output rows for task 1"), "{err}");
}

#[test]
fn fork_is_refused_while_the_coordinator_has_other_threads() {
    // The test harness runs this test on a thread of its own, so the process
    // has several: forking would copy only this one. (The fork mode itself
    // is tested through the procjob binary, which forks single-threaded.)
    assert!(procjob::__private::thread_count().unwrap() > 1);
    let mut p =
        Parallel::new().n_jobs(1).in_process(false).start_method(procjob::StartMethod::Fork { inherit: vec![] });
    let err = p.run::<Square, _>([1u64]).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("cannot fork workers") && msg.contains("threads"), "{msg}");
    assert!(p.worker_pids().is_empty(), "no worker was started");
}
