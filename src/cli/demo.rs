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
}

/// One mode's figures, kept after its C has been checked and dropped.
struct Measured {
    mode: Mode,
    wall_s: f64,
    phases: Phases,
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
        let rep = &run.repetitions[0];
        Measured {
            mode: run.mode,
            wall_s: rep.wall.as_secs_f64(),
            phases: rep.phases,
            to_workers: rep.bytes_to_workers,
            from_workers: rep.bytes_from_workers,
            blocks: run.blocks,
            same_as_seq: seq_c.is_none_or(|c| *c == run.c),
            workers: run.workers,
            coordinator_rss: run.coordinator_peak_rss,
            trace: run.trace,
        }
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
    let (n, p, dtype) = (opts.size, opts.processes, opts.dtype);
    let item = dtype.size() as u64;
    let matrix_bytes = (n * n) as u64 * item;
    // Room: the demo's own look at A and B, then each file mode's dumps
    // (two sets while warm workers keep the previous maps) and a C file.
    let needed = 4 * matrix_bytes + matrix_bytes + 64 * 1024;
    let folder = RunFolder::create(opts.temp_folder.as_deref(), needed)?;
    let inputs = Inputs::pattern(dtype, n, n, n)?;
    let settings = RunSettings { temp_folder: opts.temp_folder.clone(), trace: true, ..RunSettings::with_processes(p) };
    let mut s = Screen { out, section: 0 };

    intro(&mut s, &inputs, p);
    temp_folder(&mut s, opts, &folder, &inputs)?;

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

