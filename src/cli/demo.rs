//! `procjob demo`: the guided tour.
//!
//! Runs the real modes of the matmul job through [`matmul::run_mode`] (the
//! same code as `procjob matmul`) and narrates each with the figures of the
//! run it just did: the temp folder and the files written into it, each
//! worker's pid, the bytes of one task descriptor next to the bytes of the
//! B it would otherwise carry, each worker's memory in each mode, the
//! speedups; then the classic warning case, a B of a single column, where
//! the work is too small for worker processes to pay off. No figure on the
//! screen is written in the source: `--size` and `--processes` change them
//! all. Prose is wrapped for an 80-column terminal.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use procjob_worker::DType;

use crate::error::Error;
use crate::matmul::{self, Inputs, Mode, ModeRun, Phases, RunSettings};
use crate::pool::WorkerReport;
use crate::run_folder::{human_bytes, RunFolder};
use crate::trace::{Lane, Trace};

use super::load::{CpuClock, Load};

/// Columns of wrapped prose; no line printed is wider than 80.
const WIDTH: usize = 78;

/// The modes of the tour, in order; seq first, as the baseline.
const DEMO_MODES: [Mode; 6] = [Mode::Seq, Mode::Threads, Mode::Copy, Mode::Memmap, Mode::MemmapOut, Mode::Fork];

/// What `procjob demo` runs.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// n of the n×n · n×n product (and of the n×n · n×1 warning case).
    pub size: usize,
    /// Worker processes (and threads, for mode `threads`).
    pub processes: usize,
    /// Element type.
    pub dtype: DType,
    /// Parent of the run folder (`None`: the default choice).
    pub temp_folder: Option<PathBuf>,
    /// Timed runs of each mode on warm workers, after the cold first one.
    pub repeat: usize,
}

/// The median of some timings, with their smallest and largest.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Spread {
    median: f64,
    min: f64,
    max: f64,
    /// How many timings.
    runs: usize,
}

impl Spread {
    fn of(times: &[f64]) -> Spread {
        let mut sorted = times.to_vec();
        sorted.sort_by(f64::total_cmp);
        match (sorted.first(), sorted.last()) {
            (Some(&min), Some(&max)) => Spread { median: sorted[(sorted.len() - 1) / 2], min, max, runs: sorted.len() },
            _ => Spread { median: 0.0, min: 0.0, max: 0.0, runs: 0 },
        }
    }

    /// Whether two sets of timings overlap: the difference between their
    /// medians is then within the noise, a tie.
    fn ties(&self, other: &Spread) -> bool {
        self.min <= other.max && other.min <= self.max
    }

    /// "112.3–140.2 ms".
    fn range_text(&self) -> String {
        let (lo, hi) = (secs(self.min), secs(self.max));
        match (lo.rsplit_once(' '), hi.rsplit_once(' ')) {
            (Some((l, lu)), Some((h, hu))) if lu == hu => format!("{l}–{h} {hu}"),
            _ => format!("{lo}–{hi}"),
        }
    }
}

/// One mode's figures, kept after its C has been checked and dropped.
struct Measured {
    mode: Mode,
    /// The first run, on workers started for it (and files written for it).
    cold_s: f64,
    cold_phases: Phases,
    /// The runs after it, on the same warm workers.
    warm: Spread,
    /// Phases of the warm run whose wall is the median.
    warm_phases: Phases,
    /// Which repetition that is (0 is the cold one).
    median_rep: usize,
    to_workers: u64,
    from_workers: u64,
    blocks: usize,
    workers: Vec<WorkerReport>,
    coordinator_rss: u64,
    same_as_seq: bool,
    trace: Trace,
}

impl Measured {
    fn of(run: ModeRun, seq_c: Option<&procjob_worker::Array>) -> Measured {
        let walls: Vec<f64> = run.repetitions.iter().map(|r| r.wall.as_secs_f64()).collect();
        let warm_walls = if walls.len() > 1 { &walls[1..] } else { &walls[..] };
        let warm = Spread::of(warm_walls);
        let median_rep =
            (if walls.len() > 1 { 1 } else { 0 }) + warm_walls.iter().position(|&w| w == warm.median).unwrap_or(0);
        let cold = &run.repetitions[0];
        let median = &run.repetitions[median_rep];
        Measured {
            mode: run.mode,
            cold_s: walls[0],
            cold_phases: cold.phases,
            warm,
            warm_phases: median.phases,
            median_rep,
            to_workers: median.bytes_to_workers,
            from_workers: median.bytes_from_workers,
            blocks: run.blocks,
            same_as_seq: seq_c.is_none_or(|c| *c == run.c),
            workers: run.workers,
            coordinator_rss: run.coordinator_peak_rss,
            trace: run.trace,
        }
    }

    /// The median warm wall time.
    fn wall_s(&self) -> f64 {
        self.warm.median
    }

    /// The coordinator's window of repetition `rep` (0: the cold one).
    fn window(&self, rep: usize) -> Option<(u64, u64)> {
        let category = if self.mode.uses_workers() { "run" } else { "compute" };
        let mut runs: Vec<&crate::trace::Span> = self
            .trace
            .spans
            .iter()
            .filter(|sp| sp.lane == Lane::Coordinator && sp.category == category && sp.name.contains("repetition"))
            .collect();
        runs.sort_by_key(|sp| sp.start_ns);
        runs.get(rep).map(|sp| (sp.start_ns, sp.end_ns))
    }

    /// The spans of `category` on `lane` (any worker when `None`) that
    /// started in repetition `rep`.
    fn spans_in(&self, rep: usize, lane: Option<Lane>, category: &str) -> Vec<&crate::trace::Span> {
        let Some((from, to)) = self.window(rep) else { return Vec::new() };
        let mut spans: Vec<_> = self
            .trace
            .spans
            .iter()
            .filter(|sp| sp.category == category && (from..=to).contains(&sp.start_ns))
            .filter(|sp| match lane {
                Some(lane) => sp.lane == lane,
                None => matches!(sp.lane, Lane::Worker { .. }),
            })
            .collect();
        spans.sort_by_key(|sp| sp.start_ns);
        spans
    }

    /// The longest task computed by a worker in the median warm run.
    fn longest_compute_s(&self) -> Option<f64> {
        self.spans_in(self.median_rep, None, "compute").into_iter().map(dur_s).max_by(f64::total_cmp)
    }
}

/// Runs the tour, writing it to `out`.
pub fn run(opts: &DemoOptions, out: &mut dyn Write) -> Result<(), Error> {
    if opts.size == 0 {
        return Err(Error::Config("--size 0: the demo needs at least a 1×1 matrix".into()));
    }
    if opts.processes == 0 {
        return Err(Error::Config("--processes 0: at least one worker process is needed".into()));
    }
    if opts.repeat == 0 {
        return Err(Error::Config("--repeat 0: each mode needs at least one timed run".into()));
    }
    let (n, p, dtype) = (opts.size, opts.processes, opts.dtype);
    let item = dtype.size() as u64;
    let matrix_bytes = (n * n) as u64 * item;
    // Room: the demo's own look at A and B, then each file mode's dumps
    // (two sets while warm workers keep the previous maps) and a C file.
    let needed = 4 * matrix_bytes + matrix_bytes + 64 * 1024;
    let folder = RunFolder::create(opts.temp_folder.as_deref(), needed)?;
    let inputs = Inputs::pattern(dtype, n, n, n)?;
    let settings = RunSettings {
        temp_folder: opts.temp_folder.clone(),
        trace: true,
        repeat: 1 + opts.repeat,
        ..RunSettings::with_processes(p)
    };
    let mut s = Screen { out, section: 0 };
    let cpus = crate::pool::available_cpus();

    // How busy the machine is just before the timing starts.
    let before = CpuClock::now();
    std::thread::sleep(std::time::Duration::from_millis(200));
    let load_before = Load::since(before);
    intro(&mut s, &inputs, p, opts.repeat);
    if let Some(line) = load_before.and_then(|l| l.busy_line(cpus)) {
        s.blank();
        s.para(&line);
    }
    temp_folder(&mut s, opts, &folder, &inputs)?;

    let timing = CpuClock::now();
    let mut seq_c = None;
    let mut runs: Vec<Measured> = Vec::new();
    for mode in DEMO_MODES {
        check_interrupt()?;
        let run = matmul::run_mode(mode, &inputs, &settings, &folder)?;
        let c = if mode == Mode::Seq { Some(run.c.clone()) } else { None };
        let measured = Measured::of(run, seq_c.as_ref());
        if let Some(c) = c {
            seq_c = Some(c);
        }
        narrate_mode(&mut s, &measured, &runs, &inputs, p, &folder);
        runs.push(measured);
    }
    drop(seq_c);
    let load = Load::since(timing);

    side_by_side(&mut s, &runs, p, load.as_ref(), cpus);
    ceiling(&mut s, &runs, p, load.as_ref());
    memory(&mut s, &runs, &inputs, p);
    check_interrupt()?;
    warning_case(&mut s, &settings, &folder, n, dtype)?;
    next_steps(&mut s, n, p);
    Ok(())
}

