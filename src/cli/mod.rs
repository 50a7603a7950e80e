//! The command line: argument parsing, input checks, and reports.
//!
//! `main` parses, calls [`run`], and exits with the code it returns; every
//! exit code lives in [`exit`]. Human tables go to stdout; with `--json`
//! stdout carries only JSON Lines, one object per mode (fields as
//! docs/cli.md).

use std::io::Write;
use std::path::{Path, PathBuf};

use clap::{Args, Parser, Subcommand};
use serde::Serialize;

use procjob_worker::array::Array;
use procjob_worker::protocol::Access;
use procjob_worker::DType;

pub mod against;
pub mod bench;
pub mod demo;
mod load;
mod mpi;
pub mod plot;
mod progress;

use crate::error::Error;
use crate::matmul::{self, Inputs, Mode, ModeRun, RunSettings};
use crate::run_folder::RunFolder;

/// Exit codes (docs/cli.md).
pub mod exit {
    /// Success.
    pub const OK: i32 = 0;
    /// The run failed: a worker died, a task failed, a timeout.
    pub const RUN_FAILED: i32 = 1;
    /// Usage or input error.
    pub const USAGE: i32 = 2;
    /// Interrupted by SIGINT.
    pub const INTERRUPTED: i32 = 130;
    /// Stopped by SIGTERM.
    pub const TERMINATED: i32 = 143;
}

/// procjob: run jobs on worker processes, joblib-style, and see what it costs.
#[derive(Debug, Parser)]
#[command(name = "procjob", version, about, long_about = None)]
pub struct Cli {
    /// What to run.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Multiply C = A × B by blocks of A's rows on worker processes, in one
    /// or every mode, and compare.
    Matmul(MatmulArgs),
    /// Sweep sizes, process counts and modes; time each like hyperfine,
    /// with its efficiency against this machine's ideal.
    Bench(BenchArgs),
    /// The guided tour: run every mode and narrate what each did and cost,
    /// with this run's own numbers.
    Demo(DemoArgs),
}

/// Options of `procjob demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Square n×n · n×n product (and n×n · n×1 for the warning case).
    #[arg(long, value_name = "N", default_value_t = 1000)]
    pub size: usize,
    /// Number of worker processes (default: the CPUs this process may use).
    #[arg(long, value_name = "N")]
    pub processes: Option<usize>,
    /// Element type: i64, f64 or f32.
    #[arg(long, value_name = "DTYPE", default_value = "i64")]
    pub dtype: String,
    /// Parent folder of the run's private temp folder.
    #[arg(long, value_name = "DIR")]
    pub temp_folder: Option<PathBuf>,
    /// Timed runs of each mode on warm workers, after its cold first run.
    #[arg(long, value_name = "N", default_value_t = 3)]
    pub repeat: usize,
}

/// Options of `procjob bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Square sizes n to run (n×n · n×n), comma-separated.
    #[arg(long, value_name = "N,...", value_delimiter = ',', default_values_t = [500, 1000, 2000])]
    pub sizes: Vec<usize>,
    /// Process counts, comma-separated (default: 1 up to the CPUs).
    #[arg(long, value_name = "P,...", value_delimiter = ',')]
    pub processes: Vec<usize>,
    /// Modes, comma-separated (seq always runs, as the baseline).
    #[arg(long, value_name = "MODE,...", value_delimiter = ',', default_values_t = ["copy".to_string(), "memmap".to_string(), "memmap-out".to_string()])]
    pub modes: Vec<String>,
    /// Element type: i64, f64 or f32.
    #[arg(long, value_name = "DTYPE", default_value = "f64")]
    pub dtype: String,
    /// Timed repetitions per case.
    #[arg(long, value_name = "R", default_value_t = 5)]
    pub repeat: usize,
    /// Untimed repetitions before them (the first starts the workers).
    #[arg(long, value_name = "W", default_value_t = 1)]
    pub warmup: usize,
    /// Parent folder of the run's private temp folder.
    #[arg(long, value_name = "DIR")]
    pub temp_folder: Option<PathBuf>,
    /// JSON Lines on stdout, one object per case.
    #[arg(long)]
    pub json: bool,
    /// After the sweep, write SVG charts into this existing folder: for each
    /// size N, speedup-N.svg and memory-N.svg.
    #[arg(long, value_name = "DIR")]
    pub plot: Option<PathBuf>,
    /// Also run numpy's matmul on P BLAS threads and joblib's memmapped
    /// parallel_dot on P workers, in the same rounds, and print each mode's
    /// ratio to them (numpy, joblib or both; comma-separated).
    #[arg(long, value_name = "numpy,joblib", value_delimiter = ',')]
    pub against: Vec<String>,
    /// The Python for --against (default: $PROCJOB_BENCH_PYTHON, else
    /// python3 on PATH).
    #[arg(long, value_name = "PATH")]
    pub python: Option<PathBuf>,
    /// mpi (the sweep's pools across the ranks of `mpirun`/`srun`, built
    /// with the `mpi` feature) or local (this machine only); default: mpi
    /// when launched under it.
    #[arg(long, value_name = "mpi|local")]
    pub backend: Option<String>,
}

/// Options of `procjob matmul`.
#[derive(Debug, Args)]
pub struct MatmulArgs {
    /// Number of worker processes (default: the CPUs this process may use).
    #[arg(long, value_name = "N")]
    pub processes: Option<usize>,
    /// Square n×n · n×n product.
    #[arg(long, value_name = "N", conflicts_with = "shape")]
    pub size: Option<usize>,
    /// m×k · k×n product, written MxKxN.
    #[arg(long, value_name = "MxKxN")]
    pub shape: Option<String>,
    /// Element type: i64, f64 or f32 (with --a/--b: taken from the files).
    #[arg(long, value_name = "DTYPE")]
    pub dtype: Option<String>,
    /// seq, threads, copy, memmap, memmap-out, fork, or all.
    #[arg(long, value_name = "MODE", default_value = "all")]
    pub mode: String,
    /// A as a .npy file (needs --b), mapped in place read-only.
    #[arg(long, value_name = "FILE", requires = "b")]
    pub a: Option<PathBuf>,
    /// B as a .npy file (needs --a).
    #[arg(long, value_name = "FILE", requires = "a")]
    pub b: Option<PathBuf>,
    /// Random integer inputs in [0, 10) from this seed, instead of the pattern.
    #[arg(long, value_name = "S")]
    pub seed: Option<u64>,
    /// Write C to this .npy file.
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// Number of row blocks (tasks); default: the number of processes.
    #[arg(long, value_name = "K")]
    pub blocks: Option<usize>,
    /// Parent folder of the run's private temp folder.
    #[arg(long, value_name = "DIR")]
    pub temp_folder: Option<PathBuf>,
    /// Repetitions per mode, on warm workers.
    #[arg(long, value_name = "R", default_value_t = 1)]
    pub repeat: usize,
    /// Re-run a task lost to a dead worker on a fresh worker, up to N times.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub retries: u32,
    /// Per-task time limit in seconds; on expiry the worker is killed and the run fails.
    #[arg(long, value_name = "SECS")]
    pub timeout: Option<f64>,
    /// How the copy, memmap and memmap-out modes start their workers:
    /// spawn (re-execute this program) or fork (mode fork always forks).
    #[arg(long, value_name = "spawn|fork", default_value = "spawn")]
    pub start_method: String,
    /// Write a timeline of every phase and task as Chrome trace-event JSON
    /// (open it in ui.perfetto.dev or chrome://tracing).
    #[arg(long, value_name = "FILE")]
    pub trace: Option<PathBuf>,
    /// Skip computing seq to compare against.
    #[arg(long)]
    pub no_check: bool,
    /// JSON Lines on stdout, one object per mode.
    #[arg(long)]
    pub json: bool,
    /// No progress bar on stderr.
    #[arg(long)]
    pub quiet: bool,
    /// mpi (across the ranks of `mpirun`/`srun`, built with the `mpi`
    /// feature) or local (this machine only); default: mpi when launched
    /// under it.
    #[arg(long, value_name = "mpi|local")]
    pub backend: Option<String>,
}

