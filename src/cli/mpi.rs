//! The command line under MPI: `--backend`, the default worker count over
//! every node, the modes that apply, the shared-filesystem check, and what
//! the tables and JSON add (ranks, hosts, bytes between ranks).

use std::io::Write;
use std::sync::Mutex;

use super::CliError;
use crate::matmul::Mode;

/// Where each worker of the last pool placed ran: (rank, host), by index.
static PLACES: Mutex<Vec<(usize, String)>> = Mutex::new(Vec::new());

/// Applies `--backend` (`None`: MPI when launched under it, else local).
pub(super) fn select_backend(backend: Option<&str>) -> Result<(), CliError> {
    match backend {
        None => Ok(()),
        Some("local") => {
            #[cfg(feature = "mpi")]
            crate::cluster::set_backend_local();
            Ok(())
        }
        Some("mpi") => {
            if !cfg!(feature = "mpi") {
                return Err(CliError::usage(
                    "--backend mpi: this binary was built without MPI support; build it with \
                     `cargo build --release --features mpi` and start it with `mpirun -n R procjob …`",
                ));
            }
            if !on_mpi() {
                return Err(CliError::usage(
                    "--backend mpi: not started by an MPI launcher with more than one rank; \
                     start it as `mpirun -n R procjob …` (or `srun`)",
                ));
            }
            Ok(())
        }
        Some(other) => Err(CliError::usage(format!("--backend {other:?} is not one of: mpi, local"))),
    }
}

/// Whether pools run across MPI ranks.
pub(super) fn on_mpi() -> bool {
    #[cfg(feature = "mpi")]
    return crate::cluster::world().is_some();
    #[cfg(not(feature = "mpi"))]
    false
}

/// "mpi" or "local".
pub(super) fn backend() -> &'static str {
    if on_mpi() {
        "mpi"
    } else {
        "local"
    }
}

/// The number of ranks (1 when local).
pub(super) fn ranks() -> usize {
    #[cfg(feature = "mpi")]
    if let Some(w) = crate::cluster::world() {
        return w.size;
    }
    1
}

/// The default worker count: this machine's CPUs, or under MPI the CPUs
/// of every node.
pub(super) fn default_processes() -> usize {
    #[cfg(feature = "mpi")]
    if let Some(w) = crate::cluster::world() {
        return w.nodes.iter().map(|n| n.cpus).sum();
    }
    crate::pool::available_cpus()
}

/// Under MPI, fork does not apply (a forked worker is on rank 0's machine
/// only, and a process with MPI's threads cannot fork safely): `all` leaves
/// it out, and asking for it is an error.
pub(super) fn adjust_modes(modes: &mut Vec<Mode>, all: bool, fork_start: bool) -> Result<(), CliError> {
    if !on_mpi() {
        return Ok(());
    }
    if fork_start {
        return Err(CliError::usage(
            "--start-method fork does not apply under MPI: workers on other nodes are started by their \
             node's agent; use spawn (or --backend local)",
        ));
    }
    if all {
        modes.retain(|&m| m != Mode::Fork);
    } else if modes.contains(&Mode::Fork) {
        return Err(CliError::usage(
            "--mode fork does not apply under MPI (workers on other nodes cannot inherit rank 0's memory); \
             use copy, memmap or memmap-out, or --backend local",
        ));
    }
    Ok(())
}

/// Bytes sent to and received from other ranks so far, as rank 0 sees it.
pub(super) fn rank_bytes() -> (u64, u64) {
    crate::cluster::bytes_between_ranks()
}

/// Remembers where the workers of a pool of `processes` run.
pub(super) fn record_places(processes: usize) {
    #[cfg(feature = "mpi")]
    if let (Some(places), Ok(mut p)) = (crate::cluster::worker_places(processes), PLACES.lock()) {
        *p = places;
    }
    #[cfg(not(feature = "mpi"))]
    let _ = processes;
}

/// Worker `index`'s rank and host, under MPI.
pub(super) fn place(index: usize) -> Option<(usize, String)> {
    PLACES.lock().ok()?.get(index).cloned()
}

/// The header line of a run under MPI: ranks, nodes, where workers run.
pub(super) fn header(out: &mut impl Write) {
    #[cfg(feature = "mpi")]
    if let Some(w) = crate::cluster::world() {
        let places = PLACES.lock().map(|p| p.clone()).unwrap_or_default();
        let nodes: Vec<String> = w
            .nodes
            .iter()
            .map(|n| {
                let workers: Vec<String> =
                    places.iter().enumerate().filter(|(_, (r, _))| *r == n.agent).map(|(i, _)| i.to_string()).collect();
                format!(
                    "rank {} on {} (workers {})",
                    n.agent,
                    n.host,
                    if workers.is_empty() { "none".into() } else { workers.join(",") }
                )
            })
            .collect();
        let _ = writeln!(
            out,
            "  backend mpi, {} ranks, {} node{}: {}",
            w.size,
            w.nodes.len(),
            if w.nodes.len() == 1 { "" } else { "s" },
            nodes.join("; ")
        );
    }
    #[cfg(not(feature = "mpi"))]
    let _ = out;
}

/// After a failure under MPI: where each worker ran, so that "worker 3"
/// in the message names a rank and a host.
pub(super) fn explain_failure() {
    if !on_mpi() {
        return;
    }
    let places = PLACES.lock().map(|p| p.clone()).unwrap_or_default();
    if places.is_empty() {
        return;
    }
    let list: Vec<String> =
        places.iter().enumerate().map(|(i, (rank, host))| format!("worker {i} on rank {rank} (host {host})")).collect();
    eprintln!("procjob: under MPI: {}", list.join(", "));
}

/// Under MPI, after the tables: what crossed between ranks in each mode.
pub(super) fn footer(out: &mut impl Write, reports: &[super::ModeReport]) {
    if !on_mpi() {
        return;
    }
    let _ = writeln!(out, "\n{:<11} {:>15} {:>15}", "MPI", "rank 0 → others", "others → rank 0");
    for r in reports {
        let _ = writeln!(
            out,
            "{:<11} {:>15} {:>15}",
            r.mode,
            crate::run_folder::human_bytes(r.bytes_between_ranks_out),
            crate::run_folder::human_bytes(r.bytes_between_ranks_in)
        );
    }
}
