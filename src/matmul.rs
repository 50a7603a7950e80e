//! The matmul job.
