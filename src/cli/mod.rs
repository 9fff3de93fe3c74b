//! Subcommands. The library never prints; this module reports.

/// A line on standard output, the command's result: failing to write it (a full disk, a closed
/// descriptor) is the command's error. A closed pipe ends the process quietly (see `main`).
macro_rules! say {
    ($($arg:tt)*) => {
        $crate::cli::write_line(&mut std::io::stdout().lock(), format_args!($($arg)*))
            .map_err(|e| anyhow::anyhow!("writing to standard output: {e}"))?
    };
}

/// A line on standard error (a warning, a note, a summary): lost, never fatal, when standard
/// error cannot take it, since there is nowhere left to say so.
macro_rules! report {
    ($($arg:tt)*) => {
        let _ = $crate::cli::write_line(&mut std::io::stderr().lock(), format_args!($($arg)*));
    };
}

mod bench;
mod convert;
mod encode_text;
mod forward;
mod info;
mod inspect;
mod interrupt;
mod merge;
mod sample;

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use mcdm::{DType, Device};

#[derive(Parser)]
#[command(
    name = "mcdm",
    version,
    about = "Compose guided-diffusion experts: eps = eps_u + sum_i w_i (eps_i - eps_u)",
    long_about = "mcdm runs OpenAI guided-diffusion UNets from safetensors files and combines several \
                  experts, each conditioned on its own modality, with an unconditional model at every \
                  sampling step (Nair et al., eq. 12)."
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Made once per process: the size of its largest variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    Sample(sample::Args),
    Forward(forward::Args),
    Bench(bench::Args),
    Info(info::Args),
    EncodeText(encode_text::Args),
    Inspect(inspect::Args),
    Convert(convert::Args),
    Merge(merge::Args),
}

/// Where networks run: `cpu`, `cuda` (GPU 0), `cuda:N` or `auto` (the GPU when one is usable,
/// else the CPU).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceArg {
    Cpu,
    Cuda(usize),
    Auto,
}

/// Parses `--device`.
fn parse_device(s: &str) -> std::result::Result<DeviceArg, String> {
    match s {
        "cpu" => Ok(DeviceArg::Cpu),
        "cuda" => Ok(DeviceArg::Cuda(0)),
        "auto" => Ok(DeviceArg::Auto),
        _ => match s.strip_prefix("cuda:").map(str::parse) {
            Some(Ok(ordinal)) => Ok(DeviceArg::Cuda(ordinal)),
            _ => Err("expected cpu, cuda, cuda:N (GPU N) or auto".into()),
        },
    }
}

/// `--device` of `mcdm sample`: one device, or several GPUs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DevicesArg {
    One(DeviceArg),
    /// `cuda:all`
    AllCuda,
    /// `cuda:0,2,3`
    Cuda(Vec<usize>),
}

/// Parses `mcdm sample --device`.
fn parse_devices(s: &str) -> std::result::Result<DevicesArg, String> {
    let expected =
        "expected cpu, cuda, cuda:N (GPU N), auto, cuda:all or cuda:N,M,... (those GPUs)";
    match s.strip_prefix("cuda:") {
        Some("all") => Ok(DevicesArg::AllCuda),
        Some(list) if list.contains(',') => {
            let ordinals: Vec<usize> = list
                .split(',')
                .map(|n| n.trim().parse().map_err(|_| expected.to_string()))
                .collect::<std::result::Result<_, _>>()?;
            if let Some(twice) = ordinals
                .iter()
                .enumerate()
                .find_map(|(i, o)| ordinals[..i].contains(o).then_some(o))
            {
                return Err(format!("GPU {twice} is named twice"));
            }
            Ok(DevicesArg::Cuda(ordinals))
        }
        _ => parse_device(s)
            .map(DevicesArg::One)
            .map_err(|_| expected.to_string()),
    }
}