fn check_interrupt() -> Result<(), Error> {
    match crate::signals::received() {
        Some(signal) => Err(Error::Interrupted { signal }),
        None => Ok(()),
    }
}

// ---------------------------------------------------------------------------
// The sections.

fn intro(s: &mut Screen, inputs: &Inputs, p: usize, repeat: usize) {
    let (m, k, n) = inputs.dims();
    let dtype = inputs.dtype();
    let title = "procjob demo: C = A × B on worker processes, a guided tour";
    s.line(title);
    s.line(&"═".repeat(title.chars().count()));
    s.para(&format!(
        "This tour computes C = A × B for two {m}×{n} matrices of {} in {} \
         ways and shows what each way did and what it cost. It is joblib's \
         classic example: split A's rows into blocks, hand each block to a \
         worker process, and put the blocks of C back together. Every figure \
         below was measured in this run; --size and --processes change them.",
        describe_dtype(dtype),
        DEMO_MODES.len()
    ));
    s.blank();
    s.line(&format!(
        "  A: {m}×{k} {dtype} = {} bytes ({})",
        grouped(inputs.a.nbytes() as u64),
        human_bytes(inputs.a.nbytes() as u64)
    ));
    s.line(&format!(
        "  B: {k}×{n} {dtype} = {} bytes ({})",
        grouped(inputs.b.nbytes() as u64),
        human_bytes(inputs.b.nbytes() as u64)
    ));
    s.line(&format!("  work: 2·m·k·n = {} {}", grouped(work(m, k, n)), ops_word(dtype)));
    s.para(&format!(
        "(A is m×k and B is k×n: here m = {m}, k = {k}, n = {n}. Each of C's \
         m·n numbers takes k multiplications and k additions: 2·m·k·n in all.)"
    ));
    let ranges = matmul::plan_blocks(m, p);
    let shown: Vec<String> = ranges.iter().take(4).map(|r| format!("{}..{}", r.start, r.end)).collect();
    let more = if ranges.len() > shown.len() { ", …" } else { "" };
    s.line(&format!("  blocks: {} (rows {}{more}), one task each", ranges.len(), shown.join(", ")));
    let cpus = crate::pool::available_cpus();
    s.line(&format!("  workers: {p} processes; this machine lets procjob use {cpus} CPU{}", plural(cpus)));
    if p > cpus {
        s.para(&format!(
            "(More processes than CPUs: the {p} workers take turns on {cpus} CPU{}, so they \
             cannot all compute at once.)",
            plural(cpus)
        ));
    }
    s.blank();
    s.para(&format!(
        "How it is timed: each mode runs once cold (its worker processes started \
         and its files written for that run), then {repeat} more time{} on the \
         same, warm workers. A mode's time is the median of its warm runs, shown \
         with their spread, fastest–slowest. When two modes' spreads overlap, \
         the difference between them is noise: a tie, not a win.",
        plural(repeat)
    ));
}

fn temp_folder(s: &mut Screen, opts: &DemoOptions, folder: &RunFolder, inputs: &Inputs) -> Result<(), Error> {
    s.heading("The temp folder, and the files that go in it");
    let path = folder.path();
    let mode = folder_mode(path);
    s.para("procjob made a private folder for this run:");
    s.line(&format!("  {}", path.display()));
    s.line(&format!("  {} ({mode:04o}: only your user can enter it)", permissions_text(mode, true)));
    let parent = path.parent().unwrap_or(Path::new("/"));
    let why = if opts.temp_folder.is_some() {
        "You chose its parent with --temp-folder.".to_string()
    } else if std::env::var_os(crate::run_folder::TEMP_FOLDER_ENV).is_some_and(|v| !v.is_empty()) {
        format!("Its parent comes from {}.", crate::run_folder::TEMP_FOLDER_ENV)
    } else if parent == Path::new("/dev/shm") {
        format!(
            "/dev/shm is a filesystem kept in memory (tmpfs), with {} free: a file there \
             is RAM with a name, so writing one costs no disk I/O.",
            crate::run_folder::free_bytes(parent).map_or("an unknown amount".into(), human_bytes)
        )
    } else {
        let shm = crate::run_folder::free_bytes(Path::new("/dev/shm"))
            .map_or("it is missing here".to_string(), |f| format!("it has {} free", human_bytes(f)));
        format!(
            "It is in the system temp folder, not in /dev/shm (memory), which procjob \
             uses only with plenty of room: {shm}."
        )
    };
    s.para(&why);
    s.blank();
    s.para(
        "The memmap modes write A and B into this folder as .npy files, the format \
         of numpy.save, so that every worker can map them. The demo writes them \
         once now so you can look:",
    );
    let t = Instant::now();
    let files = [("A.npy", &inputs.a), ("B.npy", &inputs.b)];
    for (name, array) in files {
        let path = folder.file(name);
        array
            .save_npy(&path)
            .map_err(|source| Error::Array { what: format!("cannot write {}", path.display()), source })?;
    }
    let write_s = t.elapsed().as_secs_f64();
    let mut written = 0u64;
    let mut listing: Vec<(String, u64, u32)> = std::fs::read_dir(path)
        .map_err(|source| Error::System { what: format!("list {}", path.display()), source })?
        .flatten()
        .filter(|e| e.file_name() != crate::run_folder::LOCK_FILE)
        .filter_map(|e| {
            let meta = e.metadata().ok()?;
            Some((e.file_name().to_string_lossy().into_owned(), meta.len(), file_mode(&meta)))
        })
        .collect();
    listing.sort();
    s.blank();
    for (name, len, mode) in &listing {
        written += len;
        s.line(&format!("  {}  {:>15} bytes  {name}", permissions_text(*mode, false), grouped(*len)));
    }
    s.blank();
    let data = inputs.a.nbytes() as u64;
    if let Some((_, len, _)) = listing.iter().find(|(name, _, _)| name == "A.npy") {
        let header = len.saturating_sub(data);
        let (m, k, _) = inputs.dims();
        s.para(&format!(
            "Each is a {header}-byte header, then the raw numbers: A.npy is {header} + \
             {m}×{k}×{} = {} bytes. The header is plain text:",
            inputs.dtype().size(),
            grouped(*len)
        ));
        if let Some(text) = npy_header_text(&folder.file("A.npy")) {
            s.line(&format!("  {text}"));
        }
    }
    s.para(&format!(
        "Writing both took {} ({}/s). Python reads them as they are: \
         numpy.load('A.npy', mmap_mode='r'). The demo removes its two files now; \
         each file mode below writes its own and removes them when it ends.",
        secs(write_s),
        human_bytes(per_second(written, write_s))
    ));
    for (name, _) in files {
        let _ = std::fs::remove_file(folder.file(name));
    }
    Ok(())
}

/// Narrates one mode's run: what the mode is, what its workers did, what
/// crossed the pipes, and what that shows.
fn narrate_mode(s: &mut Screen, r: &Measured, earlier: &[Measured], inputs: &Inputs, p: usize, folder: &RunFolder) {
    let (m, k, n) = inputs.dims();
    let seq = earlier.first().map_or(r.warm, |seq| seq.warm);
    let b_bytes = inputs.b.nbytes() as u64;
    introduce_mode(s, r, p);
    s.blank();
    if r.mode.uses_workers() {
        report_workers(s, r);
        report_traffic(s, r, earlier, inputs);
        s.blank();
        picture(s, r, inputs);
        s.blank();
        let sends = r.spans_in(r.median_rep, Some(Lane::Coordinator), "send");
        if let Some(send) = sends.into_iter().map(dur_s).max_by(f64::total_cmp) {
            s.line(&format!("  the slowest send (writing one task into a pipe): {}", secs(send)));
        }
        let left = std::fs::read_dir(folder.path())
            .map_or(0, |d| d.flatten().filter(|e| e.file_name() != crate::run_folder::LOCK_FILE).count());
        s.line(&format!("  files left in the temp folder: {left}"));
    }
    timings(s, r, &seq, rate(m, k, n, r.wall_s()), inputs.dtype());
    if r.mode != Mode::Seq {
        s.line(&format!("  C is identical to seq's, byte for byte: {}", yes_no(r.same_as_seq)));
    }
    if r.mode.uses_workers() {
        s.blank();
        conclude_mode(s, r, earlier, b_bytes);
    }
}

