//! The matmul job: `C = A × B` by blocks of A's rows, in every mode.
//!
//! Each mode is a different way for A, B and C to reach the workers, all
//! through the same [`Parallel`] API and the same [`MatmulBlock`] task:
//!
//! - `seq`: the kernel on the whole of A in this process.
//! - `copy`: each task carries its A block and all of B inline (joblib's
//!   `max_nbytes=None`): B crosses the pipe once per task.
//! - `memmap`: A and B are dumped once to the run folder and each task
//!   carries file references; workers map them read-only and send C blocks
//!   back, which are stacked at their row offsets.
//! - `memmap-out`: as memmap, and each task also carries a read-write
//!   reference to its rows of a shared C file; only "done" comes back.
//!
//! In every mode but seq, B reaches the blocks packed once, in the panels
//! the kernel reads (`PackedB`; docs/kernels.md, "B packed once for all
//! blocks"), so that no block packs all of B again.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use procjob_worker::array::{Array, FileId};
use procjob_worker::kernels::Kernel;
pub use procjob_worker::matmul::{not_a_matmul_dtype, MATMUL_DTYPES};
use procjob_worker::matmul::{BPanels, MatmulBlock, MatmulInput, MatmulOutput};
use procjob_worker::protocol::Access;
use procjob_worker::{DType, Element};

use crate::error::Error;
use crate::parallel::Parallel;
use crate::pool::StartMethod;
use crate::pool::WorkerReport;
use crate::run_folder::RunFolder;
use crate::scheduler::{BatchSize, PreDispatch};
use crate::trace::Lane;

/// How A, B and C travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mode {
    /// In this process, no workers.
    Seq,
    /// The same blocks on N threads of this process: the cost of
    /// parallelism without processes.
    Threads,
    /// A block and B inline in every task.
    Copy,
    /// A and B dumped once and mapped; C blocks sent back.
    Memmap,
    /// As memmap, and C written in place into a shared file.
    MemmapOut,
    /// Workers forked after A and B are in memory: they read them
    /// copy-on-write, with no files at all; C blocks are sent back.
    Fork,
}

impl Mode {
    /// Every mode, in the order `--mode all` runs them.
    pub const ALL: [Mode; 6] = [Mode::Seq, Mode::Threads, Mode::Copy, Mode::Memmap, Mode::MemmapOut, Mode::Fork];

    /// The mode's name on the command line and in JSON.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Seq => "seq",
            Mode::Threads => "threads",
            Mode::Copy => "copy",
            Mode::Memmap => "memmap",
            Mode::MemmapOut => "memmap-out",
            Mode::Fork => "fork",
        }
    }

    /// Parses a mode name.
    pub fn from_name(s: &str) -> Option<Mode> {
        Mode::ALL.into_iter().find(|m| m.name() == s)
    }

    /// Whether the mode starts worker processes.
    pub fn uses_workers(self) -> bool {
        !matches!(self, Mode::Seq | Mode::Threads)
    }

    /// Whether C lives in a file of the run folder (copy, memmap,
    /// memmap-out), rather than in this process's memory.
    pub fn c_in_file(self) -> bool {
        matches!(self, Mode::Copy | Mode::Memmap | Mode::MemmapOut)
    }
}

/// Splits `m` rows into `blocks` contiguous ranges as `np.array_split`
/// does: the first `m % blocks` ranges get one row more. Never more ranges
/// than rows (an empty A gives no ranges).
pub fn plan_blocks(m: usize, blocks: usize) -> Vec<Range<usize>> {
    let blocks = blocks.clamp(1, m.max(1)).min(m);
    let (base, extra) = m.checked_div(blocks).map_or((0, 0), |base| (base, m % blocks));
    let mut start = 0;
    (0..blocks)
        .map(|i| {
            let len = base + usize::from(i < extra);
            let r = start..start + len;
            start += len;
            r
        })
        .collect()
}

/// The dtype named `name` if a product is computed for it: `i64`, `f64`
/// or `f32` ([`MATMUL_DTYPES`]); the other [`DType`]s travel and are
/// stored, but are not multiplied.
pub fn dtype_from_name(name: &str) -> Option<DType> {
    MATMUL_DTYPES.into_iter().find(|d| d.name() == name)
}

/// The inputs of a run.
#[derive(Debug, Clone)]
pub struct Inputs {
    /// A (m × k).
    pub a: Array,
    /// B (k × n).
    pub b: Array,
}

impl Inputs {
    /// (m, k, n).
    pub fn dims(&self) -> (usize, usize, usize) {
        (self.a.shape()[0], self.a.shape()[1], self.b.shape()[1])
    }

    /// The element type.
    pub fn dtype(&self) -> DType {
        self.a.dtype()
    }

    /// The deterministic pattern of the CLI contract and the numpy bench:
    /// `A[i,j] = (31·i + 17·j) mod 10`, `B[i,j] = (7·i + 13·j) mod 10`.
    /// Fails, without allocating, when A or B is larger than memory allows.
    pub fn pattern(dtype: DType, m: usize, k: usize, n: usize) -> Result<Inputs, Error> {
        let a = filled("A", dtype, m, k, |i, j| ((31 * i as u64 + 17 * j as u64) % 10) as i64)?;
        let b = filled("B", dtype, k, n, |i, j| ((7 * i as u64 + 13 * j as u64) % 10) as i64)?;
        Ok(Inputs { a, b })
    }

    /// Integers uniform in [0, 10), cast to the dtype, from `seed`.
    pub fn random(dtype: DType, m: usize, k: usize, n: usize, seed: u64) -> Result<Inputs, Error> {
        let mut rng = SplitMix64(seed);
        let a = filled("A", dtype, m, k, |_, _| (rng.next() % 10) as i64)?;
        let b = filled("B", dtype, k, n, |_, _| (rng.next() % 10) as i64)?;
        Ok(Inputs { a, b })
    }
}

