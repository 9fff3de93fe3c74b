//! Subcommands. The library never prints; this module reports.

mod bench;
mod encode_text;
mod forward;
mod info;
mod inspect;
mod sample;

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

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

#[derive(Subcommand)]
enum Command {
    Sample(sample::Args),
    Forward(forward::Args),
    Bench(bench::Args),
    Info(info::Args),
    EncodeText(encode_text::Args),
    Inspect(inspect::Args),
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

/// A progress bar of `len` units on standard error, drawn only when that is a terminal and
/// `shown`; `template` is indicatif's (the bar is `[{bar:30}]`).
fn progress_bar(len: usize, shown: bool, template: &str) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(
        Some(len as u64),
        if shown && std::io::stderr().is_terminal() {
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
    bar
}

/// Fails unless a file can be written at `path`: its directory exists and takes new files, and
/// `path` is not a directory. Checked before long work, so that it does not fail at the end.
fn check_output_file(path: &Path, what: &str) -> Result<()> {
    if path.is_dir() {
        bail!("{what} {}: is a directory", path.display());
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

/// `auto` takes the GPU when one is usable, else the CPU (saying why when a GPU is present but
/// cannot be set up: its kernels fail to load, say); `cuda` insists on it with a clear error.
fn open_device(device: DeviceArg) -> Result<Device> {
    match device {
        DeviceArg::Cpu => Ok(Device::Cpu),
        DeviceArg::Auto => {
            let (device, why) = Device::auto();
            if let Some(e) = why {
                eprintln!(
                    "warning: --device auto: the GPU cannot be used ({e}); running on the CPU"
                );
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
        eprintln!(
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

pub fn run(cli: Cli) -> Result<()> {
    if let Err(warning) = mcdm::ops::conv::conv_kernel_setting() {
        eprintln!("warning: {warning}");
    }
    match cli.command {
        Command::Sample(args) => sample::run(args),
        Command::Forward(args) => forward::run(args),
        Command::Inspect(args) => inspect::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Info(args) => info::run(args),
        Command::EncodeText(args) => encode_text::run(args),
    }
}