/// A mode's cold run, and its warm median with the spread, against seq.
fn timings(s: &mut Screen, r: &Measured, seq: &Spread, rate_here: f64, dtype: DType) {
    let cold_what = if r.mode.uses_workers() { "starting its workers included" } else { "C's pages touched first" };
    s.line(&format!("  cold run: {} ({cold_what})", secs(r.cold_s)));
    s.line(&format!(
        "  warm runs: median {}, spread {} over {} run{}",
        secs(r.wall_s()),
        r.warm.range_text(),
        r.warm.runs,
        plural(r.warm.runs)
    ));
    if r.mode == Mode::Seq {
        s.line(&format!("  speed: {:.2} {}", rate_here, rate_unit(dtype)));
    } else {
        s.line(&format!("  against seq: {}", versus_seq(seq, &r.warm)));
    }
}

/// What the mode is.
fn introduce_mode(s: &mut Screen, r: &Measured, p: usize) {
    match r.mode {
        Mode::Seq => {
            s.heading("seq: one process, one core");
            s.para(
                "The whole product in this process, with the same matmul routine \
                 (GEMM, for GEneral Matrix Multiply) the workers use. This is the \
                 baseline every speedup below is measured against.",
            );
        }
        Mode::Threads => {
            s.heading("threads: the same blocks on threads of this process");
            s.para(&format!(
                "The {} blocks on {} threads of this one process. Threads share their \
                 process's memory, so A, B and C are not copied, written or sent \
                 anywhere: no data moves, though the threads still share the \
                 machine's memory bandwidth and caches. numpy can do this too: \
                 np.dot releases the GIL (the lock that lets one thread at a time \
                 run Python code), so joblib's prefer=\"threads\" runs it on several \
                 cores. Plain Python code holds the GIL, which is why joblib runs \
                 Python on worker processes.",
                r.blocks, p
            ));
        }
        Mode::Copy => {
            s.heading("copy: worker processes, data through the pipes");
            s.para(
                "A process is a running program with its own private memory: \
                 nothing in this process is visible to a worker. procjob spawns its \
                 workers: it starts this same program afresh, in worker mode, as \
                 loky starts a fresh Python (how a worker is made is its start \
                 method: spawn here, fork in the last mode). So each task travels \
                 through a pipe (a one-way stream of bytes that the operating \
                 system's kernel copies from one process to another) carrying its \
                 rows of A and the whole of B. Its block of C comes back the same \
                 way, or, from 4 MiB on, the worker says where the block lies in \
                 its memory and this process copies it from there in one system \
                 call (process_vm_readv: a parent may read its child's memory). \
                 This is joblib with max_nbytes=None.",
            );
        }
        Mode::Memmap => {
            s.heading("memmap: worker processes, data through files");
            s.para(
                "A and B are written to .npy files in the temp folder (a copy too, \
                 into the files), and each task carries only a descriptor: its \
                 rows, and for A and B a file path, dtype, shape and byte offset. \
                 Each worker memory-maps the files: the kernel makes the file's \
                 pages (the 4 KiB units in which it manages memory) appear in the \
                 worker's memory, and every process that maps the same file uses \
                 the same physical pages. B exists once, however many workers read \
                 it. C is a file in the temp folder too, but only this process \
                 maps it: each worker sends its block of C back as in copy (through \
                 its pipe, or copied out of its memory), and the block is written \
                 into C's file. This is what joblib does with arrays over \
                 max_nbytes.",
            );
        }
        Mode::MemmapOut => {
            s.heading("memmap-out: workers write C in place");
            s.para(
                "As memmap, and the workers map C's file as well: each task also \
                 carries a reference to its rows of C in that file, mapped \
                 read-write, and the worker writes its results straight into them. Only a short \
                 \"done\" comes back through the pipe. (In joblib: an output array \
                 made with numpy.memmap and handed to the workers.)",
            );
        }
        Mode::Fork => {
            s.heading("fork: workers that inherit A and B");
            s.para(
                "The workers are made with fork(): the new process gets a duplicate \
                 of this process's address space, A and B included, but the pages \
                 behind it are not copied. Parent and child share every page until \
                 one of them writes to it; only then is that page copied \
                 (copy-on-write). The tasks carry neither data nor file names, only \
                 which inherited array and which rows; the blocks of C come back \
                 into this process's memory as in copy. This is Python's \
                 multiprocessing with the \"fork\" start method.",
            );
        }
    }
}

/// The workers started, and what each computed, cold and warm.
fn report_workers(s: &mut Screen, r: &Measured) {
    let workers = r.workers.len();
    let pids: Vec<String> = r.workers.iter().map(|w| w.pid.to_string()).collect();
    if matches!(r.mode, Mode::Memmap | Mode::MemmapOut) && r.cold_phases.dump_s > 0.0 {
        s.line(&format!("  wrote A and B to the temp folder in {} (cold run only)", secs(r.cold_phases.dump_s)));
    }
    s.line(&format!(
        "  started {workers} worker{} in {}: pid{} {}",
        plural(workers),
        secs(r.cold_phases.spawn_s),
        plural(workers),
        pids.join(", ")
    ));
    s.line(&format!("  {:<50}{:>12}{:>12}", "GEMM on each task's rows, in its worker:", "cold", "warm"));
    for w in &r.workers {
        let lane = Lane::Worker { index: w.index, pid: w.pid };
        let cold = r.spans_in(0, Some(lane), "compute");
        let warm = r.spans_in(r.median_rep, Some(lane), "compute");
        if cold.is_empty() && warm.is_empty() {
            s.line(&format!("    worker {} (pid {}): no task (more workers than blocks)", w.index, w.pid));
        }
        for (i, span) in cold.iter().enumerate() {
            let task = span.name.trim_start_matches("compute ");
            let warm_s = warm.get(i).map_or(String::new(), |sp| secs(dur_s(sp)));
            let who = format!("worker {}: {task}", w.index);
            s.line(&format!("    {who:<48}{:>12}{:>12}", secs(dur_s(span)), warm_s));
        }
    }
}

/// The bytes that went each way (through the pipes, and result blocks
/// copied out of the workers' memory), against copy's and B's.
fn report_traffic(s: &mut Screen, r: &Measured, earlier: &[Measured], inputs: &Inputs) {
    let (a_bytes, b_bytes) = (inputs.a.nbytes() as u64, inputs.b.nbytes() as u64);
    let c_bytes = c_bytes(inputs);
    let blocks = r.blocks as u64;
    let per_task = r.to_workers as f64 / r.blocks.max(1) as f64;
    let back_framing = if r.mode == Mode::MemmapOut { r.from_workers } else { r.from_workers.saturating_sub(c_bytes) };
    if r.mode == Mode::Copy {
        let framing = r.to_workers.saturating_sub(a_bytes + blocks * b_bytes);
        s.line(&format!(
            "  to workers:   {:>15} bytes ({}) for {} task{}",
            grouped(r.to_workers),
            human_bytes(r.to_workers),
            r.blocks,
            plural(r.blocks)
        ));
        s.line(&format!(
            "    = A, split in rows ({}) + B × {} ({} each) + framing ({})",
            grouped(a_bytes),
            r.blocks,
            grouped(b_bytes),
            grouped(framing)
        ));
        s.line(&format!("  from workers: {:>15} bytes", grouped(r.from_workers)));
        s.line(&format!("    = the blocks of C ({}) + framing ({})", grouped(c_bytes), grouped(back_framing)));
        s.para(
            "  (framing: the few bytes around each message, its length and what it \
             is, that tell the reader where one message ends and the next begins)",
        );
    } else {
        s.line(&format!("  one task descriptor:    {:>15} bytes (framing included)", grouped(per_task.round() as u64)));
        if let Some(copy) = earlier.iter().find(|e| e.mode == Mode::Copy) {
            let copy_task = copy.to_workers as f64 / copy.blocks.max(1) as f64;
            s.line(&format!(
                "  one task in copy mode:  {:>15} bytes (rows of A and all of B)",
                grouped(copy_task.round() as u64)
            ));
        }
        s.line(&format!(
            "  B alone:                {:>15} bytes ({} the descriptor)",
            grouped(b_bytes),
            ratio_text(b_bytes as f64 / per_task.max(1.0))
        ));
        let back = if r.mode == Mode::MemmapOut {
            "\"done\" only".to_string()
        } else {
            format!("C ({}) + framing ({})", grouped(c_bytes), grouped(back_framing))
        };
        s.line(&format!("  to workers in all:      {:>15} bytes for {} tasks", grouped(r.to_workers), r.blocks));
        s.line(&format!("  from workers in all:    {:>15} bytes: {back}", grouped(r.from_workers)));
    }
}

