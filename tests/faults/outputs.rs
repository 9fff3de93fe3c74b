//! Outputs under faults: runs killed at random moments, a file-size limit, two runs into one
//! folder, a model replaced during a run, outputs aimed at inputs and at devices, and every
//! subcommand with its standard output or error full or closed.

use std::collections::BTreeSet;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::{self, fixtures};
use crate::{mcdm, sample_args, uncond_copy, uncond_path};

fn sha256(path: &Path) -> String {
    use sha2::Digest;
    format!("{:x}", sha2::Sha256::digest(std::fs::read(path).unwrap()))
}

fn names(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect()
}

/// What a run folder holds, checked to be consistent: `None` for a folder with no run in it,
/// else the record's seed and status. A record beside exactly the images it counts, each a
/// whole 16x16 PNG, and a grid; no staging folder, temporary or lock file unless `killed`
/// (SIGKILL leaves them for the next run to clear).
fn folder_state(dir: &Path, killed: bool) -> Option<(u64, String)> {
    let names = names(dir);
    let hidden: Vec<&String> = names.iter().filter(|n| n.starts_with('.')).collect();
    assert!(killed || hidden.is_empty(), "left behind: {hidden:?}");
    let numbered: BTreeSet<&String> = names
        .iter()
        .filter(|n| n.len() == 10 && n.ends_with(".png") && n[..6].parse::<u32>().is_ok())
        .collect();
    let Ok(text) = std::fs::read_to_string(dir.join("record.json")) else {
        assert!(
            numbered.is_empty() && !names.contains("grid.png"),
            "images with no record: {names:?}"
        );
        return None;
    };
    let record: serde_json::Value = serde_json::from_str(&text).expect("record.json is whole");
    let status = record["status"].as_str().unwrap().to_string();
    let images = record["images"].as_u64().unwrap() as usize;
    match status.as_str() {
        "complete" | "partial" => {
            let want: BTreeSet<String> = (0..images).map(|k| format!("{k:06}.png")).collect();
            assert_eq!(
                numbered,
                want.iter().collect(),
                "{status} record of {images} image(s) beside other images"
            );
            // The grid comes with a finished run and one stopped by a signal; a killed run
            // leaves the batches it published, and no grid.
            let grid = names.contains("grid.png");
            assert!(
                grid || (killed && status == "partial"),
                "no grid: {names:?}"
            );
            for name in want
                .iter()
                .chain(grid.then(|| "grid.png".to_string()).as_ref())
            {
                let file = std::fs::File::open(dir.join(name)).unwrap();
                let mut reader = png::Decoder::new(std::io::BufReader::new(file))
                    .read_info()
                    .unwrap_or_else(|e| panic!("{name}: {e}"));
                let mut buf = vec![0; reader.output_buffer_size()];
                reader
                    .next_frame(&mut buf)
                    .unwrap_or_else(|e| panic!("{name}: {e}"));
            }
            let complete = images == record["num_samples"].as_u64().unwrap() as usize;
            assert_eq!(
                complete,
                status == "complete",
                "{status}, {images} image(s)"
            );
        }
        // Killed while moving its images in: the record says the folder is not a finished run.
        "writing" => assert!(killed, "a run that was not killed left status `writing`"),
        other => panic!("unknown status {other}"),
    }
    Some((record["seed"].as_u64().unwrap(), status))
}

/// A small deterministic generator for the kill times.
struct SplitMix(u64);

impl SplitMix {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_add(0x9e3779b97f4a7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d049bb133111eb);
        (z ^ (z >> 31)) % n
    }
}

