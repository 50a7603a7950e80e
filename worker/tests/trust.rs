//! What the worker trusts, through the real `procjob-worker` binary: frames
//! built with the crate's own encoder (`protocol::send`, `encode_with`) go
//! into its stdin, replies are read back with `protocol::recv`.
//!
//! - A handshake without the pool secret the worker was started with is
//!   refused (`Reply::Refused`, exit 3).
//! - A file reference outside the folders the coordinator named — by path,
//!   through a symbolically linked folder, or an output mapped read-write —
//!   fails its task, names the path, and touches nothing; the worker serves
//!   the next batch.
//!
//! (Forged entry offsets need a worker that is the coordinator's own
//! executable: see the root crate's tests/trust.rs.)

use std::io::{BufReader, BufWriter};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, ExitStatus, Stdio};

use procjob_worker::array::{self, InlineEncoder};
use procjob_worker::matmul::MatmulInput;
use procjob_worker::protocol::{
    self, Access, ArrayRef, Batch, FailureCause, FrameKind, Hello, Outcome, Reply, Request, TaskKind, TaskReply,
    TaskRequest, PROTOCOL_VERSION,
};
use procjob_worker::registry::BinaryId;
use procjob_worker::secret::{PoolSecret, SECRET_FD_ENV};
use procjob_worker::{Array, DType};

const WORKER: &str = env!("CARGO_BIN_EXE_procjob-worker");

/// A running `procjob-worker` and the two ends of its stream.
struct Worker {
    child: Child,
    input: BufWriter<ChildStdin>,
    output: BufReader<ChildStdout>,
}

impl Worker {
    /// Starts the worker; with `secret`, handed over as a pool does: the
    /// read end of a pipe named in `PROCJOB_SECRET_FD`.
    fn start(secret: Option<&PoolSecret>) -> Worker {
        let mut cmd = Command::new(WORKER);
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let pipe: Option<OwnedFd> = secret.map(|s| s.hand_to(&mut cmd).unwrap());
        let mut child = cmd.spawn().unwrap();
        drop(pipe);
        let input = BufWriter::new(child.stdin.take().unwrap());
        let output = BufReader::new(child.stdout.take().unwrap());
        Worker { child, input, output }
    }

    fn send(&mut self, request: &Request, bulk: &[&[u8]]) {
        protocol::send(&mut self.input, FrameKind::Request, request, bulk).unwrap();
    }

    fn recv(&mut self) -> (Reply, Vec<Array>) {
        let frame = protocol::recv::<_, Reply>(&mut self.output, FrameKind::Reply).unwrap();
        // These workers are never told they may lend: no lender.
        let arrays =
            array::read_arrays(&mut self.output, frame.message.array_refs(), frame.bulk_len, None, &mut |_, _| {
                array::Placement::Own
            })
            .unwrap();
        (frame.message, arrays.into_iter().map(Result::unwrap).collect())
    }

    /// Sends the handshake with `secret` and the allowed `folders`; returns
    /// the answer.
    fn hello(&mut self, secret: PoolSecret, folders: Vec<PathBuf>) -> Reply {
        self.send(
            &Request::Hello(Hello {
                protocol: PROTOCOL_VERSION,
                worker_index: 0,
                binary: BinaryId::default(),
                idle_timeout_ms: 0,
                reuse_lent_pages: false,
                secret,
                folders,
            }),
            &[],
        );
        self.recv().0
    }

    /// Runs one batch of `kind` and returns its task replies and the arrays
    /// of their outputs.
    fn run(&mut self, kind: &str, tasks: Vec<TaskRequest>) -> (Vec<TaskReply>, Vec<Array>) {
        let kind = TaskKind { name: kind.into(), entry: None };
        self.send(&Request::Run(Batch { call: 1, kind, tasks, timestamps: false, shared: None }), &[]);
        match self.recv() {
            (Reply::Results(results), arrays) => {
                if results.memory_follows {
                    assert!(matches!(self.recv().0, Reply::Memory(_)), "no memory snapshot after the results");
                }
                (results.tasks, arrays)
            }
            (other, _) => panic!("expected results, got {other:?}"),
        }
    }