/// The processes, pipes and files of one warm run, with the bytes that
/// went each way, as a picture.
fn picture(s: &mut Screen, r: &Measured, inputs: &Inputs) {
    let window = r.window(r.median_rep);
    let in_window = |at: u64| window.is_some_and(|(from, to)| (from..=to).contains(&at));
    let (a_bytes, b_bytes) = (inputs.a.nbytes() as u64, inputs.b.nbytes() as u64);
    s.line(&format!("  the picture, one warm run (pid {} is this process):", std::process::id()));
    s.line("  coordinator: holds A and B, and puts C together");
    for w in &r.workers {
        let lane = Lane::Worker { index: w.index, pid: w.pid };
        let flows = |to_worker: bool| {
            r.trace
                .flows
                .iter()
                .filter(move |f| if to_worker { f.to.0 == lane } else { f.from.0 == lane })
                .filter(|f| in_window(f.from.1))
        };
        let (to, back) = (flows(true).map(|f| f.bytes).sum::<u64>(), flows(false).map(|f| f.bytes).sum::<u64>());
        let lent: u64 = flows(false).map(|f| f.lent).sum();
        let what_in = match r.mode {
            Mode::Copy => "rows of A + all of B",
            _ => "a descriptor",
        };
        let what_back = if r.mode == Mode::MemmapOut { "\"done\"" } else { "its rows of C" };
        s.line(&format!(
            "    ├── pipe ─{:─>16} B ─▶ worker {} (pid {}): {what_in}",
            format!(" {}", grouped(to)),
            w.index,
            w.pid
        ));
        match lent {
            0 => s.line(&format!("    │   ◀─{:─>16} B ── pipe back: {what_back}", format!(" {}", grouped(back)))),
            lent => {
                s.line(&format!("    │   ◀─{:─>16} B ── back: {what_back},", format!(" {}", grouped(back))));
                s.line(&format!("    │        {} B of them copied out of its memory, not the pipe", grouped(lent)));
            }
        }
    }
    let workers: Vec<String> = r.workers.iter().map(|w| w.index.to_string()).collect();
    let workers = format!("worker{} {}", plural(workers.len()), workers.join(", "));
    match r.mode {
        Mode::Copy => {
            s.line("    └── A and B went through the pipes; C's blocks land in C's file,");
            s.line("        which only this process maps");
        }
        Mode::Memmap => {
            s.line(&format!("    └── wrote {} B (cold run) ─▶ [A.npy B.npy]", grouped(a_bytes + b_bytes)));
            s.line(&format!("            mapped read-only by {workers}: one copy in RAM"));
            s.line("        C's blocks land in C's file, which only this process maps");
        }
        Mode::MemmapOut => {
            s.line(&format!("    └── wrote {} B (cold run) ─▶ [A.npy B.npy]", grouped(a_bytes + b_bytes)));
            s.line(&format!("            mapped read-only by {workers}"));
            s.line(&format!("        [C.npy, {} B] mapped read-write by {workers}", grouped(c_bytes(inputs))));
            s.line("            and read by the coordinator: C never crosses a pipe");
        }
        Mode::Fork => {
            s.line(&format!("    └── fork(): A and B's pages shared with {workers},"));
            s.line("            copied only if written (copy-on-write): 0 B moved;");
            s.line("        C is in this process's memory, no file");
        }
        Mode::Seq | Mode::Threads => {}
    }
}

/// What this mode's figures show, against the modes before it.
fn conclude_mode(s: &mut Screen, r: &Measured, earlier: &[Measured], b_bytes: u64) {
    match r.mode {
        Mode::Copy => s.para(&format!(
            "Each task carried its rows of A and all {} bytes of B: B crossed the \
             pipes {} time{}, once per task, and each worker holds its own copy.",
            grouped(b_bytes),
            r.blocks,
            plural(r.blocks)
        )),
        Mode::Memmap => s.para(&format!(
            "The pipes carried {} bytes to the workers instead of copy's {}. That \
             does not mean nothing was copied: writing A and B to the files, {} \
             in the cold run, is a copy too, and the blocks of C are still \
             copied back into this process.",
            grouped(r.to_workers),
            earlier.iter().find(|e| e.mode == Mode::Copy).map_or("–".into(), |c| grouped(c.to_workers)),
            secs(r.cold_phases.dump_s)
        )),
        Mode::MemmapOut => {
            let memmap_back = earlier.iter().find(|e| e.mode == Mode::Memmap).map(|e| e.from_workers);
            s.para(&format!(
                "Nothing large crosses a pipe in either direction: {} bytes came \
                 back{}.",
                grouped(r.from_workers),
                memmap_back.map_or(String::new(), |b| format!(", against memmap's {}", grouped(b)))
            ));
        }
        Mode::Fork => {
            let spawned: Vec<String> = earlier
                .iter()
                .filter(|e| e.mode.uses_workers())
                .map(|e| format!("{} {}", e.mode.name(), secs(e.cold_phases.spawn_s)))
                .collect();
            s.para(&format!(
                "No file was written and no array crossed a pipe on the way in. \
                 Starting the workers took {} here; spawning them took {}. One \
                 start per mode is too few to call a winner: fork skips starting \
                 the program afresh, but duplicates the address space of this \
                 process, which holds A, B and C. For scale: loky, joblib's \
                 backend, spawns Python and imports numpy in each worker, about \
                 0.3–0.6 s for a first call with 2 workers.",
                secs(r.cold_phases.spawn_s),
                spawned.join(", ")
            ));
        }
        _ => {}
    }
}

fn side_by_side(s: &mut Screen, runs: &[Measured], p: usize, load: Option<&Load>, cpus: usize) {
    s.heading("Side by side");
    if let Some(line) = load.and_then(|l| l.busy_line(cpus)) {
        s.para(&line);
        s.blank();
    }
    s.line(&format!(
        "{:<11}{:>9}{:>10}  {:<16}{:>8}{:>10}{:>10}",
        "mode", "cold", "warm", "spread", "speedup", "to wkrs", "from wkrs"
    ));
    let seq = runs[0].warm;
    for r in runs {
        s.line(&format!(
            "{:<11}{:>9}{:>10}  {:<16}{:>8}{:>10}{:>10}",
            r.mode.name(),
            secs(r.cold_s),
            secs(r.wall_s()),
            r.warm.range_text(),
            format!("{:.2}×", speedup(seq.median, r.wall_s())),
            human_bytes(r.to_workers),
            human_bytes(r.from_workers),
        ));
    }
    s.blank();
    s.para(&format!(
        "warm: the median of {} warm runs; spread: their fastest–slowest; \
         speedup = seq's warm median ÷ the mode's, above 1.00× is faster than seq. \
         With {p} worker{} the most to hope for is {p}.00×.",
        seq.runs,
        plural(p)
    ));
    let ties: Vec<&str> = runs.iter().skip(1).filter(|r| r.warm.ties(&seq)).map(|r| r.mode.name()).collect();
    let faster: Vec<&str> =
        runs.iter().skip(1).filter(|r| !r.warm.ties(&seq) && r.wall_s() < seq.median).map(|r| r.mode.name()).collect();
    let slower: Vec<&str> =
        runs.iter().skip(1).filter(|r| !r.warm.ties(&seq) && r.wall_s() > seq.median).map(|r| r.mode.name()).collect();
    let mut verdict = Vec::new();
    if !faster.is_empty() {
        verdict.push(format!("faster than seq beyond the noise: {}", faster.join(", ")));
    }
    if !ties.is_empty() {
        verdict.push(format!("a tie with seq (spreads overlap): {}", ties.join(", ")));
    }
    if !slower.is_empty() {
        verdict.push(format!("slower than seq beyond the noise: {}", slower.join(", ")));
    }
    s.blank();
    s.para(&format!("{}.", verdict.join("; ")));
    s.blank();
    let process_runs: Vec<&Measured> = runs.iter().filter(|r| r.mode.uses_workers()).collect();
    let list = |f: fn(&Phases) -> f64, only_files: bool| {
        process_runs
            .iter()
            .filter(|r| !only_files || matches!(r.mode, Mode::Memmap | Mode::MemmapOut))
            .map(|r| format!("{} {}", r.mode.name(), secs(f(&r.cold_phases))))
            .collect::<Vec<_>>()
            .join(", ")
    };
    s.para(&format!(
        "The cold run of each process mode includes starting its workers ({}) \
         and, for the file modes, writing A and B ({}); the warm runs pay \
         neither. Threads never do.",
        list(|ph| ph.spawn_s, false),
        list(|ph| ph.dump_s, true)
    ));
}