fn spawn_sample(args: &[String]) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_mcdm"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Runs into a folder holding an earlier run, each sent SIGKILL, SIGTERM or SIGINT at a random
/// moment (seeded) of its life: afterwards the folder holds the earlier run, this run partial
/// or complete (never a mix), and, but after SIGKILL, nothing temporary. The next run clears
/// what a killed one left.
#[test]
fn runs_killed_at_random_moments_leave_a_consistent_folder() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let mut earlier = sample_args(&uncond_path(), &out, 6, 2);
    earlier.extend(["--seed", "1"].map(String::from));
    let (code, err) = mcdm(&earlier.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(code, Some(0), "{err}");
    // One image per batch, so that batches end (and images are kept) all through the run.
    let mut args = sample_args(&uncond_path(), &out, 4, 8);
    args.extend(["--seed", "2", "--batch-size", "1"].map(String::from));
    let start = Instant::now();
    let (code, err) = mcdm(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(code, Some(0), "{err}");
    let run_time = start.elapsed().as_micros() as u64;
    assert_eq!(folder_state(&out, false), Some((2, "complete".into())));
    let (code, err) = mcdm(&earlier.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(code, Some(0), "{err}");

    let mut rng = SplitMix(28);
    let mut outcomes = BTreeSet::new();
    let signals = [libc::SIGKILL, libc::SIGTERM, libc::SIGINT];
    for trial in 0..36 {
        let signal = signals[trial % 3];
        let mut child = spawn_sample(&args);
        std::thread::sleep(Duration::from_micros(rng.below(run_time * 6 / 5)));
        unsafe { libc::kill(child.id() as i32, signal) };
        let status = child.wait().unwrap();
        let mut err = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
        let killed = signal == libc::SIGKILL;
        if !killed {
            // Stopped with its folder in order (exit 128 + signal), finished, or ended by the
            // signal before its handler was set up, which is before it touched the folder.
            let code = status.code();
            assert!(
                code == Some(0) || code == Some(128 + signal) || status.signal() == Some(signal),
                "trial {trial}: {status:?}: {err}"
            );
            assert!(!err.contains("panicked"), "{err}");
            if code == Some(128 + signal) {
                assert!(err.contains("interrupted by SIG"), "{err}");
            }
        }
        let state = folder_state(&out, killed);
        outcomes.insert(format!(
            "{:?}",
            state.as_ref().map(|(s, st)| (s, st.as_str()))
        ));
        // Back to the earlier run, through any leftovers.
        let (code, err) = mcdm(&earlier.iter().map(String::as_str).collect::<Vec<_>>());
        assert_eq!(code, Some(0), "trial {trial}: {err}");
        assert_eq!(folder_state(&out, false), Some((1, "complete".into())));
    }
    eprintln!("states seen after the signal: {outcomes:?}");
    // The kill times cover the run: some trials left the earlier run, some this one whole.
    assert!(outcomes.len() >= 2, "{outcomes:?}");
}

/// A write past `ulimit -f` is an error naming the file (not SIGXFSZ), and the folder keeps
/// the earlier run.
#[test]
fn a_file_size_limit_is_an_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let mut earlier = sample_args(&uncond_path(), &out, 2, 2);
    earlier.extend(["--seed", "1"].map(String::from));
    let (code, err) = mcdm(&earlier.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(code, Some(0), "{err}");
    // A 16x16 image takes about 400 bytes, a record about 1.7 kB.
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_mcdm"));
    cmd.args(sample_args(&uncond_path(), &out, 9, 2));
    unsafe {
        cmd.pre_exec(|| {
            let limit = libc::rlimit {
                rlim_cur: 1500,
                rlim_max: 1500,
            };
            if libc::setrlimit(libc::RLIMIT_FSIZE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let output = common::output_within(&mut cmd, Duration::from_secs(60));
    let err = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{err}");
    // The first file past the limit is the record of the first batch (about 1.7 kB).
    assert!(err.contains("out/record.json: File too large"), "{err}");
    assert_eq!(folder_state(&out, false), Some((1, "complete".into())));
}

/// A second run into a folder that a run is writing is refused, naming the first; a lock,
/// staging folder and temporary file left by a dead process are not in the way.
#[test]
fn one_run_at_a_time_per_folder() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let mut first = spawn_sample(&sample_args(&uncond_path(), &out, 64, 50));
    let lock = out.join(".mcdm.lock");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(&lock).is_ok_and(|s| s.ends_with('\n')) {
        assert!(Instant::now() < deadline, "no lock file appeared");
        std::thread::sleep(Duration::from_millis(5));
    }
    let (code, err) = mcdm(
        &sample_args(&uncond_path(), &out, 1, 2)
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    let pid = first.id();
    first.kill().unwrap();
    first.wait().unwrap();
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains(&format!("another mcdm run (pid {pid}) is writing there")),
        "{err}"
    );

    // What the killed run left, and a stale lock of a process that is gone.
    std::fs::write(&lock, "999999999\n").unwrap();
    std::fs::create_dir_all(out.join(".mcdm-staging-999999999")).unwrap();
    std::fs::write(out.join(".mcdm-staging-999999999/000000.png"), b"half").unwrap();
    std::fs::write(out.join(".record.json.tmp999999999"), b"{").unwrap();
    let (code, err) = mcdm(
        &sample_args(&uncond_path(), &out, 1, 2)
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(folder_state(&out, false), Some((0, "complete".into())));
}

/// The record holds the hash of the model bytes the run loaded, though the file was replaced
/// while it ran.
#[test]
fn a_model_replaced_during_the_run_is_recorded_as_loaded() {
    let dir = tempfile::tempdir().unwrap();
    let model = uncond_copy(dir.path());
    let loaded = sha256(&model);
    let out = dir.path().join("out");
    let mut args = sample_args(&model, &out, 6, 20);
    args.extend(["--batch-size", "1"].map(String::from));
    let child = spawn_sample(&args);
    // The first image published (each batch is, as it finishes; it is staged only for a moment
    // before): the model was loaded long before.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !out.join("000000.png").is_file() {
        assert!(Instant::now() < deadline, "no image was published");
        std::thread::sleep(Duration::from_millis(2));
    }
    // A different model at the same path (a new file, as editors and converters write).
    let other = dir.path().join("other.safetensors");
    std::fs::copy(fixtures("sample/models/sketch.safetensors"), &other).unwrap();
    std::fs::rename(&other, &model).unwrap();
    let output = common::process::wait_within(child, common::process::LIMIT, "mcdm sample");
    let err = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{err}");
    let record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("record.json")).unwrap()).unwrap();
    assert_ne!(loaded, sha256(&model));
    assert_eq!(record["models"]["u"]["sha256"], loaded.as_str());
}

/// Outputs aimed at the command's own inputs, at a FIFO and at a device node are refused before
/// any work, and the files aimed at are untouched.
#[test]
fn outputs_aimed_at_inputs_or_devices_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let model = uncond_copy(dir.path());
    let hash = sha256(&model);
    let out = dir.path().join("out");
    let base = sample_args(&model, &out, 1, 2);
    let fifo = dir.path().join("fifo");
    let path = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(path.as_ptr(), 0o600) }, 0);
    // A device node of our own (as root); else a link to the system's, which mcdm would only
    // replace, never write through, were it to get this wrong.
    let device = dir.path().join("null");
    let node = std::ffi::CString::new(device.to_str().unwrap()).unwrap();
    let made = unsafe { libc::mknod(node.as_ptr(), libc::S_IFCHR | 0o666, libc::makedev(1, 3)) };
    if made != 0 {
        std::os::unix::fs::symlink("/dev/null", &device).unwrap();
    }
    let refused = |extra: &[&str], needle: &str| {
        let mut args: Vec<&str> = base.iter().map(String::as_str).collect();
        args.extend_from_slice(extra);
        let (code, err) = mcdm(&args);
        assert_eq!(code, Some(1), "{extra:?}: {err}");
        assert!(err.contains(needle), "{extra:?}: `{needle}` not in: {err}");
        assert!(
            !out.join("grid.png").exists(),
            "{extra:?}: a run was written"
        );
    };
    let model_arg = model.display().to_string();
    refused(
        &["--save-tensor", &model_arg],
        "is the file given to --model",
    );
    for target in [&fifo, &device] {
        refused(
            &["--save-tensor", &target.display().to_string()],
            "is not a regular file",
        );
    }
    // A job file, initial noise, and a condition image that an earlier run left in --out,
    // which this run would replace.
    let job = dir.path().join("job.json");
    std::fs::write(&job, r#"{"uncond": {"model": "u"}}"#).unwrap();
    let noise = dir.path().join("x_T.safetensors");
    std::fs::write(&noise, b"checked before it is read").unwrap();
    std::fs::create_dir_all(&out).unwrap();
    let image = out.join("000000.png");
    std::fs::write(&image, b"an earlier run's image").unwrap();
    let [job, noise, image] = [&job, &noise, &image].map(|p| p.display().to_string());
    refused(
        &["--job", &job, "--save-tensor", &job],
        "is the file given to --job",
    );
    refused(
        &["--init-noise", &noise, "--save-tensor", &noise],
        "is the file given to --init-noise",
    );
    let uncond = format!("u,image={image}");
    let mut args: Vec<&str> = base.iter().map(String::as_str).collect();
    let at = args.iter().position(|a| *a == "--uncond").unwrap() + 1;
    args[at] = &uncond;
    let (code, err) = mcdm(&args);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("is the file given to image="), "{err}");
    assert_eq!(std::fs::read(&image).unwrap(), b"an earlier run's image");
    assert_eq!(sha256(&model), hash);
    assert!(fifo.exists() && device.exists());

    // forward, encode-text and bench: their outputs over their inputs.
    let io = fixtures("unet/attn_ds1_dropout.io.safetensors");
    let input = dir.path().join("io.safetensors");
    std::fs::copy(&io, &input).unwrap();
    let input_arg = input.display().to_string();
    let unet = fixtures("unet/attn_ds1_dropout.safetensors")
        .display()
        .to_string();
    let (code, err) = mcdm(&[
        "forward", "--device", "cpu", "--model", &unet, "--input", &input_arg, "--output",
        &input_arg,
    ]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("is the file given to --input"), "{err}");
    assert_eq!(sha256(&input), sha256(&io));
    let (code, err) = mcdm(&[
        "forward",
        "--device",
        "cpu",
        "--model",
        &unet,
        "--input",
        &input_arg,
        "--output",
        &device.display().to_string(),
    ]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("is not a regular file"), "{err}");
    let texts = dir.path().join("texts.txt");
    std::fs::write(&texts, "a face\n").unwrap();
    let texts_arg = texts.display().to_string();
    let (code, err) = mcdm(&[
        "encode-text",
        "--text-file",
        &texts_arg,
        "--output",
        &texts_arg,
    ]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("is the file given to --text-file"), "{err}");
    assert_eq!(std::fs::read_to_string(&texts).unwrap(), "a face\n");
    let config = dir.path().join("config.json");
    std::fs::copy(uncond_path().with_extension("json"), &config).unwrap();
    let config_arg = config.display().to_string();
    let (code, err) = mcdm(&[
        "bench",
        "--device",
        "cpu",
        "--config",
        &config_arg,
        "--batch",
        "1",
        "--output",
        &config_arg,
    ]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("is the file given to --config"), "{err}");
}

