//! Reading a batch's arrays: inline ones from the frame's bulk, file
//! references through the [`MapCache`], and (in a forked worker) references
//! to the arrays it inherited from its coordinator.

use std::io::BufReader;

use super::map_cache::MapCache;
use crate::array::{self, Array, ArrayError, BulkSource};
use crate::protocol::{ArrayRef, DecodeError, Frame, Request};

/// Reads (or maps) every array of a request's tasks, in bulk order; one
/// that cannot be had is an `Err` in its place, for its task to report.
pub(super) fn batch_arrays<R>(
    input: &mut BufReader<R>,
    frame: &Frame<Request>,
    maps: &mut MapCache,
    inherited: &[Array],
) -> Result<Vec<Result<Array, ArrayError>>, DecodeError>
where
    BufReader<R>: BulkSource,
{
    // No lender: a request's arrays are never read out of the coordinator's
    // memory (a lent array in a request is refused as that array's error).
    array::read_arrays(input, frame.message.array_refs(), frame.bulk_len, None, &mut |_, r| match r {
        ArrayRef::File { .. } => array::Placement::Mapped(maps.map(r)),
        ArrayRef::Inline { .. } | ArrayRef::Lent { .. } => array::Placement::Own,
        ArrayRef::Inherited { .. } => array::Placement::Mapped(inherit(inherited, r)),
    })
}

/// The arrays of `message` that arrived inline in its bulk (shared with
/// `arrays`, not copied).
pub(super) fn inline_arrays(message: &Request, arrays: &[Result<Array, ArrayError>]) -> Vec<Array> {
    message
        .array_refs()
        .zip(arrays)
        .filter_map(|(r, a)| match (r, a) {
            (ArrayRef::Inline { .. }, Ok(a)) => Some(a.clone()),
            _ => None,
        })
        .collect()
}

/// Resolves an [`ArrayRef::Inherited`] against the arrays this forked
/// worker shares with its coordinator.
fn inherit(inherited: &[Array], r: &ArrayRef) -> Result<Array, ArrayError> {
    let ArrayRef::Inherited { dtype, index, offset, .. } = r else {
        unreachable!("only inherited references are resolved here")
    };
    let base = inherited.get(*index as usize).ok_or_else(|| {
        ArrayError::Shape(format!("inherited array {index} does not exist ({} were inherited)", inherited.len()))
    })?;
    base.view_of_storage(*dtype, &r.checked_shape()?, *offset)
}
