//! [`Array`]: an n-dimensional array that knows how to travel between
//! processes.
//!
//! An array is either owned (a buffer in this process) or mapped (a view of
//! a file, usually a `.npy` in the run's temp folder). When a task's input
//! or output is encoded, every `Array` inside it is replaced by an index into
//! a list of [`ArrayRef`](crate::protocol::ArrayRef)s: an owned array travels inline as raw bytes in
//! the frame's bulk, a mapped one as a file reference with a byte offset, so
//! a row slice of a mapped array costs a few dozen bytes on the pipe — what
//! joblib does for `np.split` of a memmap. The coordinator decides at
//! encoding time whether a large owned array is dumped to a file instead
//! (see [`ArrayEncoder`]).
//!
//! Serde sees an `Array` only through a scoped encoder or decoder installed
//! by [`encode_with`] / [`decode_with`]; serializing one anywhere else is an
//! error rather than a silent copy.
//!
//! Its rooms: `value` (the [`Array`] type, constructors and accessors),
//! `views` (row slices, split, stack, reshape), `storage` (owned buffers and
//! maps), `mapping` (file-backed arrays and file references), `spare_pages`
//! and `kept_maps` (page and map reuse between results and calls),
//! `codec` (arrays as references inside encoded values), `bulk` (reading a
//! frame's arrays), `lend` (results read out of a worker's memory), `nd`
//! (`ndarray` views and conversions, with the `ndarray` feature) and
//! `error`.

mod bulk;
mod codec;
mod error;
mod kept_maps;
mod lend;
mod mapping;
#[cfg(feature = "ndarray")]
mod nd;
mod spare_pages;
mod storage;
mod value;
mod views;

pub use bulk::{read_arrays, BulkSource, Landing, Placement};
pub use codec::{
    decode_with, encode_with, encode_with_buffer, file_ref, inline_ref, ArrayEncoder, CodecError, InlineEncoder,
};
pub use error::ArrayError;
pub use lend::{lend_probe_address, lending_forbidden_here, Lender, LEND_PROBE};
pub(crate) use mapping::FaultedViews;
pub use mapping::{map_file_ref, map_file_ref_within, FileId};
#[cfg(feature = "test-tasks")]
pub(crate) use spare_pages::recycles_here;
pub(crate) use spare_pages::{NoRecycling, SPARES_KEPT};
pub use storage::HUGE_PAGE_THRESHOLD;
pub use value::Array;
pub use views::Rows;
