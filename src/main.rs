//! The `mcdm` command line.

mod cli;

use std::io::Write;

use clap::Parser;

fn main() {
    // Rust ignores SIGPIPE, so a write to a closed pipe (`mcdm info --kernels | head`) would
    // panic in println!; the default action ends the process quietly, as other tools do.
    #[cfg(unix)]
    // SAFETY: called before any other thread exists; SIG_DFL is a valid disposition.
    // A write past `ulimit -f` then fails with EFBIG, reported naming the file, instead of
    // SIGXFSZ ending the process without a word.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
    let args = match cli::Cli::try_parse() {
        Ok(args) => args,
        Err(e) => parse_failed(e),
    };
    if let Err(e) = cli::run(args) {
        let _ = writeln!(std::io::stderr(), "error: {e:#}");
        std::process::exit(cli::exit_code(&e));
    }
}

/// `--help` and `--version` (clap's "errors" that succeed) and usage errors, written without
/// panicking: help that cannot be written to a full or closed stdout is a failed command.
fn parse_failed(e: clap::Error) -> ! {
    use std::io::IsTerminal;
    let styled = e.render();
    let terminal = if e.use_stderr() {
        std::io::stderr().is_terminal()
    } else {
        std::io::stdout().is_terminal()
    };
    let text = if terminal {
        styled.ansi().to_string()
    } else {
        styled.to_string()
    };
    if e.use_stderr() {
        let _ = write!(std::io::stderr(), "{text}");
        std::process::exit(e.exit_code());
    }
    let mut out = std::io::stdout().lock();
    if let Err(why) = out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        let _ = writeln!(
            std::io::stderr(),
            "error: writing to standard output: {why}"
        );
        std::process::exit(1);
    }
    std::process::exit(0);
}