/// One process mode's warm median run, split into the part that shrinks
/// with more workers (GEMM) and the rest.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Split {
    wall: f64,
    /// The slowest worker's GEMM: the part more workers would shrink.
    longest_compute: f64,
    /// seq's whole time ÷ the workers.
    share: f64,
    /// seq's warm median.
    seq: f64,
    workers: usize,
}

impl Split {
    /// What does not shrink with more workers: sending tasks, mapping,
    /// replies, putting C together.
    fn rest(&self) -> f64 {
        (self.wall - self.longest_compute).max(0.0)
    }

    /// The share of the serial part in a one-worker run: rest ÷ (rest + seq).
    fn serial_fraction(&self) -> f64 {
        let total = self.rest() + self.seq;
        if total > 0.0 {
            self.rest() / total
        } else {
            0.0
        }
    }

    /// Amdahl's law: 1 ÷ (f + (1 − f) ÷ N).
    fn amdahl(&self) -> f64 {
        let f = self.serial_fraction();
        1.0 / (f + (1.0 - f) / self.workers.max(1) as f64)
    }

    /// The slowest worker's GEMM against its share of seq's time.
    fn compute_ratio(&self) -> f64 {
        if self.share > 0.0 {
            self.longest_compute / self.share
        } else {
            0.0
        }
    }
}

/// The three reasons a speedup stays below N, each said with this run's
/// numbers, and each only as far as those numbers bear it out.
fn ceiling_reasons(name: &str, split: &Split, load: Option<&Load>) -> String {
    let mut text = format!(
        "Why, with {name}'s numbers. Amdahl's law: a part that does not shrink \
         caps the speedup. Here the rest was {} of a one-worker run of {} (seq \
         plus the rest): a serial fraction of {:.0}%, which caps {} workers at \
         {:.2}×, however fast they compute.",
        secs(split.rest()),
        secs(split.rest() + split.seq),
        split.serial_fraction() * 100.0,
        split.workers,
        split.amdahl()
    );
    if split.compute_ratio() > 1.1 {
        text.push_str(&format!(
            " Shared memory and caches: the cores share the memory bandwidth and \
             the caches, so each worker's GEMM runs slower than seq's did alone; \
             the slowest took {}, {} its share of seq's time ({}).",
            secs(split.longest_compute),
            ratio_text(split.compute_ratio()),
            secs(split.share)
        ));
    } else {
        text.push_str(&format!(
            " The workers' GEMM did not slow down here: the slowest took {}, \
             within its share of seq's time ({}).",
            secs(split.longest_compute),
            secs(split.share)
        ));
    }
    match load {
        Some(load) if load.busy() => text.push_str(&format!(
            " Other load: other programs used {:.1} CPUs while this ran, time \
             the workers could not have.",
            load.others_cpus
        )),
        Some(_) => text.push_str(" Other load: hardly any in this run; other programs took little CPU."),
        None => {}
    }
    text
}

/// Why a process mode lost to seq, from its split; `None` when it did not
/// lose.
fn why_it_lost(name: &str, split: &Split) -> Option<String> {
    if split.wall <= split.seq {
        return None;
    }
    let rest = split.rest();
    let excess = (split.longest_compute - split.share).max(0.0);
    let saving = split.seq - split.share;
    Some(if rest >= excess {
        let beyond = if rest >= saving {
            format!(
                ", more than the {} that {} workers could save at best (seq {} − seq ÷ {} = {})",
                secs(saving),
                split.workers,
                secs(split.seq),
                split.workers,
                secs(split.share)
            )
        } else {
            String::new()
        };
        format!(
            "{name} lost to seq mostly to its fixed part: {} of sending, mapping, \
             replies and putting C together{beyond}; its GEMM took {} beyond its \
             share of seq's time.",
            secs(rest),
            secs(excess)
        )
    } else {
        format!(
            "{name} lost to seq mostly in GEMM itself: its slowest task took {} \
             where its share of seq's time is {} ({} as long), while its fixed part \
             was {}. The workers ran slower than seq did alone: they share the \
             memory bandwidth, the caches and the CPUs with each other and with \
             whatever else runs.",
            secs(split.longest_compute),
            secs(split.share),
            ratio_text(split.compute_ratio()),
            secs(rest)
        )
    })
}

fn ceiling(s: &mut Screen, runs: &[Measured], p: usize, load: Option<&Load>) {
    s.heading(&format!("Why {p} CPUs give less than {p}×"));
    let seq = runs[0].wall_s();
    let splits: Vec<(&Measured, Split)> = runs
        .iter()
        .filter(|r| r.mode.uses_workers())
        .filter_map(|r| {
            let longest_compute = r.longest_compute_s()?;
            let workers = r.workers.len().min(r.blocks).max(1);
            Some((r, Split { wall: r.wall_s(), longest_compute, share: seq / workers as f64, seq, workers }))
        })
        .collect();
    let Some((_, first)) = splits.first() else {
        s.para("No worker timings were recorded in this run.");
        return;
    };
    s.para(&format!(
        "Split each process mode's warm median run in two: the slowest worker's \
         GEMM, the part that more workers would shrink, and the rest, which does \
         not shrink: sending tasks, mapping files, replies, putting C together. \
         Compare the GEMM with seq's time divided among the workers, seq ÷ {} = {}.",
        first.workers,
        secs(first.share)
    ));
    s.blank();
    s.line(&format!(
        "{:<11}{:>10}{:>10}{:>10}{:>10}{:>9}{:>9}",
        "mode", "warm", "GEMM", "the rest", "seq ÷ N", "Amdahl", "speedup"
    ));
    for (r, split) in &splits {
        s.line(&format!(
            "{:<11}{:>10}{:>10}{:>10}{:>10}{:>9}{:>9}",
            r.mode.name(),
            secs(split.wall),
            secs(split.longest_compute),
            secs(split.rest()),
            secs(split.share),
            format!("{:.2}×", split.amdahl()),
            format!("{:.2}×", speedup(split.seq, split.wall))
        ));
    }
    s.blank();
    let best = splits.iter().max_by(|a, b| speedup(seq, a.1.wall).total_cmp(&speedup(seq, b.1.wall)));
    if let Some((r, split)) = best {
        s.para(&ceiling_reasons(r.mode.name(), split, load));
    }
    let above: Vec<&str> = splits
        .iter()
        .filter(|(_, split)| speedup(seq, split.wall) > split.amdahl())
        .map(|(r, _)| r.mode.name())
        .collect();
    if !above.is_empty() {
        s.blank();
        s.para(&format!(
            "Above its cap: {}. A cap cannot be beaten; seq's own timing is what \
             moved: its warm runs spread over {}, and the cap and the speedup \
             both rest on its median.",
            above.join(", "),
            runs[0].warm.range_text()
        ));
    }
    for (r, split) in &splits {
        if !r.warm.ties(&runs[0].warm) {
            if let Some(text) = why_it_lost(r.mode.name(), split) {
                s.blank();
                s.para(&text);
            }
        }
    }
}