/// A `rows × cols` array of zeros, allocated fallibly: a size that
/// overflows, or that memory (or `ulimit -v`) cannot hold, is an error
/// naming `what`, not an abort.
fn zeros(what: &str, dtype: DType, rows: usize, cols: usize) -> Result<Array, Error> {
    Array::try_zeros(dtype, vec![rows, cols]).map_err(|e| Error::OutOfMemory {
        what: format!("{what} ({rows}×{cols} {dtype})"),
        bytes: match e {
            procjob_worker::array::ArrayError::OutOfMemory { bytes, .. } => bytes,
            _ => u64::MAX,
        },
    })
}

/// A `rows × cols` array whose element (i, j) is `f(i, j)`, cast to `dtype`.
fn filled(
    what: &str,
    dtype: DType,
    rows: usize,
    cols: usize,
    mut f: impl FnMut(usize, usize) -> i64,
) -> Result<Array, Error> {
    fn fill<T: Element>(a: &mut Array, cols: usize, mut f: impl FnMut(usize, usize) -> T) -> Result<(), Error> {
        let values = a.as_mut_slice::<T>().map_err(|source| Error::Array { what: "new inputs".into(), source })?;
        for (at, v) in values.iter_mut().enumerate() {
            *v = f(at / cols, at % cols);
        }
        Ok(())
    }
    let mut a = zeros(what, dtype, rows, cols)?;
    match dtype {
        DType::I64 => fill::<i64>(&mut a, cols, f),
        DType::F64 => fill::<f64>(&mut a, cols, |i, j| f(i, j) as f64),
        DType::F32 => fill::<f32>(&mut a, cols, |i, j| f(i, j) as f32),
        other => Err(Error::Config(not_a_matmul_dtype(other))),
    }?;
    Ok(a)
}

/// An `m × n` C of zeros, allocated fallibly (see [`zeros`]).
pub(crate) fn zeros_c(dtype: DType, m: usize, n: usize) -> Result<Array, Error> {
    zeros("C", dtype, m, n)
}

/// A small, fast, seedable generator (Steele et al.'s SplitMix64).
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// Seconds spent in each phase of one repetition.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Phases {
    /// Writing A and B to the run folder.
    pub dump_s: f64,
    /// Starting workers (0 when warm).
    pub spawn_s: f64,
    /// Dispatch until the last block is back, less stacking.
    pub compute_s: f64,
    /// Copying C blocks into place.
    pub collect_s: f64,
}

/// One repetition of one mode (built by the runner: fields may be added).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Repetition {
    /// Wall time as the coordinator sees it.
    pub wall: Duration,
    /// Its phases.
    pub phases: Phases,
    /// Bytes written to workers.
    pub bytes_to_workers: u64,
    /// Bytes read from workers.
    pub bytes_from_workers: u64,
    /// Workers lost during the repetition whose tasks ran again
    /// (`RunSettings::retries`): what each loss would have failed the run
    /// with.
    pub lost: Vec<String>,
}

/// Settings shared by every mode of a run.
#[derive(Debug, Clone)]
pub struct RunSettings {
    /// Worker processes.
    pub processes: usize,
    /// Row blocks (tasks).
    pub blocks: usize,
    /// Parent of the run folder (`None`: the default choice).
    pub temp_folder: Option<PathBuf>,
    /// Repetitions per mode.
    pub repeat: usize,
    /// Re-runs of a task lost to a dead worker.
    pub retries: u32,
    /// Per-task time limit.
    pub timeout: Option<Duration>,
    /// Record a timeline of every phase and task.
    pub trace: bool,
    /// Fork the workers of the copy, memmap and memmap-out modes instead of
    /// re-executing this program (mode fork always forks).
    pub fork: bool,
    /// Told of each block done in the worker modes (`None`: nothing is).
    pub progress: Option<ProgressHook>,
}

impl RunSettings {
    /// `processes` workers (or threads), one block each, one repetition,
    /// the default temp folder, no retries, time limit, trace, fork or
    /// progress bar.
    pub fn with_processes(processes: usize) -> RunSettings {
        RunSettings {
            processes,
            blocks: processes,
            temp_folder: None,
            repeat: 1,
            retries: 0,
            timeout: None,
            trace: false,
            fork: false,
            progress: None,
        }
    }
}

/// The outcome of one mode: every repetition, its workers, and C.
#[derive(Debug)]
pub struct ModeRun {
    /// The mode.
    pub mode: Mode,
    /// Each repetition, in order.
    pub repetitions: Vec<Repetition>,
    /// What each worker did (empty for seq).
    pub workers: Vec<WorkerReport>,
    /// Tasks (row blocks) actually run.
    pub blocks: usize,
    /// Peak RSS of the coordinator during this mode.
    pub coordinator_peak_rss: u64,
    /// The product.
    pub c: Array,
    /// The timeline, when asked for.
    pub trace: crate::trace::Trace,
}

/// Runs one mode `settings.repeat` times on warm workers; the run folder
/// `folder` receives dump files.
pub fn run_mode(mode: Mode, inputs: &Inputs, settings: &RunSettings, folder: &RunFolder) -> Result<ModeRun, Error> {
    reset_peak_rss();
    let mut runner = ModeRunner::new(mode, inputs, settings, folder);
    let mut repetitions = Vec::with_capacity(settings.repeat);
    let mut c = None;
    for _ in 0..settings.repeat.max(1) {
        // The last repetition's C is not needed once the next one starts:
        // it is written over, as numpy's next product reuses freed memory.
        if let Some(old) = c.take() {
            runner.recycle(old);
        }
        let (r, out) = runner.run_once()?;
        repetitions.push(r);
        c = Some(out);
    }
    let blocks = runner.blocks();
    let (workers, trace) = runner.finish();
    Ok(ModeRun {
        mode,
        repetitions,
        workers,
        blocks,
        coordinator_peak_rss: procjob_worker::memory::peak_rss(),
        c: c.expect("at least one repetition"),
        trace,
    })
}

