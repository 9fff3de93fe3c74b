//! `mcdm convert`: a model file (safetensors or a PyTorch `.pt`) written as safetensors in the
//! storage type asked, with its resolved config in the metadata and beside it.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{Context, Result};
use half::{bf16, f16};

use mcdm::files::write_atomic;
use mcdm::model::load_model;
use mcdm::weights::{write_safetensors, StorageDtype, TensorData};

use super::{check_output_file, Dtype};

/// Convert a model to safetensors (e.g. a PyTorch .pt checkpoint), checked to load first.
#[derive(clap::Args)]
#[command(after_help = "Example:\n  \
    mcdm convert 64x64_diffusion.pt imagenet64.safetensors --dtype f16 --config imagenet64.json\n\n\
The model must load with its config (from --config, <stem>.json beside it, or inferred from \
the weights), so that a config that does not fit is caught here. OUTPUT gets the config in its \
metadata and <OUTPUT stem>.json beside it.")]
pub struct Args {
    /// The model to convert (safetensors, a PyTorch .pt state_dict, or a diffusers UNet2DModel
    /// folder).
    input: PathBuf,
    /// The safetensors file to write.
    output: PathBuf,
    /// Storage type of the float tensors (integer tensors keep theirs).
    #[arg(long, value_enum, default_value_t = Dtype::F32)]
    dtype: Dtype,
    /// Model config (JSON, guided-diffusion flag names) for what the file does not say.
    #[arg(long)]
    config: Option<PathBuf>,
}

pub fn run(args: Args) -> Result<()> {
    let json = args.output.with_extension("json");
    let mut inputs = vec![("INPUT", args.input.as_path())];
    inputs.extend(args.config.as_deref().map(|p| ("--config", p)));
    check_output_file(&args.output, "OUTPUT", &inputs)?;
    check_output_file(&json, "OUTPUT's config", &inputs)?;
    let model = load_model(&args.input, super::config_arg(&args.config)?)
        .with_context(|| format!("loading model {}", args.input.display()))?;
    let file = &model.file;
    // Every tensor, read and converted before any is written.
    enum Values {
        F32(Vec<f32>),
        F16(Vec<f16>),
        BF16(Vec<bf16>),
        I64(Vec<i64>),
    }
    let mut tensors = Vec::new();
    for name in file.names() {
        let shape = file.shape(name)?.to_vec();
        let values = match (file.dtype(name)?, args.dtype) {
            (StorageDtype::I64, _) => Values::I64(file.i64(name)?),
            (_, Dtype::F32) => Values::F32(file.f32(name)?),
            (_, Dtype::F16) => {
                Values::F16(file.f32(name)?.into_iter().map(f16::from_f32).collect())
            }
            (_, Dtype::Bf16) => {
                Values::BF16(file.f32(name)?.into_iter().map(bf16::from_f32).collect())
            }
        };
        tensors.push((name, shape, values));
    }
    let data: Vec<(&str, TensorData)> = tensors
        .iter()
        .map(|(name, shape, values)| {
            let shape = shape.clone();
            let t = match values {
                Values::F32(v) => TensorData::F32(shape, v),
                Values::F16(v) => TensorData::F16(shape, v),
                Values::BF16(v) => TensorData::BF16(shape, v),
                Values::I64(v) => TensorData::I64(shape, v),
            };
            (*name, t)
        })
        .collect();
    let config = model.config.unet.to_json(&model.config.diffusion);
    let text = serde_json::to_string_pretty(&config)?;
    let meta = BTreeMap::from([("config".to_string(), config.to_string())]);
    write_safetensors(&args.output, &data, Some(meta))
        .with_context(|| format!("writing {}", args.output.display()))?;
    write_atomic(&json, text.as_bytes())?;
    let bytes = std::fs::metadata(&args.output).map_or(0, |m| m.len());
    report!(
        "wrote {} tensors ({:.2} MiB, {}) to {} and its config to {}",
        data.len(),
        bytes as f64 / (1 << 20) as f64,
        format!("{:?}", args.dtype).to_lowercase(),
        args.output.display(),
        json.display()
    );
    Ok(())
}
