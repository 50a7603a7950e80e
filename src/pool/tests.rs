//! The pool over a fake transport: no process is started, so each case is
//! exact and fast — a worker lost mid-batch, the late answer of a worker
//! that was replaced, a batch that never comes back, a shutdown while a
//! worker is busy, the folder allowance and the traffic counts.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::Signal;
use procjob_worker::protocol::{Batch, Payload, Request, TaskKind, TaskRequest};

use super::fake::{answer, Act, Fake, Script};
use super::*;

/// A started pool of `n` fake workers, and the script that steers them.
fn pool(n: usize) -> (WorkerPool, Arc<Mutex<Script>>) {
    let script = Arc::new(Mutex::new(Script::default()));
    let shared = Arc::clone(&script);
    let mut pool = WorkerPool::with_transport(n, None, move |events, _readers| Box::new(Fake::new(n, events, shared)));
    pool.ensure_started().expect("fake workers start");
    (pool, script)
}

/// A batch of the given task indices, each with its index as input.
fn batch(tasks: &[u64]) -> Request {
    Request::Run(Batch {
        call: 1,
        kind: TaskKind { name: "test".into(), entry: None },
        tasks: tasks
            .iter()
            .map(|&i| TaskRequest { index: i, input: Payload::from(i.to_le_bytes().to_vec()), arrays: Vec::new() })
            .collect(),
        timestamps: false,
        shared: None,
    })
}

/// The tasks' indices of a results event.
fn answered(event: &PoolEvent) -> Vec<u64> {
    match &event.event {
        WorkerEvent::Results { results, .. } => results.tasks.iter().map(|t| t.index).collect(),
        other => panic!("expected results, got {other:?}"),
    }
}

#[test]
fn workers_start_and_answer_with_handshakes_and_batches_counted() {
    let (mut pool, script) = pool(2);
    let pids = pool.pids();
    assert!(pids.iter().all(|&p| p > 0) && pids[0] != pids[1], "{pids:?}");
    assert_eq!(pool.take_starts().len(), 2);
    pool.send(1, &batch(&[7, 8]), &[]).unwrap();
    let event = pool.next_event(Some(Duration::ZERO)).expect("an answer");
    assert_eq!((event.index, answered(&event)), (1, vec![7, 8]));
    let t = pool.traffic();
    assert_eq!((t.frames_to_workers, t.frames_from_workers), (3, 1), "two handshakes and a batch; one answer");
    assert_eq!((t.bytes_to_workers, t.bytes_from_workers), (2 * 50 + 10, 100));
    assert_eq!(script.lock().unwrap().sent, vec![(1, 1, "run")]);
}

#[test]
fn a_lost_worker_is_reaped_with_its_exit_and_its_slot_restarts() {
    let (mut pool, script) = pool(2);
    let first = pool.pid(0).unwrap();
    script.lock().unwrap().next.insert(0, Act::Die(Signal::SIGKILL));
    pool.send(0, &batch(&[0]), &[]).unwrap();
    let event = pool.next_event(Some(Duration::ZERO)).expect("the loss");
    assert!(matches!(event.event, WorkerEvent::Lost { error: None }) && event.index == 0, "{event:?}");
    assert_eq!(pool.reap(0), WorkerExit::Signaled { signal: Signal::SIGKILL });
    // Its slot is empty; messages still name it by its last pid.
    assert_eq!(pool.pid(0), None);
    assert_eq!(pool.worker_id(0).pid, first);
    assert!(pool.input_closed(0));
    pool.ensure_started().unwrap();
    let second = pool.pid(0).unwrap();
    assert_ne!(second, first);
    assert_eq!(pool.reports()[0].pid, second);
}

#[test]
fn an_empty_slot_is_left_out_of_the_pids_never_given_as_zero() {
    let (mut pool, _script) = pool(2);
    let second = pool.pid(1).unwrap();
    pool.kill(0);
    assert_eq!(pool.pids(), vec![second]);
    assert_eq!(pool.reports().len(), 2, "reports keep one entry per slot");
}

