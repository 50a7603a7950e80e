//! `procjob bench`: a sweep over sizes, process counts and modes, timed in
//! the style of hyperfine, with each mode's efficiency against this
//! machine's own ideal measured in the same run.
//!
//! The ideal for N processes is N threads of this process running the same
//! kernel on the same blocks, already in memory, with no communication: what
//! perfect process parallelism could reach here. Since a shared machine
//! drifts, the runs are interleaved (ideal, procjob, ideal, procjob, …) and
//! the efficiency reported is the median of the paired ratios ideal/procjob.
//! Each case's C (from its last timed repetition) is checked against seq's.
//! Under MPI the pools spread over the nodes as `matmul`'s do, and each
//! case says where its workers ran and what crossed between ranks.

use std::ops::Range;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::Serialize;

use procjob_worker::array::Array;
use procjob_worker::DType;

use crate::cli::against::{Against, Baseline, Driver};
use crate::error::Error;
use crate::matmul::{plan_blocks, Inputs, Mode, ModeRunner, PackedB, RunSettings};
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
    /// numpy and joblib to run in the same rounds (`--against`).
    pub against: Option<Against>,
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
    /// The mode, or the baseline: "numpy" (on `processes` BLAS threads)
    /// or "joblib" (on `processes` workers).
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
    /// Median of the paired ratios numpy's time / this mode's, in the
    /// rounds they shared (`--against numpy`; above 1: this mode is faster).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vs_numpy: Option<f64>,
    /// In how many of those rounds this mode took less time than numpy
    /// (of `times_s.len()`): how much of the spread the median stands on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vs_numpy_faster_rounds: Option<usize>,
    /// Likewise against joblib's `parallel_dot` (`--against joblib`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vs_joblib: Option<f64>,
    /// Likewise, the rounds faster than joblib.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vs_joblib_faster_rounds: Option<usize>,
    /// C of the last timed repetition is bit-identical to seq's C (null
    /// for numpy and joblib, whose products are checked by their sum).
    pub matches_seq: Option<bool>,
    /// "local" or "mpi".
    pub backend: &'static str,
    /// MPI ranks of the job (1 when local).
    pub ranks: usize,
    /// Under MPI, where the case's workers ran: per node, its agent's
    /// rank, its host and how many of the workers (empty when local, and
    /// for seq, threads and the baselines, which run on rank 0 only).
    pub nodes: Vec<NodeWorkers>,
    /// Under MPI, bytes rank 0 sent to other ranks per timed repetition
    /// (their mean; 0 when local).
    pub bytes_between_ranks_out: u64,
    /// Likewise, bytes rank 0 received from other ranks.
    pub bytes_between_ranks_in: u64,
}

