//! A shared output: workers fill disjoint rows of one read-write memory map.
//!
//! The image of the Mandelbrot set is a `.npy` file mapped read-write; each
//! task gets a view of its rows (a file reference, a few dozen bytes on the
//! pipe) and writes escape counts straight into the file. Nothing but "done"
//! comes back. numpy opens the result with `np.load("mandelbrot.npy")`.
//!
//! Run: `cargo run --release --example shared_output -- 800 mandelbrot.npy`

use procjob::{Array, DType, Parallel, Task};
use serde::{Deserialize, Serialize};

/// Computes escape counts for a band of rows.
struct Band;

#[derive(Serialize, Deserialize)]
struct Rows {
    first_row: usize,
    height: usize,
    image: Array,
}

impl Task for Band {
    type Input = Rows;
    type Output = ();
    type Error = String;

    fn run(mut r: Rows) -> Result<(), String> {
        let width = r.image.shape()[1];
        let pixels = r.image.as_mut_slice::<i64>()?;
        for (i, row) in pixels.chunks_mut(width).enumerate() {
            let y = -1.5 + 3.0 * (r.first_row + i) as f64 / r.height as f64;
            for (j, px) in row.iter_mut().enumerate() {
                let x = -2.0 + 3.0 * j as f64 / width as f64;
                let (mut zr, mut zi, mut n) = (0.0f64, 0.0f64, 0);
                while n < 255 && zr * zr + zi * zi <= 4.0 {
                    (zr, zi) = (zr * zr - zi * zi + x, 2.0 * zr * zi + y);
                    n += 1;
                }
                *px = n;
            }
        }
        Ok(())
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    procjob::init();
    let mut args = std::env::args().skip(1);
    let size: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(800);
    let dir = tempfile::tempdir()?;
    let path = args.next().map_or_else(|| dir.path().join("mandelbrot.npy"), Into::into);
    let _ = std::fs::remove_file(&path);

    let image = Array::create_npy(&path, DType::I64, vec![size, size])?;
    let band = 16;
    let tasks = (0..size).step_by(band).map(|first_row| Rows {
        first_row,
        height: size,
        image: image.rows(first_row..(first_row + band).min(size)).expect("rows in range"),
    });
    let mut parallel = Parallel::new();
    parallel.run::<Band, _>(tasks)?;

    let pixels = image.as_slice::<i64>()?;
    let inside = pixels.iter().filter(|&&n| n == 255).count();
    println!(
        "{size}×{size} image in {}: {inside} pixels inside the set; {} bytes went to the workers",
        path.display(),
        parallel.last_call().traffic.bytes_to_workers
    );
    assert!(inside > 0 && inside < size * size);
    Ok(())
}