/// One mode, ready to run repetition after repetition on the same warm
/// workers (`procjob bench` interleaves them with other measurements).
pub struct ModeRunner<'a> {
    mode: Mode,
    inputs: &'a Inputs,
    ranges: Vec<Range<usize>>,
    parallel: Parallel,
    folder: &'a RunFolder,
    rep: usize,
    threads: usize,
    progress: Option<ProgressHook>,
    /// The coordinator's own spans (dump, in-process compute), when tracing.
    trace: Option<crate::trace::Trace>,
    /// What this runner's files in the run folder are called after (two
    /// runners of one mode may share a folder).
    name: String,
    /// A and B in the run folder, from the first repetition on (file modes).
    dumped: Option<DumpedInputs>,
    /// B packed for the blocks, from the first repetition on (threads,
    /// copy and fork; the file modes' is in `dumped`).
    packed_b: Option<PackedB>,
    /// The latest repetition's C file (file modes), kept until the next
    /// repetition so that its C can be handed back with it.
    latest_c_file: Option<TempFiles>,
    /// A C handed back by [`recycle`](ModeRunner::recycle), with its file
    /// (file modes): the next repetition writes over it.
    spare_c: Option<(Array, Option<TempFiles>)>,
}

/// What [`ModeRunner::recycle`] did with the C it was handed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recycled {
    /// Kept: the next repetition writes over it.
    Kept,
    /// Dropped: another view or clone of it still exists.
    Shared,
    /// Dropped: not what this runner's next C can be (another shape or
    /// dtype, not the latest repetition's C file or not mapped read-write
    /// in a file mode, a mapped array in an in-memory mode).
    NotThisRunners,
}

impl std::fmt::Debug for ModeRunner<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModeRunner")
            .field("mode", &self.mode)
            .field("blocks", &self.ranges.len())
            .field("repetitions", &self.rep)
            .finish_non_exhaustive()
    }
}

impl<'a> ModeRunner<'a> {
    /// A runner for `mode`; no worker starts until the first repetition.
    pub fn new(mode: Mode, inputs: &'a Inputs, settings: &RunSettings, folder: &'a RunFolder) -> ModeRunner<'a> {
        let (m, _, _) = inputs.dims();
        let mut parallel = Parallel::new()
            .n_jobs(settings.processes as i64)
            .in_process(false)
            .max_nbytes(None)
            .batch_size(BatchSize::Fixed(1))
            .pre_dispatch(PreDispatch::All)
            .retries(settings.retries)
            .trace(settings.trace)
            .start_method(match mode {
                Mode::Fork => StartMethod::Fork { inherit: vec![inputs.a.clone(), inputs.b.clone()] },
                _ if settings.fork => StartMethod::Fork { inherit: Vec::new() },
                _ => StartMethod::Spawn,
            });
        if let Some(t) = settings.timeout {
            parallel = parallel.timeout(t);
        }
        ModeRunner {
            mode,
            inputs,
            ranges: plan_blocks(m, settings.blocks),
            parallel,
            folder,
            rep: 0,
            threads: settings.processes,
            progress: settings.progress.clone(),
            trace: settings.trace.then(crate::trace::Trace::default),
            name: {
                static RUNNERS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
                let id = RUNNERS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                format!("{}-{id}", mode.name())
            },
            dumped: None,
            packed_b: None,
            latest_c_file: None,
            spare_c: None,
        }
    }

    /// Hands back the C of the latest repetition, no longer needed: the
    /// next repetition writes every element of it again instead of taking
    /// fresh pages. Fresh pages cost a page fault and a zeroing each, about
    /// 8 ms per 16 MB on /dev/shm here, where C's pages already mapped cost
    /// nothing; numpy's next product likewise gets the memory its last one
    /// freed from the allocator. In the file modes only the latest
    /// repetition's C qualifies (its file is the one workers open); in the
    /// in-memory modes any unshared owned array of C's shape and dtype does.
    pub fn recycle(&mut self, c: Array) -> Recycled {
        let (m, _, n) = self.inputs.dims();
        if c.shape() != [m, n] || c.dtype() != self.inputs.dtype() {
            return Recycled::NotThisRunners;
        }
        if !c.is_unshared() {
            return Recycled::Shared;
        }
        let file = if self.mode.c_in_file() {
            let Some(file) = self.latest_c_file.take() else { return Recycled::NotThisRunners };
            let read_write = c.file_location().is_some_and(|(_, _, access)| access == Access::ReadWrite);
            if !read_write || !c.mapped_file_id().is_some_and(|id| FileId::of_path(&file.0[0]) == Some(id)) {
                self.latest_c_file = Some(file);
                return Recycled::NotThisRunners;
            }
            Some(file)
        } else if c.is_mapped() {
            return Recycled::NotThisRunners;
        } else {
            None
        };
        self.spare_c = Some((c, file));
        Recycled::Kept
    }

    /// Row blocks (tasks) per repetition: 1 for seq.
    pub fn blocks(&self) -> usize {
        if self.mode == Mode::Seq {
            1
        } else {
            self.ranges.len()
        }
    }

    /// Runs one repetition and returns its figures and C.
    pub fn run_once(&mut self) -> Result<(Repetition, Array), Error> {
        self.rep += 1;
        let start_ns = procjob_worker::clock::monotonic_ns();
        let spare = self.spare_c.take();
        let times = (self.trace.is_some() && self.mode == Mode::Threads).then(BlockTimes::default);
        let (repetition, c, c_file) = match self.mode {
            Mode::Seq => {
                // One block: B packed as the kernel goes, as by any one
                // product.
                let whole = plan_blocks(self.inputs.dims().0, 1);
                run_threads(self.inputs, &PackedB::unpacked(&self.inputs.b), &whole, 1, spare.map(|(c, _)| c), None)
            }
            Mode::Threads => {
                // B packed once for the blocks of every repetition, as the
                // worker modes have it, in the first repetition's time.
                let packing = pack_b_once(&mut self.packed_b, &self.inputs.b)?;
                let b = self.packed_b.as_ref().expect("just packed");
                let spare = spare.map(|(c, _)| c);
                run_threads(self.inputs, b, &self.ranges, self.threads, spare, times.as_ref()).map(|(mut r, c, f)| {
                    r.wall += packing;
                    r.phases.dump_s = packing.as_secs_f64();
                    (r, c, f)
                })
            }
            mode => {
                let bar = self.progress.as_ref().map(|hook| (hook.0)(mode, &self.ranges));
                run_parallel(self, spare, bar)
            }
        }?;
        self.latest_c_file = c_file;
        if let Some(trace) = self.trace.as_mut() {
            let name = self.mode.name();
            let (rep, end_ns) = (self.rep, procjob_worker::clock::monotonic_ns());
            let dump_ns = (repetition.phases.dump_s * 1e9) as u64;
            if dump_ns > 0 {
                let what = match self.mode {
                    Mode::Memmap | Mode::MemmapOut => "dump A and B",
                    _ => "pack B",
                };
                trace.span(Lane::Coordinator, "dump", format!("{name}: {what}"), start_ns, start_ns + dump_ns);
            }
            let category = if self.mode.uses_workers() { "run" } else { "compute" };
            trace.span(Lane::Coordinator, category, format!("{name}: repetition {rep}"), start_ns, end_ns);
            // Threads mode: a lane per thread, a span per block it computed.
            let times = times.map(|t| t.into_inner().unwrap_or_else(std::sync::PoisonError::into_inner));
            for (thread, rows, from, to) in times.unwrap_or_default() {
                let what = format!("compute rows {}..{}", rows.start, rows.end);
                trace.span(Lane::Thread { index: thread }, "compute", what, from, to);
            }
        }
        Ok((repetition, c))
    }

    /// Runs one repetition for its figures only: its C is handed back
    /// ([`recycle`](ModeRunner::recycle)) for the next repetition.
    pub fn time_once(&mut self) -> Result<Repetition, Error> {
        let (repetition, c) = self.run_once()?;
        self.recycle(c);
        Ok(repetition)
    }

    /// Stops the workers and returns what each did, and the timeline.
    pub fn finish(mut self) -> (Vec<WorkerReport>, crate::trace::Trace) {
        let workers = self.parallel.worker_reports();
        let mut trace = self.trace.take().unwrap_or_default();
        trace.extend(self.parallel.take_trace());
        self.parallel.shutdown();
        (workers, trace)
    }
}