/// How many of a case's workers ran on one node (under MPI).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct NodeWorkers {
    /// The node's agent rank.
    pub rank: usize,
    /// Its host.
    pub host: String,
    /// Workers on it.
    pub workers: usize,
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
///
/// For each size, seq runs first (in rounds with numpy on one thread when
/// the sweep runs against numpy); then, for each process count, every
/// other mode and the baselines run in rounds: the ideal, each mode, numpy,
/// joblib; again and again. Each mode's efficiency is the median of its
/// paired ratios ideal/mode, and its ratio to a baseline the median of the
/// paired ratios baseline/mode over those rounds, with the number of
/// rounds in which the mode was the faster.
pub fn run(sweep: &Sweep, mut report: impl FnMut(&CaseReport)) -> Result<Vec<CaseReport>, Error> {
    let mut all = Vec::new();
    for &size in &sweep.sizes {
        let inputs = Inputs::pattern(sweep.dtype, size, size, size)?;
        let against_bytes = if sweep.against.is_some() { 2 * (size * size * sweep.dtype.size()) as u64 } else { 0 };
        let needed = 3 * (size * size * sweep.dtype.size()) as u64 + against_bytes + (1 << 20);
        let folder = RunFolder::create(sweep.temp_folder.as_deref(), needed)?;
        // Dropped (their drivers stopped) before the folder.
        let mut baselines = Baselines::new(sweep.against.as_ref(), &inputs, &folder)?;
        let (seq_times, seq_numpy, seq_c) = {
            // Dropped before the other modes run, with the C it keeps.
            let mut seq = ModeRunner::new(Mode::Seq, &inputs, &settings(1, None), &folder);
            let numpy = baselines.numpy_only();
            for _ in 0..sweep.warmup {
                seq.time_once()?;
                baselines.time(1, numpy)?;
            }
            let (mut times, mut numpy_times) = (Vec::new(), Vec::new());
            let mut seq_c = None;
            for round in 0..sweep.repeat.max(1) {
                // The last repetition's C is what the other modes' are
                // checked against.
                if round + 1 == sweep.repeat.max(1) {
                    let (repetition, c) = seq.run_once()?;
                    times.push(repetition.wall.as_secs_f64());
                    seq_c = Some(c);
                } else {
                    times.push(seq.time_once()?.wall.as_secs_f64());
                }
                numpy_times.extend(baselines.time(1, numpy)?.into_iter().map(|(_, t)| t));
                check_interrupt()?;
            }
            (times, numpy_times, seq_c)
        };
        let seq_stats = Stats::of(&seq_times);
        let mut seq_report = case(
            Mode::Seq.name(),
            sweep,
            size,
            1,
            1,
            seq_stats.clone(),
            seq_stats.mean_s,
            None,
            WorkersMemory::default(),
        );
        (seq_report.vs_numpy, seq_report.vs_numpy_faster_rounds) =
            (!seq_numpy.is_empty()).then(|| versus(&seq_numpy, &seq_times)).unzip();
        seq_report.matches_seq = Some(true);
        report(&seq_report);
        all.push(seq_report);
        for &processes in &sweep.processes {
            let s = settings(processes, sweep.temp_folder.clone());
            let ranges = plan_blocks(size, processes);
            let mut ideal = Ideal::new(&inputs, &ranges)?;
            let modes: Vec<Mode> = sweep.modes.iter().copied().filter(|&m| m != Mode::Seq).collect();
            let mut runners: Vec<ModeRunner> =
                modes.iter().map(|&mode| ModeRunner::new(mode, &inputs, &s, &folder)).collect();
            let all_baselines = baselines.all();
            for _ in 0..sweep.warmup {
                for runner in &mut runners {
                    runner.time_once()?;
                }
                baselines.time(processes, all_baselines)?;
            }
            let mut ideals = Vec::new();
            let mut times = vec![Vec::new(); runners.len()];
            // Bytes between ranks of each runner's timed repetitions.
            let mut between = vec![(0u64, 0u64); runners.len()];
            let mut matches = vec![None; runners.len()];
            let mut baseline_times: Vec<(Baseline, Vec<f64>)> = Vec::new();
            let rounds = sweep.repeat.max(1);
            for round in 0..rounds {
                ideals.push(ideal.run(processes)?.as_secs_f64());
                for (i, (runner, t)) in runners.iter_mut().zip(&mut times).enumerate() {
                    let before = super::mpi::rank_bytes();
                    // The last round's C is checked against seq's.
                    let repetition = if round + 1 == rounds {
                        let (repetition, c) = runner.run_once()?;
                        matches[i] = Some(seq_c.as_ref().is_some_and(|s| *s == c));
                        runner.recycle(c);
                        repetition
                    } else {
                        runner.time_once()?
                    };
                    let after = super::mpi::rank_bytes();
                    between[i].0 += after.0 - before.0;
                    between[i].1 += after.1 - before.1;
                    t.push(repetition.wall.as_secs_f64());
                }
                for (b, t) in baselines.time(processes, all_baselines)? {
                    match baseline_times.iter_mut().find(|(known, _)| *known == b) {
                        Some((_, v)) => v.push(t),
                        None => baseline_times.push((b, vec![t])),
                    }
                }
                check_interrupt()?;
            }
            let vs = |b: Baseline, mode_times: &[f64]| {
                baseline_times.iter().find(|(known, _)| *known == b).map(|(_, bt)| versus(bt, mode_times)).unzip()
            };
            let places = super::mpi::nodes_of(processes);
            for (i, ((runner, times), mode)) in runners.into_iter().zip(times).zip(modes).enumerate() {
                let blocks = runner.blocks();
                let memory = WorkersMemory::sum(&runner.finish().0);
                let ratios: Vec<f64> = ideals.iter().zip(&times).map(|(i, t)| i / t).collect();
                let paired = Some((&ratios[..], &ideals[..]));
                let stats = Stats::of(&times);
                let mut r = case(mode.name(), sweep, size, processes, blocks, stats, seq_stats.mean_s, paired, memory);
                (r.vs_numpy, r.vs_numpy_faster_rounds) = vs(Baseline::Numpy, &times);
                (r.vs_joblib, r.vs_joblib_faster_rounds) = vs(Baseline::Joblib, &times);
                r.matches_seq = matches[i];
                if mode.uses_workers() {
                    r.nodes = places.clone();
                    r.bytes_between_ranks_out = between[i].0 / rounds as u64;
                    r.bytes_between_ranks_in = between[i].1 / rounds as u64;
                }
                report(&r);
                all.push(r);
            }
            for (b, times) in &baseline_times {
                let blocks = if *b == Baseline::Joblib { processes } else { 1 };
                let stats = Stats::of(times);
                let r = case(
                    b.name(),
                    sweep,
                    size,
                    processes,
                    blocks,
                    stats,
                    seq_stats.mean_s,
                    None,
                    WorkersMemory::default(),
                );
                report(&r);
                all.push(r);
            }
        }
    }
    Ok(all)
}

/// The median of the paired ratios `num[i] / den[i]`.
fn paired_median(num: &[f64], den: &[f64]) -> f64 {
    let ratios: Vec<f64> = num.iter().zip(den).map(|(n, d)| n / d).collect();
    median(&ratios)
}

