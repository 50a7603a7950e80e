//! Running across the ranks of an MPI job (feature `mpi`).
//!
//! `mpirun -n R procjob …` (or `srun`) starts R copies of the program.
//! [`crate::init`] makes every rank but 0 a node agent that never returns
//! from it: the lowest rank on each node starts and feeds local worker
//! processes over pipes, exactly as a local pool does, relaying their frames
//! to and from rank 0 over MPI; the other ranks of a node wait for the end.
//! Rank 0 runs the program; its pools place slots on every node (its own
//! node's slots are local processes) through the [`Transport`](super::Transport)
//! in `transport.rs`. The frames are the same bytes as on a pipe, so the
//! workers cannot tell; file references in them hold where the temp
//! folder is on a filesystem every node sees, which [`probe_shared`]
//! checks; elsewhere `ship.rs` copies the bytes a batch reads to the same
//! path on that node before the batch, and brings back the rows a worker
//! wrote there before its answer.
//!
//! This file is compiled without the feature too: it says whether the
//! process was launched by an MPI launcher, so that a binary built without
//! MPI can say how to build one that has it.

#[cfg(feature = "mpi")]
mod agent;
#[cfg(feature = "mpi")]
mod link;
#[cfg(feature = "mpi")]
mod ship;
#[cfg(feature = "mpi")]
mod transport;
#[cfg(feature = "mpi")]
mod wire;
#[cfg(feature = "mpi")]
mod world;

#[cfg(feature = "mpi")]
pub(crate) use ship::prepare;
#[cfg(feature = "mpi")]
pub(crate) use transport::pool_on_ranks;
#[cfg(feature = "mpi")]
pub use transport::worker_places;
#[cfg(feature = "mpi")]
pub use world::{probe_shared, set_backend_local, world, Node, World};

/// Environment variables an MPI launcher sets in each rank, with the rank
/// count (Open MPI, MPICH/Hydra and Intel MPI, PMIx, Slurm's srun: a job
/// step's task count; `SLURM_NTASKS` is the allocation's, set in a batch
/// script too).
const SIZE_VARS: [&str; 4] = ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "SLURM_STEP_NUM_TASKS"];
/// The same for the rank.
const RANK_VARS: [&str; 4] = ["OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "SLURM_PROCID"];

/// How the process was launched, as the environment says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Launch {
    /// This process's rank.
    pub rank: usize,
    /// The number of ranks.
    pub size: usize,
}

/// The MPI launch this process is part of, if any: read from the variables
/// `mpirun`/`mpiexec` (Open MPI, MPICH, Intel MPI, PMIx) or Slurm's `srun`
/// set. A Slurm batch script is not a launch (it has `SLURM_PROCID` 0 and
/// the allocation's `SLURM_NTASKS`, but no job step); nor is a procjob
/// worker.
pub fn launch() -> Option<Launch> {
    if procjob_worker::serve::is_worker_process() {
        return None;
    }
    launch_from(|v| std::env::var(v).ok())
}

/// [`launch`] from the variables `var` gives.
fn launch_from(var: impl Fn(&str) -> Option<String>) -> Option<Launch> {
    let read = |vars: &[&str]| vars.iter().find_map(|v| var(v)?.trim().parse::<usize>().ok());
    let size = read(&SIZE_VARS)?;
    let rank = read(&RANK_VARS)?;
    Some(Launch { rank, size })
}

/// What [`crate::init`] does about MPI: under a launch of several ranks,
/// with the feature, set up the job (and never return on ranks other than
/// 0); without it, say how to build with it and exit.
pub(crate) fn init() {
    let Some(launch) = launch() else { return };
    #[cfg(feature = "mpi")]
    {
        let _ = launch;
        world::init();
    }
    #[cfg(not(feature = "mpi"))]
    if launch.size > 1 && std::env::var_os("PROCJOB_BACKEND").is_none_or(|b| b != "local") {
        if launch.rank == 0 {
            say!(
                "procjob: error: started as rank 0 of {} MPI ranks, but this binary was built without MPI \
                 support; build it with `cargo build --release --features mpi` (the MPI library and libclang \
                 must be installed, see the README), or set PROCJOB_BACKEND=local to run a copy of the job \
                 on each rank on its own",
                launch.size
            );
        }
        std::process::exit(2);
    }
}

/// Readies the file at `path` to be referred to by workers on every node
/// (see `ship.rs`); nothing without MPI.
#[cfg(not(feature = "mpi"))]
pub(crate) fn prepare(path: &std::path::Path, writable: bool) -> Result<(), String> {
    let _ = (path, writable);
    Ok(())
}

/// The CPUs the job may use: under MPI (rank 0 of a job of several
/// ranks, with the `mpi` feature), the sum over every node of the CPUs its
/// agent may use; otherwise those this process may use
/// ([`available_cpus`](crate::pool::available_cpus)). What `n_jobs(-1)`
/// and the CLI's default `--processes` count.
pub fn job_cpus() -> usize {
    #[cfg(feature = "mpi")]
    if let Some(w) = world::world() {
        return w.nodes.iter().map(|n| n.cpus).sum::<usize>().max(1);
    }
    crate::pool::available_cpus()
}

/// Bytes this rank has sent to and received from other ranks over MPI,
/// framing of procjob's messages included (0, 0 without MPI).
pub fn bytes_between_ranks() -> (u64, u64) {
    #[cfg(feature = "mpi")]
    {
        use std::sync::atomic::Ordering;
        (link::BYTES_OUT.load(Ordering::Relaxed), link::BYTES_IN.load(Ordering::Relaxed))
    }
    #[cfg(not(feature = "mpi"))]
    (0, 0)
}

#[cfg(test)]
mod tests {
    use super::{launch_from, Launch};

    fn launch_of(vars: &[(&str, &str)]) -> Option<Launch> {
        launch_from(|v| vars.iter().find(|(k, _)| *k == v).map(|(_, x)| x.to_string()))
    }

    #[test]
    fn a_launch_is_read_from_mpirun_and_srun_but_not_a_batch_script() {
        let mpirun = [("OMPI_COMM_WORLD_RANK", "2"), ("OMPI_COMM_WORLD_SIZE", "3")];
        assert_eq!(launch_of(&mpirun), Some(Launch { rank: 2, size: 3 }));
        // Slurm 22.05's srun --mpi=pmix, as seen by a task.
        let srun = [("PMIX_RANK", "1"), ("SLURM_PROCID", "1"), ("SLURM_STEP_NUM_TASKS", "2"), ("SLURM_NTASKS", "2")];
        assert_eq!(launch_of(&srun), Some(Launch { rank: 1, size: 2 }));
        // sbatch -n 2: the batch script itself, no step.
        let batch = [("SLURM_PROCID", "0"), ("SLURM_NTASKS", "2"), ("SLURM_NPROCS", "2")];
        assert_eq!(launch_of(&batch), None);
        // mpirun inside that batch script: its own variables win.
        let both = [
            ("SLURM_PROCID", "0"),
            ("SLURM_NTASKS", "2"),
            ("OMPI_COMM_WORLD_RANK", "1"),
            ("OMPI_COMM_WORLD_SIZE", "2"),
        ];
        assert_eq!(launch_of(&both), Some(Launch { rank: 1, size: 2 }));
        assert_eq!(launch_of(&[]), None);
    }
}
