//! The worker side of procjob.
//!
//! Everything a worker process needs lives here, and nothing of the pool:
//! the wire protocol both sides speak, the `.npy` array store, the task
//! registry, the matrix kernels and the serve loop. The coordinator crate
//! (`procjob`) depends on this one, never the reverse.
//!
//! # Layers
//!
//! Modules import only from the layers below their own, so there is no
//! import cycle between them:
//!
//! ```text
//! serve                       the worker process: handshake, batches, replies (and the test fault hook)
//!   ↓
//! tasks (matmul, testkinds)   the built-in task kinds, and the list of them (Registry::builtin)
//! kernels                     block matrix-product kernels (only dtype below)
//!   ↓
//! task · entry · registry     the Task trait, entry descriptors, kinds by name
//!   ↓
//! array                       Array: owned or mapped, its codec and the frame's bulk
//!   ↓
//! npy                         the .npy file format
//! protocol                    the wire: frames, messages, limits, BinaryId
//!   ↓
//! leaves                      dtype, clock, io, memory, payload, secret, confine, image, sigbus
//! ```
#![warn(missing_docs)]
#![deny(unreachable_pub, missing_debug_implementations)]

// Leaves: they import nothing of this crate.
pub mod clock;
pub mod confine;
pub mod dtype;
pub mod image;
mod io;
pub mod memory;
pub mod payload;
pub mod secret;
pub mod sigbus;

// The wire, and the file format.
pub mod npy;
pub mod protocol;

// Arrays.
pub mod array;

// Tasks in general, and how a worker finds their code.
pub mod entry;
pub mod registry;
pub mod task;

// Kernels, and the task kinds built on them.
pub mod kernels;
mod tasks;

// The worker process.
pub mod serve;

pub use array::Array;
pub use dtype::{Complex, DType, Element};
pub use kernels::gemm;
/// The `ndarray` crate this one converts to and views as (the `ndarray`
/// feature), so that a user's `ndarray` version matches it.
#[cfg(feature = "ndarray")]
pub use ndarray;
#[cfg(feature = "ndarray")]
pub use num_complex;
pub use registry::Registry;
pub use task::Task;
pub use tasks::matmul;
#[cfg(feature = "test-tasks")]
pub use tasks::testkinds;