/// A failure of the command, with its exit code.
#[derive(Debug)]
pub struct CliError {
    /// The exit code.
    pub code: i32,
    /// The message.
    pub message: String,
}

impl CliError {
    fn usage(message: impl Into<String>) -> CliError {
        CliError { code: exit::USAGE, message: message.into() }
    }
}

impl From<Error> for CliError {
    fn from(e: Error) -> CliError {
        let code = match e {
            Error::Interrupted { signal } => crate::signals::exit_code(signal),
            ref e if e.is_usage() => exit::USAGE,
            _ => exit::RUN_FAILED,
        };
        CliError { code, message: e.to_string() }
    }
}

/// Runs a parsed command line; returns the exit code.
pub fn run(cli: Cli) -> i32 {
    let result = match cli.command {
        Command::Matmul(args) => matmul_command(&args),
        Command::Bench(args) => bench_command(&args),
        Command::Demo(args) => demo_command(&args),
    };
    // A run that ended while a signal was being handled ends as that signal
    // says, whatever else went wrong on the way.
    crate::signals::wait_if_stopping();
    if let Some(signal) = crate::signals::received() {
        say!("procjob: stopped by {}; workers stopped, temp folder removed", signal.as_str());
        return crate::signals::exit_code(signal);
    }
    match result {
        Ok(()) => exit::OK,
        Err(e) => {
            say!("procjob: error: {}", e.message);
            mpi::say_where_workers_ran();
            e.code
        }
    }
}

/// Where the inputs come from; generated ones are made only after the
/// temp folder proved it has room.
enum Source {
    /// The user's `.npy` files, already mapped.
    Files(Inputs),
    /// The pattern of CLI.md.
    Pattern { dtype: DType, m: usize, k: usize, n: usize },
    /// Random digits from a seed.
    Random { dtype: DType, m: usize, k: usize, n: usize, seed: u64 },
}

impl Source {
    fn dims(&self) -> (DType, usize, usize, usize) {
        match self {
            Source::Files(i) => {
                let (m, k, n) = i.dims();
                (i.dtype(), m, k, n)
            }
            Source::Pattern { dtype, m, k, n } | Source::Random { dtype, m, k, n, .. } => (*dtype, *m, *k, *n),
        }
    }

    fn materialize(self) -> Result<Inputs, Error> {
        match self {
            Source::Files(i) => Ok(i),
            Source::Pattern { dtype, m, k, n } => Inputs::pattern(dtype, m, k, n),
            Source::Random { dtype, m, k, n, seed } => Inputs::random(dtype, m, k, n, seed),
        }
    }
}

/// A checked `procjob matmul` request.
struct Request {
    modes: Vec<Mode>,
    source: Source,
    settings: RunSettings,
    check: bool,
    out: Option<OutputTarget>,
    trace: Option<OutputTarget>,
}

fn parse_shape(s: &str) -> Result<(usize, usize, usize), CliError> {
    let parts: Vec<&str> = s.split(['x', 'X', '×']).collect();
    let bad = || CliError::usage(format!("--shape {s:?} is not MxKxN (three sizes, e.g. 1000x500x2000)"));
    let [m, k, n] = parts.as_slice() else { return Err(bad()) };
    Ok((
        m.trim().parse().map_err(|_| bad())?,
        k.trim().parse().map_err(|_| bad())?,
        n.trim().parse().map_err(|_| bad())?,
    ))
}

fn open_input(path: &Path, name: &str) -> Result<Array, CliError> {
    let a = Array::open_npy(path, Access::ReadOnly).map_err(|e| CliError::usage(format!("--{name}: {e}")))?;
    if !crate::matmul::MATMUL_DTYPES.contains(&a.dtype()) {
        let accepted = crate::matmul::MATMUL_DTYPES.map(|d| format!("'{}' ({d})", d.npy_descr())).join(", ");
        return Err(CliError::usage(format!(
            "--{name}: {} has an unsupported dtype for matmul, '{}' ({}); accepted are {accepted}",
            path.display(),
            a.dtype().npy_descr(),
            a.dtype()
        )));
    }
    if a.shape().len() != 2 {
        return Err(CliError::usage(format!(
            "--{name}: {} holds a {}-D array of shape {:?}; a matrix (2-D) is needed",
            path.display(),
            a.shape().len(),
            a.shape()
        )));
    }
    Ok(a)
}

fn check_request(args: &MatmulArgs) -> Result<Request, CliError> {
    mpi::select_backend(args.backend.as_deref())?;
    let processes = args.processes.unwrap_or_else(mpi::default_processes);
    if processes == 0 {
        return Err(CliError::usage("--processes 0: at least one worker process is needed"));
    }
    let blocks = args.blocks.unwrap_or(processes);
    if blocks == 0 {
        return Err(CliError::usage("--blocks 0: at least one block is needed"));
    }
    if args.repeat == 0 {
        return Err(CliError::usage("--repeat 0: at least one repetition is needed"));
    }
    let modes = if args.mode == "all" {
        Mode::ALL.to_vec()
    } else {
        vec![Mode::from_name(&args.mode).ok_or_else(|| {
            CliError::usage(format!(
                "--mode {:?} is not one of: seq, threads, copy, memmap, memmap-out, fork, all",
                args.mode
            ))
        })?]
    };
    let mut modes = modes;
    mpi::adjust_modes(&mut modes, args.mode == "all", args.start_method == "fork")?;
    let dtype = match &args.dtype {
        Some(d) => Some(
            crate::matmul::dtype_from_name(d)
                .ok_or_else(|| CliError::usage(format!("--dtype {d:?} is not one of: i64, f64, f32")))?,
        ),
        None => None,
    };
    let source = source_of(args, dtype)?;
    // Every output is checked before any work starts, so a run is never
    // lost to an output path that could not have been written.
    let out = args.out.as_deref().map(|p| check_output("--out", p)).transpose()?;
    let trace = args.trace.as_deref().map(|p| check_output("--trace", p)).transpose()?;
    if let (Some(o), Some(t)) = (&out, &trace) {
        if o.path() == t.path() {
            return Err(CliError::usage(format!(
                "--out and --trace both name {}; give each its own file",
                o.path().display()
            )));
        }
    }
    let (dtype, m, k, n) = source.dims();
    for (what, rows, cols) in [("A", m, k), ("B", k, n), ("C", m, n)] {
        matrix_bytes(what, dtype, rows, cols)?;
    }
    // A block has at least one row: more blocks than rows are clamped, and
    // said. More workers than rows are started as asked (the CLI contract:
    // the extra ones idle), and said too.
    let rows = m.max(1);
    let blocks = clamp_to_rows("--blocks", args.blocks.is_some(), blocks, rows, "blocks");
    if args.processes.is_some() && processes > rows {
        say!(
            "procjob: note: --processes {processes} is more than A's {rows} row{}; {} worker{} will idle",
            if rows == 1 { "" } else { "s" },
            processes - rows,
            if processes - rows == 1 { "" } else { "s" }
        );
    }
    let timeout = match args.timeout {
        None => None,
        Some(t) if t.is_finite() && t > 0.0 => Some(std::time::Duration::try_from_secs_f64(t).map_err(|_| {
            CliError::usage(format!("--timeout {t}: too large a number of seconds; leave --timeout out for no limit"))
        })?),
        Some(t) => return Err(CliError::usage(format!("--timeout {t}: a positive number of seconds is needed"))),
    };
    Ok(Request {
        modes,
        source,
        settings: RunSettings {
            processes,
            blocks,
            temp_folder: args.temp_folder.clone(),
            repeat: args.repeat,
            retries: args.retries,
            timeout,
            trace: args.trace.is_some(),
            progress: (!args.quiet).then(progress::ProgressBar::hook),
            fork: match args.start_method.as_str() {
                "spawn" => false,
                "fork" => true,
                other => return Err(CliError::usage(format!("--start-method {other:?} is not one of: spawn, fork"))),
            },
        },
        check: !args.no_check,
        out,
        trace,
    })
}