/// Opens the devices of `mcdm sample --device`.
fn open_devices(arg: &DevicesArg) -> Result<Vec<Device>> {
    let ordinals = match arg {
        DevicesArg::One(one) => return Ok(vec![open_device(*one)?]),
        DevicesArg::AllCuda => {
            let count = mcdm::cuda::devices().context("--device cuda:all")?.len();
            if count == 0 {
                bail!("--device cuda:all: the driver reports no GPU");
            }
            (0..count).collect()
        }
        DevicesArg::Cuda(ordinals) => {
            let count = mcdm::cuda::devices().context("--device")?.len();
            if let Some(missing) = ordinals.iter().find(|&&o| o >= count) {
                bail!(
                    "--device: there is no GPU {missing} (this machine has {count}: 0 to {})",
                    count.saturating_sub(1)
                );
            }
            ordinals.clone()
        }
    };
    ordinals
        .into_iter()
        .map(|o| Device::cuda(o).with_context(|| format!("--device: GPU {o}")))
        .collect()
}

/// Storage and tensor-core precision on the GPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Dtype {
    Bf16,
    F16,
    /// For checking against the CPU.
    F32,
}

impl From<Dtype> for DType {
    fn from(d: Dtype) -> DType {
        match d {
            Dtype::Bf16 => DType::Bf16,
            Dtype::F16 => DType::F16,
            Dtype::F32 => DType::F32,
        }
    }
}

/// Progress of long work on standard error: on a terminal, a bar that fits its width; elsewhere
/// (a log file, a batch job's output) a line every [`Progress::LINE_EVERY`], so that a log shows
/// the work moving. Nothing at all unless `shown`.
pub struct Progress {
    bar: ProgressBar,
    /// When the last line was written, where lines stand in for the bar.
    last_line: Option<Instant>,
    shown: bool,
}

impl Progress {
    const LINE_EVERY: Duration = Duration::from_secs(30);

