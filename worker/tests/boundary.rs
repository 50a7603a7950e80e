//! The worker at its protocol boundary, through the real `procjob-worker`
//! binary: frames built with the crate's own encoder, sent on its stdin,
//! its replies read from its stdout. Each test checks that what a frame can
//! ask for — a product of zero-byte inputs, a reply of many long failures,
//! a FIFO, a file truncated between batches or while a task reads it —
//! fails the task that asked, with a message naming the cause, and that
//! the worker then answers the next batch.
//!
//! Tests that need the misbehaving task kinds are ignored without the
//! `test-tasks` feature (`cargo test --workspace` enables it).

mod util;

use procjob_worker::array::{self, Array};
use procjob_worker::matmul::MatmulInput;
use procjob_worker::protocol::{ArrayRef, Outcome};
use procjob_worker::DType;
use util::{batch_of, failure, Worker};

/// 4 KiB of f64 elements (512), each `value`, saved as `.npy` at `path`;
/// returns the array mapped read-only (so it travels as a file reference).
fn saved(path: &std::path::Path, value: f64, len: usize) -> Array {
    Array::from_vec(vec![1, len], vec![value; len]).save_npy(path).unwrap();
    Array::open_npy(path, procjob_worker::protocol::Access::ReadOnly).unwrap()
}

fn column(len: usize) -> Array {
    Array::from_vec(vec![len, 1], vec![1.0f64; len])
}

/// The value of a one-element `dot` result.
fn scalar(outcome: &Outcome, arrays: &[Array]) -> f64 {
    let Outcome::Ok { output, .. } = outcome else { panic!("failed: {outcome:?}") };
    let c: Array = array::decode_with(output, arrays.to_vec()).unwrap();
    c.as_slice::<f64>().unwrap()[0]
}

/// A 92-byte frame can ask for an 8 TiB product (A[2²⁰, 0] · B[0, 2²⁰]),
/// or one whose size wraps (2³²+1 rows × 2³² columns): each fails that
/// task with a typed message, and the worker computes the next batch.
#[test]
fn zero_byte_inputs_with_a_huge_product_fail_the_task_not_the_worker() {
    let mut w = Worker::start();
    let wraps = (Array::zeros(DType::F64, vec![(1 << 32) + 1, 0]), Array::zeros(DType::F64, vec![0, 1 << 32]));
    let (batch, bulk) = batch_of("dot", 1, &[wraps]);
    let (results, _) = w.run(&batch, &bulk);
    let message = &failure(&results.tasks[0].outcome).message;
    assert!(message.contains("cannot make the product") && message.contains("more bytes than"), "{message}");
    assert!(message.contains("[4294967297, 4294967296]"), "the shape is not named: {message}");

    let overcommit = std::fs::read_to_string("/proc/sys/vm/overcommit_memory").unwrap_or_default();
    if overcommit.trim() == "1" {
        eprintln!("skipping the 8 TiB product: vm.overcommit_memory is 1, it would be granted");
    } else {
        let huge = (Array::zeros(DType::F64, vec![1 << 20, 0]), Array::zeros(DType::F64, vec![0, 1 << 20]));
        let (batch, bulk) = batch_of("dot", 1, std::slice::from_ref(&huge));
        let (results, _) = w.run(&batch, &bulk);
        let message = &failure(&results.tasks[0].outcome).message;
        assert!(message.contains("cannot allocate") && message.contains("8796093022208 bytes"), "{message}");
        let block = MatmulInput { rows: (0, 1 << 20), a: huge.0, b: huge.1, out: None };
        let (batch, bulk) = batch_of("matmul", 1, &[block]);
        let (results, _) = w.run(&batch, &bulk);
        let message = &failure(&results.tasks[0].outcome).message;
        assert!(message.contains("cannot make the output block"), "{message}");
    }

    let small = (Array::from_vec(vec![1, 2], vec![1.0f64, 2.0]), Array::from_vec(vec![2, 1], vec![3.0f64, 4.0]));
    let (batch, bulk) = batch_of("dot", 1, &[small]);
    let (results, arrays) = w.run(&batch, &bulk);
    assert_eq!(scalar(&results.tasks[0].outcome, &arrays), 11.0);
    let exit = w.finish();
    assert_eq!(exit.code, Some(0), "{exit:?}");
}

/// A kind name longer than `MAX_KIND_NAME` is refused when the frame is
/// decoded (the 65,536-byte name × 2,000 tasks took 253 MB).
#[test]
fn an_overlong_kind_name_is_refused_at_decode() {
    let mut w = Worker::start();
    let name = "k".repeat(65_536);
    let (batch, bulk) = batch_of(&name, 1, &[(); 2000]);
    w.send(&batch, &bulk);
    let exit = w.finish();
    assert_eq!(exit.code, Some(3), "{exit:?}");
    assert!(exit.stderr.contains("task kind name of 65536 bytes exceeds the limit of 256 bytes"), "{}", exit.stderr);
}