/// How a test runs a command with one of its standard streams on `/dev/full` or closed.
#[derive(Clone, Copy, Debug)]
enum Stream {
    FullStdout,
    FullStderr,
    ClosedStdout,
    ClosedStderr,
}

/// Every subcommand with standard output or error full or closed: no panic (exit 101); a
/// result that cannot be written to a full stdout is an error exit naming it.
#[test]
fn full_or_closed_standard_streams_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    let uncond = uncond_path().display().to_string();
    let sample = sample_args(&uncond_path(), &dir.path().join("out"), 1, 2);
    let config = uncond_path().with_extension("json").display().to_string();
    let unet = fixtures("unet/attn_ds1_dropout.safetensors")
        .display()
        .to_string();
    let io = fixtures("unet/attn_ds1_dropout.io.safetensors")
        .display()
        .to_string();
    let forward_out = dir.path().join("f.safetensors").display().to_string();
    let convert_out = dir.path().join("c.safetensors").display().to_string();
    // Each command, and whether it writes its result to standard output.
    let commands: Vec<(Vec<&str>, bool)> = vec![
        (vec!["--help"], true),
        (vec!["sample", "--help"], true),
        (vec!["--version"], true),
        (vec!["info"], true),
        (vec!["inspect", &uncond], true),
        (
            vec![
                "bench", "--device", "cpu", "--config", &config, "--batch", "1", "--iters", "1",
            ],
            true,
        ),
        (sample.iter().map(String::as_str).collect(), false),
        (
            vec![
                "forward",
                "--device",
                "cpu",
                "--model",
                &unet,
                "--input",
                &io,
                "--output",
                &forward_out,
            ],
            false,
        ),
        (
            vec!["convert", &uncond, &convert_out, "--dtype", "f16"],
            false,
        ),
        // Errors, reported on standard error.
        (vec!["inspect", "/nonexistent.safetensors"], false),
        (vec!["no-such-command"], false),
    ];
    for (args, to_stdout) in &commands {
        let normal = crate::mcdm_within(args, Duration::from_secs(60));
        for stream in [
            Stream::FullStdout,
            Stream::FullStderr,
            Stream::ClosedStdout,
            Stream::ClosedStderr,
        ] {
            let mut cmd = Command::new(env!("CARGO_BIN_EXE_mcdm"));
            cmd.args(args).stdin(Stdio::null());
            let full = || {
                std::fs::OpenOptions::new()
                    .write(true)
                    .open("/dev/full")
                    .unwrap()
            };
            let (stdout, stderr) = match stream {
                Stream::FullStdout => (Stdio::from(full()), Stdio::piped()),
                Stream::FullStderr => (Stdio::piped(), Stdio::from(full())),
                _ => (Stdio::piped(), Stdio::piped()),
            };
            cmd.stdout(stdout).stderr(stderr);
            let closed = match stream {
                Stream::ClosedStdout => Some(1),
                Stream::ClosedStderr => Some(2),
                _ => None,
            };
            if let Some(fd) = closed {
                unsafe {
                    cmd.pre_exec(move || {
                        libc::close(fd);
                        Ok(())
                    });
                }
            }
            let child = cmd.spawn().unwrap();
            let got =
                common::process::wait_within(child, Duration::from_secs(60), &format!("{args:?}"));
            let err = String::from_utf8_lossy(&got.stderr);
            let what = format!("{args:?} with {stream:?}: {:?}: {err}", got.status);
            assert_ne!(got.status.code(), Some(101), "{what}");
            assert!(got.status.code().is_some(), "ended by a signal: {what}");
            match stream {
                Stream::FullStdout if *to_stdout => {
                    assert_eq!(got.status.code(), Some(1), "{what}");
                    assert!(err.contains("writing to standard output"), "{what}");
                }
                // Whatever standard error cannot take, the command's outcome is the same.
                _ => assert_eq!(got.status.code(), normal.status.code(), "{what}"),
            }
        }
    }
}

