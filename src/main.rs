//! The `procjob` binary: parse the command line, run, exit with its code.

use clap::Parser;

fn main() {
    procjob::init();
    let cli = procjob::cli::Cli::parse();
    std::process::exit(procjob::cli::run(cli));
}
