//! Every process a test starts runs under a time limit: a kernel that spins (on the fake driver
//! or in the emulator) or a command that waits forever fails its test with the command line and
//! what it printed, instead of holding CI until its own limit.

use std::io::Read;
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The limit of a command: the slowest, an emulated GPU test executable, takes about two
/// minutes on 2 cores.
pub const LIMIT: Duration = Duration::from_secs(10 * 60);

/// Whether `program` runs here (`program --version` starts and ends).
pub fn found(program: &str) -> bool {
    let started = Command::new(program)
        .arg("--version")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    started.is_ok_and(|child| {
        wait_within(child, LIMIT, &format!("{program} --version"))
            .status
            .success()
    })
}

/// `cmd.output()` within [`LIMIT`].
pub fn output(cmd: &mut Command) -> Output {
    output_within(cmd, LIMIT)
}

/// `cmd.output()` (stdin closed, stdout and stderr captured), failing the test when the command
/// runs past `limit`.
pub fn output_within(cmd: &mut Command, limit: Duration) -> Output {
    let shown = format!("{cmd:?}");
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {shown}: {e}"));
    wait_within(child, limit, &shown)
}

/// Waits for `child` (its stdout and stderr piped, where it should be captured) and collects
/// what it printed. Past `limit` it is sent SIGTERM (the fake CUDA driver and the kernel
/// emulator then print the kernel they were running), then killed, and the test fails naming
/// `shown` with the end of its output.
pub fn wait_within(mut child: Child, limit: Duration, shown: &str) -> Output {
    let stdout = collect(child.stdout.take());
    let stderr = collect(child.stderr.take());
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting for a test's command") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let grace = Instant::now() + Duration::from_secs(5);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < grace {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
            // The readers are not joined: a process the command started may hold the pipes.
            std::thread::sleep(Duration::from_millis(200));
            let printed = |(buffer, _): &Collected| {
                let text = String::from_utf8_lossy(&buffer.lock().unwrap()).into_owned();
                let start = text.len().saturating_sub(4000);
                let start = (start..=text.len())
                    .find(|&i| text.is_char_boundary(i))
                    .unwrap_or(text.len());
                text[start..].to_string()
            };
            panic!(
                "{shown} ran past {} s: taken for hung and stopped. The end of its output:\n{}{}",
                limit.as_secs(),
                printed(&stdout),
                printed(&stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: finish(stdout),
        stderr: finish(stderr),
    }
}

/// A pipe's bytes so far, and the thread reading the rest.
type Collected = (Arc<Mutex<Vec<u8>>>, Option<JoinHandle<()>>);

fn collect(pipe: Option<impl Read + Send + 'static>) -> Collected {
    let buffer = Arc::new(Mutex::new(Vec::new()));
    let reader = pipe.map(|mut pipe| {
        let buffer = buffer.clone();
        std::thread::spawn(move || {
            let mut chunk = [0u8; 8192];
            while let Ok(n @ 1..) = pipe.read(&mut chunk) {
                buffer.lock().unwrap().extend_from_slice(&chunk[..n]);
            }
        })
    });
    (buffer, reader)
}

fn finish((buffer, reader): Collected) -> Vec<u8> {
    if let Some(reader) = reader {
        reader.join().expect("reading a test command's output");
    }
    std::mem::take(&mut buffer.lock().unwrap())
}