    side_by_side(&mut s, &runs, p);
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

fn intro(s: &mut Screen, inputs: &Inputs, p: usize) {
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
    let seq_wall = earlier.first().map_or(r.wall_s, |seq| seq.wall_s);
    let b_bytes = inputs.b.nbytes() as u64;
    if introduce_mode(s, r, p, seq_wall, rate(m, k, n, r.wall_s), inputs.dtype()) {
        return;
    }
    s.blank();
    report_workers(s, r);
    report_traffic(s, r, earlier, b_bytes);
    if let Some(send) = longest(&r.trace, Lane::Coordinator, "send") {
        s.line(&format!("  the slowest send of one task took {}", secs(dur_s(send))));
    }
    let left = std::fs::read_dir(folder.path())
        .map_or(0, |d| d.flatten().filter(|e| e.file_name() != crate::run_folder::LOCK_FILE).count());
    s.line(&format!("  files left in the temp folder: {left}"));
    s.line(&format!("  wall time {}: {}", secs(r.wall_s), versus_seq(seq_wall, r.wall_s)));
    s.line(&format!("  C is identical to seq's, byte for byte: {}", yes_no(r.same_as_seq)));
    s.blank();
    conclude_mode(s, r, earlier, b_bytes);
}

/// What the mode is. For the in-process modes (seq, threads), also what
/// they took; returns true then, as there is nothing more to say.
fn introduce_mode(s: &mut Screen, r: &Measured, p: usize, seq_wall: f64, rate_here: f64, dtype: DType) -> bool {
    match r.mode {
        Mode::Seq => {
            s.heading("seq: one process, one core");
            s.para(
                "The whole product in this process, with the same kernel the workers \
                 use. This is the baseline every speedup below is measured against.",
            );
            s.blank();
            s.line(&format!("  took {}: {:.2} {}", secs(r.wall_s), rate_here, rate_unit(dtype)));
            return true;
        }
        Mode::Threads => {
            s.heading("threads: the same blocks on threads of this process");
            s.para(&format!(
                "The {} blocks on {} threads of this one process. Threads share their \
                 process's memory, so A, B and C are not copied, written or sent \
                 anywhere: this is parallelism at its cheapest. Python code cannot \
                 use threads this way because of the GIL, which is why joblib runs \
                 Python on worker processes.",
                r.blocks, p
            ));
            s.blank();
            s.line(&format!("  took {}: {}", secs(r.wall_s), versus_seq(seq_wall, r.wall_s)));
            s.line(&format!("  C is identical to seq's, byte for byte: {}", yes_no(r.same_as_seq)));
            return true;
        }
        Mode::Copy => {
            s.heading("copy: worker processes, data through the pipes");
            s.para(
                "A process is a running program with its own private memory: \
                 nothing in this process is visible to a worker. So each task \
                 travels through a pipe (a one-way stream of bytes that the kernel \
                 copies from one process to another) carrying its rows of A and \
                 the whole of B. This is joblib with max_nbytes=None.",
            );
        }
        Mode::Memmap => {
            s.heading("memmap: worker processes, data through files");
            s.para(
                "A and B are written once to .npy files in the temp folder, and \
                 each task carries only a descriptor: its rows, and for A and B a \
                 file path, dtype, shape and byte offset. Each worker memory-maps \
                 the files: the kernel makes the file's pages appear in the \
                 worker's memory, and every process that maps the same file uses \
                 the same physical pages. B exists once, however many workers \
                 read it. This is what joblib does with arrays over max_nbytes.",
            );
        }
        Mode::MemmapOut => {
            s.heading("memmap-out: workers write C in place");
            s.para(
                "As memmap, and C is a file too: each task also carries a \
                 reference to its rows of C, mapped read-write, and the worker \
                 writes its results straight into them. Only a short \"done\" \
                 comes back through the pipe.",
            );
        }
        Mode::Fork => {
            s.heading("fork: workers that inherit A and B");
            s.para(
                "The workers are made with fork(), which copies this process, A \
                 and B included, without copying its memory: parent and child \
                 share every page until one of them writes to it, and only then is \
                 that page copied (copy-on-write). The tasks carry neither data nor \
                 file names, only which inherited array and which rows. This is \
                 Python's multiprocessing with the \"fork\" start method.",
            );
        }
    }
    false
}

/// The workers started, and what each computed.
fn report_workers(s: &mut Screen, r: &Measured) {
    let workers = r.workers.len();
    let pids: Vec<String> = r.workers.iter().map(|w| w.pid.to_string()).collect();
    if r.phases.dump_s > 0.0 {
        s.line(&format!("  wrote A and B to the temp folder in {}", secs(r.phases.dump_s)));
    }
    s.line(&format!(
        "  started {workers} worker{} in {}: pid{} {}",
        plural(workers),
        secs(r.phases.spawn_s),
        plural(workers),
        pids.join(", ")
    ));
    for w in &r.workers {
        let spans = worker_spans(&r.trace, w.index, w.pid, "compute");
        if spans.is_empty() {
            s.line(&format!("    worker {} (pid {}): no task (more workers than blocks)", w.index, w.pid));
        }
        for span in spans {
            s.line(&format!("    worker {} (pid {}): {} in {}", w.index, w.pid, span.name, secs(dur_s(span))));
        }
    }
}

/// The bytes that crossed the pipes, each way, against copy's and B's.
fn report_traffic(s: &mut Screen, r: &Measured, earlier: &[Measured], b_bytes: u64) {
    let per_task = r.to_workers as f64 / r.blocks.max(1) as f64;
    if r.mode == Mode::Copy {
        s.line(&format!(
            "  to workers:   {:>15} bytes ({}), {} per task",
            grouped(r.to_workers),
            human_bytes(r.to_workers),
            grouped(per_task.round() as u64)
        ));
        s.line(&format!("  from workers: {:>15} bytes: the blocks of C", grouped(r.from_workers)));
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
        let back = if r.mode == Mode::MemmapOut { "\"done\" only" } else { "the blocks of C" };
        s.line(&format!("  to workers in all:      {:>15} bytes for {} tasks", grouped(r.to_workers), r.blocks));
        s.line(&format!("  from workers in all:    {:>15} bytes: {back}", grouped(r.from_workers)));
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
            "The pipes carried {} bytes to the workers instead of copy's {}. The \
             blocks of C still come back through them.",
            grouped(r.to_workers),
            earlier.iter().find(|e| e.mode == Mode::Copy).map_or("–".into(), |c| grouped(c.to_workers))
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
                .map(|e| format!("{} {}", e.mode.name(), secs(e.phases.spawn_s)))
                .collect();
            s.para(&format!(
                "No file was written and no array crossed a pipe on the way in. \
                 Starting the workers took {} here; the modes that start the \
                 program afresh took {}.",
                secs(r.phases.spawn_s),
                spawned.join(", ")
            ));
        }
        _ => {}
    }
}