    /// Closes its input and waits for it; returns its status and stderr.
    fn finish(mut self) -> (ExitStatus, String) {
        drop(self.input);
        let mut stderr = String::new();
        std::io::Read::read_to_string(self.child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
        (self.child.wait().unwrap(), stderr)
    }
}

/// A `dot` task whose inputs are the given references: encoded by the
/// crate's encoder from two placeholder arrays, whose references are then
/// replaced (a path the coordinator would never make, as a forged frame
/// would carry).
fn dot_task(index: u64, a: ArrayRef, b: ArrayRef) -> TaskRequest {
    let placeholder = Array::from_vec(vec![1, 1], vec![0.0f64]);
    let mut encoder = InlineEncoder::default();
    let (input, refs) = array::encode_with(&(placeholder.clone(), placeholder), &mut encoder).unwrap();
    assert_eq!(refs.len(), 2);
    TaskRequest { index, input, arrays: vec![a, b] }
}

/// A reference to the whole `.npy` file at `path` (whatever the path goes
/// through), as a 2×2 f64 array.
fn file_ref(path: &Path, access: Access) -> ArrayRef {
    let data_offset = array::file_ref(&Array::open_npy(path, Access::ReadOnly).unwrap()).map(|r| match r {
        ArrayRef::File { offset, .. } => offset,
        _ => unreachable!("a mapped array travels as a file reference"),
    });
    ArrayRef::File { dtype: DType::F64, shape: vec![2, 2], path: path.into(), offset: data_offset.unwrap(), access }
}

/// `root/allowed/{a.npy, link -> ../outside}`, `root/outside/b.npy`
/// (canonical paths).
struct Tree {
    _root: tempfile::TempDir,
    allowed: PathBuf,
    outside: PathBuf,
}

fn tree() -> Tree {
    let root = tempfile::tempdir().unwrap();
    let base = std::fs::canonicalize(root.path()).unwrap();
    let (allowed, outside) = (base.join("allowed"), base.join("outside"));
    std::fs::create_dir(&allowed).unwrap();
    std::fs::create_dir(&outside).unwrap();
    Array::from_vec(vec![2, 2], vec![1.0f64, 2.0, 3.0, 4.0]).save_npy(&allowed.join("a.npy")).unwrap();
    Array::from_vec(vec![2, 2], vec![5.0f64, 6.0, 7.0, 8.0]).save_npy(&outside.join("b.npy")).unwrap();
    std::os::unix::fs::symlink("../outside", allowed.join("link")).unwrap();
    Tree { _root: root, allowed, outside }
}

#[track_caller]
fn assert_refused(reply: &TaskReply, path: &Path) {
    let Outcome::Failed(f) = &reply.outcome else { panic!("task {} ran: {reply:?}", reply.index) };
    assert_eq!(f.cause, FailureCause::Setup, "{f:?}");
    assert!(f.message.contains("outside the folders the coordinator named"), "{}", f.message);
    assert!(f.message.contains(&path.display().to_string()), "the path is not named: {}", f.message);
}

#[test]
fn a_handshake_without_the_pool_secret_is_refused_and_the_worker_exits() {
    let secret = PoolSecret::generate().unwrap();

    // Started with a secret; the handshake carries another.
    let mut w = Worker::start(Some(&secret));
    let reply = w.hello(PoolSecret::generate().unwrap(), Vec::new());
    let Reply::Refused { reason } = reply else { panic!("a wrong secret was accepted: {reply:?}") };
    assert!(reason.contains("does not carry the secret of the pool that started this worker"), "{reason}");
    let (status, stderr) = w.finish();
    assert_eq!(status.code(), Some(3), "{stderr}");

    // Started without one: every handshake is refused, and says how to
    // hand one over.
    let mut w = Worker::start(None);
    let reply = w.hello(secret.clone(), Vec::new());
    let Reply::Refused { reason } = reply else { panic!("a worker without a secret accepted: {reply:?}") };
    assert!(reason.contains("no pool secret") && reason.contains(SECRET_FD_ENV), "{reason}");
    let (status, stderr) = w.finish();
    assert_eq!(status.code(), Some(3), "{stderr}");

    // The right one: served.
    let mut w = Worker::start(Some(&secret));
    assert!(matches!(w.hello(secret, Vec::new()), Reply::Ready(_)));
    let (status, stderr) = w.finish();
    assert_eq!(status.code(), Some(0), "{stderr}");
}

#[test]
fn a_path_outside_the_named_folders_is_refused_also_through_a_symlinked_folder() {
    let t = tree();
    let secret = PoolSecret::generate().unwrap();
    let mut w = Worker::start(Some(&secret));
    assert!(matches!(w.hello(secret, vec![t.allowed.clone()]), Reply::Ready(_)));
    let inside = file_ref(&t.allowed.join("a.npy"), Access::ReadOnly);
    let outside_path = t.outside.join("b.npy");
    let through_link = t.allowed.join("link/b.npy");
    let (replies, arrays) = w.run(
        "dot",
        vec![
            dot_task(0, inside.clone(), inside.clone()),
            dot_task(1, inside.clone(), file_ref(&outside_path, Access::ReadOnly)),
            dot_task(2, file_ref(&through_link, Access::ReadOnly), inside.clone()),
            dot_task(3, file_ref(&through_link, Access::CopyOnWrite), inside.clone()),
        ],
    );
    assert!(matches!(replies[0].outcome, Outcome::Ok { .. }), "{:?}", replies[0]);
    assert_eq!(arrays[0].as_slice::<f64>().unwrap(), &[7.0, 10.0, 15.0, 22.0]);
    assert_refused(&replies[1], &outside_path);
    assert_refused(&replies[2], &through_link);
    assert_refused(&replies[3], &through_link);

    // The same stream names the other folder later: now it maps.
    w.send(&Request::Allow { folders: vec![t.outside.clone()] }, &[]);
    let (replies, arrays) = w.run("dot", vec![dot_task(4, inside, file_ref(&outside_path, Access::ReadOnly))]);
    assert!(matches!(replies[0].outcome, Outcome::Ok { .. }), "{:?}", replies[0]);
    assert_eq!(arrays[0].as_slice::<f64>().unwrap(), &[19.0, 22.0, 43.0, 50.0]);
    let (status, stderr) = w.finish();
    assert_eq!(status.code(), Some(0), "{stderr}");
}

#[test]
fn an_output_mapped_read_write_outside_the_named_folders_is_not_written() {
    let t = tree();
    let before = std::fs::read(t.outside.join("b.npy")).unwrap();
    let secret = PoolSecret::generate().unwrap();
    let mut w = Worker::start(Some(&secret));
    assert!(matches!(w.hello(secret, vec![t.allowed.clone()]), Reply::Ready(_)));
    let a = Array::open_npy(&t.allowed.join("a.npy"), Access::ReadOnly).unwrap();
    let task = |index: u64, out: &Path| {
        // The output: a read-write view of the 2×2 array in `out`.
        let input = MatmulInput { rows: (0, 2), a: a.clone(), b: a.clone(), out: Some(a.clone()), b_panels: None };
        let mut encoder = InlineEncoder::default();
        let (input, mut refs) = array::encode_with(&input, &mut encoder).unwrap();
        refs[2] = file_ref(out, Access::ReadWrite);
        TaskRequest { index, input, arrays: refs }
    };
    let outside_path = t.outside.join("b.npy");
    let through_link = t.allowed.join("link/b.npy");
    let (replies, _) = w.run("matmul", vec![task(0, &outside_path), task(1, &through_link)]);
    assert_refused(&replies[0], &outside_path);
    assert_refused(&replies[1], &through_link);
    assert_eq!(std::fs::read(&outside_path).unwrap(), before, "the file outside was written");
    // The worker serves on: an output inside the folder is written.
    let inside = t.allowed.join("c.npy");
    Array::from_vec(vec![2, 2], vec![0.0f64; 4]).save_npy(&inside).unwrap();
    let (replies, _) = w.run("matmul", vec![task(2, &inside)]);
    assert!(matches!(replies[0].outcome, Outcome::Ok { .. }), "{:?}", replies[0]);
    let c = Array::open_npy(&inside, Access::ReadOnly).unwrap();
    assert_eq!(c.as_slice::<f64>().unwrap(), &[7.0, 10.0, 15.0, 22.0]);
    let (status, stderr) = w.finish();
    assert_eq!(status.code(), Some(0), "{stderr}");
}
