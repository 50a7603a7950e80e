//! `procjob bench`: a sweep over sizes, process counts and modes, timed in
//! the style of hyperfine, with each mode's efficiency against this
//! machine's own ideal measured in the same run.
//!
//! The ideal for N processes is N threads of this process running the same
//! kernel on the same blocks, already in memory, with no communication: what
//! perfect process parallelism could reach here. Since a shared machine
//! drifts, the runs are interleaved (ideal, procjob, ideal, procjob, …) and
//! the efficiency reported is the median of the paired ratios ideal/procjob.

use std::ops::Range;
use std::time::{Duration, Instant};

use serde::Serialize;

use procjob_worker::array::Array;
use procjob_worker::DType;

use crate::error::Error;
use crate::matmul::{plan_blocks, Inputs, Mode, ModeRunner, RunSettings};
use crate::run_folder::RunFolder;

/// What to sweep.
#[derive(Debug, Clone)]
pub struct Sweep {
    /// Square sizes n (n×n · n×n).
    pub sizes: Vec<usize>,
    /// Process counts.
    pub processes: Vec<usize>,
    /// Modes (seq always runs first, as the baseline).
    pub modes: Vec<Mode>,
    /// Element type.
    pub dtype: DType,
    /// Timed repetitions per case.
    pub repeat: usize,
    /// Untimed repetitions first (the first starts the workers).
    pub warmup: usize,
    /// Parent of the run folder.
    pub temp_folder: Option<std::path::PathBuf>,
}

/// Statistics of a list of times, in seconds.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Stats {
    /// Arithmetic mean.
    pub mean_s: f64,
    /// Sample standard deviation (0 for one sample).
    pub stddev_s: f64,
    /// Median.
    pub median_s: f64,
    /// Fastest.
    pub min_s: f64,
    /// Slowest.
    pub max_s: f64,
    /// Every sample, in order.
    pub times_s: Vec<f64>,
}

impl Stats {
    /// Statistics of `times` (seconds); `times` must not be empty.
    pub fn of(times: &[f64]) -> Stats {
        let n = times.len() as f64;
        let mean = times.iter().sum::<f64>() / n;
        let var = if times.len() > 1 { times.iter().map(|t| (t - mean).powi(2)).sum::<f64>() / (n - 1.0) } else { 0.0 };
        Stats {
            mean_s: mean,
            stddev_s: var.sqrt(),
            median_s: median(times),
            min_s: times.iter().copied().fold(f64::INFINITY, f64::min),
            max_s: times.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            times_s: times.to_vec(),
        }
    }
}

/// The median of `xs` (mean of the middle two for an even count).
pub fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    if v.len().is_multiple_of(2) {
        (v[mid - 1] + v[mid]) / 2.0
    } else {
        v[mid]
    }
}

/// One row of the sweep: a mode at a size and process count.
#[derive(Debug, Clone, Serialize)]
pub struct CaseReport {
    /// Always "matmul".
    pub bench: &'static str,
    /// The mode.
    pub mode: &'static str,
    /// Element type.
    pub dtype: &'static str,
    /// n of the n×n product.
    pub size: usize,
    /// Worker processes (1 for seq).
    pub processes: usize,
    /// Row blocks (tasks).
    pub blocks: usize,
    /// Wall times of the timed repetitions.
    #[serde(flatten)]
    pub stats: Stats,
    /// seq's mean / this mean.
    pub speedup_vs_seq: f64,
    /// 2·n³ / median.
    pub gflops: f64,
    /// Median of the paired ratios ideal/this (null for seq).
    pub efficiency: Option<f64>,
    /// The ideal's median, seconds (null for seq).
    pub ideal_median_s: Option<f64>,
    /// Peak RSS summed over the case's workers, bytes (0 for seq and
    /// threads, which start none).
    pub workers_peak_rss_bytes: u64,
    /// Peak USS (private pages) summed over the case's workers, bytes.
    pub workers_peak_uss_bytes: u64,
    /// Peak PSS (shared pages split among their users) summed over the
    /// case's workers, bytes.
    pub workers_peak_pss_bytes: u64,
}

/// Memory peaks summed over a case's workers, bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct WorkersMemory {
    peak_rss: u64,
    uss: u64,
    pss: u64,
}

impl WorkersMemory {
    fn sum(workers: &[crate::pool::WorkerReport]) -> WorkersMemory {
        workers.iter().fold(WorkersMemory::default(), |m, w| WorkersMemory {
            peak_rss: m.peak_rss + w.peak.peak_rss,
            uss: m.uss + w.peak.uss,
            pss: m.pss + w.peak.pss,
        })
    }
}

