//! The worker side of procjob.
//!
//! Everything a worker process needs lives here, and nothing of the pool:
//! the wire protocol both sides speak, the `.npy` array store, the task
//! registry, the matrix kernels and the serve loop. The coordinator crate
//! (`procjob`) depends on this one, never the reverse.
#![warn(missing_docs)]

pub mod dtype;
pub mod kernels;
pub mod npy;

pub use dtype::{DType, Element};
pub mod array;
pub mod clock;
pub mod confine;
pub mod entry;
pub mod image;
mod io;
pub mod memory;
pub mod payload;
pub mod protocol;
pub mod registry;
pub mod secret;
pub mod serve;
mod sigbus;
pub mod task;
mod tasks;

pub use tasks::matmul;
#[cfg(feature = "test-tasks")]
pub use tasks::testkinds;

pub use kernels::gemm;

pub use array::Array;
pub use registry::Registry;
pub use task::Task;
