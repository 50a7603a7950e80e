//! The standalone worker executable, for launchers that need one executable
//! per host. It speaks the same protocol on stdin/stdout as a re-executed
//! `procjob`, and runs the built-in task kinds by name.
//!
//! Its launcher hands it the pool secret that the handshake must carry: 32
//! bytes on an inherited descriptor named in `PROCJOB_SECRET_FD` (e.g.
//! `PROCJOB_SECRET_FD=3 procjob-worker 3<secret`); without one it refuses
//! every handshake. See docs/protocol.md, "What the worker trusts".

fn main() {
    procjob_worker::serve::run_worker(&procjob_worker::Registry::builtin())
}
