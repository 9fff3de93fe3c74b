//! `mcdm info`: version, backends, GPUs, embedded kernel images, NVRTC and driver versions.

use anyhow::Result;

use mcdm::cuda::{
    cubin_arch_for, devices, driver_version, unavailable_reason, KERNEL_IMAGES, KERNEL_RESOURCES,
    KERNEL_SOURCES, NVRTC_VERSION,
};

/// Show what this build of mcdm can run on.
#[derive(clap::Args)]
#[command(after_help = "Examples:\n  mcdm info\n  mcdm info --kernels --arch sm_86")]
pub struct Args {
    /// List every kernel with the registers, static shared memory, stack and spills ptxas
    /// reported when it was compiled (for the GPU found, else --arch)
    #[arg(long)]
    kernels: bool,
    /// Architecture of the kernel list when no GPU is found
    #[arg(long, default_value = "sm_90", value_parser = ["sm_80", "sm_86", "sm_89", "sm_90"])]
    arch: String,
}

pub fn run(args: Args) -> Result<()> {
    say!("mcdm {}", env!("CARGO_PKG_VERSION"));
    say!("cpu: {} threads (rayon)", rayon::current_num_threads());
    let mut archs: Vec<&str> = KERNEL_IMAGES.iter().map(|(_, arch, _)| *arch).collect();
    archs.sort();
    archs.dedup();
    say!(
        "kernels: {} source file(s) embedded; images for {}",
        KERNEL_SOURCES.len(),
        if archs.is_empty() {
            "no architecture (built without NVRTC: sources compile at first GPU use)".to_string()
        } else {
            archs.join(", ")
        }
    );
    match NVRTC_VERSION {
        Some((major, minor)) => say!("nvrtc at build time: {major}.{minor}"),
        None => say!("nvrtc at build time: not found"),
    }
    // The CUBIN the GPU runs (sm_86 on an sm_87), else --arch.
    let unusable = unavailable_reason();
    let gpu_arch = unusable
        .is_none()
        .then(devices)
        .transpose()?
        .and_then(|d| d.first().map(|g| g.compute_capability))
        .map(|cc| cubin_arch_for(cc).map_or(format!("sm_{}{}", cc.0, cc.1), str::to_string));
    let arch = gpu_arch.unwrap_or(args.arch);
    let resources: Vec<_> = KERNEL_RESOURCES.iter().filter(|r| r.arch == arch).collect();
    if let Some(most) = resources.iter().max_by_key(|r| r.registers) {
        let spilling = resources
            .iter()
            .filter(|r| r.spill_store_bytes + r.spill_load_bytes > 0)
            .count();
        say!(
            "ptxas ({arch}): {} kernels, at most {} registers a thread ({}), {}",
            resources.len(),
            most.registers,
            most.kernel,
            match spilling {
                0 => "no register spills".to_string(),
                n => format!("{n} kernels spill registers"),
            }
        );
    }
    let driver = driver_version();
    match driver {
        Some((major, minor)) => say!("cuda driver: {major}.{minor}"),
        None => say!("cuda driver: none"),
    }
    // Every GPU the driver reports, also one too old for the kernels (the reason says so).
    if driver.is_some() {
        for d in devices()? {
            say!(
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
    if let Some(reason) = &unusable {
        say!("gpus: none usable ({reason}); --device auto uses the CPU");
    }
    if args.kernels {
        if resources.is_empty() {
            say!(
                "no ptxas report for {arch}: {}",
                if KERNEL_IMAGES.is_empty() {
                    "built without NVRTC"
                } else {
                    "no CUBIN for it (the driver compiles the embedded PTX)"
                }
            );
            return Ok(());
        }
        let row = |cells: [&str; 6]| -> Result<()> {
            say!(
                "{:<14} {:<24} {:>9} {:>13} {:>7} {:>13}",
                cells[0],
                cells[1],
                cells[2],
                cells[3],
                cells[4],
                cells[5]
            );
            Ok(())
        };
        say!("");
        row([
            "file",
            "kernel",
            "registers",
            "static smem B",
            "stack B",
            "spill st/ld B",
        ])?;
        for r in &resources {
            row([
                &format!("{}.cu", r.file),
                r.kernel,
                &r.registers.to_string(),
                &r.static_shared_bytes.to_string(),
                &r.stack_bytes.to_string(),
                &format!("{}/{}", r.spill_store_bytes, r.spill_load_bytes),
            ])?;
        }
    }
    Ok(())
}