#[test]
fn a_replacement_whose_handshake_comes_after_its_call_is_ready_before_the_next() {
    let (mut pool, _script) = pool(2);
    pool.reap(0);
    // Started late in a call (after a panic): its handshake is still in the
    // channel when the call ends.
    pool.start(0).unwrap();
    assert!(pool.slots[0].worker.as_ref().is_some_and(|w| !w.ready));
    pool.ensure_started().unwrap();
    assert!(pool.slots[0].worker.as_ref().is_some_and(|w| w.ready), "the handshake was taken, not dropped");
    assert!(pool.next_event(Some(Duration::ZERO)).is_none(), "no handshake is left for the next call to see");
    assert_eq!(pool.pids().len(), 2);
}

#[test]
fn the_late_answer_of_a_replaced_worker_is_dropped() {
    let (mut pool, script) = pool(1);
    script.lock().unwrap().next.insert(0, Act::Hang);
    pool.send(0, &batch(&[3]), &[]).unwrap();
    assert!(pool.next_event(Some(Duration::ZERO)).is_none(), "a hanging worker says nothing");
    let (old_generation, held) = script.lock().unwrap().held.get(&0).cloned().expect("the batch is held");
    // The caller gives up on it (its timeout), kills it, and retries the
    // task on a fresh worker.
    assert_eq!(pool.kill(0), WorkerExit::Signaled { signal: Signal::SIGKILL });
    pool.ensure_started().unwrap();
    // The old worker's answer to the task arrives after all, then the
    // retry's: the first is from a worker no longer in the slot, and is
    // skipped, not counted.
    let late = answer(0, old_generation, held.iter().map(|&i| (i, Payload::default())).collect());
    assert!(!pool.is_current(&late));
    script.lock().unwrap().events.as_ref().unwrap().send(late).unwrap();
    pool.send(0, &batch(&[3]), &[]).unwrap();
    let fresh = pool.next_event(Some(Duration::ZERO)).expect("the retry's answer");
    assert_eq!((fresh.generation, answered(&fresh)), (old_generation + 1, vec![3]));
    assert!(pool.next_event(Some(Duration::ZERO)).is_none());
    assert_eq!(pool.traffic().frames_from_workers, 1, "only the current worker's answer is counted");
}

#[test]
fn a_batch_that_never_comes_back_times_out_and_its_worker_is_killed() {
    let (mut pool, script) = pool(2);
    script.lock().unwrap().next.insert(1, Act::Hang);
    pool.send(1, &batch(&[5]), &[]).unwrap();
    assert!(pool.next_event(Some(Duration::from_millis(1))).is_none(), "no event before the deadline");
    assert!(!pool.reply_arriving(1), "nothing is arriving from a hung worker");
    let pid = pool.pid(1).unwrap();
    assert_eq!(pool.kill(1), WorkerExit::Signaled { signal: Signal::SIGKILL });
    assert_eq!(script.lock().unwrap().killed, vec![pid]);
    // The other worker is untouched.
    pool.send(0, &batch(&[6]), &[]).unwrap();
    assert_eq!(answered(&pool.next_event(Some(Duration::ZERO)).unwrap()), vec![6]);
}

#[test]
fn shutdown_while_busy_stops_idle_workers_and_kills_the_busy_one() {
    let (mut pool, script) = pool(3);
    let pids = pool.pids();
    script.lock().unwrap().next.insert(2, Act::Hang);
    pool.send(2, &batch(&[1]), &[]).unwrap();
    pool.shutdown(Duration::from_millis(10));
    let script = script.lock().unwrap();
    let mut stopped = script.stopped.clone();
    stopped.sort_by_key(|(pid, _)| *pid);
    let idle = WorkerExit::Exited { code: 0 };
    let killed = WorkerExit::Signaled { signal: Signal::SIGKILL };
    assert_eq!(stopped, vec![(pids[0], idle), (pids[1], idle), (pids[2], killed)]);
    assert_eq!(script.killed, vec![pids[2]]);
    assert!((0..3).all(|i| pool.pid(i).is_none()), "every slot is empty");
}

#[test]
fn a_new_folder_is_allowed_once_before_the_next_batch() {
    let (mut pool, script) = pool(1);
    pool.allow_folder(PathBuf::from("/data/a"));
    pool.allow_folder(PathBuf::from("/data/a"));
    pool.send(0, &batch(&[0]), &[]).unwrap();
    pool.send(0, &batch(&[1]), &[]).unwrap();
    let kinds: Vec<&str> = script.lock().unwrap().sent.iter().map(|s| s.2).collect();
    assert_eq!(kinds, vec!["allow", "run", "run"]);
}
