//! Per-row-block statistics of a 4000×4000 f64 matrix (128 MB): the matrix
//! is dumped once and memory-mapped by every worker; each task reads its
//! 250 rows in place.
//!
//! joblib:
//! ```python
//! m = np.sqrt(np.arange(16_000_000, dtype=np.float64)).reshape(4000, 4000)
//! def stats(m, b):
//!     rows = m[b * 250:(b + 1) * 250]
//!     return rows.mean(), rows.std(), rows.max()
//! print(Parallel(n_jobs=-1)(delayed(stats)(m, b) for b in range(16)))
//! ```
//!
//! Run: `cargo run --release --example block_stats`

use procjob::{Array, ArrayError, Parallel};

fn stats(m: &Array, block: usize) -> Result<(f64, f64, f64), ArrayError> {
    let rows = m.rows(block * 250..(block + 1) * 250)?;
    let xs = rows.as_slice::<f64>()?;
    let mean = xs.iter().sum::<f64>() / xs.len() as f64;
    let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / xs.len() as f64;
    Ok((mean, var.sqrt(), xs.iter().copied().fold(f64::MIN, f64::max)))
}

fn main() -> Result<(), procjob::Error> {
    procjob::init();
    let m = Array::from_vec([4000, 4000], (0..16_000_000).map(|i| f64::from(i).sqrt()).collect::<Vec<_>>());
    let blocks = Parallel::new().try_map_with(&m, stats, 0..16)?;
    println!("(mean, std, max) of each 250-row block: {blocks:?}");
    Ok(())
}