/// Where the inputs come from: the user's `.npy` files, checked against
/// each other and `--dtype`, or the pattern or seed's random digits.
fn source_of(args: &MatmulArgs, dtype: Option<DType>) -> Result<Source, CliError> {
    Ok(match (&args.a, &args.b) {
        (Some(a_path), Some(b_path)) => {
            if args.size.is_some() || args.shape.is_some() || args.seed.is_some() {
                return Err(CliError::usage("--a/--b give the inputs: --size, --shape and --seed do not apply"));
            }
            let a = open_input(a_path, "a")?;
            let b = open_input(b_path, "b")?;
            if a.dtype() != b.dtype() {
                return Err(CliError::usage(format!(
                    "A ({}) is {} but B ({}) is {}; both must have the same dtype",
                    a_path.display(),
                    a.dtype(),
                    b_path.display(),
                    b.dtype()
                )));
            }
            if let Some(d) = dtype.filter(|&d| d != a.dtype()) {
                return Err(CliError::usage(format!("--dtype {d} disagrees with the files, which are {}", a.dtype())));
            }
            if a.shape()[1] != b.shape()[0] {
                return Err(CliError::usage(format!(
                    "inner dimensions do not fit: A ({}) is {}×{}, B ({}) is {}×{}",
                    a_path.display(),
                    a.shape()[0],
                    a.shape()[1],
                    b_path.display(),
                    b.shape()[0],
                    b.shape()[1]
                )));
            }
            Source::Files(Inputs { a, b })
        }
        (None, None) => {
            let (m, k, n) = match (&args.shape, args.size) {
                (Some(s), _) => parse_shape(s)?,
                (None, Some(n)) => (n, n, n),
                (None, None) => (1000, 1000, 1000),
            };
            let dtype = dtype.unwrap_or(DType::I64);
            match args.seed {
                Some(seed) => Source::Random { dtype, m, k, n, seed },
                None => Source::Pattern { dtype, m, k, n },
            }
        }
        _ => return Err(CliError::usage("--a and --b go together: give both or neither")),
    })
}

/// Bytes of a `rows × cols` matrix of `dtype`; an error naming it when
/// that is more than one array can hold on this machine.
fn matrix_bytes(what: &str, dtype: DType, rows: usize, cols: usize) -> Result<u64, CliError> {
    let bytes = rows as u128 * cols as u128 * dtype.size() as u128;
    u64::try_from(bytes).ok().filter(|&b| b <= isize::MAX as u64).ok_or_else(|| {
        CliError::usage(format!(
            "{what} would be {rows}×{cols} {dtype}, {bytes} bytes: more than one array can hold on this machine"
        ))
    })
}

/// `value` or A's `rows`, whichever is smaller, with a note on stderr when
/// the user asked for more.
fn clamp_to_rows(flag: &str, given: bool, value: usize, rows: usize, what: &str) -> usize {
    if value <= rows {
        return value;
    }
    if given {
        say!(
            "procjob: note: {flag} {value} is more than A's {rows} row{}; running {rows} {what}",
            if rows == 1 { "" } else { "s" }
        );
    }
    rows
}

/// Where an output file goes, as checked before the run.
#[derive(Debug)]
enum OutputTarget {
    /// A regular file, new or replaced: written beside it under a temporary
    /// name and renamed over it, so a reader never sees half a file. A
    /// replaced file keeps its mode (and, where allowed, its owner).
    File {
        /// The real path (a symbolic link followed, as `cp` does).
        path: PathBuf,
        /// The file replaced, if one was there.
        replaced: Option<std::fs::Metadata>,
    },
    /// A character device or a FIFO (`/dev/null`, a named pipe): written
    /// through, never replaced.
    Through {
        /// The real path.
        path: PathBuf,
    },
}

impl OutputTarget {
    fn path(&self) -> &Path {
        match self {
            OutputTarget::File { path, .. } | OutputTarget::Through { path } => path,
        }
    }
}

/// Checks an output path before the run: what is there, and that it can
/// be written. A symbolic link is followed (as `cp` does), a dangling one
/// refused; a regular file must be writable, and its folder too (the new
/// file is made there and renamed over it); a character device or FIFO is
/// written through; anything else (a folder, a block device, a socket) is
/// refused.
fn check_output(flag: &str, path: &Path) -> Result<OutputTarget, CliError> {
    use std::os::unix::fs::FileTypeExt;
    let shown = path.display();
    let meta = match std::fs::metadata(path) {
        Ok(m) => Some(m),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if path.symlink_metadata().is_ok() {
                return Err(CliError::usage(format!(
                    "{flag} {shown} is a symbolic link to a file that does not exist; procjob does not write through it"
                )));
            }
            None
        }
        Err(e) => return Err(CliError::usage(format!("{flag} {shown}: {e}"))),
    };
    let real = match &meta {
        Some(_) => std::fs::canonicalize(path).map_err(|e| CliError::usage(format!("{flag} {shown}: {e}")))?,
        None => path.to_path_buf(),
    };
    let writable = |p: &Path| {
        nix::unistd::access(p, nix::unistd::AccessFlags::W_OK)
            .map_err(|e| CliError::usage(format!("{flag} {shown}: cannot write it: {}", std::io::Error::from(e))))
    };
    let Some(meta) = meta else {
        check_folder_writable(flag, path)?;
        return Ok(OutputTarget::File { path: real, replaced: None });
    };
    let kind = meta.file_type();
    if kind.is_file() {
        writable(&real)?;
        check_folder_writable(flag, &real)?;
        Ok(OutputTarget::File { path: real, replaced: Some(meta) })
    } else if kind.is_char_device() || kind.is_fifo() {
        writable(&real)?;
        Ok(OutputTarget::Through { path: real })
    } else {
        let what = if kind.is_dir() {
            "a folder"
        } else if kind.is_block_device() {
            "a block device"
        } else if kind.is_socket() {
            "a socket"
        } else {
            "not a regular file"
        };
        Err(CliError::usage(format!(
            "{flag} {shown} is {what}; procjob writes a regular file, or through a character device or FIFO"
        )))
    }
}