fn memory(s: &mut Screen, runs: &[Measured], inputs: &Inputs, p: usize) {
    s.heading("Memory: what each worker held");
    s.para(
        "Each worker reads its own memory figures from /proc/self after its task, \
         while the task's data is still alive:",
    );
    s.line("  RSS  every page the process has in RAM, shared pages included");
    s.line("  USS  its private pages only: what would be freed if it exited");
    s.line("  PSS  USS plus its equal share of each shared page");
    s.para(
        "The total, the memory a mode's workers take together, is the sum of \
         their PSS: a page shared by three processes counts a third in each. \
         Summed RSS counts it three times; summed USS not at all.",
    );
    s.blank();
    s.line(&format!("  {:<11}{:>7}{:>9}{:>13}{:>12}{:>12}", "mode", "worker", "pid", "peak RSS", "USS", "PSS"));
    let mut sums: Vec<(Mode, u64)> = Vec::new();
    for r in runs.iter().filter(|r| r.mode.uses_workers()) {
        for (i, w) in r.workers.iter().enumerate() {
            let name = if i == 0 { r.mode.name() } else { "" };
            s.line(&format!(
                "  {:<11}{:>7}{:>9}{:>13}{:>12}{:>12}",
                name,
                w.index,
                w.pid,
                human_bytes(w.peak.peak_rss),
                human_bytes(w.peak.uss),
                human_bytes(w.peak.pss)
            ));
        }
        sums.push((r.mode, r.workers.iter().map(|w| w.peak.uss).sum()));
    }
    for r in runs.iter().filter(|r| !r.mode.uses_workers()) {
        s.line(&format!(
            "  {:<11}  (no workers: this process peaked at {} RSS)",
            r.mode.name(),
            human_bytes(r.coordinator_rss)
        ));
    }
    s.blank();
    let uss_of = |mode: Mode| sums.iter().find(|(m, _)| *m == mode).map(|(_, u)| *u);
    let b = inputs.b.nbytes() as u64;
    if let (Some(copy), Some(memmap)) = (uss_of(Mode::Copy), uss_of(Mode::Memmap)) {
        let workers = runs.iter().find(|r| r.mode == Mode::Copy).map_or(p, |r| r.workers.len());
        let base = runs
            .iter()
            .filter(|r| r.mode.uses_workers())
            .flat_map(|r| r.workers.iter().map(|w| w.peak.peak_rss))
            .min()
            .unwrap_or(0);
        if copy > memmap {
            s.para(&format!(
                "In copy, each of the {workers} workers received its own copy of B \
                 ({} each, {} in all); in memmap they all mapped the one B in the \
                 temp folder. The workers' USS added up to {} in copy and {} in \
                 memmap: {} more private memory for copying.",
                human_bytes(b),
                human_bytes(b * workers as u64),
                human_bytes(copy),
                human_bytes(memmap),
                human_bytes(copy - memmap)
            ));
        } else {
            s.para(&format!(
                "In copy, each of the {workers} workers received its own copy of B \
                 ({} each); in memmap they all mapped the one B. At this size the \
                 difference is lost among each worker's own code and buffers (the \
                 smallest worker here had {} in RAM): the workers' USS added up to \
                 {} in copy and {} in memmap. Try a larger --size.",
                human_bytes(b),
                human_bytes(base),
                human_bytes(copy),
                human_bytes(memmap)
            ));
        }
    }
    if let Some(fork) = runs.iter().find(|r| r.mode == Mode::Fork) {
        let fork_uss: u64 = fork.workers.iter().map(|w| w.peak.uss).sum();
        s.blank();
        s.para(&format!(
            "fork's workers never received A or B: the pages they read are this \
             process's own, shared copy-on-write, so they count in each worker's \
             RSS but not in its USS. Their USS added up to {}: what each worker \
             wrote itself, its block of C and its buffers.",
            human_bytes(fork_uss)
        ));
        let coordinator = runs.iter().map(|r| r.coordinator_rss).max().unwrap_or(0);
        if let Some(w) = fork.workers.first() {
            if let Some(note) = fork_row_note(w.peak.peak_rss, w.peak.uss, w.peak.pss, coordinator, fork.workers.len())
            {
                s.blank();
                s.para(&note);
            }
        }
    }
    s.blank();
    s.para(
        "A page of a shared file counts as private (USS) while only one process \
         maps it: a worker's own rows of A do, the B that every worker reads does \
         not. That is why RSS, which counts B in every worker, overstates the \
         total, and PSS does not.",
    );
}

/// Why a forked worker's RSS and PSS are large while its USS is small,
/// said only when its PSS is what sharing the rest among the coordinator
/// and the workers predicts (within a fifth).
fn fork_row_note(rss: u64, uss: u64, pss: u64, coordinator_rss: u64, workers: usize) -> Option<String> {
    let sharers = workers as u64 + 1;
    let shared = rss.saturating_sub(uss);
    let predicted = uss + shared / sharers;
    let off = (pss as f64 - predicted as f64).abs() / (predicted.max(1) as f64);
    (off <= 0.2 && shared > uss).then(|| {
        format!(
            "Reading fork's row: a forked worker starts with every page of this \
             process mapped, shared, so its RSS ({}) is close to this process's \
             own (it peaked at {}). Of that, {} is its own (USS) and {} shared \
             with this process and the other worker{}: {} processes in all. PSS \
             gives each of them an equal share: {} + {} ÷ {} = {}, against the \
             {} measured.",
            human_bytes(rss),
            human_bytes(coordinator_rss),
            human_bytes(uss),
            human_bytes(shared),
            plural(workers.saturating_sub(1)),
            sharers,
            human_bytes(uss),
            human_bytes(shared),
            sharers,
            human_bytes(predicted),
            human_bytes(pss)
        )
    })
}

fn warning_case(
    s: &mut Screen,
    settings: &RunSettings,
    folder: &RunFolder,
    n: usize,
    dtype: DType,
) -> Result<(), Error> {
    s.heading("When parallel loses: B with a single column");
    let inputs = Inputs::pattern(dtype, n, n, 1)?;
    let (m, k, cols) = inputs.dims();
    let big = work(m, k, m);
    let small = work(m, k, cols);
    s.para(&format!(
        "Now B is {k}×{cols}: one column. A is still {m}×{k}, so the file modes \
         still write {} of A, start workers and send tasks, but the work drops \
         from {} to {} {}.",
        human_bytes(inputs.a.nbytes() as u64),
        grouped(big),
        grouped(small),
        ops_word(dtype)
    ));
    let measure = |mode: Mode, seq_c: Option<&procjob_worker::Array>| -> Result<Measured, Error> {
        check_interrupt()?;
        Ok(Measured::of(matmul::run_mode(mode, &inputs, settings, folder)?, seq_c))
    };
    let seq_run = matmul::run_mode(Mode::Seq, &inputs, settings, folder)?;
    let seq_c = seq_run.c.clone();
    let seq = Measured::of(seq_run, None);
    let threads = measure(Mode::Threads, Some(&seq_c))?;
    let memmap = measure(Mode::Memmap, Some(&seq_c))?;
    drop(seq_c);
    let same = threads.same_as_seq && memmap.same_as_seq;
    s.blank();
    s.line(&format!("  {:<15}{:>10}  {:<17}  {}", "", "warm", "spread", "speed of seq's"));
    for r in [&seq, &threads, &memmap] {
        let against = if r.mode == Mode::Seq { String::new() } else { short_versus(&seq.warm, &r.warm) };
        s.line(&format!("  {:<15}{:>10}  {:<17}  {against}", r.mode.name(), secs(r.wall_s()), r.warm.range_text()));
    }
    s.line(&format!(
        "  {:<15}{:>10}  {:<17}  {}",
        "memmap, cold",
        secs(memmap.cold_s),
        "(one run)",
        short_versus(&seq.warm, &Spread::of(&[memmap.cold_s]))
    ));
    s.line(&format!("  C identical in all three: {}", yes_no(same)));
    s.line("  (cold: workers started and A written in the run; warm: the runs after it)");
    s.blank();
    s.line(&format!("  {:<36}{:>10}{:>10}", "where memmap's time went:", "cold", "warm"));
    let (cold, warm) = (&memmap.cold_phases, &memmap.warm_phases);
    let row = |label: &str, f: fn(&Phases) -> f64| format!("    {label:<34}{:>10}{:>10}", secs(f(cold)), secs(f(warm)));
    s.line(&row("writing A and B to files", |ph| ph.dump_s));
    let workers = memmap.workers.len();
    s.line(&row(&format!("starting {workers} worker{}", plural(workers)), |ph| ph.spawn_s));
    s.line(&row("tasks: send, map, compute, reply", |ph| ph.compute_s + ph.collect_s));
    let longest = |rep: usize| memmap.spans_in(rep, None, "compute").into_iter().map(dur_s).max_by(f64::total_cmp);
    let (cold_compute, warm_compute) = (longest(0), longest(memmap.median_rep).filter(|_| memmap.median_rep > 0));
    if let Some(c) = cold_compute {
        s.line(&format!(
            "    {:<34}{:>10}{:>10}",
            "of which the longest GEMM",
            secs(c),
            warm_compute.map_or(String::new(), secs)
        ));
    }
    s.blank();
    let seq_s = seq.wall_s();
    if memmap.cold_s > seq_s {
        let still = if memmap.warm.ties(&seq.warm) {
            ", and level with it (a tie within the spreads) once its workers were running".to_string()
        } else if memmap.wall_s() > seq_s {
            format!(
                ", and still {} slower with its workers already running",
                ratio_text(memmap.wall_s() / seq_s.max(1e-9))
            )
        } else {
            format!(", though {} with its workers already running", versus_seq(&seq.warm, &memmap.warm))
        };
        s.para(&format!(
            "memmap's cold run was {} slower than seq{still}. The work itself is \
             small: seq did all of it in {}. What memmap adds are fixed costs \
             that do not shrink with the work: writing A to a file ({}), starting \
             processes ({}), and a round trip through the pipes for every task. \
             Parallel pays only when each task computes for much longer than that.",
            ratio_text(memmap.cold_s / seq_s.max(1e-9)),
            secs(seq_s),
            secs(cold.dump_s),
            secs(cold.spawn_s)
        ));
    } else {
        s.para(&format!(
            "This time memmap's cold run was not slower than seq ({} against {}). \
             The fixed costs above hardly depend on the work; with a smaller \
             --size they outweigh it.",
            secs(memmap.cold_s),
            secs(seq_s)
        ));
    }
    let share = seq_s / memmap.blocks.max(1) as f64;
    for note in [cold_start_note(cold_compute, warm_compute), slow_gemm_note(warm_compute, share, memmap.blocks)]
        .into_iter()
        .flatten()
    {
        s.blank();
        s.para(&note);
    }
    s.blank();
    s.para(
        "joblib behaves the same with many tiny delayed() calls, and the cures are \
         the same: give each task more work (fewer, larger blocks; joblib's \
         batch_size), keep the workers alive between calls (joblib: `with \
         Parallel(...) as parallel:`), or stay sequential.",
    );
    Ok(())
}

