//! SIGINT and SIGTERM during `mcdm sample`: the first asks the run to stop at the next step and
//! keep what it finished; a second ends the process at once, as the signal would have.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use anyhow::{Context, Result};
use signal_hook::consts::{SIGINT, SIGTERM};

static ASKED: AtomicBool = AtomicBool::new(false);
static SIGNAL: AtomicUsize = AtomicUsize::new(0);

/// From now on, SIGINT and SIGTERM set a flag that [`requested`] reports instead of ending the
/// process; the second ends it with the shell's status for the signal (128 + its number).
pub fn catch() -> Result<()> {
    for signal in [SIGINT, SIGTERM] {
        // Registered first, so it sees the flag the first signal set, not its own.
        signal_hook::flag::register_conditional_shutdown(signal, 128 + signal, &ASKED)
            .and_then(|_| signal_hook::flag::register_usize(signal, &SIGNAL, signal as usize))
            .and_then(|_| signal_hook::flag::register(signal, &ASKED))
            .context("installing the SIGINT/SIGTERM handlers")?;
    }
    Ok(())
}

/// The signal that asked the run to stop, if one did.
pub fn requested() -> Option<i32> {
    ASKED
        .load(Ordering::SeqCst)
        .then(|| SIGNAL.load(Ordering::SeqCst) as i32)
}

/// A run that stopped on a signal, after keeping what it finished: the command's exit status
/// is the shell's for that signal.
#[derive(Debug)]
pub struct Interrupted {
    pub signal: i32,
    pub message: String,
}

impl Interrupted {
    pub fn exit_code(&self) -> i32 {
        128 + self.signal
    }
}

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match self.signal {
            SIGINT => "SIGINT",
            SIGTERM => "SIGTERM",
            _ => "a signal",
        };
        write!(f, "interrupted by {name}: {}", self.message)
    }
}

impl std::error::Error for Interrupted {}