/// A mode against a baseline timed in the same rounds: the median of the
/// paired ratios baseline / mode, and the rounds in which the mode took
/// less time.
fn versus(baseline: &[f64], mode: &[f64]) -> (f64, usize) {
    (paired_median(baseline, mode), baseline.iter().zip(mode).filter(|(b, m)| m < b).count())
}

/// The numpy and joblib baselines of one size: A and B written as `.npy`
/// in the run folder, and one driver per thread count, started when first
/// asked for.
struct Baselines<'a> {
    against: Option<&'a Against>,
    files: Option<(PathBuf, PathBuf)>,
    folder: &'a RunFolder,
    expected_sum: f64,
    drivers: Vec<(usize, Driver)>,
}

impl<'a> Baselines<'a> {
    fn new(against: Option<&'a Against>, inputs: &Inputs, folder: &'a RunFolder) -> Result<Baselines<'a>, Error> {
        let mut files = None;
        let mut expected_sum = 0.0;
        if against.is_some() {
            let (a, b) = (folder.file("against-A.npy"), folder.file("against-B.npy"));
            for (path, array) in [(&a, &inputs.a), (&b, &inputs.b)] {
                procjob_worker::npy::write(path, array.dtype(), array.shape(), array.as_bytes()).map_err(|e| {
                    Error::System { what: format!("write {}", path.display()), source: std::io::Error::other(e) }
                })?;
            }
            files = Some((a, b));
            expected_sum = crate::cli::against::product_sum(inputs)?;
        }
        Ok(Baselines { against, files, folder, expected_sum, drivers: Vec::new() })
    }

    /// The baselines asked for (none without `--against`).
    fn all(&self) -> &'static [Baseline] {
        match self.against.map(|a| &a.baselines[..]) {
            Some(b) if b.contains(&Baseline::Joblib) && b.contains(&Baseline::Numpy) => {
                &[Baseline::Numpy, Baseline::Joblib]
            }
            Some(b) if b.contains(&Baseline::Joblib) => &[Baseline::Joblib],
            Some(b) if b.contains(&Baseline::Numpy) => &[Baseline::Numpy],
            _ => &[],
        }
    }

    /// Numpy alone when asked for: what seq runs against.
    fn numpy_only(&self) -> &'static [Baseline] {
        if self.all().contains(&Baseline::Numpy) {
            &[Baseline::Numpy]
        } else {
            &[]
        }
    }

    /// Runs each of `which` once on `threads` threads (or workers), in
    /// order; returns their seconds.
    fn time(&mut self, threads: usize, which: &[Baseline]) -> Result<Vec<(Baseline, f64)>, Error> {
        let (Some(against), Some((a, b))) = (self.against, &self.files) else { return Ok(Vec::new()) };
        if which.is_empty() {
            return Ok(Vec::new());
        }
        let at = match self.drivers.iter().position(|(t, _)| *t == threads) {
            Some(at) => at,
            None => {
                let joblib = against.baselines.contains(&Baseline::Joblib);
                let driver =
                    Driver::start(&against.python, (a, b), threads, joblib, self.folder.path(), self.expected_sum)?;
                self.drivers.push((threads, driver));
                self.drivers.len() - 1
            }
        };
        let driver = &mut self.drivers[at].1;
        which.iter().map(|&b| Ok((b, driver.time(b)?))).collect()
    }
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

#[allow(clippy::too_many_arguments)]
fn case(
    mode: &'static str,
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
        mode,
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
        vs_numpy: None,
        vs_numpy_faster_rounds: None,
        vs_joblib: None,
        vs_joblib_faster_rounds: None,
        matches_seq: None,
        backend: super::mpi::backend(),
        ranks: super::mpi::ranks(),
        nodes: Vec::new(),
        bytes_between_ranks_out: 0,
        bytes_between_ranks_in: 0,
        stats,
    }
}

/// The machine's ideal: threads running the kernel on blocks already in
/// memory, each writing its own rows of a C allocated beforehand, taking
/// blocks as they free up: what the `threads` mode does once its C is handed
/// back, here measured on its own.
struct Ideal<'a> {
    inputs: &'a Inputs,
    /// B packed once, as the modes have it after their first repetition.
    b: PackedB,
    ranges: Vec<Range<usize>>,
    c: Array,
}

impl<'a> Ideal<'a> {
    fn new(inputs: &'a Inputs, ranges: &[Range<usize>]) -> Result<Ideal<'a>, Error> {
        let (m, _, n) = inputs.dims();
        let b = PackedB::owned(&inputs.b)?;
        Ok(Ideal { inputs, b, ranges: ranges.to_vec(), c: crate::matmul::zeros_c(inputs.dtype(), m, n)? })
    }

    fn run(&mut self, threads: usize) -> Result<Duration, Error> {
        let t = Instant::now();
        crate::matmul::multiply_threads_packed_into(self.inputs, &self.b, &self.ranges, threads, &mut self.c)?;
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