/// The folder of `path` exists and a file can be made in it.
fn check_folder_writable(flag: &str, path: &Path) -> Result<(), CliError> {
    let folder = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    if !folder.is_dir() {
        return Err(CliError::usage(format!(
            "{flag} {}: the folder {} does not exist",
            path.display(),
            folder.display()
        )));
    }
    tempfile::Builder::new()
        .prefix(".procjob-probe-")
        .tempfile_in(folder)
        .map(drop)
        .map_err(|e| CliError::usage(format!("{flag} {}: cannot write in {}: {e}", path.display(), folder.display())))
}

/// Writes `parts` to an output checked by [`check_output`].
fn write_output(flag: &str, target: &OutputTarget, parts: &[&[u8]]) -> Result<(), String> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let fail = |e: std::io::Error| format!("{flag} {}: {e}", target.path().display());
    match target {
        OutputTarget::Through { path } => {
            let mut f = std::fs::OpenOptions::new().write(true).open(path).map_err(fail)?;
            parts.iter().try_for_each(|p| f.write_all(p)).and_then(|()| f.flush()).map_err(fail)
        }
        OutputTarget::File { path, replaced } => {
            let folder = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            // A new file gets the usual 0666 less the umask, as numpy's
            // np.save gives it; a replaced one keeps its own mode.
            let mut tmp = tempfile::Builder::new()
                .prefix(&format!(".{name}."))
                .suffix(".procjob-tmp")
                .permissions(std::fs::Permissions::from_mode(0o666))
                .tempfile_in(folder)
                .map_err(fail)?;
            parts.iter().try_for_each(|p| tmp.write_all(p)).and_then(|()| tmp.flush()).map_err(fail)?;
            if let Some(old) = replaced {
                let file = tmp.as_file();
                file.set_permissions(std::fs::Permissions::from_mode(old.mode() & 0o7777)).map_err(fail)?;
                // Only root may give a file away; anyone else already owns it.
                let _ = std::os::unix::fs::fchown(file, Some(old.uid()), Some(old.gid()));
            }
            tmp.persist(path).map(drop).map_err(|e| fail(e.error))
        }
    }
}

/// Standard output that keeps its first write error, so that a report that
/// could not be written fails the command at its end instead of passing
/// silently (`> /dev/full`). The run goes on meanwhile: what it computes
/// for other outputs (`--out`) is not lost.
struct Checked<W: Write> {
    inner: W,
    error: Option<std::io::Error>,
}

impl<W: Write> Checked<W> {
    fn new(inner: W) -> Checked<W> {
        Checked { inner, error: None }
    }

    /// Flushes, then: nothing went wrong, or the reader went away (a
    /// closed pipe, `| head -1`: quiet, as a Unix filter is), or an error
    /// naming what failed.
    fn finish(mut self) -> Result<(), CliError> {
        let _ = self.flush();
        match self.error {
            None => Ok(()),
            Some(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
            Some(e) => {
                Err(CliError { code: exit::RUN_FAILED, message: format!("cannot write to standard output: {e}") })
            }
        }
    }

    fn keep(&mut self, result: std::io::Result<()>) {
        if let Err(e) = result {
            self.error.get_or_insert(e);
        }
    }
}

impl<W: Write> Write for Checked<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.error.is_some() {
            return Ok(buf.len());
        }
        match self.inner.write(buf) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => Err(e),
            Err(e) => {
                self.error = Some(e);
                Ok(buf.len())
            }
            ok => ok,
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if self.error.is_none() {
            let result = self.inner.flush();
            self.keep(result);
        }
        Ok(())
    }
}

/// Room the run folder needs: the A and B dumps (none for the user's own
/// files, mapped in place) and a C file, per mode that writes files.
fn needed_bytes(source: &Source, modes: &[Mode]) -> u64 {
    let (dtype, m, k, n) = source.dims();
    let size = dtype.size() as u128;
    let (m, k, n) = (m as u128, k as u128, n as u128);
    let file_modes = modes.iter().any(|m| matches!(m, Mode::Memmap | Mode::MemmapOut));
    let inputs = if matches!(source, Source::Files(_)) || !file_modes { 0 } else { (m * k + k * n) * size };
    // Every worker mode stacks C in a file of the run folder.
    let outputs = if modes.iter().any(|m| m.uses_workers()) { m * n * size } else { 0 };
    // Each repetition's dumps are unlinked when it ends, but warm workers
    // keep the previous repetition's maps (and so its pages) until their next
    // batch: room for two sets of inputs. (Each matrix was checked to fit
    // in an isize, so this sum fits in a u128 and saturates only beyond any
    // real folder's room.)
    u64::try_from(2 * inputs + outputs + 64 * 1024).unwrap_or(u64::MAX)
}

/// This machine in a few words: the CPU's model, family and model numbers
/// (from `/proc/cpuinfo` where there is one) and the CPUs this process may
/// use.
fn machine_text() -> String {
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    // The first processor's fields.
    let field = |key: &str| {
        info.lines()
            .take_while(|l| !l.trim().is_empty())
            .find_map(|l| l.split_once(':').filter(|(k, _)| k.trim() == key).map(|(_, v)| v.trim().to_string()))
    };
    let cpu = match (field("model name"), field("cpu family"), field("model")) {
        (Some(name), Some(family), Some(model)) => format!("{name}, family {family} model {model}, "),
        (Some(name), ..) => format!("{name}, "),
        _ => String::new(),
    };
    format!("{cpu}{cpus} CPU{}", if cpus == 1 { "" } else { "s" })
}

/// A run that failed for want of room in the temp folder's filesystem
/// (another run or program filled it after the room check): say so, with
/// the folder, what the run needs and what to do, instead of the worker's
/// death or the read error it showed up as.
fn explain_full_folder(e: Error, folder: &RunFolder, needed: u64) -> CliError {
    let full = match &e {
        Error::WorkerDied { exit: crate::error::WorkerExit::Signaled { signal }, .. } => {
            *signal == nix::sys::signal::Signal::SIGBUS
                && crate::run_folder::free_bytes(folder.path()).is_some_and(|free| free < 1 << 20)
        }
        other => {
            let text = other.to_string();
            text.contains("No space left on device") || text.contains("os error 28")
        }
    };
    if !full {
        return e.into();
    }
    let parent = folder.path().parent().unwrap_or(folder.path());
    let free = crate::run_folder::free_bytes(folder.path()).unwrap_or(0);
    CliError::usage(format!(
        "the temp folder {} is full ({} free; this run needs {} there): something else filled it while \
         this run was using it. Free some space, or pick another folder with --temp-folder or {} \
         (what failed: {e})",
        parent.display(),
        crate::run_folder::human_bytes(free),
        crate::run_folder::human_bytes(needed),
        crate::run_folder::TEMP_FOLDER_ENV,
    ))
}