/// GEMM clearly slower in the cold run than in a warm one (by a fifth or
/// more) is the cost of starting cold; said only then.
fn cold_start_note(cold: Option<f64>, warm: Option<f64>) -> Option<String> {
    let (cold, warm) = (cold?, warm?);
    (cold > 1.2 * warm).then(|| {
        format!(
            "The longest GEMM took {} in the cold run and {} in a warm one: part of \
             the cold run is starting cold. The first touch of each page a process \
             has not used yet (its own code, a new map of A) stops it while the \
             kernel finds the page and wires it in: a page fault. Warm workers \
             have those pages already.",
            secs(cold),
            secs(warm)
        )
    })
}

/// A warm worker's GEMM clearly longer (by a fifth or more) than its share
/// of seq's time; said only then.
fn slow_gemm_note(warm: Option<f64>, share: f64, blocks: usize) -> Option<String> {
    let warm = warm?;
    (warm > 1.2 * share).then(|| {
        format!(
            "Even warm, one block's GEMM took {}, where seq's time divided by the \
             {blocks} block{} is {}. With one column, GEMM does two operations \
             per number of A it reads: it is bound by how fast memory delivers \
             A, and the workers share that bandwidth (and the CPUs, with anything \
             else running).",
            secs(warm),
            plural(blocks),
            secs(share)
        )
    })
}

fn next_steps(s: &mut Screen, n: usize, p: usize) {
    s.heading("What next");
    let exe = std::env::current_exe().unwrap_or_default();
    let run = command_prefix(&exe);
    let bigger = n.saturating_mul(2).max(2);
    s.line(&format!("  {run} demo --size {bigger} --processes {p}"));
    s.line(&format!("  {run} matmul --trace trace.json"));
    s.line("      then open trace.json at https://ui.perfetto.dev: one lane per");
    s.line("      process, named with its mode, a bar for every dump, start, send,");
    s.line("      compute and reply, and an arrow for every message, with its bytes");
    s.line(&format!("  {run} bench"));
    s.line("      how each mode scales with the size and the number of processes");
    s.para(
        "The tutorial, docs/guide.md, explains processes, pipes, memory maps and \
         copy-on-write for joblib users, with exercises; docs/lab.md is a \
         50-minute lab built on this demo.",
    );
}

/// How to run procjob as this program was run: through cargo from a build
/// tree (`…/target/release/procjob`), else by its name.
fn command_prefix(exe: &Path) -> &'static str {
    let parts: Vec<&std::ffi::OsStr> = exe.iter().collect();
    let from_cargo = parts.windows(3).any(|w| w[0] == "target" && (w[1] == "release" || w[1] == "debug"));
    if from_cargo {
        "cargo run --release --"
    } else {
        "procjob"
    }
}

// ---------------------------------------------------------------------------
// Figures from the run.

fn dur_s(span: &crate::trace::Span) -> f64 {
    (span.end_ns - span.start_ns) as f64 / 1e9
}

/// Bytes of C's numbers.
fn c_bytes(inputs: &Inputs) -> u64 {
    let (m, _, n) = inputs.dims();
    (m * n * inputs.dtype().size()) as u64
}

fn work(m: usize, k: usize, n: usize) -> u64 {
    2 * m as u64 * k as u64 * n as u64
}

fn rate(m: usize, k: usize, n: usize, wall_s: f64) -> f64 {
    if wall_s > 0.0 {
        work(m, k, n) as f64 / wall_s / 1e9
    } else {
        0.0
    }
}

fn speedup(seq_s: f64, wall_s: f64) -> f64 {
    if wall_s > 0.0 {
        seq_s / wall_s
    } else {
        0.0
    }
}

fn per_second(bytes: u64, s: f64) -> u64 {
    if s > 0.0 {
        (bytes as f64 / s) as u64
    } else {
        0
    }
}

/// The mode bits of a folder.
fn folder_mode(path: &Path) -> u32 {
    std::fs::metadata(path).map_or(0, |m| file_mode(&m))
}

fn file_mode(meta: &std::fs::Metadata) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    meta.permissions().mode() & 0o777
}

/// The text of a `.npy` header (the dict after magic, version and length).
fn npy_header_text(path: &Path) -> Option<String> {
    use std::io::Read;
    let mut head = [0u8; 256];
    let mut file = std::fs::File::open(path).ok()?;
    let got = file.read(&mut head).ok()?;
    let head = &head[..got];
    if !head.starts_with(b"\x93NUMPY") || head.len() < 10 {
        return None;
    }
    let len = u16::from_le_bytes([head[8], head[9]]) as usize;
    let text = std::str::from_utf8(head.get(10..10 + len)?).ok()?;
    Some(text.trim_end().to_string())
}

// ---------------------------------------------------------------------------
// Words and numbers.

fn describe_dtype(dtype: DType) -> String {
    match dtype {
        DType::I64 => "i64 (8-byte integers, numpy's int64)".into(),
        DType::F64 => "f64 (8-byte floats, numpy's float64)".into(),
        DType::F32 => "f32 (4-byte floats, numpy's float32)".into(),
        other => format!("{other} (numpy's '{}')", other.npy_descr()),
    }
}

fn ops_word(dtype: DType) -> &'static str {
    if dtype == DType::I64 {
        "integer operations"
    } else {
        "floating-point operations"
    }
}

fn rate_unit(dtype: DType) -> &'static str {
    if dtype == DType::I64 {
        "billion operations per second"
    } else {
        "GFLOP/s"
    }
}

/// A mode's timings against seq's: a tie when the spreads overlap.
fn versus_seq(seq: &Spread, mode: &Spread) -> String {
    let x = speedup(seq.median, mode.median);
    if x <= 0.0 {
        "–".into()
    } else if seq.ties(mode) {
        format!("{x:.2}× seq's speed: a tie (spreads overlap)")
    } else if x >= 1.0 {
        format!("{x:.2}× seq's speed (faster)")
    } else {
        format!("{x:.2}× seq's speed ({} slower)", ratio_text(1.0 / x))
    }
}

/// "1.54×, a tie", "0.46×, 2.2× slower": for a table.
fn short_versus(seq: &Spread, mode: &Spread) -> String {
    let x = speedup(seq.median, mode.median);
    if x <= 0.0 {
        "–".into()
    } else if seq.ties(mode) {
        format!("{x:.2}×, a tie")
    } else if x >= 1.0 {
        format!("{x:.2}×, faster")
    } else {
        format!("{x:.2}×, {} slower", ratio_text(1.0 / x))
    }
}

/// "1.8×", "12×", "4,000×".
fn ratio_text(x: f64) -> String {
    if x < 10.0 {
        format!("{x:.1}×")
    } else {
        format!("{}×", grouped(x.round() as u64))
    }
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "NO"
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

/// 8000000 → "8,000,000".
fn grouped(v: u64) -> String {
    let digits = v.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

fn secs(s: f64) -> String {
    if s < 0.001 {
        format!("{:.0} µs", s * 1e6)
    } else if s < 1.0 {
        format!("{:.1} ms", s * 1e3)
    } else {
        format!("{s:.2} s")
    }
}

/// `rwx------` style, with a leading `d` for folders.
fn permissions_text(mode: u32, folder: bool) -> String {
    let mut t = String::from(if folder { "d" } else { "-" });
    for shift in [6, 3, 0] {
        let bits = (mode >> shift) & 7;
        t.push(if bits & 4 != 0 { 'r' } else { '-' });
        t.push(if bits & 2 != 0 { 'w' } else { '-' });
        t.push(if bits & 1 != 0 { 'x' } else { '-' });
    }
    t
}

// ---------------------------------------------------------------------------
// The screen.

/// Writes lines and wrapped paragraphs; write errors (a closed pipe) are
/// ignored, as the run itself must still clean up.
struct Screen<'a> {
    out: &'a mut dyn Write,
    /// The last section number used by [`Screen::heading`].
    section: usize,
}

impl Screen<'_> {
    fn line(&mut self, text: &str) {
        let _ = writeln!(self.out, "{}", text.trim_end());
    }

    fn blank(&mut self) {
        let _ = writeln!(self.out);
        let _ = self.out.flush();
    }

    /// A numbered section heading, underlined.
    fn heading(&mut self, title: &str) {
        self.section += 1;
        let title = format!("{}. {title}", self.section);
        self.blank();
        self.line(&title);
        self.line(&"─".repeat(title.chars().count()));
    }

    fn para(&mut self, text: &str) {
        for line in wrap(text, WIDTH) {
            self.line(&line);
        }
    }
}

