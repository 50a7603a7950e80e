//! Start-up of a worker process, spawned ([`run_worker`]) or forked by the
//! coordinator ([`run_forked_worker`]): take the pool secret, move the
//! protocol off fds 0 and 1, die with the parent, capture panics, install
//! the SIGBUS guard, then [`serve`](super::serve), and exit.

use std::fs::File;
use std::io::BufReader;
use std::os::fd::AsFd;

use super::run::install_panic_capture;
use super::session::{serve, ServeError};
use crate::array::Array;
use crate::registry::Registry;
use crate::secret::PoolSecret;

/// The environment variable that marks a process as a procjob worker; its
/// value is the coordinator's pid.
pub const WORKER_ENV: &str = "PROCJOB_WORKER";

/// Whether this process was started as a procjob worker.
pub fn is_worker_process() -> bool {
    std::env::var_os(WORKER_ENV).is_some()
}

/// Turns this process into a worker: serves on stdin/stdout and exits.
/// Never returns.
pub fn run_worker(registry: &Registry) -> ! {
    let code = match prepare_and_serve(registry) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("procjob worker (pid {}): {e}", std::process::id());
            3
        }
    };
    std::process::exit(code)
}

fn prepare_and_serve(registry: &Registry) -> Result<(), ServeError> {
    // First, before anything opens a descriptor of its own.
    let secret = PoolSecret::take_inherited();
    let (input, output) = take_protocol_fds()?;
    die_with_parent(std::env::var(WORKER_ENV).ok().and_then(|v| v.parse::<i32>().ok()));
    install_panic_capture();
    crate::sigbus::install()?;
    serve(BufReader::with_capacity(1 << 16, input), output, registry, &[], &secret)
}

/// The body of a worker forked by the coordinator (start method `fork`):
/// serves on the given pipe ends, with `inherited` — arrays of the
/// coordinator that this process shares copy-on-write — resolvable by
/// [`ArrayRef::Inherited`](crate::protocol::ArrayRef::Inherited) references, and accepting the handshake that
/// carries `secret`, its pool's (which it has in memory). Never returns.
///
/// Must be called in the child right after `fork`, while it is the only
/// thread of its process (as the coordinator was when it forked).
pub fn run_forked_worker(
    input: File,
    output: File,
    registry: &Registry,
    inherited: &[Array],
    parent: i32,
    secret: PoolSecret,
) -> ! {
    let code = match prepare_forked(parent).and_then(|()| {
        serve(BufReader::with_capacity(1 << 16, input), output, registry, inherited, &Ok(secret))
            .map_err(std::io::Error::other)
    }) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("procjob worker (pid {}): {e}", std::process::id());
            3
        }
    };
    // SAFETY: _exit ends the forked child without running the destructors
    // and exit handlers it inherited from the coordinator.
    unsafe { libc::_exit(code) }
}

/// What a forked worker does before serving: stdin from /dev/null and
/// stdout to stderr (as a spawned one), its own process group, the
/// coordinator's blocked signals unblocked, death with its parent, panics
/// captured.
fn prepare_forked(parent: i32) -> std::io::Result<()> {
    let devnull = File::open("/dev/null")?;
    nix::unistd::dup2_stdin(devnull.as_fd()).map_err(std::io::Error::from)?;
    nix::unistd::dup2_stdout(std::io::stderr().as_fd()).map_err(std::io::Error::from)?;
    nix::unistd::setpgid(nix::unistd::Pid::from_raw(0), nix::unistd::Pid::from_raw(0)).map_err(std::io::Error::from)?;
    nix::sys::signal::sigprocmask(
        nix::sys::signal::SigmaskHow::SIG_SETMASK,
        Some(&nix::sys::signal::SigSet::empty()),
        None,
    )
    .map_err(std::io::Error::from)?;
    die_with_parent(Some(parent));
    install_panic_capture();
    crate::sigbus::install()
}

/// Moves the protocol off fds 0 and 1: stdin becomes /dev/null and stdout
/// becomes stderr, so a task's prints and reads cannot touch the stream.
fn take_protocol_fds() -> std::io::Result<(File, File)> {
    let stdin = std::io::stdin();
    let input = stdin.as_fd().try_clone_to_owned()?;
    let stdout = std::io::stdout();
    let output = stdout.as_fd().try_clone_to_owned()?;
    let devnull = File::open("/dev/null")?;
    nix::unistd::dup2_stdin(devnull.as_fd()).map_err(std::io::Error::from)?;
    nix::unistd::dup2_stdout(std::io::stderr().as_fd()).map_err(std::io::Error::from)?;
    crate::io::set_protocol_output_fd(std::os::fd::AsRawFd::as_raw_fd(&output));
    Ok((File::from(input), File::from(output)))
}

/// Asks the kernel for SIGKILL when the parent dies, then checks the parent
/// is still the coordinator that started us (it may have died before the
/// request took effect).
fn die_with_parent(expected: Option<i32>) {
    #[cfg(target_os = "linux")]
    {
        let _ = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL);
        if let Some(parent) = expected {
            if parent > 1 && nix::unistd::getppid().as_raw() != parent {
                std::process::exit(3);
            }
        }
    }
}
