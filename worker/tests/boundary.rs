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
use procjob_worker::protocol::{ArrayRef, Outcome, Request};
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
        let block = MatmulInput { rows: (0, 1 << 20), a: huge.0, b: huge.1, out: None, b_panels: None };
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

/// Whether this system forbids a parent to read its child's memory, said
/// on stderr: the lending tests then skip.
fn lending_forbidden() -> bool {
    let forbidden = procjob_worker::array::lending_forbidden_here();
    if forbidden {
        eprintln!("skipping: this system forbids reading a child's memory (Yama ptrace_scope 2 or 3)");
    }
    forbidden
}

/// A `dot` batch of one outer product, `[n, 1] · [1, n]` with every element
/// `value`: an n × n f64 result (8 MiB at 1024, pages of its own) from
/// 16 KiB of inputs.
fn outer_product(n: usize, value: f64) -> (procjob_worker::protocol::Batch, Vec<Array>) {
    let a = Array::from_vec(vec![n, 1], vec![value; n]);
    let b = Array::from_vec(vec![1, n], vec![1.0f64; n]);
    batch_of("dot", 1, &[(a, b)])
}

/// Told it may lend (`Request::Lending`), a worker names a large result by
/// its address instead of sending its bytes, and this process — its parent,
/// as the coordinator is — copies them out of its memory. Until told the
/// reply was read, the worker neither writes nor frees those pages: the
/// next result goes elsewhere and the first is still there, whole. Once
/// told, the pages serve its next result.
#[test]
fn a_large_result_is_lent_by_address_and_kept_until_it_was_read() {
    if lending_forbidden() {
        return;
    }
    let mut w = Worker::start();
    let lender = array::Lender::new(w.pid());
    let n = 1024;
    let outer = |value: f64| outer_product(n, value);
    let lent_address = |results: &procjob_worker::protocol::Results| match &results.tasks[0].outcome {
        Outcome::Ok { arrays, .. } => match arrays[..] {
            [ArrayRef::Lent { address, .. }] => Some(address),
            _ => None,
        },
        Outcome::Failed(f) => panic!("the product failed: {}", f.message),
    };
    let all = |arrays: &[Array], value: f64| arrays[0].as_slice::<f64>().unwrap().iter().all(|&x| x == value);
    // Not told: the bytes come in the frame.
    let (batch, bulk) = outer(1.0);
    let (results, arrays) = w.run(&batch, &bulk);
    assert_eq!(lent_address(&results), None, "lent before it was allowed to");
    assert!(all(&arrays, 1.0));
    w.send_message(&Request::Lending { read: 0 }, &[]);
    let (batch, bulk) = outer(2.0);
    let (results, arrays) = w.run(&batch, &bulk);
    let first = lent_address(&results).expect("a large result was not lent");
    assert!(all(&arrays, 2.0), "the lent bytes read back differ");
    // The reply was read but the worker was not told: its next result must
    // not be written over the first.
    let (batch, bulk) = outer(3.0);
    let (results, arrays) = w.run(&batch, &bulk);
    let second = lent_address(&results).expect("the second result was not lent");
    assert_ne!(first, second, "the next result was written into pages still lent");
    assert!(all(&arrays, 3.0));
    let mut still = vec![0u8; n * n * 8];
    lender.read(first, &mut still).unwrap();
    assert!(still.chunks(8).all(|x| f64::from_le_bytes(x.try_into().unwrap()) == 2.0), "a lent result changed");
    // Told both were read: their pages serve the next result.
    w.send_message(&Request::Lending { read: 2 }, &[]);
    let (batch, bulk) = outer(4.0);
    let (results, arrays) = w.run(&batch, &bulk);
    let third = lent_address(&results).expect("the third result was not lent");
    assert!(third == first || third == second, "the pages given back were not reused");
    assert!(all(&arrays, 4.0));
    assert_eq!(w.finish().code, Some(0));
}

/// A `Lent` reference in a request — an address in someone else's memory —
/// fails the task that uses it; the worker reads nothing there and serves on.
#[test]
fn a_lent_array_in_a_request_fails_its_task() {
    let mut w = Worker::start();
    let row = Array::from_vec(vec![1, 4], vec![1.0f64; 4]);
    let (mut batch, bulk) = batch_of("dot", 1, &[(row.clone(), column(4))]);
    batch.tasks[0].arrays[0] = ArrayRef::Lent { dtype: DType::F64, shape: vec![1, 4], address: 4096 };
    let bulk = bulk[1..].to_vec();
    let (results, _) = w.run(&batch, &bulk);
    let f = failure(&results.tasks[0].outcome);
    assert!(f.message.contains("lent by address"), "{}", f.message);
    let (batch, bulk) = batch_of("dot", 2, &[(row, column(4))]);
    let (results, arrays) = w.run(&batch, &bulk);
    assert_eq!(scalar(&results.tasks[0].outcome, &arrays), 4.0);
}

/// A worker never idles out while results it lent are unread: the
/// coordinator may read them later than its idle timeout. Here its reply
/// is read ten idle timeouts late and the lent bytes are still there; once
/// told they were read, the worker idles out as usual.
#[test]
fn a_worker_holding_lent_results_does_not_idle_out() {
    if lending_forbidden() {
        return;
    }
    let mut w = Worker::start_idle(30);
    w.send_message(&Request::Lending { read: 0 }, &[]);
    let (batch, bulk) = outer_product(1024, 5.0);
    w.send(&batch, &bulk);
    let frame = w.frame();
    // Not a wait for an event: the idle time the worker must outlast.
    std::thread::sleep(std::time::Duration::from_millis(300));
    let (results, arrays) = w.arrays_of(frame);
    assert!(arrays[0].as_slice::<f64>().unwrap().iter().all(|&x| x == 5.0), "the lent block changed");
    if results.memory_follows {
        w.memory();
    }
    w.send_message(&Request::Lending { read: 1 }, &[]);
    let limit = std::time::Duration::from_secs(10);
    assert!(w.output_ends_within(limit), "the worker did not idle out within {limit:?} once its results were read");
}

/// A worker gone before its lent results were read — killed, here, after
/// its reply's head arrived — leaves nothing to copy: reading them reports
/// the stream as ended (`Closed`, as a worker that died mid-reply), which
/// the coordinator treats as a death it may retry, not as a bad frame.
#[test]
fn lent_results_of_a_worker_gone_read_as_a_closed_stream() {
    if lending_forbidden() {
        return;
    }
    let mut w = Worker::start();
    w.send_message(&Request::Lending { read: 0 }, &[]);
    let (batch, bulk) = outer_product(1024, 1.0);
    w.send(&batch, &bulk);
    let frame = w.frame();
    let pid = nix::unistd::Pid::from_raw(w.pid() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).unwrap();
    // Wait for the death without reaping it (WNOWAIT): the pid stays the
    // worker's, a zombie with no memory left.
    let flags = nix::sys::wait::WaitPidFlag::WEXITED | nix::sys::wait::WaitPidFlag::WNOWAIT;
    nix::sys::wait::waitid(nix::sys::wait::Id::Pid(pid), flags).unwrap();
    let (_, arrays) = w.try_arrays_of(frame);
    assert!(matches!(arrays, Err(procjob_worker::protocol::DecodeError::Closed)), "{arrays:?}");
}
