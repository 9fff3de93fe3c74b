//! `mcdm info`: version, backends, GPUs, embedded kernel images, NVRTC and driver versions.

use anyhow::Result;

use mcdm::cuda::{
    devices, driver_version, unavailable_reason, KERNEL_IMAGES, KERNEL_SOURCES, NVRTC_VERSION,
};

/// Show what this build of mcdm can run on.
#[derive(clap::Args)]
#[command(after_help = "Example:\n  mcdm info")]
pub struct Args {}

pub fn run(_args: Args) -> Result<()> {
    println!("mcdm {}", env!("CARGO_PKG_VERSION"));
    println!("cpu: {} threads (rayon)", rayon::current_num_threads());
    let mut archs: Vec<&str> = KERNEL_IMAGES.iter().map(|(_, arch, _)| *arch).collect();
    archs.sort();
    archs.dedup();
    println!(
        "kernels: {} source file(s) embedded; images for {}",
        KERNEL_SOURCES.len(),
        if archs.is_empty() {
            "no architecture (built without NVRTC: sources compile at first GPU use)".to_string()
        } else {
            archs.join(", ")
        }
    );
    match NVRTC_VERSION {
        Some((major, minor)) => println!("nvrtc at build time: {major}.{minor}"),
        None => println!("nvrtc at build time: not found"),
    }
    match driver_version() {
        Some((major, minor)) => println!("cuda driver: {major}.{minor}"),
        None => println!("cuda driver: none"),
    }
    match unavailable_reason() {
        Some(reason) => println!("gpus: none ({reason}); --device auto uses the CPU"),
        None => {
            for d in devices()? {
                println!(
                    "gpu {}: {}, {:.1} GiB, compute capability {}.{}, {} SMs",
                    d.ordinal,
                    d.name,
                    d.total_memory as f64 / (1u64 << 30) as f64,
                    d.compute_capability.0,
                    d.compute_capability.1,
                    d.multiprocessors
                );
            }
        }
    }
    Ok(())
}