/// An unknown kind of the longest name, in 2,000 tasks: every task fails,
/// the message in full once and then as a pointer to it, and the worker
/// stays small.
#[test]
fn an_unknown_kind_fails_every_task_with_one_full_message() {
    let mut w = Worker::start();
    let name = "k".repeat(procjob_worker::protocol::MAX_KIND_NAME);
    let (batch, bulk) = batch_of(&name, 1, &[(); 2000]);
    let (results, _) = w.run(&batch, &bulk);
    assert_eq!(results.tasks.len(), 2000);
    assert!(failure(&results.tasks[0].outcome).message.contains("is not known to this worker"));
    for t in &results.tasks[1..] {
        let message = &failure(&t.outcome).message;
        assert!(message.contains("(see task 0)") && message.len() < name.len() + 80, "{message}");
    }
    let peak = w.peak_rss();
    assert!(peak < 16 << 20, "the worker peaked at {peak} bytes");
    let exit = w.finish();
    assert_eq!(exit.code, Some(0), "{exit:?}");
}

/// Tasks whose failures carry 1 MiB messages, 200 of them: the reply is
/// built only up to the frame limit, the rest reported compactly, so the
/// worker holds about one frame's worth instead of 200 MiB of messages
/// (and as much again to encode them).
#[test]
#[cfg_attr(not(feature = "test-tasks"), ignore = "needs the test-tasks feature")]
fn a_reply_is_bounded_while_it_is_built() {
    #[cfg(feature = "test-tasks")]
    {
        use procjob_worker::testkinds::Misbehavior;
        let mut w = Worker::start();
        let inputs: Vec<(u64, Misbehavior)> = (0..200).map(|i| (i, Misbehavior::LongError(1 << 20))).collect();
        let (batch, bulk) = batch_of("test.misbehave", 1, &inputs);
        let (results, _) = w.run(&batch, &bulk);
        let messages: Vec<&procjob_worker::protocol::TaskFailure> =
            results.tasks.iter().map(|t| failure(&t.outcome)).collect();
        let kept = messages.iter().take_while(|f| f.message.len() == 1 << 20).count();
        // A task's error travels twice, as its message and postcard-encoded
        // (`TaskFailure::error`): 2 MiB each, so about 32 fit in 64 MiB.
        assert!((24..32).contains(&kept), "{kept} full messages kept");
        assert!(messages[kept].message.contains("would exceed the frame limit"), "{}", messages[kept].message);
        for f in &messages[kept + 1..] {
            assert_eq!(f.message, format!("dropped: the batch's reply was full (see task {kept})"));
        }
        let peak = w.peak_rss();
        assert!(peak < 200 << 20, "the worker peaked at {} MiB", peak >> 20);
        let exit = w.finish();
        assert_eq!(exit.code, Some(0), "{exit:?}");
    }
}

/// A reference naming a FIFO fails its task at once (opening a FIFO for
/// reading would wait for a writer for ever), read-only or copy-on-write.
#[test]
fn a_fifo_is_refused_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo.npy");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
    let real = saved(&dir.path().join("a.npy"), 1.0, 512);
    let mut w = Worker::start();
    for access in [procjob_worker::protocol::Access::ReadOnly, procjob_worker::protocol::Access::CopyOnWrite] {
        let (mut batch, bulk) = batch_of("dot", 1, &[(real.clone(), column(512))]);
        let ArrayRef::File { path, access: a, .. } = &mut batch.tasks[0].arrays[0] else { panic!("not a file") };
        *path = fifo.clone();
        *a = access;
        let (results, _) = w.run(&batch, &bulk);
        let message = &failure(&results.tasks[0].outcome).message;
        assert!(message.contains("fifo.npy") && message.contains("not a regular file (a fifo)"), "{message}");
    }
    let (batch, bulk) = batch_of("dot", 1, &[(real, column(512))]);
    let (results, arrays) = w.run(&batch, &bulk);
    assert_eq!(scalar(&results.tasks[0].outcome, &arrays), 512.0);
    assert_eq!(w.finish().code, Some(0));
}

