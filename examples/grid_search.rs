//! A 200-point grid search: every (penalty, power) pair scored on the same
//! samples, which cross to each worker once, not once per point.
//!
//! joblib:
//! ```python
//! import numpy as np
//! from joblib import Parallel, delayed
//!
//! def score(data, alpha, power):
//!     x, y = data
//!     phi = x ** power
//!     w = (phi * y).sum() / ((phi * phi).sum() + alpha)
//!     return alpha, power, ((y - w * phi) ** 2).mean()
//!
//! x = np.arange(2000) / 1000
//! data = (x, 3 * x + np.sin(7 * x))
//! grid = [(a / 10, p) for a in range(20) for p in range(1, 11)]
//! scores = Parallel(n_jobs=-1)(delayed(score)(data, a, p) for a, p in grid)
//! print("best (alpha, power, mse):", min(scores, key=lambda s: s[2]))
//! ```
//!
//! Run: `cargo run --release --example grid_search`

use procjob::Parallel;

/// Fits `y ≈ w·x^power` with a ridge penalty `alpha`; returns the point and its error.
fn score((x, y): &(Vec<f64>, Vec<f64>), (alpha, power): (f64, i32)) -> (f64, i32, f64) {
    let phi: Vec<f64> = x.iter().map(|x| x.powi(power)).collect();
    let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(a, b)| a * b).sum::<f64>();
    let w = dot(&phi, y) / (dot(&phi, &phi) + alpha);
    let mse = phi.iter().zip(y).map(|(p, y)| (y - w * p).powi(2)).sum::<f64>() / y.len() as f64;
    (alpha, power, mse)
}

fn main() -> Result<(), procjob::Error> {
    procjob::init();
    let x: Vec<f64> = (0..2000).map(|i| f64::from(i) / 1000.0).collect();
    let data = (x.clone(), x.iter().map(|x| 3.0 * x + (7.0 * x).sin()).collect::<Vec<_>>());
    let grid = (0..20).flat_map(|a| (1..=10).map(move |p| (f64::from(a) / 10.0, p)));
    let scores = Parallel::new().map_with(&data, score, grid)?;
    let best = scores.iter().min_by(|a, b| a.2.total_cmp(&b.2)).expect("the grid is not empty");
    println!("{} points; best (alpha, power, mse): {best:?}", scores.len());
    Ok(())
}