/// Resets this process's peak RSS (`VmHWM`) so each mode reports its own.
fn reset_peak_rss() {
    // Linux: writing 5 to clear_refs resets the peak; elsewhere a no-op.
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// The product in this process, on the whole of A.
pub fn multiply_seq(inputs: &Inputs) -> Result<Array, Error> {
    fn typed<T: Kernel>(inputs: &Inputs) -> Result<Array, String> {
        procjob_worker::matmul::multiply::<T>(&inputs.a, &inputs.b)
    }
    match inputs.dtype() {
        DType::I64 => typed::<i64>(inputs),
        DType::F64 => typed::<f64>(inputs),
        DType::F32 => typed::<f32>(inputs),
        other => Err(not_a_matmul_dtype(other)),
    }
    .map_err(Error::Config)
}

/// C = A × B into an existing C (m × n, owned and unshared), with the
/// blocks `ranges` of A's rows computed on `threads` threads of this
/// process (one: the calling thread), each taking the next block when it
/// is done (the same dynamic dispatch as the pool), written straight into
/// their rows of C.
pub fn multiply_threads_into(
    inputs: &Inputs,
    ranges: &[Range<usize>],
    threads: usize,
    c: &mut Array,
) -> Result<(), Error> {
    multiply_threads_timed(inputs, &PackedB::unpacked(&inputs.b), ranges, threads, c, None)
}

/// [`multiply_threads_into`] with `B` packed once beforehand for all the
/// blocks, as the worker modes have it (`procjob bench`'s ideal).
#[cfg(feature = "cli")]
pub(crate) fn multiply_threads_packed_into(
    inputs: &Inputs,
    b: &PackedB,
    ranges: &[Range<usize>],
    threads: usize,
    c: &mut Array,
) -> Result<(), Error> {
    multiply_threads_timed(inputs, b, ranges, threads, c, None)
}

/// Which thread computed which block, from when to when (monotonic ns).
type BlockTimes = std::sync::Mutex<Vec<(usize, Range<usize>, u64, u64)>>;

/// [`multiply_threads_into`], noting each block's thread and times in
/// `times` when given (for the trace).
fn multiply_threads_timed(
    inputs: &Inputs,
    b: &PackedB,
    ranges: &[Range<usize>],
    threads: usize,
    c: &mut Array,
    times: Option<&BlockTimes>,
) -> Result<(), Error> {
    fn typed<T: Kernel>(
        inputs: &Inputs,
        packed: &PackedB,
        ranges: &[Range<usize>],
        threads: usize,
        c: &mut Array,
        times: Option<&BlockTimes>,
    ) -> Result<(), Error> {
        let (m, k, n) = procjob_worker::matmul::check_shapes(&inputs.a, &inputs.b).map_err(Error::Config)?;
        if c.shape() != [m, n] || ranges.iter().any(|r| r.end > m) {
            return Err(Error::Config(format!(
                "C is {:?} and the blocks {ranges:?}, for a {m} × {n} product",
                c.shape()
            )));
        }
        let config = |source| Error::Array { what: "A, B or C as a slice".into(), source };
        let a = inputs.a.as_slice::<T>().map_err(config)?;
        let b = packed.b.as_slice::<T>().map_err(config)?;
        let mut rest = c.as_mut_slice::<T>().map_err(config)?;
        // Hand each block its own rows of C: disjoint &mut slices.
        let mut blocks = Vec::with_capacity(ranges.len());
        for r in ranges {
            let (mine, tail) = std::mem::take(&mut rest).split_at_mut(r.len() * n);
            blocks.push(std::sync::Mutex::new((r.clone(), mine)));
            rest = tail;
        }
        let next = std::sync::atomic::AtomicUsize::new(0);
        let work = |thread: usize| loop {
            let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let Some(block) = blocks.get(i) else { break };
            let mut guard = block.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let (r, c_rows) = &mut *guard;
            let start = procjob_worker::clock::monotonic_ns();
            let a = &a[r.start * k..r.end * k];
            match packed.panels {
                // Packed for this process's kernel, by `PackedB::owned`.
                Some(p) => T::matmul_block_packed(a, b, c_rows, r.len(), k, n, p.width as usize),
                None => procjob_worker::kernels::matmul_block(a, b, c_rows, r.len(), k, n),
            }
            if let Some(times) = times {
                let end = procjob_worker::clock::monotonic_ns();
                times.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push((thread, r.clone(), start, end));
            }
        };
        if threads <= 1 {
            // One thread: this one (seq runs here).
            work(0);
            return Ok(());
        }
        // A thread the system refuses (a process limit such as ulimit -u)
        // fails the run once the threads already started have finished.
        std::thread::scope(|scope| {
            for started in 0..threads {
                let work = &work;
                if let Err(source) = std::thread::Builder::new().spawn_scoped(scope, move || work(started)) {
                    return Err(Error::System {
                        what: format!("start thread {} of {threads} (a process limit such as ulimit -u?)", started + 1),
                        source,
                    });
                }
            }
            Ok(())
        })
    }
    match inputs.dtype() {
        DType::I64 => typed::<i64>(inputs, b, ranges, threads, c, times),
        DType::F64 => typed::<f64>(inputs, b, ranges, threads, c, times),
        DType::F32 => typed::<f32>(inputs, b, ranges, threads, c, times),
        other => Err(Error::Config(not_a_matmul_dtype(other))),
    }
}

/// One repetition in this process (seq is one block on one thread), into
/// the C handed back if there is one.
fn run_threads(
    inputs: &Inputs,
    b: &PackedB,
    ranges: &[Range<usize>],
    threads: usize,
    spare: Option<Array>,
    times: Option<&BlockTimes>,
) -> Result<(Repetition, Array, Option<TempFiles>), Error> {
    let t = Instant::now();
    let mut c = match spare {
        Some(c) => c,
        None => {
            let (m, _, n) = inputs.dims();
            zeros_c(inputs.dtype(), m, n)?
        }
    };
    multiply_threads_timed(inputs, b, ranges, threads, &mut c, times)?;
    let wall = t.elapsed();
    let phases = Phases { compute_s: wall.as_secs_f64(), ..Phases::default() };
    Ok((Repetition { wall, phases, bytes_to_workers: 0, bytes_from_workers: 0, lost: Vec::new() }, c, None))
}

/// One repetition of a worker mode, with the runner's pool, run folder and
/// dumped inputs.
fn run_parallel(
    runner: &mut ModeRunner<'_>,
    spare: Option<(Array, Option<TempFiles>)>,
    mut bar: Option<Box<dyn BlockProgress>>,
) -> Result<(Repetition, Array, Option<TempFiles>), Error> {
    let ModeRunner { mode, inputs, ranges, parallel, folder, rep, name, dumped, packed_b, .. } = runner;
    let (mode, rep) = (*mode, *rep);
    let (m, _, n) = inputs.dims();
    let dtype = inputs.dtype();
    let t0 = Instant::now();
    // B is packed once for all blocks of all repetitions, where the
    // kernel reads panels (`PackedB`). Dump (file modes): inputs not
    // already backed by a file are written once per mode run and mapped,
    // B packed; the user's own .npy files are mapped in place, B as it is.
    let mut packing = Duration::ZERO;
    let (a, b) = match mode {
        Mode::Copy | Mode::Fork => {
            let first = packed_b.is_none();
            packing = pack_b_once(packed_b, &inputs.b)?;
            let b = packed_b.as_ref().expect("just packed").clone();
            // Forked workers inherit A and (packed) B: they travel as
            // references. The pool starts below, after this.
            if mode == Mode::Fork && first {
                let inherit = vec![inputs.a.clone(), b.b.clone()];
                *parallel = std::mem::take(parallel).start_method(StartMethod::Fork { inherit });
            }
            match mode {
                Mode::Copy => (owned(&inputs.a), PackedB { b: owned(&b.b), ..b }),
                _ => (inputs.a.clone(), b),
            }
        }
        // The first repetition dumps A and B; later ones map the same files
        // (the inputs do not change between repetitions), as joblib reuses
        // a dump whose content hash it has seen.
        _ => {
            if dumped.is_none() {
                *dumped = Some(DumpedInputs::write(inputs, folder, name)?);
            }
            let d = dumped.as_ref().expect("just dumped");
            (d.a.clone(), d.b.clone())
        }
    };
    // C is a file-backed array in copy, memmap and memmap-out: in
    // memmap-out the workers write their rows into it; in the other two the
    // coordinator's readers write each returned block straight into its
    // rows as it comes off the pipe (no block-sized buffer, no copy to stack
    // it). Fork stacks C in memory.
    //
    // A C handed back from the last repetition is written over. C's file
    // stays until the repetition after this one (or the runner's end), so
    // that this C can be handed back in turn; a mapping of it outlives the
    // file.
    let (c, c_file) = match spare {
        Some(spare) => spare,
        None if mode == Mode::Fork => (zeros_c(dtype, m, n)?, None),
        None => {
            let path = folder.file(&format!("{name}-C-{rep}.npy"));
            let c = Array::create_npy(&path, dtype, vec![m, n])
                .map_err(|source| Error::Array { what: format!("cannot create C in {}", path.display()), source })?;
            (c, Some(TempFiles(vec![path])))
        }
    };
    // Copy and fork dump nothing, their inputs go through the pipes or are
    // inherited; their first repetition packs B.
    let dump_s = match mode {
        Mode::Copy | Mode::Fork => packing.as_secs_f64(),
        _ => t0.elapsed().as_secs_f64(),
    };
    let spawn_s = parallel.start()?.as_secs_f64();
    let t1 = Instant::now();
    let view = |x: &Array, r: &Range<usize>| {
        x.rows(r.clone()).map_err(|source| Error::Array { what: format!("rows {}..{}", r.start, r.end), source })
    };
    let block_inputs = ranges
        .iter()
        .map(|r| {
            Ok(MatmulInput {
                rows: (r.start as u64, r.end as u64),
                a: view(&a, r)?,
                b: b.b.clone(),
                out: if mode == Mode::MemmapOut { Some(view(&c, r)?) } else { None },
                b_panels: b.panels,
            })
        })
        .collect::<Result<Vec<_>, Error>>()?;
    let mut stack = Duration::ZERO;
    let mut c = c;
    let landing_ranges = ranges.to_vec();
    let results = match mode {
        Mode::MemmapOut | Mode::Fork => parallel.run_unordered::<MatmulBlock, _>(block_inputs)?,
        _ => parallel
            .run_unordered_into::<MatmulBlock, _>(block_inputs, &c, move |i| landing_ranges[i as usize].clone())?,
    };
    let mut blocks = Vec::new();
    for result in results {
        let (index, output) = result?;
        if let Some(bar) = bar.as_mut() {
            bar.block_done(ranges[index as usize].len());
        }
        blocks.push((index, output));
    }
    if let Some(bar) = bar {
        bar.finish();
    }
    // A block that landed in place is a view of C, dropped here; anything
    // else (a block of another shape than its rows) is copied, or refused.
    let foreign: Vec<(u64, Array)> = blocks
        .into_iter()
        .filter_map(|(index, output)| match output {
            MatmulOutput::Block(block) if block.storage_id() != c.storage_id() => Some((index, block)),
            _ => None,
        })
        .collect();
    for (index, block) in foreign {
        let t = Instant::now();
        place_rows(&mut c, &block, index, &ranges[index as usize], n)?;
        stack += t.elapsed();
    }
    let collect = stack;
    let wall = t0.elapsed();
    let traffic = parallel.last_call().traffic;
    let compute_s = t1.elapsed().as_secs_f64() - collect.as_secs_f64();
    let phases = Phases { dump_s, spawn_s, compute_s, collect_s: collect.as_secs_f64() };
    Ok((
        Repetition {
            wall,
            phases,
            bytes_to_workers: traffic.bytes_to_workers,
            bytes_from_workers: traffic.bytes_from_workers,
            lost: parallel.last_call().lost.clone(),
        },
        c,
        c_file,
    ))
}

/// Whether to keep a packed copy of B of `bytes` in memory, with `available`
/// bytes available to the system: not if it would take more than half of
/// them, where packing block by block, as before, risks no out-of-memory
/// kill for a copy that only saves time (unknown: yes).
fn worth_a_packed_copy(bytes: u64, available: Option<u64>) -> bool {
    available.is_none_or(|available| bytes <= available / 2)
}

/// Packs B for the blocks into `packed` unless it is there already (the
/// first repetition of threads, copy and fork); how long that took.
fn pack_b_once(packed: &mut Option<PackedB>, b: &Array) -> Result<Duration, Error> {
    if packed.is_some() {
        return Ok(Duration::ZERO);
    }
    let t = Instant::now();
    *packed = Some(PackedB::owned(b)?);
    Ok(t.elapsed())
}

/// Told how one repetition of a worker mode progresses, block by block
/// (the CLI draws a progress bar from it).
pub trait BlockProgress {
    /// A block of `rows` rows is done.
    fn block_done(&mut self, rows: usize);
    /// The repetition is over.
    fn finish(self: Box<Self>);
}

/// What makes a [`BlockProgress`] from a mode and its blocks of rows.
pub type MakeProgress = dyn Fn(Mode, &[Range<usize>]) -> Box<dyn BlockProgress> + Send + Sync;

/// Makes a [`BlockProgress`] for each repetition of a mode, given the mode
/// and its blocks of rows.
#[derive(Clone)]
pub struct ProgressHook(pub std::sync::Arc<MakeProgress>);

impl std::fmt::Debug for ProgressHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ProgressHook")
    }
}