fn matmul_command(args: &MatmulArgs) -> Result<(), CliError> {
    let req = check_request(args)?;
    let needed = needed_bytes(&req.source, &req.modes);
    let folder =
        RunFolder::create(req.settings.temp_folder.as_deref(), needed).map_err(|e| CliError::usage(e.to_string()))?;
    let Request { modes, source, settings, check, out: out_target, trace: trace_target } = req;
    mpi::record_places(settings.processes);
    let inputs = source.materialize()?;
    let (m, k, n) = inputs.dims();
    let mut out = Checked::new(std::io::stdout().lock());
    if !args.json {
        let _ = writeln!(
            out,
            "procjob matmul: C = A × B, {} {m}×{k} · {k}×{n}, {} processes, {} blocks\n  temp folder {}",
            inputs.dtype(),
            settings.processes,
            settings.blocks,
            folder.path().display()
        );
        mpi::header(&mut out);
    }
    // What every mode's C is checked against: seq's C, computed here when
    // seq is not among the modes, else taken from seq's run.
    let mut reference = if check && !modes.contains(&Mode::Seq) { Some(matmul::multiply_seq(&inputs)?) } else { None };
    let mut reports: Vec<ModeReport> = Vec::new();
    let mut trace = crate::trace::Trace::default();
    // Only the reference and the last mode's C (for --out) are kept, and a
    // mode's C is dropped before the next mode runs: not held through the
    // modes after it (six of them at 4000² would be 768 MB, and forked
    // workers would inherit them).
    let mut last_c = None;
    let mut table = Table::new(table_width() >= Table::FULL_WIDTH);
    let timing = load::CpuClock::now();
    for &mode in &modes {
        if let Some(signal) = crate::signals::received() {
            return Err(Error::Interrupted { signal }.into());
        }
        drop(last_c.take());
        let between_before = mpi::rank_bytes();
        let run =
            matmul::run_mode(mode, &inputs, &settings, &folder).map_err(|e| explain_full_folder(e, &folder, needed))?;
        // A task lost to a dead worker and run again (--retries) is no
        // failure, but the user hears of it.
        let mut lost = false;
        for loss in run.repetitions.iter().flat_map(|r| &r.lost) {
            say!("procjob: {}: {loss}; ran it again on a fresh worker (--retries)", mode.name());
            lost = true;
        }
        if lost {
            mpi::say_where_workers_ran();
        }
        let matches = if check { Some(reference.as_ref().is_none_or(|s| *s == run.c)) } else { None };
        let seq_wall = reports.iter().find(|r| r.mode == "seq").map(|r| r.wall_s);
        let mut report = ModeReport::new(&run, &inputs, &settings, seq_wall, matches);
        let between_after = mpi::rank_bytes();
        report.bytes_between_ranks_out = between_after.0 - between_before.0;
        report.bytes_between_ranks_in = between_after.1 - between_before.1;
        if args.json {
            let line = serde_json::to_string(&report).expect("reports serialize");
            let _ = writeln!(out, "{line}");
        } else {
            table.row(&mut out, &report);
        }
        let _ = out.flush();
        reports.push(report);
        let ModeRun { c, trace: mut mode_trace, .. } = run;
        mode_trace.name_worker_lanes(mode.name());
        trace.extend(mode_trace);
        if check && mode == Mode::Seq && reference.is_none() {
            reference = Some(c.clone());
        }
        last_c = Some(c);
    }
    if !args.json {
        table.footer(&mut out, &reports);
        mpi::footer(&mut out, &reports);
        let cpus = crate::pool::available_cpus();
        if let Some(line) = load::Load::since(timing).and_then(|l| l.busy_line(cpus)) {
            let _ = writeln!(out, "\n{}", wrap_78(&line));
        }
    }
    // Each output is written even if another fails: one failure never
    // loses what another output holds.
    let mut failures = Vec::new();
    if let Some(target) = &out_target {
        let c = last_c.as_ref().expect("at least one mode");
        let written = procjob_worker::npy::try_encode_header(c.dtype(), c.shape())
            .map_err(|e| format!("--out: {e}"))
            .and_then(|header| write_output("--out", target, &[&header, c.as_bytes()]));
        failures.extend(written.err());
    }
    if let Some(target) = &trace_target {
        failures.extend(write_output("--trace", target, &[trace.to_chrome_json().as_bytes()]).err());
    }
    let printed = out.finish();
    if !failures.is_empty() {
        return Err(CliError { code: exit::RUN_FAILED, message: failures.join("; ") });
    }
    printed?;
    if reports.iter().any(|r| r.matches_seq == Some(false)) {
        return Err(CliError {
            code: exit::RUN_FAILED,
            message: "C differs from seq's C in some mode (see matches_seq)".into(),
        });
    }
    Ok(())
}

fn demo_command(args: &DemoArgs) -> Result<(), CliError> {
    let dtype = crate::matmul::dtype_from_name(&args.dtype)
        .ok_or_else(|| CliError::usage(format!("--dtype {:?} is not one of: i64, f64, f32", args.dtype)))?;
    let options = crate::cli::demo::DemoOptions {
        size: args.size,
        processes: args.processes.unwrap_or_else(crate::pool::available_cpus),
        dtype,
        temp_folder: args.temp_folder.clone(),
        repeat: args.repeat,
    };
    let mut out = Checked::new(std::io::stdout().lock());
    crate::cli::demo::run(&options, &mut out)?;
    out.finish()
}

