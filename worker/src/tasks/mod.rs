//! The task kinds built into the worker, above the registry that runs them:
//! the block-row matrix product and `np.dot` ([`matmul`]), the misbehaving
//! kinds of procjob's own tests ([`testkinds`], feature `test-tasks`), and
//! the list of built-in kinds ([`Registry::builtin`](crate::Registry::builtin)).
//!
//! These are tasks like any user's: they use the [`Task`](crate::Task) trait
//! and [`Array`](crate::Array), and nothing below knows them. (Not to be
//! confused with the coordinator's `matmul` module, the job that plans,
//! dumps and checks a whole product and hands its blocks to these tasks.)

mod builtin;
pub mod matmul;
#[cfg(feature = "test-tasks")]
pub mod testkinds;