/// A read-only map cached by one batch is checked again before the next
/// batch of the same call uses it: a file truncated in between fails that
/// task, naming the file, instead of raising SIGBUS in the worker.
#[test]
fn a_file_truncated_between_two_batches_of_one_call_fails_the_task() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.npy");
    let x = saved(&path, 1.0, 512);
    let mut w = Worker::start();
    let (batch, bulk) = batch_of("dot", 7, &[(x.clone(), column(512))]);
    let (results, arrays) = w.run(&batch, &bulk);
    assert_eq!(scalar(&results.tasks[0].outcome, &arrays), 512.0);
    std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(0).unwrap();
    let (results, _) = w.run(&batch, &bulk);
    let message = &failure(&results.tasks[0].outcome).message;
    assert!(message.contains("x.npy") && message.contains("the file has 0 bytes"), "{message}");
    drop(x);
    let y = saved(&dir.path().join("y.npy"), 2.0, 512);
    let (batch, bulk) = batch_of("dot", 7, &[(y, column(512))]);
    let (results, arrays) = w.run(&batch, &bulk);
    assert_eq!(scalar(&results.tasks[0].outcome, &arrays), 1024.0);
    assert_eq!(w.finish().code, Some(0));
}

/// A task whose mapped input is truncated while it reads it (the test kind
/// truncates its own input, then sums it) fails with a message naming the
/// file; the worker lives, and does not hand the poisoned map to the next
/// batch even when the file has its old size again (same inode and size).
#[test]
#[cfg_attr(not(feature = "test-tasks"), ignore = "needs the test-tasks feature")]
fn a_sigbus_mid_task_fails_that_task_and_names_the_file() {
    #[cfg(feature = "test-tasks")]
    {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("shrinks.npy");
        let len = 64 << 10; // 512 KiB of data: many pages past the first
        let x = saved(&path, 1.0, len);
        let header = x.file_location().unwrap().1;
        let mut w = Worker::start();
        let (batch, bulk) = batch_of("test.truncate_then_read", 3, std::slice::from_ref(&x));
        let (results, _) = w.run(&batch, &bulk);
        let message = &failure(&results.tasks[0].outcome).message;
        assert!(message.contains("shrinks.npy shrank while task 0 read it"), "{message}");
        assert!(message.contains(&format!("{} bytes when mapped, 0 now", header + 8 * len as u64)), "{message}");
        // The file gets its size back, with other contents: the same inode
        // and size, so only the poison tells the cached map is stale.
        {
            use std::os::unix::fs::FileExt;
            let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
            f.set_len(header + 8 * len as u64).unwrap();
            let mut bytes = Vec::new();
            for _ in 0..len {
                bytes.extend_from_slice(&2.0f64.to_le_bytes());
            }
            f.write_all_at(&bytes, header).unwrap();
        }
        let (batch, bulk) = batch_of("test.checksum", 3, &[x]);
        let (results, _) = w.run(&batch, &bulk);
        let Outcome::Ok { output, .. } = &results.tasks[0].outcome else { panic!("{:?}", results.tasks[0].outcome) };
        let sum: procjob_worker::testkinds::ChecksumOutput = array::decode_with(output, Vec::new()).unwrap();
        assert_eq!(sum.sum, 2.0 * len as f64, "the poisoned map was read again");
        assert_eq!(w.finish().code, Some(0));
    }
}

/// A SIGBUS that is not a fault in a registered mapping (here one sent by
/// another process) still ends the worker with the default action.
#[test]
fn a_sigbus_sent_from_outside_still_kills_the_worker() {
    let w = Worker::start();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(w.pid() as i32), nix::sys::signal::Signal::SIGBUS).unwrap();
    let exit = w.finish();
    assert_eq!(exit.signal, Some(libc::SIGBUS), "{exit:?}");
}

/// Protocol 7: a batch that computed for a millisecond or more is answered
/// at once, `memory_follows` set (the answer has no figures of its own
/// since); the snapshot comes
/// next as its own frame, with the figures of a worker that held the
/// batch's arrays; and the worker then answers the next batch first.
#[test]
fn a_busy_batch_is_answered_first_and_its_memory_follows() {
    let mut w = Worker::start();
    // 600³ multiply-adds: over a millisecond on any one core today.
    let n = 600;
    let ones = Array::from_vec(vec![n, n], vec![1.0f64; n * n]);
    let (batch, bulk) = batch_of("dot", 1, &[(ones.clone(), ones)]);
    let (results, arrays) = w.results_alone_of(&batch, &bulk);
    assert!(results.memory_follows, "a busy batch's answer announces no snapshot");
    assert_eq!(arrays[0].as_slice::<f64>().unwrap()[0], n as f64);
    let memory = w.memory();
    // It held A and B (read into its heap) and C: three n × n blocks.
    let held = 3 * (n * n * 8) as u64;
    assert!(memory.peak_rss >= held && memory.uss >= held && memory.pss >= held, "{memory:?} < {held}");
    let row = Array::from_vec(vec![1, 4], vec![1.0f64; 4]);
    let (batch, bulk) = batch_of("dot", 2, &[(row, column(4))]);
    let (results, arrays) = w.run(&batch, &bulk);
    assert_eq!(scalar(&results.tasks[0].outcome, &arrays), 4.0);
}
