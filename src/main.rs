//! The `procjob` binary: parse the command line, run, exit with its code.

use clap::Parser;

fn main() {
    procjob::init();
    if let Err(e) = procjob::signals::install() {
        eprintln!("procjob: warning: cannot take SIGINT and SIGTERM ({e}); Ctrl-C may leave workers behind");
    }
    let cli = procjob::cli::Cli::parse();
    std::process::exit(procjob::cli::run(cli));
}
