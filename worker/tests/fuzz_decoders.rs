//! Property tests of the two parsers that read untrusted bytes: the frame
//! decoder and the `.npy` header parser. Whatever the bytes, each returns a
//! typed error or a value; it never panics, never allocates what a bad
//! frame advertises, and never waits for bytes that will not come.
//!
//! Then the whole conversation, against the real `procjob-worker`: a
//! handshake and a few batches whose kinds, shapes (zero, huge, wrapping),
//! file references (missing, a FIFO, a directory, a real file at any
//! offset), inherited references, inputs and bulk lengths are arbitrary,
//! some frames with a byte changed. Whatever it is sent, the worker answers
//! or exits with a message, never dies by a signal, and stays within an
//! address-space limit (`RLIMIT_AS`, under which an allocation that was
//! not fallible would abort, i.e. die by SIGABRT).
//!
//! Inputs that once broke an invariant are kept below as regression tests.

use proptest::prelude::*;

use procjob_worker::protocol::{self, ArrayRef, DecodeError, FrameKind, Request};
use procjob_worker::{npy, DType};

fn valid_frame() -> Vec<u8> {
    let request = Request::Run(protocol::Batch {
        call: 3,
        kind: protocol::TaskKind { name: "matmul".into(), entry: Some(-1234) },
        tasks: vec![protocol::TaskRequest {
            index: 9,
            input: vec![1, 2, 3].into(),
            arrays: vec![ArrayRef::Inline { dtype: DType::F32, shape: vec![2, 2] }],
        }],
        timestamps: true,
        shared: Some(protocol::SharedValue {
            value: vec![4, 5].into(),
            arrays: vec![ArrayRef::Inline { dtype: DType::F64, shape: vec![1] }],
        }),
    });
    let bulk = [0u8; 24];
    let mut buf = Vec::new();
    protocol::send(&mut buf, FrameKind::Request, &request, &[&bulk]).unwrap();
    buf
}

