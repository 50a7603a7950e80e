//! The classic joblib demo, `parallel_dot`, with procjob.
//!
//! Python:
//! ```python
//! def parallel_dot(A, B, n_jobs=2):
//!     blocks = Parallel(n_jobs=n_jobs)(delayed(np.dot)(A_block, B)
//!                                      for A_block in np.array_split(A, n_jobs))
//!     return np.vstack(blocks)
//! ```
//!
//! Run: `cargo run --release --example parallel_dot -- 1000 2`

use procjob::matmul::Inputs;
use procjob::{Array, DType, Parallel};

/// B is shared: it crosses to each worker once (as a memory map above
/// max_nbytes), and each task gets a block of A's rows.
fn parallel_dot(a: &Array, b: &Array, n_jobs: usize) -> Result<Array, procjob::Error> {
    let blocks = a.array_split(n_jobs).expect("A is a matrix");
    let c_blocks = Parallel::new().n_jobs(n_jobs as i64).try_map_with(
        b,
        |b: &Array, a: Array| procjob::tasks::dot(&a, b),
        blocks,
    )?;
    Ok(Array::vstack(&c_blocks).expect("blocks of one product stack"))
}

fn main() -> Result<(), procjob::Error> {
    procjob::init();
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(1000);
    let n_jobs: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(2);
    // Integers in [0, 10) as np.random.randint(0, 10), like the blog post.
    let Inputs { a, b } = Inputs::random(DType::I64, n, n, n, 0)?;

    let t = std::time::Instant::now();
    let c = parallel_dot(&a, &b, n_jobs)?;
    let parallel = t.elapsed();
    let t = std::time::Instant::now();
    let reference = procjob::tasks::dot(&a, &b).expect("A and B fit");
    let sequential = t.elapsed();

    assert_eq!(c, reference, "parallel and sequential products differ");
    println!(
        "{n}×{n} i64: {n_jobs} processes {:.3} s, one process {:.3} s, same C: yes",
        parallel.as_secs_f64(),
        sequential.as_secs_f64()
    );
    Ok(())
}