fn side_by_side(s: &mut Screen, runs: &[Measured], p: usize) {
    s.heading("Side by side");
    s.line(&format!(
        "{:<11}{:>10}{:>9}{:>12}{:>13}  {:<16}",
        "mode", "wall", "speedup", "to workers", "from workers", "wall, as a bar"
    ));
    let seq_wall = runs[0].wall_s;
    let longest_wall = runs.iter().map(|r| r.wall_s).fold(0.0, f64::max);
    for r in runs {
        let bar = bar(r.wall_s, longest_wall, 20);
        s.line(&format!(
            "{:<11}{:>10}{:>9}{:>12}{:>13}  {bar}",
            r.mode.name(),
            secs(r.wall_s),
            format!("{:.2}×", speedup(seq_wall, r.wall_s)),
            human_bytes(r.to_workers),
            human_bytes(r.from_workers),
        ));
    }
    s.blank();
    let best = runs.iter().skip(1).max_by(|a, b| b.wall_s.total_cmp(&a.wall_s));
    let mut text = format!(
        "speedup = seq's wall time ÷ the mode's wall time; above 1.00× is faster \
         than seq. With {p} worker{} the most to hope for is {p}.00×",
        plural(p)
    );
    if let Some(best) = best {
        text.push_str(&format!(
            "; the fastest here was {} at {:.2}×.",
            best.mode.name(),
            speedup(seq_wall, best.wall_s)
        ));
    } else {
        text.push('.');
    }
    s.para(&text);
    s.blank();
    let process_runs: Vec<&Measured> = runs.iter().filter(|r| r.mode.uses_workers()).collect();
    let list = |f: fn(&Phases) -> f64, only_files: bool| {
        process_runs
            .iter()
            .filter(|r| !only_files || r.phases.dump_s > 0.0)
            .map(|r| format!("{} {}", r.mode.name(), secs(f(&r.phases))))
            .collect::<Vec<_>>()
            .join(", ")
    };
    s.para(&format!(
        "The wall time of each process mode includes starting its workers ({}) and, \
         for the file modes, writing A and B ({}). Threads pay neither.",
        list(|ph| ph.spawn_s, false),
        list(|ph| ph.dump_s, true)
    ));
}

