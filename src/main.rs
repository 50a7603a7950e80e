//! The `procjob` binary: parse the command line, run, exit with its code.

use clap::Parser;

fn main() {
    procjob::init();
    if let Err(e) = procjob::signals::install() {
        eprintln!("procjob: warning: cannot take the signals that end it ({e}); a signal may leave workers and temp files behind");
    }
    let cli = procjob::cli::Cli::parse();
    procjob::signals::exit(procjob::cli::run(cli));
}