/// Runs the sweep, handing each case's report to `report` as it finishes.
pub fn run(sweep: &Sweep, mut report: impl FnMut(&CaseReport)) -> Result<Vec<CaseReport>, Error> {
    let mut all = Vec::new();
    for &size in &sweep.sizes {
        let inputs = Inputs::pattern(sweep.dtype, size, size, size)?;
        let needed = 3 * (size * size * sweep.dtype.size()) as u64 + (1 << 20);
        let folder = RunFolder::create(sweep.temp_folder.as_deref(), needed)?;
        let seq_settings = settings(1, None);
        let seq_times = {
            // Dropped before the other modes run, with the C it keeps.
            let mut seq = ModeRunner::new(Mode::Seq, &inputs, &seq_settings, &folder);
            for _ in 0..sweep.warmup {
                seq.time_once()?;
            }
            timed(sweep.repeat, || Ok(seq.time_once()?.wall))?
        };
        let seq_stats = Stats::of(&seq_times);
        let seq_report =
            case(Mode::Seq, sweep, size, 1, 1, seq_stats.clone(), seq_stats.mean_s, None, WorkersMemory::default());
        report(&seq_report);
        all.push(seq_report);
        for &processes in &sweep.processes {
            let s = settings(processes, sweep.temp_folder.clone());
            let ranges = plan_blocks(size, processes);
            let mut ideal = Ideal::new(&inputs, &ranges)?;
            for &mode in sweep.modes.iter().filter(|&&m| m != Mode::Seq) {
                let mut runner = ModeRunner::new(mode, &inputs, &s, &folder);
                for _ in 0..sweep.warmup {
                    runner.time_once()?;
                }
                let (mut times, mut ideals) = (Vec::new(), Vec::new());
                for _ in 0..sweep.repeat.max(1) {
                    ideals.push(ideal.run(processes)?.as_secs_f64());
                    times.push(runner.time_once()?.wall.as_secs_f64());
                    check_interrupt()?;
                }
                let blocks = runner.blocks();
                let memory = WorkersMemory::sum(&runner.finish().0);
                let ratios: Vec<f64> = ideals.iter().zip(&times).map(|(i, t)| i / t).collect();
                let stats = Stats::of(&times);
                let paired = Some((&ratios[..], &ideals[..]));
                let r = case(mode, sweep, size, processes, blocks, stats, seq_stats.mean_s, paired, memory);
                report(&r);
                all.push(r);
            }
        }
    }
    Ok(all)
}

fn settings(processes: usize, temp_folder: Option<std::path::PathBuf>) -> RunSettings {
    RunSettings { temp_folder, ..RunSettings::with_processes(processes) }
}

fn check_interrupt() -> Result<(), Error> {
    match crate::signals::received() {
        Some(signal) => Err(Error::Interrupted { signal }),
        None => Ok(()),
    }
}

fn timed(repeat: usize, mut f: impl FnMut() -> Result<Duration, Error>) -> Result<Vec<f64>, Error> {
    let mut v = Vec::with_capacity(repeat);
    for _ in 0..repeat.max(1) {
        v.push(f()?.as_secs_f64());
        check_interrupt()?;
    }
    Ok(v)
}

#[allow(clippy::too_many_arguments)]
fn case(
    mode: Mode,
    sweep: &Sweep,
    size: usize,
    processes: usize,
    blocks: usize,
    stats: Stats,
    seq_mean: f64,
    paired: Option<(&[f64], &[f64])>,
    memory: WorkersMemory,
) -> CaseReport {
    let ops = 2.0 * (size as f64).powi(3);
    CaseReport {
        bench: "matmul",
        mode: mode.name(),
        dtype: sweep.dtype.name(),
        size,
        processes,
        blocks,
        speedup_vs_seq: if stats.mean_s > 0.0 { seq_mean / stats.mean_s } else { 0.0 },
        gflops: if stats.median_s > 0.0 { ops / stats.median_s / 1e9 } else { 0.0 },
        efficiency: paired.map(|(r, _)| median(r)),
        ideal_median_s: paired.map(|(_, i)| median(i)),
        workers_peak_rss_bytes: memory.peak_rss,
        workers_peak_uss_bytes: memory.uss,
        workers_peak_pss_bytes: memory.pss,
        stats,
    }
}

/// The machine's ideal: threads running the kernel on blocks already in
/// memory, each writing its own rows of a C allocated beforehand, taking
/// blocks as they free up: what the `threads` mode does once its C is handed
/// back, here measured on its own.
struct Ideal<'a> {
    inputs: &'a Inputs,
    ranges: Vec<Range<usize>>,
    c: Array,
}

impl<'a> Ideal<'a> {
    fn new(inputs: &'a Inputs, ranges: &[Range<usize>]) -> Result<Ideal<'a>, Error> {
        let (m, _, n) = inputs.dims();
        Ok(Ideal { inputs, ranges: ranges.to_vec(), c: crate::matmul::zeros_c(inputs.dtype(), m, n)? })
    }

    fn run(&mut self, threads: usize) -> Result<Duration, Error> {
        let t = Instant::now();
        crate::matmul::multiply_threads_into(self.inputs, &self.ranges, threads, &mut self.c)?;
        Ok(t.elapsed())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_are_hyperfine_style() {
        let s = Stats::of(&[1.0, 2.0, 3.0, 4.0]);
        assert_eq!((s.mean_s, s.median_s, s.min_s, s.max_s), (2.5, 2.5, 1.0, 4.0));
        assert!((s.stddev_s - 1.290_994_448_7).abs() < 1e-9);
        assert_eq!(Stats::of(&[5.0]).stddev_s, 0.0);
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
    }

    #[test]
    fn ideal_computes_the_product() {
        let inputs = Inputs::pattern(DType::I64, 9, 5, 4).unwrap();
        let ranges = plan_blocks(9, 3);
        let mut ideal = Ideal::new(&inputs, &ranges).unwrap();
        ideal.run(2).unwrap();
        assert_eq!(ideal.c, crate::matmul::multiply_seq(&inputs).unwrap());
    }
}
