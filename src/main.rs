//! The `mcdm` command line.

mod cli;

use clap::Parser;

fn main() {
    // Rust ignores SIGPIPE, so a write to a closed pipe (`mcdm info --kernels | head`) would
    // panic in println!; the default action ends the process quietly, as other tools do.
    #[cfg(unix)]
    // SAFETY: called before any other thread exists; SIG_DFL is a valid disposition.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let args = cli::Cli::parse();
    if let Err(e) = cli::run(args) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