/// Runs killed (SIGKILL, SIGTERM) at random moments and resumed with --resume end with exactly
/// the images and grid of an uninterrupted run, byte for byte, and nothing else; --resume
/// refuses a folder of another job, and without it a stopped run's images are made again.
#[test]
fn killed_runs_resume_to_the_uninterrupted_images() {
    let dir = tempfile::tempdir().unwrap();
    let whole = dir.path().join("whole");
    let run_args = |out: &Path, extra: &[&str]| {
        let mut args = sample_args(&uncond_path(), out, 5, 8);
        args.extend(["--batch-size", "1"].map(String::from));
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    };
    let start = Instant::now();
    let (code, err) = mcdm(
        &run_args(&whole, &[])
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    assert_eq!(code, Some(0), "{err}");
    let run_time = start.elapsed().as_micros() as u64;
    let pngs = |d: &Path| -> Vec<(String, Vec<u8>)> {
        names(d)
            .into_iter()
            .filter(|n| n.ends_with(".png"))
            .map(|n| (n.clone(), std::fs::read(d.join(&n)).unwrap()))
            .collect()
    };
    let want = pngs(&whole);
    let mut rng = SplitMix(25);
    let mut kept_some = false;
    for trial in 0..12 {
        let out = dir.path().join(format!("t{trial}"));
        let signal = [libc::SIGKILL, libc::SIGTERM][trial % 2];
        let mut child = spawn_sample(&run_args(&out, &[]));
        std::thread::sleep(Duration::from_micros(rng.below(run_time)));
        unsafe { libc::kill(child.id() as i32, signal) };
        child.wait().unwrap();
        let (code, err) = mcdm(
            &run_args(&out, &["--resume"])
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>(),
        );
        assert_eq!(code, Some(0), "trial {trial}: {err}");
        kept_some |= err.contains("kept from the stopped run");
        assert_eq!(pngs(&out), want, "trial {trial}");
        assert_eq!(folder_state(&out, false), Some((0, "complete".into())));
    }
    assert!(
        kept_some,
        "no trial stopped a run that had finished an image"
    );

    // Another job's folder (another seed) is not resumed.
    let mut other = run_args(&whole, &["--resume"]);
    other.extend(["--seed", "5"].map(String::from));
    let (code, err) = mcdm(&other.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("holds a run of another job (its record differs in `seed`)"),
        "{err}"
    );
    assert_eq!(pngs(&whole), want);
}