/// Files of a runner in the run folder, unlinked on drop (missing ones
/// are fine).
struct TempFiles(Vec<PathBuf>);

/// A and B as dumped to the run folder and mapped, kept for the mode's
/// later repetitions; the files go when this is dropped.
struct DumpedInputs {
    a: Array,
    b: PackedB,
    _files: TempFiles,
}

/// B as the blocks get it: packed once for every block of the product in
/// the panels this process's kernel reads (`f64` and `f32` on CPUs with
/// AVX2 and FMA: `procjob_worker::kernels::pack_b`), so that no block
/// packs it again; else its rows.
#[derive(Clone)]
pub(crate) struct PackedB {
    b: Array,
    panels: Option<BPanels>,
}

impl PackedB {
    /// B as it is.
    pub(crate) fn unpacked(b: &Array) -> PackedB {
        PackedB { b: b.clone(), panels: None }
    }

    /// `b` packed into an array of its own, or as it is when this
    /// process's kernel does not read packed panels, or when a packed copy
    /// beside B would take more than half of the memory the system has
    /// available ([`worth_a_packed_copy`]): then each block packs B as it
    /// goes, in a buffer of a few MiB, as before.
    pub(crate) fn owned(b: &Array) -> Result<PackedB, Error> {
        fn typed<T: Kernel>(b: &Array, (k, n, panels): (usize, usize, BPanels)) -> Result<PackedB, Error> {
            let bytes = (k as u64).saturating_mul(wide(panels) as u64).saturating_mul(T::DTYPE.size() as u64);
            if !worth_a_packed_copy(bytes, procjob_worker::memory::available()) {
                return Ok(PackedB::unpacked(b));
            }
            let mut packed = zeros("B packed for the blocks", T::DTYPE, k, wide(panels))?;
            let dst = packed.as_mut_slice::<T>().map_err(as_slice)?;
            procjob_worker::kernels::pack_b::<T>(
                b.as_slice::<T>().map_err(as_slice)?,
                k,
                n,
                panels.width as usize,
                dst,
            );
            Ok(PackedB { b: packed, panels: Some(panels) })
        }
        match (b.dtype(), PackedB::layout(b)) {
            (DType::F64, Some(layout)) => typed::<f64>(b, layout),
            (DType::F32, Some(layout)) => typed::<f32>(b, layout),
            _ => Ok(PackedB::unpacked(b)),
        }
    }

