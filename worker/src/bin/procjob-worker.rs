//! The standalone worker executable, for launchers that need one executable
//! per host. It speaks the same protocol on stdin/stdout as a re-executed
//! `procjob`, and runs the built-in task kinds by name.

fn main() {
    procjob_worker::serve::run_worker(&procjob_worker::Registry::builtin())
}