/// Word-wraps `text` at `width` characters (a word longer than the width
/// gets a line of its own).
fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines = Vec::new();
    let mut line = String::new();
    let mut len = 0;
    for word in text.split_whitespace() {
        let w = word.chars().count();
        if len > 0 && len + 1 + w > width {
            lines.push(std::mem::take(&mut line));
            len = 0;
        }
        if len > 0 {
            line.push(' ');
            len += 1;
        }
        line.push_str(word);
        len += w;
    }
    if !line.is_empty() {
        lines.push(line);
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wraps_at_the_width_counting_characters() {
        let text = "× ".repeat(100);
        for line in wrap(&text, 10) {
            assert!(line.chars().count() <= 10, "{line:?}");
        }
        assert_eq!(wrap("a bb ccc", 4), vec!["a bb", "ccc"]);
        assert_eq!(wrap("", 4), Vec::<String>::new());
    }

    #[test]
    fn groups_thousands() {
        assert_eq!(grouped(0), "0");
        assert_eq!(grouped(999), "999");
        assert_eq!(grouped(1000), "1,000");
        assert_eq!(grouped(8_000_128), "8,000,128");
    }

    #[test]
    fn a_difference_within_the_spreads_is_a_tie() {
        let seq = Spread::of(&[0.100, 0.110, 0.120]);
        assert_eq!((seq.median, seq.min, seq.max, seq.runs), (0.110, 0.100, 0.120, 3));
        let overlapping = Spread::of(&[0.090, 0.095, 0.105]);
        assert!(seq.ties(&overlapping) && overlapping.ties(&seq));
        assert!(versus_seq(&seq, &overlapping).contains("a tie"));
        let faster = Spread::of(&[0.050, 0.055, 0.060]);
        assert!(!seq.ties(&faster));
        assert!(versus_seq(&seq, &faster).contains("(faster)"), "{}", versus_seq(&seq, &faster));
        assert!(versus_seq(&faster, &seq).contains("slower"));
        assert_eq!(Spread::of(&[0.0101, 0.0205]).range_text(), "10.1–20.5 ms");
    }

    #[test]
    fn starting_cold_is_said_only_when_the_cold_gemm_was_slower() {
        let said = cold_start_note(Some(0.0225), Some(0.0120)).expect("cold clearly slower");
        assert!(said.contains("22.5 ms") && said.contains("12.0 ms") && said.contains("page fault"), "{said}");
        // The case: warm slower than cold. Nothing about starting cold.
        assert_eq!(cold_start_note(Some(0.0102), Some(0.0121)), None);
        assert_eq!(cold_start_note(Some(0.0102), Some(0.0100)), None);
        assert_eq!(cold_start_note(Some(0.0102), None), None);
    }

    #[test]
    fn a_slow_warm_gemm_is_said_only_when_it_exceeds_its_share() {
        let said = slow_gemm_note(Some(0.018), 0.008, 2).expect("more than twice its share");
        assert!(said.contains("18.0 ms") && said.contains("8.0 ms"), "{said}");
        assert_eq!(slow_gemm_note(Some(0.008), 0.008, 2), None);
        assert_eq!(slow_gemm_note(None, 0.008, 2), None);
    }

    #[test]
    fn forks_row_is_explained_only_when_its_pss_fits_the_sharing() {
        let mib = 1 << 20;
        // 73.8 MiB RSS of which 11.8 own: PSS 11.8 + 62 ÷ 3 = 32.5 MiB.
        let (rss, uss) = (73 * mib + 8 * mib / 10, 11 * mib + 8 * mib / 10);
        let said = fork_row_note(rss, uss, 33 * mib, 74 * mib, 2).expect("PSS fits three sharers");
        assert!(said.contains("3 processes") && said.contains("÷ 3"), "{said}");
        // A PSS far from what sharing predicts: no explanation that does not fit.
        assert_eq!(fork_row_note(rss, uss, 70 * mib, 74 * mib, 2), None);
        // Nothing shared to speak of.
        assert_eq!(fork_row_note(12 * mib, 11 * mib, 11 * mib, 74 * mib, 2), None);
    }

    fn split(wall: f64, longest_compute: f64, seq: f64) -> Split {
        Split { wall, longest_compute, share: seq / 2.0, seq, workers: 2 }
    }

    #[test]
    fn the_ceiling_is_amdahls_law_with_the_measured_serial_part() {
        // 10 ms that does not shrink against 90 ms of seq: f = 0.1,
        // 1 / (0.1 + 0.9 / 2) = 1.82×.
        let s = split(0.055, 0.045, 0.090);
        assert!((s.rest() - 0.010).abs() < 1e-12 && (s.serial_fraction() - 0.1).abs() < 1e-12);
        assert!((s.amdahl() - 1.0 / 0.55).abs() < 1e-9, "{}", s.amdahl());
    }

    #[test]
    fn shared_memory_and_other_load_are_named_only_when_the_numbers_show_them() {
        let busy = Load { others_cpus: 1.2, loadavg_1m: None };
        let idle = Load { others_cpus: 0.0, loadavg_1m: None };
        let slow = ceiling_reasons("copy", &split(0.080, 0.070, 0.090), Some(&busy));
        assert!(slow.contains("Amdahl") && slow.contains("Shared memory") && slow.contains("1.6× its share"), "{slow}");
        assert!(slow.contains("other programs used 1.2 CPUs"), "{slow}");
        let fine = ceiling_reasons("copy", &split(0.050, 0.044, 0.090), Some(&idle));
        assert!(!fine.contains("Shared memory") && fine.contains("did not slow down"), "{fine}");
        assert!(fine.contains("hardly any"), "{fine}");
    }

    #[test]
    fn a_loss_is_blamed_on_the_part_that_caused_it() {
        // Won: nothing to blame.
        assert_eq!(why_it_lost("memmap", &split(0.050, 0.045, 0.090)), None);
        // The n×1 case: a fixed part far above what two workers can save.
        let fixed = why_it_lost("memmap", &split(0.030, 0.004, 0.008)).expect("lost");
        assert!(fixed.contains("fixed part") && fixed.contains("26.0 ms"), "{fixed}");
        assert!(fixed.contains("more than the 4.0 ms that 2 workers could save"), "{fixed}");
        // The fixed part the larger culprit, yet less than the most 2
        // workers could save: no claim that it outweighs the saving.
        let both = why_it_lost("copy", &split(0.617, 0.414, 0.534)).expect("lost");
        assert!(both.contains("fixed part: 203.0 ms") && !both.contains("more than"), "{both}");
        assert!(both.contains("147.0 ms beyond its share"), "{both}");
        // The 1000² case on a busy machine: GEMM itself slower than seq.
        let gemm = why_it_lost("copy", &split(0.130, 0.125, 0.100)).expect("lost");
        assert!(gemm.contains("in GEMM itself") && gemm.contains("125.0 ms"), "{gemm}");
    }

    #[test]
    fn the_last_section_names_the_commands_as_this_program_was_run() {
        assert_eq!(command_prefix(Path::new("/home/me/procjob/target/release/procjob")), "cargo run --release --");
        assert_eq!(command_prefix(Path::new("/home/me/procjob/target/debug/procjob")), "cargo run --release --");
        assert_eq!(command_prefix(Path::new("/home/me/.cargo/bin/procjob")), "procjob");
        assert_eq!(command_prefix(Path::new("/usr/local/bin/procjob")), "procjob");
    }

    #[test]
    fn permissions_read_like_ls() {
        assert_eq!(permissions_text(0o700, true), "drwx------");
        assert_eq!(permissions_text(0o644, false), "-rw-r--r--");
    }
}