    /// `b` packed into a new `.npy` file at `path`, mapped read-only, or
    /// copied into it as it is when this process's kernel does not read
    /// packed panels. Packed part by part into memory and written out in
    /// order: packing straight into the new file's shared pages faulted
    /// them in one by one, and all of it in memory first is another `B`.
    fn in_file(b: &Array, path: &Path) -> Result<PackedB, Error> {
        fn typed<T: Kernel>(b: &Array, path: &Path, (k, n, panels): (usize, usize, BPanels)) -> Result<(), Error> {
            use std::os::unix::fs::FileExt;
            let what = || format!("cannot write {}", path.display());
            let (file, header) = procjob_worker::npy::create(path, T::DTYPE, &[k, wide(panels)])
                .map_err(|e| Error::Array { what: what(), source: e.into() })?;
            let depth = procjob_worker::kernels::PACKED_B_DEPTH;
            let mut part = zeros("a part of B packed for the blocks", T::DTYPE, depth.min(k), wide(panels))?;
            let src = b.as_slice::<T>().map_err(as_slice)?;
            for pc in (0..k).step_by(depth) {
                let len = depth.min(k - pc) * wide(panels);
                let dst = &mut part.as_mut_slice::<T>().map_err(as_slice)?[..len];
                procjob_worker::kernels::pack_b_part::<T>(src, k, n, panels.width as usize, pc, dst);
                let size = T::DTYPE.size();
                let at = (header.data_offset + pc * wide(panels) * size) as u64;
                file.write_all_at(&part.as_bytes()[..len * size], at)
                    .map_err(|source| Error::System { what: what(), source })?;
            }
            Ok(())
        }
        let layout = PackedB::layout(b);
        match (b.dtype(), layout) {
            (DType::F64, Some(layout)) => typed::<f64>(b, path, layout)?,
            (DType::F32, Some(layout)) => typed::<f32>(b, path, layout)?,
            _ => return Ok(PackedB::unpacked(&mapped(b, path)?)),
        }
        let b = Array::open_npy(path, Access::ReadOnly)
            .map_err(|source| Error::Array { what: format!("cannot map {}", path.display()), source })?;
        Ok(PackedB { b, panels: layout.map(|(_, _, panels)| panels) })
    }