fn memory(s: &mut Screen, runs: &[Measured], inputs: &Inputs, p: usize) {
    s.heading("Memory: what each worker held");
    s.para(
        "Each worker reads its own memory figures from /proc/self after its task, \
         while the task's data is still alive:",
    );
    s.line("  RSS  every page the process has in RAM, shared pages included");
    s.line("  USS  its private pages only: what would be freed if it exited");
    s.line("  PSS  USS plus an equal share of each shared page; sums to the total");
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
    if let Some(fork) = uss_of(Mode::Fork) {
        s.blank();
        s.para(&format!(
            "fork's workers never received A or B: the pages they read are this \
             process's own, shared copy-on-write, so they count in each worker's RSS \
             but not in its USS. Their USS added up to {}.",
            human_bytes(fork)
        ));
    }
    s.blank();
    s.para(
        "A page of a shared file counts as private (USS) while only one process \
         maps it: a worker's own rows of A do, the B that every worker reads does \
         not. That is why RSS, which counts B in every worker, overstates the \
         total, and PSS does not.",
    );
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
    let repeated = |repeat| RunSettings { repeat, ..settings.clone() };
    let seq = matmul::run_mode(Mode::Seq, &inputs, &repeated(3), folder)?;
    check_interrupt()?;
    let threads = matmul::run_mode(Mode::Threads, &inputs, &repeated(3), folder)?;
    check_interrupt()?;
    let memmap = matmul::run_mode(Mode::Memmap, &inputs, &repeated(2), folder)?;
    let same = threads.c == seq.c && memmap.c == seq.c;
    let seq_s = median_wall(&seq);
    let threads_s = median_wall(&threads);
    let cold = &memmap.repetitions[0];
    let warm = &memmap.repetitions[memmap.repetitions.len() - 1];
    let (cold_s, warm_s) = (cold.wall.as_secs_f64(), warm.wall.as_secs_f64());
    s.blank();
    s.line(&format!("  {:<19}{:>10}", "seq", secs(seq_s)));
    s.line(&format!("  {:<19}{:>10}  {}", "threads", secs(threads_s), versus_seq(seq_s, threads_s)));
    s.line(&format!("  {:<19}{:>10}  {}", "memmap, cold", secs(cold_s), versus_seq(seq_s, cold_s)));
    s.line(&format!("  {:<19}{:>10}  {}", "memmap, warm", secs(warm_s), versus_seq(seq_s, warm_s)));
    s.line(&format!("  C identical in all three: {}", yes_no(same)));
    s.line("  (seq and threads: median of 3 runs; cold: workers started in the run,");
    s.line("  warm: a second run on the same workers)");
    s.blank();
    s.line(&format!("  {:<36}{:>10}{:>10}", "where memmap's time went:", "cold", "warm"));
    let row = |label: &str, f: fn(&Phases) -> f64| {
        format!("    {label:<34}{:>10}{:>10}", secs(f(&cold.phases)), secs(f(&warm.phases)))
    };
    s.line(&row("writing A and B to files", |ph| ph.dump_s));
    let workers = memmap.workers.len();
    s.line(&row(&format!("starting {workers} worker{}", plural(workers)), |ph| ph.spawn_s));
    s.line(&row("tasks: send, map, compute, reply", |ph| ph.compute_s + ph.collect_s));
    // The longest compute of one block in each repetition, from the trace.
    let computes = longest_worker_span_per_repetition(&memmap.trace, "compute");
    let compute = computes.first().copied().flatten();
    let warm_compute = computes.last().copied().flatten().filter(|_| computes.len() > 1);
    if let Some(c) = compute {
        s.line(&format!(
            "    {:<34}{:>10}{:>10}",
            "of which the longest compute",
            secs(c),
            warm_compute.map_or(String::new(), secs)
        ));
    }
    s.blank();
    if cold_s > seq_s {
        let still = if warm_s > seq_s {
            format!(", and still {} slower with its workers already running", ratio_text(warm_s / seq_s.max(1e-9)))
        } else {
            format!(", though {} with its workers already running", versus_seq(seq_s, warm_s))
        };
        s.para(&format!(
            "memmap was {} slower than seq{still}. The work itself is small: seq \
             did all of it in {}. What memmap adds are fixed costs that do not \
             shrink with the work: writing A to a file ({}), starting processes \
             ({}), and a round trip through the pipes for every task. Parallel \
             pays only when each task computes for much longer than that.",
            ratio_text(cold_s / seq_s.max(1e-9)),
            secs(seq_s),
            secs(cold.phases.dump_s),
            secs(cold.phases.spawn_s)
        ));
        let share = seq_s / memmap.blocks.max(1) as f64;
        if let Some(c) = compute.filter(|&c| c > share) {
            s.blank();
            s.para(&format!(
                "Even the workers' computing was slow: {} for one block in the \
                 cold run{}, where seq did all {} blocks' worth in {}. Part of it \
                 is starting cold: the first touch of each page a process has not \
                 used yet (its own code, a new map of A) is a trip into the kernel, \
                 a page fault.",
                secs(c),
                warm_compute.map_or(String::new(), |w| format!(", {} in the warm one", secs(w))),
                memmap.blocks,
                secs(seq_s)
            ));
        }
    } else {
        s.para(&format!(
            "This time memmap was not slower than seq ({} against {}). The fixed \
             costs above hardly depend on the work; with a smaller --size they \
             outweigh it.",
            secs(cold_s),
            secs(seq_s)
        ));
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

fn next_steps(s: &mut Screen, n: usize, p: usize) {
    s.heading("What next");
    let bigger = n.saturating_mul(2).max(2);
    s.line(&format!("  cargo run --release -- demo --size {bigger} --processes {p}"));
    s.line("  cargo run --release -- matmul --trace trace.json");
    s.line("      then open trace.json at https://ui.perfetto.dev: one lane per");
    s.line("      process, a bar for every dump, start, send, compute and reply");
    s.line("  cargo run --release -- bench");
    s.line("      how each mode scales with the size and the number of processes");
    s.para("The tutorial, docs/guide.md, explains processes, pipes, memory maps and copy-on-write for joblib users, with exercises.");
}

// ---------------------------------------------------------------------------
// Figures from the run.

fn median_wall(run: &ModeRun) -> f64 {
    let mut walls: Vec<f64> = run.repetitions.iter().map(|r| r.wall.as_secs_f64()).collect();
    walls.sort_by(f64::total_cmp);
    walls[walls.len() / 2]
}

fn worker_spans<'t>(trace: &'t Trace, index: usize, pid: u32, category: &str) -> Vec<&'t crate::trace::Span> {
    let mut spans: Vec<_> =
        trace.spans.iter().filter(|sp| sp.category == category && sp.lane == Lane::Worker { index, pid }).collect();
    spans.sort_by_key(|sp| sp.start_ns);
    spans
}

