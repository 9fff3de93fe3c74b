//! Subcommands. The library never prints; this module reports.

mod bench;
mod forward;
mod inspect;
mod sample;

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::{Parser, Subcommand, ValueEnum};

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
    Inspect(inspect::Args),
}

/// Where the network runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Device {
    Cpu,
    Cuda,
    /// The GPU when one is usable, else the CPU.
    Auto,
}

/// The backend to use for `device`; CUDA is not part of this build yet.
fn resolve_device(device: Device) -> Result<Device> {
    match device {
        Device::Cpu | Device::Auto => Ok(Device::Cpu),
        Device::Cuda => bail!(
            "--device cuda: this build of mcdm has no CUDA backend yet; use --device cpu (or auto)"
        ),
    }
}

/// A config path given with `--config`, checked to exist so the error names the flag.
fn config_arg(path: &Option<PathBuf>) -> Result<Option<&std::path::Path>> {
    match path {
        Some(p) if !p.is_file() => bail!("--config {}: no such file", p.display()),
        Some(p) => Ok(Some(p.as_path())),
        None => Ok(None),
    }
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Sample(args) => sample::run(args),
        Command::Forward(args) => forward::run(args),
        Command::Inspect(args) => inspect::run(args),
        Command::Bench(args) => bench::run(args),
    }
}