    /// `b`'s rows and columns and the panels this process's kernel packs
    /// it in, if it does (`f64` and `f32`, `procjob_worker::kernels::Kernel::b_panel_width`).
    fn layout(b: &Array) -> Option<(usize, usize, BPanels)> {
        let width = match b.dtype() {
            DType::F64 => f64::b_panel_width(),
            DType::F32 => f32::b_panel_width(),
            _ => None,
        }?;
        let &[k, n] = b.shape() else { return None };
        n.checked_next_multiple_of(width)?;
        Some((k, n, BPanels { n: n as u64, width: width as u64 }))
    }
}

impl DumpedInputs {
    /// Writes A and B (those not already backed by a file; B packed) at the
    /// same time, on two threads: writing to tmpfs is bound by one core's
    /// page allocation and copying.
    fn write(inputs: &Inputs, folder: &RunFolder, name: &str) -> Result<DumpedInputs, Error> {
        let files = TempFiles(vec![folder.file(&format!("{name}-A.npy")), folder.file(&format!("{name}-B.npy"))]);
        // B mapped in place as it is, else written to its file, packed
        // where the kernel reads panels.
        let write_b = || {
            if inputs.b.is_mapped() {
                Ok(PackedB::unpacked(&inputs.b))
            } else {
                PackedB::in_file(&inputs.b, &files.0[1])
            }
        };
        let (a, b) = std::thread::scope(|scope| {
            // Without a second thread (a process limit), one after the other.
            let b = std::thread::Builder::new().spawn_scoped(scope, write_b);
            let a = mapped(&inputs.a, &files.0[0]);
            let b = match b {
                Ok(b) => b.join().unwrap_or_else(|_| Err(Error::Internal("the thread writing B panicked".into()))),
                Err(_) => write_b(),
            };
            Ok::<_, Error>((a?, b?))
        })?;
        Ok(DumpedInputs { a, b, _files: files })
    }
}