fn longest<'t>(trace: &'t Trace, lane: Lane, category: &str) -> Option<&'t crate::trace::Span> {
    trace.spans.iter().filter(|sp| sp.lane == lane && sp.category == category).max_by_key(|sp| sp.end_ns - sp.start_ns)
}

/// For each repetition (the coordinator's "run" spans, in order), the
/// longest worker span of `category` that started in it, in seconds.
fn longest_worker_span_per_repetition(trace: &Trace, category: &str) -> Vec<Option<f64>> {
    let mut runs: Vec<&crate::trace::Span> =
        trace.spans.iter().filter(|sp| sp.lane == Lane::Coordinator && sp.category == "run").collect();
    runs.sort_by_key(|sp| sp.start_ns);
    runs.iter()
        .map(|run| {
            trace
                .spans
                .iter()
                .filter(|sp| matches!(sp.lane, Lane::Worker { .. }) && sp.category == category)
                .filter(|sp| (run.start_ns..=run.end_ns).contains(&sp.start_ns))
                .map(dur_s)
                .max_by(f64::total_cmp)
        })
        .collect()
}

fn dur_s(span: &crate::trace::Span) -> f64 {
    (span.end_ns - span.start_ns) as f64 / 1e9
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

fn versus_seq(seq_s: f64, wall_s: f64) -> String {
    let x = speedup(seq_s, wall_s);
    if (0.95..1.05).contains(&x) {
        format!("{x:.2}× seq's speed (about the same)")
    } else if x >= 1.0 {
        format!("{x:.2}× seq's speed (faster)")
    } else if x > 0.0 {
        format!("{x:.2}× seq's speed ({} slower)", ratio_text(1.0 / x))
    } else {
        "–".into()
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

fn bar(value: f64, max: f64, width: usize) -> String {
    let filled = if max > 0.0 { ((value / max) * width as f64).round() as usize } else { 0 };
    "█".repeat(filled.clamp(1, width))
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
    fn permissions_read_like_ls() {
        assert_eq!(permissions_text(0o700, true), "drwx------");
        assert_eq!(permissions_text(0o644, false), "-rw-r--r--");
    }
}