fn bench_command(args: &BenchArgs) -> Result<(), CliError> {
    mpi::select_backend(args.backend.as_deref())?;
    // Under MPI, the CPUs of every node.
    let cpus = mpi::default_processes();
    let processes = if args.processes.is_empty() { (1..=cpus).collect() } else { args.processes.clone() };
    if processes.contains(&0) {
        return Err(CliError::usage("--processes: every count must be at least 1"));
    }
    if args.sizes.is_empty() || args.repeat == 0 {
        return Err(CliError::usage("--sizes and --repeat need at least one value"));
    }
    let modes = args
        .modes
        .iter()
        .map(|m| {
            Mode::from_name(m).ok_or_else(|| {
                CliError::usage(format!("--modes: {m:?} is not one of seq, threads, copy, memmap, memmap-out, fork"))
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut modes = modes;
    mpi::adjust_modes(&mut modes, false, false)?;
    let dtype = crate::matmul::dtype_from_name(&args.dtype)
        .ok_or_else(|| CliError::usage(format!("--dtype {:?} is not one of: i64, f64, f32", args.dtype)))?;
    if let Some(dir) = &args.plot {
        check_plot_dir(dir)?;
    }
    let found = if args.against.is_empty() {
        None
    } else {
        let wanted = crate::cli::against::parse(&args.against).map_err(CliError::usage)?;
        Some(crate::cli::against::find(&wanted, args.python.as_deref()))
    };
    let sweep = crate::cli::bench::Sweep {
        sizes: args.sizes.clone(),
        processes,
        modes,
        dtype,
        repeat: args.repeat,
        warmup: args.warmup,
        temp_folder: args.temp_folder.clone(),
        against: found.as_ref().and_then(|f| f.against.clone()),
    };
    let mut out = Checked::new(std::io::stdout().lock());
    if let Some(found) = &found {
        // With --json, stdout carries only JSON Lines.
        if args.json {
            say!("{}", found.notice);
        } else {
            let _ = writeln!(out, "{}", found.notice);
        }
    }
    if !args.json {
        let _ = writeln!(
            out,
            "procjob bench: {dtype} n×n · n×n, {} timed runs per case after {} warm-up;\n\
             efficiency = median of paired ideal/run ratios",
            args.repeat, args.warmup
        );
        if let Some(against) = &sweep.against {
            let _ = writeln!(out, "{}", crate::cli::against::legend(&against.baselines));
        }
        if let Some(text) = mpi::world_text() {
            let _ = writeln!(out, "{}", wrap_78(&text));
        }
        // What ran, so that a sweep pasted elsewhere says on what machine.
        let _ = writeln!(out, "{}", wrap_78(&format!("machine: {}", machine_text())));
        let _ = writeln!(out, "{}", wrap_78(&format!("kernel: {}", procjob_worker::kernels::gemm::describe(dtype))));
    }
    let json = args.json;
    let wide = table_width() >= FULL_BENCH_WIDTH;
    let mut over_ideal = false;
    let mut placed = None;
    let reports = crate::cli::bench::run(&sweep, |r| {
        if json {
            let _ = writeln!(out, "{}", serde_json::to_string(r).expect("reports serialize"));
        } else {
            // Under MPI, where the workers run, once per size and count.
            if !r.nodes.is_empty() && placed != Some((r.size, r.processes)) {
                placed = Some((r.size, r.processes));
                for line in wrap_78(&mpi::placement_text(&r.nodes)).lines() {
                    let _ = writeln!(out, "  {line}");
                }
            }
            over_ideal |= print_case(&mut out, r, wide);
            let rounds = r.stats.times_s.len();
            let numpy = r.vs_numpy.zip(r.vs_numpy_faster_rounds);
            let joblib = r.vs_joblib.zip(r.vs_joblib_faster_rounds);
            if let Some(line) = crate::cli::against::ratio_line(numpy, joblib, rounds) {
                let _ = writeln!(out, "{line}");
            }
        }
        let _ = out.flush();
    })?;
    if over_ideal {
        let note = if mpi::on_mpi() { OVER_IDEAL_MPI } else { OVER_IDEAL };
        let _ = writeln!(out, "\n{note}");
    }
    if !json {
        mpi::bench_footer(&mut out, &reports);
    }
    let mismatch = reports.iter().any(|r| r.matches_seq == Some(false));
    if let Some(dir) = &args.plot {
        // The charts are of procjob's modes: numpy and joblib have no
        // workers' memory to show.
        let reports: Vec<_> = reports.into_iter().filter(|r| r.mode != "numpy" && r.mode != "joblib").collect();
        let paths =
            crate::cli::plot::write_charts(&reports, dir).map_err(|e| CliError::usage(format!("--plot: {e}")))?;
        if !json {
            let _ = writeln!(out);
        }
        for path in paths {
            // With --json, stdout carries only JSON Lines.
            if json {
                say!("wrote {}", path.display());
            } else {
                let _ = writeln!(out, "wrote {}", path.display());
            }
        }
    }
    out.finish()?;
    if mismatch {
        return Err(CliError {
            code: exit::RUN_FAILED,
            message: "C differs from seq's C in some case (see matches_seq)".into(),
        });
    }
    Ok(())
}

/// `--plot DIR` must name a folder we can write into, made if it does not
/// exist; checked before the sweep so a long run does not end in an error.
fn check_plot_dir(dir: &Path) -> Result<(), CliError> {
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return Err(CliError::usage(format!("--plot {}: not a directory", dir.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => std::fs::create_dir_all(dir)
            .map_err(|e| CliError::usage(format!("--plot {}: cannot create the folder: {e}", dir.display())))?,
        Err(e) => return Err(CliError::usage(format!("--plot {}: {e}", dir.display()))),
    }
    tempfile::Builder::new()
        .prefix(".procjob-plot-probe-")
        .tempfile_in(dir)
        .map(drop)
        .map_err(|e| CliError::usage(format!("--plot {}: cannot write there: {e}", dir.display())))
}

/// The columns a wide bench row takes; narrower, a row leaves out the
/// range and the ideal's time.
const FULL_BENCH_WIDTH: usize = 136;

/// The footnote of an efficiency shown above 100%.
const OVER_IDEAL: &str = "* above 100% of the ideal: noise. The ideal and the mode ran in the same\n\
                          rounds, and a mode cannot beat the same kernel on threads with its inputs\n\
                          already in place; read it as 100%.";

/// The same footnote under MPI, where the ideal is rank 0's machine alone.
const OVER_IDEAL_MPI: &str = "* above 100% of the ideal: under MPI the ideal is P threads on rank 0's\n\
                              machine alone, while the mode's workers use the CPUs of every node; beyond\n\
                              one node's CPUs that is the nodes helping, below it noise.";

/// How a mode's time compares with seq's: "1.25× faster than seq", or
/// "level with seq" when the two round to the same.
fn relative_to_seq(speedup: f64) -> String {
    faster_or_slower(speedup, " than seq", " with seq")
}

/// "1.25× faster{than}" for a speed ratio of 1.25, "2.00× slower{than}"
/// for 0.5, or "level{with}" when it rounds to 1.00.
pub(super) fn faster_or_slower(ratio: f64, than: &str, with: &str) -> String {
    if format!("{ratio:.2}") == "1.00" {
        format!("level{with}")
    } else if ratio >= 1.0 {
        format!("{ratio:.2}× faster{than}")
    } else {
        format!("{:.2}× slower{than}", 1.0 / ratio)
    }
}

/// "  94% of ideal (97.1 ms)" (without the time when `ideal_s` is
/// `None`), marked with `*` above 100% (see [`OVER_IDEAL`]); and whether
/// it was.
fn efficiency_text(efficiency: f64, ideal_s: Option<f64>) -> (String, bool) {
    let percent = (efficiency * 100.0).round();
    let over = percent > 100.0;
    let mark = if over { "*" } else { "" };
    let text = match ideal_s {
        Some(i) => format!("  {percent:>4.0}%{mark} of ideal ({})", secs(i)),
        None => format!(" {percent:>4.0}%{mark} ideal"),
    };
    (text, over)
}

/// Prints one case of the sweep, with its range and the ideal's time when
/// `wide`; returns whether its efficiency is shown above 100%.
fn print_case(out: &mut impl Write, r: &crate::cli::bench::CaseReport, wide: bool) -> bool {
    if r.mode == "seq" {
        let _ = writeln!(out, "\nsize {}:", r.size);
    }
    let s = &r.stats;
    let rate = if r.dtype == "i64" { "GOP/s" } else { "GFLOP/s" };
    let relative = if r.mode == "seq" { "baseline".to_string() } else { relative_to_seq(r.speedup_vs_seq) };
    let (efficiency, over) = match (r.efficiency, r.ideal_median_s) {
        (Some(e), Some(i)) => efficiency_text(e, wide.then_some(i)),
        _ => (String::new(), false),
    };
    if !wide {
        let relative = relative.trim_end_matches(" than seq").trim_end_matches(" with seq");
        let _ = writeln!(
            out,
            "  {:<10} P={:<2} {:>9} ± {:>7} {:>12} {:>6.1} {rate}{efficiency}",
            r.mode,
            r.processes,
            secs(s.mean_s),
            secs(s.stddev_s),
            relative,
            r.gflops,
        );
        return over;
    }
    let _ = writeln!(
        out,
        "  {:<10} P={:<2} {:>9} ± {:>8}  [{:>9} … {:>9}]  {:>22}  {:>7.1} {rate}{efficiency}",
        r.mode,
        r.processes,
        secs(s.mean_s),
        secs(s.stddev_s),
        secs(s.min_s),
        secs(s.max_s),
        relative,
        r.gflops,
    );
    over
}

/// One JSON object per mode (docs/cli.md).
#[derive(Debug, Serialize)]
pub struct ModeReport {
    mode: &'static str,
    processes: usize,
    start_method: &'static str,
    dtype: &'static str,
    m: usize,
    k: usize,
    n: usize,
    blocks: usize,
    wall_s: f64,
    walls_s: Vec<f64>,
    wall_min_s: f64,
    wall_max_s: f64,
    cold_wall_s: f64,
    phases: PhasesReport,
    gflops: f64,
    speedup_vs_seq: Option<f64>,
    bytes_to_workers: u64,
    bytes_from_workers: u64,
    backend: &'static str,
    ranks: usize,
    bytes_between_ranks_out: u64,
    bytes_between_ranks_in: u64,
    workers: Vec<WorkerJson>,
    coordinator: CoordinatorJson,
    matches_seq: Option<bool>,
    lost: Vec<String>,
}

#[derive(Debug, Serialize)]
struct PhasesReport {
    dump_s: f64,
    spawn_s: f64,
    compute_s: f64,
    collect_s: f64,
}

#[derive(Debug, Serialize)]
struct WorkerJson {
    index: usize,
    pid: u32,
    tasks: u64,
    peak_rss_bytes: u64,
    peak_uss_bytes: u64,
    peak_pss_bytes: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    rank: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    host: Option<String>,
}

#[derive(Debug, Serialize)]
struct CoordinatorJson {
    pid: u32,
    peak_rss_bytes: u64,
}

impl ModeReport {
    fn new(
        run: &ModeRun,
        inputs: &Inputs,
        settings: &RunSettings,
        seq_wall: Option<f64>,
        matches_seq: Option<bool>,
    ) -> ModeReport {
        let (m, k, n) = inputs.dims();
        let walls: Vec<f64> = run.repetitions.iter().map(|r| r.wall.as_secs_f64()).collect();
        let median_index = median_index(&walls);
        let median = &run.repetitions[median_index];
        let wall_s = walls[median_index];
        let seq_wall = if run.mode == Mode::Seq { Some(wall_s) } else { seq_wall };
        ModeReport {
            mode: run.mode.name(),
            processes: if run.mode == Mode::Seq { 1 } else { settings.processes },
            start_method: match run.mode {
                Mode::Seq | Mode::Threads => "none",
                Mode::Fork => "fork",
                _ if settings.fork => "fork",
                _ => "spawn",
            },
            dtype: inputs.dtype().name(),
            m,
            k,
            n,
            blocks: run.blocks,
            wall_s,
            walls_s: walls.clone(),
            wall_min_s: walls.iter().copied().fold(f64::INFINITY, f64::min),
            wall_max_s: walls.iter().copied().fold(0.0, f64::max),
            cold_wall_s: walls[0],
            phases: PhasesReport {
                dump_s: median.phases.dump_s,
                spawn_s: median.phases.spawn_s,
                compute_s: median.phases.compute_s,
                collect_s: median.phases.collect_s,
            },
            gflops: if wall_s > 0.0 { 2.0 * m as f64 * k as f64 * n as f64 / wall_s / 1e9 } else { 0.0 },
            speedup_vs_seq: seq_wall.filter(|_| wall_s > 0.0).map(|s| s / wall_s),
            bytes_to_workers: median.bytes_to_workers,
            bytes_from_workers: median.bytes_from_workers,
            lost: run.repetitions.iter().flat_map(|r| r.lost.iter().cloned()).collect(),
            backend: mpi::backend(),
            ranks: mpi::ranks(),
            bytes_between_ranks_out: 0,
            bytes_between_ranks_in: 0,
            workers: run
                .workers
                .iter()
                .map(|w| WorkerJson {
                    index: w.index,
                    pid: w.pid,
                    tasks: w.tasks,
                    peak_rss_bytes: w.peak.peak_rss,
                    peak_uss_bytes: w.peak.uss,
                    peak_pss_bytes: w.peak.pss,
                    rank: mpi::place(w.index).map(|p| p.0),
                    host: mpi::place(w.index).map(|p| p.1),
                })
                .collect(),
            coordinator: CoordinatorJson { pid: std::process::id(), peak_rss_bytes: run.coordinator_peak_rss },
            matches_seq,
        }
    }
}

/// Index of the median of `xs` (the lower one for an even count).
fn median_index(xs: &[f64]) -> usize {
    let mut idx: Vec<usize> = (0..xs.len()).collect();
    idx.sort_by(|&a, &b| xs[a].total_cmp(&xs[b]));
    idx[(xs.len() - 1) / 2]
}

/// Columns the human tables may fill: the terminal's width when stdout is
/// one, else `COLUMNS`, else 80.
fn table_width() -> usize {
    use std::io::IsTerminal;
    let terminal = std::io::stdout().is_terminal().then(terminal_columns).flatten();
    terminal
        .or_else(|| std::env::var("COLUMNS").ok().and_then(|c| c.trim().parse().ok()))
        .filter(|&w| w > 0)
        .unwrap_or(80)
}

/// The width of the terminal on stdout, if the system says.
fn terminal_columns() -> Option<usize> {
    let mut size = libc::winsize { ws_row: 0, ws_col: 0, ws_xpixel: 0, ws_ypixel: 0 };
    // SAFETY: TIOCGWINSZ writes one winsize into the struct passed, which
    // lives for the call.
    let done = unsafe { libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &mut size) };
    (done == 0 && size.ws_col > 0).then_some(usize::from(size.ws_col))
}

/// The human table, one row per mode as it finishes: every column on a
/// terminal wide enough, else the ones that fit 80 columns, with the
/// phases in a table of their own after it.
struct Table {
    header_done: bool,
    wide: bool,
}

impl Table {
    /// The columns the wide table takes.
    const FULL_WIDTH: usize = 124;

    fn new(wide: bool) -> Table {
        Table { header_done: false, wide }
    }

    fn row(&mut self, out: &mut impl Write, r: &ModeReport) {
        if !self.wide {
            self.narrow_row(out, r);
            return;
        }
        if !self.header_done {
            let _ = writeln!(
                out,
                "{:<11} {:>9} {:>9} {:>9} {:>9} {:>9}  {:>10}  {:>10} {:>8} {:>8}  C = seq",
                "mode",
                "wall",
                "dump",
                "spawn",
                "compute",
                "collect",
                "to workers",
                "from wkrs",
                "speedup",
                rate_label(r.dtype),
            );
            self.header_done = true;
        }
        let _ = writeln!(
            out,
            "{:<11} {:>9} {:>9} {:>9} {:>9} {:>9}  {:>10}  {:>10} {:>8} {:>8.2}  {}",
            r.mode,
            secs(r.wall_s),
            secs(r.phases.dump_s),
            secs(r.phases.spawn_s),
            secs(r.phases.compute_s),
            secs(r.phases.collect_s),
            bytes(r.bytes_to_workers),
            bytes(r.bytes_from_workers),
            r.speedup_vs_seq.map_or("–".to_string(), |s| format!("{s:.2}×")),
            r.gflops,
            match r.matches_seq {
                Some(true) => "yes",
                Some(false) => "NO",
                None => "unchecked",
            }
        );
    }

    /// A row of the table that fits 80 columns (the phases follow in the
    /// footer).
    fn narrow_row(&mut self, out: &mut impl Write, r: &ModeReport) {
        if !self.header_done {
            let _ = writeln!(
                out,
                "{:<11} {:>9} {:>8} {:>8}  {:>10}  {:>10}  C = seq",
                "mode",
                "wall",
                "speedup",
                rate_label(r.dtype),
                "to workers",
                "from wkrs",
            );
            self.header_done = true;
        }
        let _ = writeln!(
            out,
            "{:<11} {:>9} {:>8} {:>8.2}  {:>10}  {:>10}  {}",
            r.mode,
            secs(r.wall_s),
            r.speedup_vs_seq.map_or("–".to_string(), |s| format!("{s:.2}×")),
            r.gflops,
            bytes(r.bytes_to_workers),
            bytes(r.bytes_from_workers),
            match r.matches_seq {
                Some(true) => "yes",
                Some(false) => "NO",
                None => "unchecked",
            }
        );
    }

    fn footer(&self, out: &mut impl Write, reports: &[ModeReport]) {
        let Some(first) = reports.first() else { return };
        let reps = first.walls_s.len();
        let _ = writeln!(
            out,
            "wall: median of {reps} repetition{} (the first includes starting workers,\n\
             dumping A and B in memmap modes, packing B for the blocks of f64/f32);\n\
             to/from workers: bytes through the pipes, and blocks of 4 MiB or more\n\
             copied out of the workers' memory",
            if reps == 1 { "" } else { "s" }
        );
        if reps >= 2 {
            spread_table(out, reports);
        }
        if !self.wide {
            let _ = writeln!(out, "\n{:<11} {:>9} {:>9} {:>9} {:>9}", "phases", "dump", "spawn", "compute", "collect");
            for r in reports {
                let p = &r.phases;
                let _ = writeln!(
                    out,
                    "{:<11} {:>9} {:>9} {:>9} {:>9}",
                    r.mode,
                    secs(p.dump_s),
                    secs(p.spawn_s),
                    secs(p.compute_s),
                    secs(p.collect_s)
                );
            }
        }
        let _ = writeln!(
            out,
            "\n{:<11} {:>6} {:>13} {:>13} {:>13} {:>15}",
            "memory", "procs", "workers' RSS", "workers' USS", "workers' PSS", "coordinator RSS"
        );
        for r in reports {
            let sum = |f: fn(&WorkerJson) -> u64| r.workers.iter().map(f).sum::<u64>();
            let workers = |v: u64| if r.workers.is_empty() { "–".to_string() } else { bytes(v) };
            let _ = writeln!(
                out,
                "{:<11} {:>6} {:>13} {:>13} {:>13} {:>15}",
                r.mode,
                r.workers.len(),
                workers(sum(|w| w.peak_rss_bytes)),
                workers(sum(|w| w.peak_uss_bytes)),
                workers(sum(|w| w.peak_pss_bytes)),
                bytes(r.coordinator.peak_rss_bytes),
            );
        }
        let _ = writeln!(
            out,
            "peaks, summed over workers. RSS: every page a process touched, shared ones\n\
             too; USS: its private pages only; PSS: private pages plus an even share of\n\
             each shared page, so PSS sums to the real total. A B copied into every\n\
             worker shows in USS; a mapped B shared by all shows in RSS and PSS, not USS."
        );
    }
}

/// `text` on lines of at most 78 characters.
fn wrap_78(text: &str) -> String {
    let mut lines: Vec<String> = vec![String::new()];
    for word in text.split_whitespace() {
        let last = lines.last_mut().expect("one line at least");
        if !last.is_empty() && last.chars().count() + 1 + word.chars().count() > 78 {
            lines.push(word.to_string());
        } else {
            if !last.is_empty() {
                last.push(' ');
            }
            last.push_str(word);
        }
    }
    lines.join("\n")
}

/// Each mode's median wall with its spread over the repetitions, and
/// whether it differs from seq's beyond that spread.
fn spread_table(out: &mut impl Write, reports: &[ModeReport]) {
    let _ = writeln!(out, "\n{:<11} {:>9}  {:<21}  against seq", "spread", "median", "fastest–slowest");
    let seq = reports.iter().find(|r| r.mode == "seq");
    for r in reports {
        let verdict = match seq {
            Some(seq) if r.mode != "seq" => {
                if r.wall_min_s <= seq.wall_max_s && seq.wall_min_s <= r.wall_max_s {
                    "a tie (spreads overlap)"
                } else if r.wall_s < seq.wall_s {
                    "faster"
                } else {
                    "slower"
                }
            }
            _ => "",
        };
        let range = format!("{}–{}", secs(r.wall_min_s), secs(r.wall_max_s));
        let line = format!("{:<11} {:>9}  {:<21}  {verdict}", r.mode, secs(r.wall_s), range);
        let _ = writeln!(out, "{}", line.trim_end());
    }
    let _ = writeln!(
        out,
        "fastest–slowest of all repetitions, the cold first one included; a\n\
         difference within both spreads is noise, a tie, not a win"
    );
}

fn rate_label(dtype: &str) -> &'static str {
    if dtype == "i64" {
        "GOP/s"
    } else {
        "GFLOP/s"
    }
}

fn secs(s: f64) -> String {
    if s == 0.0 {
        "–".into()
    } else if s < 0.001 {
        format!("{:.0} µs", s * 1e6)
    } else if s < 1.0 {
        format!("{:.1} ms", s * 1e3)
    } else {
        format!("{s:.3} s")
    }
}

fn bytes(b: u64) -> String {
    let b = b as f64;
    if b < 1024.0 {
        format!("{b} B")
    } else if b < 1024.0 * 1024.0 {
        format!("{:.1} KiB", b / 1024.0)
    } else if b < 1024.0 * 1024.0 * 1024.0 {
        format!("{:.1} MiB", b / 1024.0 / 1024.0)
    } else {
        format!("{:.2} GiB", b / 1024.0 / 1024.0 / 1024.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_speedup_that_rounds_to_one_is_level_not_faster() {
        assert_eq!(relative_to_seq(1.004), "level with seq");
        assert_eq!(relative_to_seq(0.996), "level with seq");
        assert_eq!(relative_to_seq(1.25), "1.25× faster than seq");
        assert_eq!(relative_to_seq(0.5), "2.00× slower than seq");
    }

    #[test]
    fn an_efficiency_over_100_percent_is_marked_for_its_footnote() {
        assert_eq!(efficiency_text(0.94, Some(0.0971)), ("    94% of ideal (97.1 ms)".to_string(), false));
        assert_eq!(efficiency_text(1.004, Some(0.0971)), ("   100% of ideal (97.1 ms)".to_string(), false));
        assert_eq!(efficiency_text(1.30, Some(0.0971)), ("   130%* of ideal (97.1 ms)".to_string(), true));
        assert_eq!(efficiency_text(1.30, None), ("  130%* ideal".to_string(), true));
    }
}
