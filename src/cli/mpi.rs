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
    crate::cluster::job_cpus()
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

/// Where the workers of a pool of `processes` would run, per node (empty
/// when local).
pub(super) fn nodes_of(processes: usize) -> Vec<super::bench::NodeWorkers> {
    #[cfg(feature = "mpi")]
    {
        let mut nodes: Vec<super::bench::NodeWorkers> = Vec::new();
        for (rank, host) in crate::cluster::worker_places(processes).unwrap_or_default() {
            match nodes.iter_mut().find(|n| n.rank == rank) {
                Some(n) => n.workers += 1,
                None => nodes.push(super::bench::NodeWorkers { rank, host, workers: 1 }),
            }
        }
        nodes
    }
    #[cfg(not(feature = "mpi"))]
    {
        let _ = processes;
        Vec::new()
    }
}

/// The job as `procjob bench` introduces it under MPI: ranks, and each
/// node's agent rank, host and CPUs (`None` when local).
pub(super) fn world_text() -> Option<String> {
    #[cfg(feature = "mpi")]
    if let Some(w) = crate::cluster::world() {
        let nodes: Vec<String> =
            w.nodes.iter().map(|n| format!("rank {} on {} ({} CPUs)", n.agent, n.host, n.cpus)).collect();
        return Some(format!(
            "backend mpi, {} ranks, {} node{}: {}",
            w.size,
            w.nodes.len(),
            if w.nodes.len() == 1 { "" } else { "s" },
            nodes.join("; ")
        ));
    }
    None
}

/// Where a case's workers ran (under MPI), for one line of the table.
pub(super) fn placement_text(nodes: &[super::bench::NodeWorkers]) -> String {
    let parts: Vec<String> = nodes.iter().map(|n| format!("{} on rank {} ({})", n.workers, n.rank, n.host)).collect();
    format!("workers: {}", parts.join(", "))
}

/// After the bench tables under MPI: what crossed between ranks per timed
/// run of each case that ran workers.
pub(super) fn bench_footer(out: &mut impl Write, reports: &[super::bench::CaseReport]) {
    if !on_mpi() {
        return;
    }
    let _ =
        writeln!(out, "\nMPI, per run  {:>6} {:>4} {:>15} {:>15}", "size", "P", "rank 0 → others", "others → rank 0");
    for r in reports.iter().filter(|r| !r.nodes.is_empty()) {
        let _ = writeln!(
            out,
            "{:<13} {:>6} {:>4} {:>15} {:>15}",
            r.mode,
            r.size,
            r.processes,
            crate::run_folder::human_bytes(r.bytes_between_ranks_out),
            crate::run_folder::human_bytes(r.bytes_between_ranks_in)
        );
    }
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

/// After a failure, or a loss run again (`--retries`), under MPI: where
/// each worker ran, so that "worker 3" in the message names a rank and a
/// host. Once per run.
pub(super) fn say_where_workers_ran() {
    static SAID: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if !on_mpi() || SAID.swap(true, std::sync::atomic::Ordering::Relaxed) {
        return;
    }
    let places = PLACES.lock().map(|p| p.clone()).unwrap_or_default();
    if places.is_empty() {
        return;
    }
    let list: Vec<String> =
        places.iter().enumerate().map(|(i, (rank, host))| format!("worker {i} on rank {rank} (host {host})")).collect();
    say!("procjob: under MPI: {}", list.join(", "));
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