impl Drop for TempFiles {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Copies a C block into C at row `start` ("stacking").
fn place_rows(c: &mut Array, block: &Array, index: u64, rows: &Range<usize>, n: usize) -> Result<(), Error> {
    let start = rows.start;
    let size = c.dtype().size();
    let bytes = block.as_bytes();
    // Exactly the block's rows: a shorter block would leave rows of C as
    // they were (a handed-back C holds the last repetition's values there).
    let fits = block.dtype() == c.dtype() && block.shape() == [rows.len(), n];
    let dst = c_bytes_mut(c)?;
    let at = start * n * size;
    let end = at + bytes.len();
    if end > dst.len() || !fits {
        return Err(Error::Codec {
            task: crate::error::TaskId { index, description: Some(format!("rows {}..{}", rows.start, rows.end)) },
            reason: format!(
                "a worker returned a {} block of shape {:?} that does not fit C",
                block.dtype(),
                block.shape()
            ),
        });
    }
    dst[at..end].copy_from_slice(bytes);
    Ok(())
}

fn c_bytes_mut(c: &mut Array) -> Result<&mut [u8], Error> {
    c.as_bytes_mut().map_err(|source| Error::Array { what: "C".into(), source })
}

/// The columns of a `B` packed in `panels`, rounded up to whole panels
/// (`PackedB::layout` checked that they fit).
fn wide(panels: BPanels) -> usize {
    (panels.n as usize).next_multiple_of(panels.width as usize)
}

/// An array that is not of the type asked for, as an error.
fn as_slice(source: procjob_worker::array::ArrayError) -> Error {
    Error::Array { what: "B as a slice".into(), source }
}

fn owned(a: &Array) -> Array {
    if a.is_mapped() {
        a.to_owned_array()
    } else {
        a.clone()
    }
}

fn mapped(a: &Array, path: &Path) -> Result<Array, Error> {
    if a.is_mapped() {
        return Ok(a.clone());
    }
    let what = |verb: &str| format!("cannot {verb} {}", path.display());
    a.save_npy(path).map_err(|source| Error::Array { what: what("write"), source })?;
    Array::open_npy(path, Access::ReadOnly).map_err(|source| Error::Array { what: what("map"), source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_packed_copy_of_b_leaves_half_the_memory_free() {
        let gib = 1u64 << 30;
        assert!(worth_a_packed_copy(gib, Some(2 * gib)));
        assert!(!worth_a_packed_copy(gib + 1, Some(2 * gib)));
        assert!(!worth_a_packed_copy(1, Some(0)));
        assert!(worth_a_packed_copy(u64::MAX, None));
        // This machine: a small B is packed, one larger than all its
        // memory is not.
        let available = procjob_worker::memory::available();
        assert!(worth_a_packed_copy(1 << 20, available) || available.is_some_and(|a| a < 2 << 20));
        assert!(available.is_none() || !worth_a_packed_copy(u64::MAX, available));
    }

    #[test]
    fn the_b_file_holds_b_packed_for_this_machine() {
        use procjob_worker::kernels::{pack_b, packed_b_len};
        let (k, n) = (300, 37); // two depth parts, panels not all whole
        let folder = RunFolder::create(None, 0).unwrap();
        for dtype in [DType::F64, DType::I64] {
            let inputs = Inputs::random(dtype, 5, k, n, 3).unwrap();
            let dumped = DumpedInputs::write(&inputs, &folder, &dtype.to_string()).unwrap();
            assert!(dumped.b.b.is_mapped(), "{dtype}: B is not its file");
            match (dtype, f64::b_panel_width()) {
                (DType::F64, Some(width)) => {
                    assert_eq!(dumped.b.panels, Some(BPanels { n: n as u64, width: width as u64 }));
                    let mut want = vec![0.0; packed_b_len(k, n, width).unwrap()];
                    pack_b(inputs.b.as_slice::<f64>().unwrap(), k, n, width, &mut want);
                    let got = dumped.b.b.as_slice::<f64>().unwrap();
                    assert!(got.iter().map(|x| x.to_bits()).eq(want.iter().map(|x| x.to_bits())), "{dtype}");
                }
                _ => {
                    assert_eq!(dumped.b.panels, None, "{dtype}");
                    assert_eq!(dumped.b.b, inputs.b, "{dtype}: B as it is");
                }
            }
        }
    }

    #[test]
    fn blocks_split_like_array_split() {
        assert_eq!(plan_blocks(7, 3), vec![0..3, 3..5, 5..7]);
        assert_eq!(plan_blocks(2, 4), vec![0..1, 1..2]);
        assert_eq!(plan_blocks(0, 3), Vec::<Range<usize>>::new());
        assert_eq!(plan_blocks(10, 1), vec![0..10]);
        let r = plan_blocks(1000, 7);
        assert_eq!(r.len(), 7);
        assert_eq!(r.last().unwrap().end, 1000);
    }

    #[test]
    fn pattern_matches_the_shared_bench_definition() {
        let inputs = Inputs::pattern(DType::I64, 3, 4, 2).unwrap();
        let a = inputs.a.as_slice::<i64>().unwrap();
        assert_eq!(a[4 + 1], (31 + 17) % 10);
        let b = inputs.b.as_slice::<i64>().unwrap();
        assert_eq!(b[2 * 2 + 1], (7 * 2 + 13) % 10);
    }

    #[test]
    fn inputs_too_large_for_memory_are_an_error_not_an_abort() {
        // 2^31 × 2^31 f64 overflows nothing in usize but no machine holds it.
        let err = Inputs::pattern(DType::F64, 1 << 31, 1 << 31, 1).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, Error::OutOfMemory { .. }), "{msg}");
        assert!(msg.contains("A (2147483648×2147483648 f64)") && msg.contains("PiB"), "{msg}");
        // A product that overflows usize.
        let err = Inputs::random(DType::I64, usize::MAX, 2, 1, 0).unwrap_err();
        assert!(matches!(err, Error::OutOfMemory { .. }), "{err}");
    }

    #[test]
    fn random_inputs_are_seeded_digits() {
        let x = Inputs::random(DType::I64, 20, 20, 20, 7).unwrap();
        let y = Inputs::random(DType::I64, 20, 20, 20, 7).unwrap();
        let z = Inputs::random(DType::I64, 20, 20, 20, 8).unwrap();
        assert_eq!(x.a, y.a);
        assert_ne!(x.a, z.a);
        assert!(x.a.as_slice::<i64>().unwrap().iter().all(|v| (0..10).contains(v)));
    }
}
