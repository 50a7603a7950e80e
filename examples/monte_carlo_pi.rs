//! A function of your own as a task: estimate π by throwing darts, on every core.
//!
//! Each task gets a seed and a number of darts and returns how many landed
//! inside the quarter circle. Many small tasks: procjob batches them
//! automatically so the pipes carry few frames.
//!
//! Run: `cargo run --release --example monte_carlo_pi -- 2000 100000`

use procjob::Parallel;

/// Throws `darts` darts from `seed`; counts those inside the unit quarter circle.
fn throw((seed, darts): (u64, u64)) -> u64 {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = || {
        // xorshift64*: fast, good enough for darts.
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        (state.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
    };
    (0..darts)
        .filter(|_| {
            let (x, y) = (next(), next());
            x * x + y * y <= 1.0
        })
        .count() as u64
}

fn main() -> Result<(), procjob::Error> {
    procjob::init();
    let mut args = std::env::args().skip(1);
    let tasks: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(2000);
    let darts: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(100_000);

    let mut parallel = Parallel::new();
    let t = std::time::Instant::now();
    let inside: u64 = parallel.map(throw, (0..tasks).map(|seed| (seed, darts)))?.iter().sum();
    let pi = 4.0 * inside as f64 / (tasks * darts) as f64;
    let stats = parallel.last_call();
    println!(
        "π ≈ {pi:.5} from {} darts in {tasks} tasks on {} workers, {:.3} s; {} frames to the workers",
        tasks * darts,
        parallel.worker_pids().len(),
        t.elapsed().as_secs_f64(),
        stats.traffic.frames_to_workers
    );
    assert!((pi - std::f64::consts::PI).abs() < 0.01, "π estimate {pi} is off");
    Ok(())
}