/// Decodes a whole frame, bulk included, as a worker does.
fn decode(bytes: &[u8]) -> Result<usize, DecodeError> {
    let mut r = bytes;
    let frame = protocol::recv::<_, Request>(&mut r, FrameKind::Request)?;
    let arrays = procjob_worker::array::read_arrays(
        &mut r,
        frame.message.array_refs(),
        frame.bulk_len,
        None,
        &mut |_, a| match a {
            ArrayRef::File { .. } | ArrayRef::Inherited { .. } => procjob_worker::array::Placement::Mapped(Err(
                procjob_worker::array::ArrayError::Shape("no files or inherited arrays in this test".into()),
            )),
            ArrayRef::Inline { .. } | ArrayRef::Lent { .. } => procjob_worker::array::Placement::Own,
        },
    )?;
    Ok(arrays.len())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic_the_frame_decoder(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        let _ = decode(&bytes);
    }

    #[test]
    fn arbitrary_bytes_after_a_valid_prelude_never_panic(
        payload_len in 0u32..=u32::MAX,
        bulk_len in any::<u64>(),
        tail in proptest::collection::vec(any::<u8>(), 0..128),
    ) {
        let mut bytes = protocol::encode_prelude(FrameKind::Request, 0, 0).to_vec();
        bytes[8..12].copy_from_slice(&payload_len.to_le_bytes());
        bytes[12..20].copy_from_slice(&bulk_len.to_le_bytes());
        bytes.extend_from_slice(&tail);
        // An advertised length past the limit is refused from the prelude
        // alone; within it, the short stream ends as Truncated, not a hang.
        match decode(&bytes) {
            Err(DecodeError::PayloadTooLarge { .. }) => prop_assert!(payload_len as usize > protocol::MAX_PAYLOAD),
            Err(DecodeError::BulkTooLarge { .. }) => prop_assert!(bulk_len > protocol::MAX_BULK),
            _ => {}
        }
    }

    #[test]
    fn single_byte_mutations_of_a_valid_frame_are_values_or_typed_errors(pos in 0usize..200, value in any::<u8>()) {
        let mut bytes = valid_frame();
        let pos = pos % bytes.len();
        bytes[pos] = value;
        let _ = decode(&bytes);
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_npy_header_parser(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        let _ = npy::parse_header(&bytes);
    }

    #[test]
    fn mutated_npy_headers_are_headers_or_typed_errors(pos in 0usize..128, value in any::<u8>(), rows in 0usize..1000) {
        let mut bytes = npy::encode_header(DType::F64, &[rows, 3]);
        let pos = pos % bytes.len();
        bytes[pos] = value;
        if let Ok(h) = npy::parse_header(&bytes) {
            // Whatever it accepted is internally consistent.
            prop_assert!(h.data_offset % npy::MIN_DATA_ALIGN == 0);
            prop_assert!(h.dtype.nbytes(&h.shape).is_some());
        }
    }

    #[test]
    fn npy_headers_round_trip(dims in proptest::collection::vec(0usize..100_000, 0..5), d in 0usize..3) {
        let dtype = DType::ALL[d];
        let bytes = npy::encode_header(dtype, &dims);
        let fits = dtype.nbytes(&dims).is_some_and(|n| n <= isize::MAX as usize - bytes.len());
        match npy::parse_header(&bytes) {
            Ok(h) => {
                prop_assert!(fits);
                prop_assert_eq!(h.dtype, dtype);
                prop_assert_eq!(h.shape, dims);
                prop_assert_eq!(h.data_offset, bytes.len());
            }
            // Too large to address: refused, never wrapped around.
            Err(e) => prop_assert!(!fits && matches!(e, npy::HeaderError::ShapeOverflow { .. }), "{e}"),
        }
    }
}

#[test]
fn valid_frame_decodes() {
    assert_eq!(decode(&valid_frame()).unwrap(), 2);
}

#[test]
fn bulk_shorter_than_its_arrays_is_truncated_not_a_hang() {
    let mut bytes = valid_frame();
    bytes.truncate(bytes.len() - 5);
    assert!(matches!(decode(&bytes), Err(DecodeError::Truncated { part: "bulk", .. })));
}

#[test]
fn bulk_that_disagrees_with_dtype_and_shape_is_refused_before_reading() {
    // Declare 24 bytes of arrays (16 of the task's, 8 of the shared
    // value's) but advertise 25 in the prelude.
    let mut bytes = valid_frame();
    bytes[12..20].copy_from_slice(&25u64.to_le_bytes());
    bytes.push(0);
    let err = decode(&bytes).unwrap_err();
    assert!(matches!(err, DecodeError::BulkMismatch { declared: 24, actual: 25 }), "{err}");
}

#[test]
fn an_inline_array_whose_size_overflows_is_refused() {
    let request = Request::Run(protocol::Batch {
        call: 0,
        kind: protocol::TaskKind { name: "x".into(), entry: None },
        tasks: vec![protocol::TaskRequest {
            index: 0,
            input: Vec::new().into(),
            arrays: vec![ArrayRef::Inline { dtype: DType::I64, shape: vec![1 << 40, 1 << 40] }],
        }],
        timestamps: false,
        shared: None,
    });
    let mut bytes = Vec::new();
    protocol::send(&mut bytes, FrameKind::Request, &request, &[]).unwrap();
    assert!(matches!(decode(&bytes), Err(DecodeError::BulkMismatch { .. })));
}

/// The conversation fuzzing: a worker under a 2 GiB address-space limit.
mod conversation {
    use std::io::{Read, Write};
    use std::os::unix::process::CommandExt;
    use std::path::PathBuf;
    use std::process::{Command, Stdio};
    use std::sync::{mpsc, OnceLock};
    use std::time::Duration;

    use proptest::prelude::*;

    use procjob_worker::protocol::{
        self, Access, ArrayRef, Batch, FrameKind, Hello, Request, SharedValue, TaskKind, TaskRequest, PROTOCOL_VERSION,
    };
    use procjob_worker::secret::PoolSecret;
    use procjob_worker::{Array, DType};

    /// The most address space a fuzzed worker may take.
    const ADDRESS_SPACE: u64 = 2 << 30;
    /// A failsafe against a hung worker (the test then fails: SIGKILL).
    const FAILSAFE: Duration = Duration::from_secs(60);

    /// Files the references may name: a real `.npy`, a FIFO, a directory,
    /// nothing.
    struct Files {
        _dir: tempfile::TempDir,
        paths: Vec<PathBuf>,
    }

    fn files() -> &'static Files {
        static FILES: OnceLock<Files> = OnceLock::new();
        FILES.get_or_init(|| {
            let dir = tempfile::tempdir().unwrap();
            let real = dir.path().join("real.npy");
            Array::from_vec(vec![8, 8], vec![1.0f64; 64]).save_npy(&real).unwrap();
            let fifo = dir.path().join("fifo.npy");
            nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
            let paths = vec![real, fifo, dir.path().to_path_buf(), dir.path().join("missing.npy")];
            Files { _dir: dir, paths }
        })
    }

    fn dim() -> impl Strategy<Value = u64> + Clone {
        prop_oneof![
            6 => 0u64..4,
            2 => Just(8u64),
            1 => Just(1 << 20),
            1 => Just((1 << 32) + 1),
            1 => Just(1 << 32),
            1 => Just(u64::MAX),
            1 => any::<u64>(),
        ]
    }

    fn dtype() -> impl Strategy<Value = DType> + Clone {
        (0usize..3).prop_map(|i| DType::ALL[i])
    }

    fn array_ref() -> impl Strategy<Value = ArrayRef> {
        let shape = || proptest::collection::vec(dim(), 0..4);
        let access = prop_oneof![Just(Access::ReadOnly), Just(Access::ReadWrite), Just(Access::CopyOnWrite)];
        prop_oneof![
            (dtype(), shape()).prop_map(|(dtype, shape)| ArrayRef::Inline { dtype, shape }),
            (dtype(), shape(), 0usize..4, prop_oneof![Just(128u64), 0u64..1024, any::<u64>()], access).prop_map(
                |(dtype, shape, file, offset, access)| ArrayRef::File {
                    dtype,
                    shape,
                    path: files().paths[file].clone(),
                    offset,
                    access,
                }
            ),
            (dtype(), shape(), any::<u32>(), any::<u64>())
                .prop_map(|(dtype, shape, index, offset)| ArrayRef::Inherited { dtype, shape, index, offset }),
            // A request may not lend: a worker refuses these without reading
            // anything at the address.
            (dtype(), shape(), any::<u64>()).prop_map(|(dtype, shape, address)| ArrayRef::Lent {
                dtype,
                shape,
                address
            }),
        ]
    }

    fn kind() -> impl Strategy<Value = String> {
        prop_oneof![
            4 => Just("dot".to_string()),
            4 => Just("matmul".to_string()),
            1 => Just("nope".to_string()),
            1 => (200usize..=256).prop_map(|n| "k".repeat(n)),
            1 => (257usize..300).prop_map(|n| "k".repeat(n)),
        ]
    }

    fn task() -> impl Strategy<Value = TaskRequest> {
        let input = prop_oneof![
            Just(vec![0u8, 1]),             // (array 0, array 1): dot's input
            Just(vec![0u8, 4, 0, 1, 0, 0]), // MatmulInput { rows: (0, 4), a: 0, b: 1, out: None, b_panels: None }
            proptest::collection::vec(any::<u8>(), 0..12),
        ];
        (any::<u64>(), input, proptest::collection::vec(array_ref(), 0..3))
            .prop_map(|(index, input, arrays)| TaskRequest { index, input: input.into(), arrays })
    }

    /// One batch frame: the bulk its inline arrays declare when that is
    /// small, else a few arbitrary bytes; and maybe one byte changed.
    fn frame() -> impl Strategy<Value = Vec<u8>> {
        let mutation = prop_oneof![3 => Just(None), 1 => any::<(usize, u8)>().prop_map(Some)];
        // A shared value decodes like a task's input: the same strategy.
        let shared = proptest::option::of(task().prop_map(|t| SharedValue { value: t.input, arrays: t.arrays }));
        (any::<u64>(), kind(), proptest::collection::vec(task(), 0..4), any::<bool>(), shared, mutation).prop_map(
            |(call, name, tasks, timestamps, shared, mutation)| {
                let kind = TaskKind { name, entry: None };
                let request = Request::Run(Batch { call: call % 3, kind, tasks, timestamps, shared });
                let declared = request
                    .array_refs()
                    .filter(|r| matches!(r, ArrayRef::Inline { .. }))
                    .try_fold(0u64, |sum, r| sum.checked_add(r.nbytes()?))
                    .filter(|&n| n <= 1 << 16);
                let bulk = vec![0x3fu8; declared.unwrap_or(7) as usize];
                let mut bytes = Vec::new();
                protocol::send(&mut bytes, FrameKind::Request, &request, &[&bulk]).unwrap();
                if let Some((at, value)) = mutation {
                    let at = at % bytes.len();
                    bytes[at] = value;
                }
                bytes
            },
        )
    }

    /// The handshake a worker started with `secret` accepts, allowing the
    /// folder of [`files`].
    fn hello(secret: &PoolSecret) -> Vec<u8> {
        let folder = files().paths[2].canonicalize().unwrap();
        let hello = Request::Hello(Hello {
            protocol: PROTOCOL_VERSION,
            worker_index: 0,
            binary: Default::default(),
            idle_timeout_ms: 0,
            reuse_lent_pages: false,
            secret: secret.clone(),
            folders: vec![folder],
        });
        let mut bytes = Vec::new();
        protocol::send(&mut bytes, FrameKind::Request, &hello, &[]).unwrap();
        bytes
    }

    /// Runs a worker on its handshake (mutated as `mutate_hello` says) and
    /// `frames`; returns its exit code, or the signal that ended it as
    /// `Err`, and its stderr.
    fn converse(mutate_hello: Option<(usize, u8)>, frames: &[Vec<u8>]) -> (Result<i32, i32>, String) {
        let secret = PoolSecret::generate().unwrap();
        let mut hello = hello(&secret);
        if let Some((at, value)) = mutate_hello {
            let at = at % hello.len();
            hello[at] = value;
        }
        let frames: Vec<&Vec<u8>> = std::iter::once(&hello).chain(frames).collect();
        let mut command = Command::new(env!("CARGO_BIN_EXE_procjob-worker"));
        command.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let pipe = secret.hand_to(&mut command).unwrap();
        // SAFETY: between fork and exec the closure only calls setrlimit,
        // which is async-signal-safe, and allocates nothing.
        unsafe {
            command.pre_exec(|| {
                let limit = libc::rlimit { rlim_cur: ADDRESS_SPACE, rlim_max: ADDRESS_SPACE };
                if libc::setrlimit(libc::RLIMIT_AS, &limit) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = command.spawn().expect("cannot start procjob-worker");
        drop(pipe);
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let (stop, stopped) = mpsc::channel::<()>();
        let watchdog = std::thread::spawn(move || {
            if let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(FAILSAFE) {
                let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            }
        });
        let mut stdout = child.stdout.take().unwrap();
        let drain = std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
        let mut stderr = child.stderr.take().unwrap();
        let errors = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = stderr.read_to_string(&mut s);
            s
        });
        let mut stdin = child.stdin.take().unwrap();
        for frame in frames {
            if stdin.write_all(frame).is_err() {
                break; // the worker stopped reading: it refused a frame
            }
        }
        drop(stdin);
        let status = child.wait().unwrap();
        drop(stop);
        let _ = watchdog.join();
        let _ = drain.join();
        let stderr = errors.join().unwrap_or_default();
        use std::os::unix::process::ExitStatusExt;
        match (status.code(), status.signal()) {
            (Some(code), _) => (Ok(code), stderr),
            (_, Some(signal)) => (Err(signal), stderr),
            _ => unreachable!("a process ends by a code or a signal"),
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 128, failure_persistence: None, ..ProptestConfig::default() })]

        #[test]
        fn a_worker_never_dies_by_a_signal_whatever_batches_it_is_sent(
            frames in proptest::collection::vec(frame(), 1..4),
            mutate_hello in prop_oneof![7 => Just(None), 1 => any::<(usize, u8)>().prop_map(Some)],
        ) {
            let (exit, stderr) = converse(mutate_hello, &frames);
            prop_assert!(exit.is_ok(), "the worker died by signal {:?}; stderr:\n{}", exit, stderr);
            let code = exit.unwrap();
            prop_assert!(code == 0 || code == 3, "exit code {}; stderr:\n{}", code, stderr);
            prop_assert!(code == 0 || stderr.contains("procjob worker"), "exit 3 without a message:\n{}", stderr);
        }
    }
}
