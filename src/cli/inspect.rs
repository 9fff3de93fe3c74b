//! `mcdm inspect`: the resolved config of a model file and what it costs.

use std::path::PathBuf;

use anyhow::{Context, Result};

use mcdm::model::load_model;

use super::config_arg;

/// Show a model's resolved config (and where each field came from), parameters and cost.
#[derive(clap::Args)]
#[command(after_help = "Example:\n  mcdm inspect weights/uncond.safetensors")]
pub struct Args {
    /// Model weights (safetensors or a PyTorch .pt state_dict), or a diffusers UNet2DModel folder.
    model: PathBuf,
    /// Model config (JSON). Each field comes from the first of this file, <model stem>.json and
    /// the file's `config` metadata that gives it; the rest are inferred from the weights.
    #[arg(long)]
    config: Option<PathBuf>,
}

pub fn run(args: Args) -> Result<()> {
    let model = load_model(&args.model, config_arg(&args.config)?)
        .with_context(|| format!("loading model {}", args.model.display()))?;
    let cfg = &model.config;
    say!("model: {}", args.model.display());
    let files: std::collections::BTreeSet<&str> = cfg
        .sources
        .values()
        .filter_map(|s| match s {
            mcdm::config::Source::File(p) => Some(p.as_str()),
            _ => None,
        })
        .collect();
    for file in &files {
        say!("config file: {file}");
    }
    say!("config (source of each field: file, metadata, inferred from the weights, or default):");
    let json = cfg.unet.to_json(&cfg.diffusion);
    if let Some(map) = json.as_object() {
        for (key, value) in map {
            let source = match cfg.sources.get(key.as_str()) {
                // Two config files: name the one the field came from.
                Some(mcdm::config::Source::File(path)) if files.len() > 1 => path.clone(),
                Some(source) => source.to_string(),
                None => "derived".into(),
            };
            say!("  {key:<24} {:<16} ({source})", value.to_string());
        }
    }
    let params = model.parameters();
    say!("parameters: {params} ({:.2} M)", params as f64 / 1e6);
    say!("storage:");
    for (dtype, bytes) in model.file.bytes_by_dtype() {
        say!(
            "  {:<5} {bytes} bytes ({:.2} MiB)",
            dtype.name(),
            bytes as f64 / (1 << 20) as f64
        );
    }
    let size = cfg.unet.image_size;
    let gflop = model.flops_per_image(size, size) / 1e9;
    say!("compute: {gflop:.3} GFLOP per image per forward at {size}x{size}");
    Ok(())
}