    /// `len` units; `template` is indicatif's, its message last (`{wide_msg}`) so that it is
    /// cut to the terminal's width rather than wrapped.
    fn new(len: usize, shown: bool, template: &str) -> Self {
        let terminal = shown && std::io::stderr().is_terminal();
        let bar = ProgressBar::with_draw_target(
            Some(len as u64),
            if terminal {
                ProgressDrawTarget::stderr()
            } else {
                ProgressDrawTarget::hidden()
            },
        );
        bar.set_style(
            ProgressStyle::with_template(template)
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        Progress {
            bar,
            last_line: (!terminal).then(Instant::now),
            shown,
        }
    }

    /// `units` more done; `message` says where the work stands.
    fn advance(&mut self, units: u64, message: impl FnOnce() -> String) {
        self.bar.inc(units);
        match &mut self.last_line {
            None => self.bar.set_message(message()),
            Some(last) if self.shown && last.elapsed() >= Self::LINE_EVERY => {
                *last = Instant::now();
                let elapsed = self.bar.elapsed().as_secs();
                report!("[{:02}:{:02}] {}", elapsed / 60, elapsed % 60, message());
            }
            Some(_) => {}
        }
    }

    fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

/// The storage type `--dtype` asks for, else `default`; given on the CPU, which computes in f32
/// whatever it is told, anything but f32 is named in a warning rather than silently ignored.
fn storage_dtype(given: Option<Dtype>, default: Dtype, device: &Device) -> Dtype {
    match given {
        Some(d) if device.is_cpu() && d != Dtype::F32 => {
            report!(
                "warning: --dtype {}: the CPU computes in f32 whatever the storage type; it \
                 applies on a GPU",
                format!("{d:?}").to_lowercase()
            );
            Dtype::F32
        }
        Some(d) => d,
        None => default,
    }
}

/// Fails unless a file can be written at `path`: its directory exists and takes new files, and
/// `path` is neither something other than a regular file (a directory, a device, a FIFO) nor
/// one of the files the command reads (`inputs`, each with the flag that named it). Checked
/// before long work, so that it does not fail at the end.
fn check_output_file(path: &Path, what: &str, inputs: &[(&str, &Path)]) -> Result<()> {
    if let Ok(meta) = std::fs::metadata(path) {
        if meta.is_dir() {
            bail!("{what} {}: is a directory", path.display());
        }
        if !meta.is_file() {
            bail!(
                "{what} {}: is not a regular file (a device, FIFO or socket); mcdm only \
                 writes regular files",
                path.display()
            );
        }
        if let Some((flag, input)) = inputs.iter().find(|(_, p)| same_file(p, path)) {
            bail!(
                "{what} {}: is the file given to {flag} ({}), which this command reads; \
                 choose another output",
                path.display(),
                input.display()
            );
        }
    }
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if !dir.is_dir() {
        bail!(
            "{what} {}: directory {} does not exist",
            path.display(),
            dir.display()
        );
    }
    let probe = dir.join(format!(".mcdm-write-test-{}", std::process::id()));
    std::fs::write(&probe, b"").with_context(|| {
        format!(
            "{what} {}: cannot write in {}",
            path.display(),
            dir.display()
        )
    })?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

/// Whether `path` names the file `file` has open.
fn same_file_as_open(file: &std::fs::File, path: &Path) -> bool {
    same_inode(file.metadata(), std::fs::metadata(path))
}

/// Whether `a` and `b` name the same existing file (links and `..` included).
fn same_file(a: &Path, b: &Path) -> bool {
    same_inode(std::fs::metadata(a), std::fs::metadata(b))
}

fn same_inode(
    a: std::io::Result<std::fs::Metadata>,
    b: std::io::Result<std::fs::Metadata>,
) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (a, b) {
        (Ok(a), Ok(b)) => (a.dev(), a.ino()) == (b.dev(), b.ino()),
        _ => false,
    }
}

/// `auto` takes the GPU when one is usable, else the CPU (saying why when a GPU is present but
/// cannot be set up: its kernels fail to load, say); `cuda` insists on it with a clear error.
fn open_device(device: DeviceArg) -> Result<Device> {
    match device {
        DeviceArg::Cpu => Ok(Device::Cpu),
        DeviceArg::Auto => {
            let (device, why) = Device::auto();
            if let Some(e) = why {
                report!("warning: --device auto: the GPU cannot be used ({e}); running on the CPU");
            }
            Ok(device)
        }
        DeviceArg::Cuda(ordinal) => {
            let flag = match ordinal {
                0 => "--device cuda".to_string(),
                n => format!("--device cuda:{n}"),
            };
            Ok(Device::cuda(ordinal).context(flag)?)
        }
    }
}

/// Says so when a step's CUDA graph could not be captured (the steps then ran launch by launch,
/// with the same results, only slower).
fn warn_graph_failure(device: &Device) {
    if let Some(why) = device.take_graph_failure() {
        report!(
            "warning: the sampling steps could not be replayed as a CUDA graph ({why}); every \
             kernel was launched from the host instead"
        );
    }
}

/// A config path given with `--config`, checked to exist so the error names the flag.
fn config_arg(path: &Option<PathBuf>) -> Result<Option<&std::path::Path>> {
    match path {
        Some(p) if p.is_dir() => bail!("--config {}: is a directory", p.display()),
        Some(p) if !p.exists() => bail!("--config {}: no such file", p.display()),
        Some(p) => Ok(Some(p.as_path())),
        None => Ok(None),
    }
}

/// Writes one line; unlike `say!`, a failed write is an error, not a panic.
pub fn write_line(out: &mut impl std::io::Write, line: std::fmt::Arguments) -> std::io::Result<()> {
    writeln!(out, "{line}").and_then(|()| out.flush())
}

/// The exit status for a command that failed with `e`: the shell's for the signal that stopped
/// an interrupted run, else 1.
pub fn exit_code(e: &anyhow::Error) -> i32 {
    e.downcast_ref::<interrupt::Interrupted>()
        .map_or(1, interrupt::Interrupted::exit_code)
}

pub fn run(cli: Cli) -> Result<()> {
    if let Err(warning) = mcdm::ops::conv::conv_kernel_setting() {
        report!("warning: {warning}");
    }
    match cli.command {
        Command::Sample(args) => sample::run(args),
        Command::Forward(args) => forward::run(args),
        Command::Inspect(args) => inspect::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Info(args) => info::run(args),
        Command::EncodeText(args) => encode_text::run(args),
        Command::Convert(args) => convert::run(args),
        Command::Merge(args) => merge::run(args),
    }
}
