//! A worker that is the coordinator's own executable runs only task entries:
//! a batch naming any other code offset is refused, nothing is called, and
//! the worker serves the next batch. The workers are re-executions of this
//! test binary, driven through the real pool; the batches are built with
//! the crate's own types and encoder. And the folders a worker may map from
//! are named canonically, so arrays in a symlinked folder still travel.

use std::time::Duration;

use procjob::__private::{PoolConfig, WorkerEvent, WorkerPool};
use procjob::StartMethod;
use procjob::{Access, Array, Parallel, Task};
use procjob_worker::array::{self, InlineEncoder};
use procjob_worker::protocol::{Batch, FailureCause, Outcome, Request, TaskKind, TaskReply, TaskRequest};
use procjob_worker::registry::entry_offset;
use procjob_worker::task::ErasedEntry;

procjob::test_support!();

struct Square;
impl Task for Square {
    type Input = u64;
    type Output = u64;
    type Error = String;
    fn run(x: u64) -> Result<u64, String> {
        Ok(x * x)
    }
}

struct Cube;
impl Task for Cube {
    type Input = u64;
    type Output = u64;
    type Error = String;
    fn run(x: u64) -> Result<u64, String> {
        Ok(x * x * x)
    }
}

/// Sends one batch of one task (input `x`) naming `kind` and `entry` to
/// worker 0, and returns its reply.
fn run_one(pool: &mut WorkerPool, call: u64, kind: &str, entry: i64, x: u64) -> TaskReply {
    let (input, arrays) = array::encode_with(&x, &mut InlineEncoder::default()).unwrap();
    let kind = TaskKind { name: kind.into(), entry: Some(entry) };
    let batch =
        Batch { call, kind, tasks: vec![TaskRequest { index: 0, input, arrays }], timestamps: false, shared: None };
    pool.send(0, &Request::Run(batch), &[]).unwrap();
    let event = pool.next_event(Some(Duration::from_secs(30))).expect("no answer within 30 s");
    match event.event {
        WorkerEvent::Results { mut results, .. } => results.tasks.remove(0),
        other => panic!("the worker did not answer the batch: {other:?}"),
    }
}

#[test]
fn a_forged_entry_offset_is_refused_and_the_worker_serves_on() {
    let mut pool =
        WorkerPool::new(PoolConfig { workers: 1, idle_timeout: None, program: None, start: StartMethod::Spawn });
    pool.ensure_started().unwrap();
    let pid = pool.pid(0).unwrap();
    let square = entry_offset::<Square>().expect("the image is known on this platform");
    let cube = entry_offset::<Cube>().unwrap();
    // Addresses the coordinator knows in its own image, which is the
    // worker's: the entry function itself (what version 4 sent) and libc's
    // abort, as offsets from the image's load address.
    let base = procjob_worker::image::Image::current().base;
    let code = (procjob_worker::task::entry::<Square> as ErasedEntry as usize).wrapping_sub(base) as i64;
    let abort = (libc::abort as unsafe extern "C" fn() -> ! as usize).wrapping_sub(base) as i64;
    let forged = [
        ("0x41414141", 0x4141_4141),
        ("1", 1),
        ("i64::MIN", i64::MIN),
        ("the entry function's code", code),
        ("libc's abort", abort),
        ("a misaligned descriptor", square + 1),
        ("another kind's descriptor", cube),
    ];
    for (call, (what, offset)) in forged.into_iter().enumerate() {
        let reply = run_one(&mut pool, call as u64 + 1, Square::name(), offset, 3);
        let Outcome::Failed(f) = &reply.outcome else { panic!("{what}: the forged entry ran: {reply:?}") };
        assert_eq!(f.cause, FailureCause::Setup, "{what}: {f:?}");
        assert!(f.message.contains("not a task entry of this executable"), "{what}: {}", f.message);
        assert!(f.message.contains(Square::name()), "{what}: the kind is not named: {}", f.message);
        assert_eq!(pool.pid(0), Some(pid), "{what}: the worker was replaced");
    }
    // Alive, and the genuine entry runs.
    let reply = run_one(&mut pool, 100, Square::name(), square, 3);
    let Outcome::Ok { output, .. } = &reply.outcome else { panic!("the genuine entry failed: {reply:?}") };
    assert_eq!(array::decode_with::<u64>(output, Vec::new()).unwrap(), 9);
    let reply = run_one(&mut pool, 101, Cube::name(), cube, 3);
    let Outcome::Ok { output, .. } = &reply.outcome else { panic!("the genuine entry failed: {reply:?}") };
    assert_eq!(array::decode_with::<u64>(output, Vec::new()).unwrap(), 27);
    assert_eq!(pool.pid(0), Some(pid));
    pool.shutdown(Duration::from_secs(5));
}

/// Sums a mapped f64 array; says where it was mapped from.
struct SumMapped;
impl Task for SumMapped {
    type Input = (Array, Array);
    type Output = (f64, Option<String>, Option<String>);
    type Error = String;
    fn run((a, dumped): (Array, Array)) -> Result<Self::Output, String> {
        let sum = a.as_slice::<f64>().map_err(|e| e.to_string())?.iter().sum::<f64>()
            + dumped.as_slice::<f64>().map_err(|e| e.to_string())?.iter().sum::<f64>();
        let from = |x: &Array| x.file_location().map(|(p, _, _)| p.display().to_string());
        Ok((sum, from(&a), from(&dumped)))
    }
}

/// The user's array opened through a symlinked folder, and a temp folder
/// reached through one: the coordinator names their canonical folders and
/// sends canonical paths, which workers map; no symlink is followed.
#[test]
fn arrays_in_symlinked_folders_travel_by_their_canonical_folders() {
    let dir = tempfile::tempdir().unwrap();
    let real = std::fs::canonicalize(dir.path()).unwrap().join("real");
    std::fs::create_dir_all(real.join("tmp")).unwrap();
    let link = dir.path().join("link");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    Array::from_vec(vec![4], vec![1.0f64, 2.0, 3.0, 4.0]).save_npy(&real.join("a.npy")).unwrap();
    let a = Array::open_npy(&link.join("a.npy"), Access::ReadOnly).unwrap();
    let big = Array::from_vec(vec![1000], vec![0.5f64; 1000]);
    let mut p = Parallel::new().n_jobs(2).max_nbytes(Some(100)).temp_folder(link.join("tmp"));
    let out = p.run::<SumMapped, _>((0..4).map(|_| (a.clone(), big.clone()))).unwrap();
    for (sum, from_a, from_dump) in out {
        assert_eq!(sum, 510.0);
        assert_eq!(from_a.as_deref(), Some(real.join("a.npy").to_str().unwrap()));
        let dump = from_dump.expect("the large array was dumped and mapped");
        assert!(dump.starts_with(real.join("tmp").to_str().unwrap()), "{dump}");
    }
}
