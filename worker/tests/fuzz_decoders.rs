//! Property tests of the two parsers that read untrusted bytes: the frame
//! decoder and the `.npy` header parser. Whatever the bytes, each returns a
//! typed error or a value; it never panics, never allocates what a bad
//! frame advertises, and never waits for bytes that will not come.
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
    });
    let bulk = [0u8; 16];
    let mut buf = Vec::new();
    protocol::send(&mut buf, FrameKind::Request, &request, &[&bulk]).unwrap();
    buf
}

/// Decodes a whole frame, bulk included, as a worker does.
fn decode(bytes: &[u8]) -> Result<usize, DecodeError> {
    let mut r = bytes;
    let frame = protocol::recv::<_, Request>(&mut r, FrameKind::Request)?;
    let arrays =
        procjob_worker::array::read_arrays(&mut r, frame.message.array_refs(), frame.bulk_len, &mut |_, a| match a {
            ArrayRef::File { .. } | ArrayRef::Inherited { .. } => procjob_worker::array::Placement::Mapped(Err(
                procjob_worker::array::ArrayError::Shape("no files or inherited arrays in this test".into()),
            )),
            ArrayRef::Inline { .. } => procjob_worker::array::Placement::Own,
        })?;
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
    assert_eq!(decode(&valid_frame()).unwrap(), 1);
}

#[test]
fn bulk_shorter_than_its_arrays_is_truncated_not_a_hang() {
    let mut bytes = valid_frame();
    bytes.truncate(bytes.len() - 5);
    assert!(matches!(decode(&bytes), Err(DecodeError::Truncated { part: "bulk", .. })));
}

#[test]
fn bulk_that_disagrees_with_dtype_and_shape_is_refused_before_reading() {
    // Declare 16 bytes of arrays but advertise 17 in the prelude.
    let mut bytes = valid_frame();
    bytes[12..20].copy_from_slice(&17u64.to_le_bytes());
    bytes.push(0);
    let err = decode(&bytes).unwrap_err();
    assert!(matches!(err, DecodeError::BulkMismatch { declared: 16, actual: 17 }), "{err}");
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
    });
    let mut bytes = Vec::new();
    protocol::send(&mut bytes, FrameKind::Request, &request, &[]).unwrap();
    assert!(matches!(decode(&bytes), Err(DecodeError::BulkMismatch { .. })));
}
