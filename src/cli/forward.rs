//! `mcdm forward`: one UNet forward pass on tensors from a safetensors file.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};

use mcdm::device::Workspace;
use mcdm::model::{load_model, Conditioning};
use mcdm::weights::{write_safetensors, SafetensorsFile, StorageDtype, TensorData};

use super::{check_output_file, config_arg, open_device, DeviceArg, Dtype};

/// Run one forward pass, e.g. to check a converted checkpoint against PyTorch.
#[derive(clap::Args)]
#[command(after_help = "Examples:\n  \
    mcdm forward --model tests/fixtures/unet/attn_ds1_dropout.safetensors \\\n    \
    --input tests/fixtures/unet/attn_ds1_dropout.io.safetensors --output out.safetensors\n\n\
    IN holds `x` [B, C, H, W] f32 (NCHW), `t` [B] (f32 or i64; fed to the network as it is),\n\
    optional `y` [B] i64 class labels and optional `emb` [B, D] f32.\n\
    OUT holds `out` [B, out_channels, H, W] f32.")]
pub struct Args {
    /// Model weights (safetensors or a PyTorch .pt state_dict, guided-diffusion key names), or a
    /// diffusers UNet2DModel folder.
    #[arg(long)]
    model: PathBuf,
    /// Model config (JSON). Each field comes from the first of this file, <model stem>.json and
    /// the file's `config` metadata that gives it; the rest are inferred from the weights.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Input tensors.
    #[arg(long)]
    input: PathBuf,
    /// Where to write `out`.
    #[arg(long)]
    output: PathBuf,
    /// Where to run: cpu, cuda (GPU 0), cuda:N (GPU N), or auto (the GPU when one is usable,
    /// else the CPU).
    #[arg(long, default_value = "auto", value_parser = super::parse_device, value_name = "DEVICE")]
    device: DeviceArg,
    /// GPU storage type (the CPU computes in f32) [default: bf16].
    #[arg(long, value_enum, value_name = "DTYPE")]
    dtype: Option<Dtype>,
}

/// The tensors forward reads from its input file.
const INPUTS: [&str; 4] = ["x", "t", "y", "emb"];

pub fn run(args: Args) -> Result<()> {
    let mut inputs = vec![
        ("--model", args.model.as_path()),
        ("--input", args.input.as_path()),
    ];
    inputs.extend(args.config.as_deref().map(|p| ("--config", p)));
    check_output_file(&args.output, "--output", &inputs)?;
    let device = open_device(args.device)?;
    let dtype = super::storage_dtype(args.dtype, Dtype::Bf16, &device);
    let model = load_model(&args.model, config_arg(&args.config)?)
        .with_context(|| format!("loading model {}", args.model.display()))?
        .to_device(&device, dtype.into())
        .context("uploading the model")?;
    let input = SafetensorsFile::open(&args.input)
        .with_context(|| format!("reading input {}", args.input.display()))?;
    let ctx = || format!("input {}", args.input.display());
    // A misspelt name (`emb` as `embedding`) would otherwise change the pass unseen. `out`,
    // the name of what forward writes, is a reference output kept beside the inputs (as in
    // tests/fixtures/unet), not a mistake.
    for name in input.names().filter(|n| !INPUTS.contains(n) && *n != "out") {
        report!(
            "warning: {}: tensor `{name}` is not one forward reads ({}): ignored",
            ctx(),
            INPUTS.join(", ")
        );
    }

    let shape = input.shape("x").with_context(ctx)?.to_vec();
    let [n, c, h, w] = shape[..] else {
        bail!("{}: `x` must be [B, C, H, W], got {shape:?}", ctx());
    };
    let x = input.f32("x").with_context(ctx)?;
    let timesteps: Vec<f32> = match input.dtype("t").with_context(ctx)? {
        StorageDtype::I64 => input.i64("t")?.into_iter().map(|t| t as f32).collect(),
        _ => input.f32("t").with_context(ctx)?,
    };
    if input.shape("t")? != [n] {
        bail!("{}: `t` must be [{n}], got {:?}", ctx(), input.shape("t")?);
    }
    let labels = if input.contains("y") {
        if input.shape("y")? != [n] {
            bail!("{}: `y` must be [{n}], got {:?}", ctx(), input.shape("y")?);
        }
        Some(input.i64("y").with_context(ctx)?)
    } else {
        None
    };
    let embedding = if input.contains("emb") {
        let s = input.shape("emb")?;
        if s.len() != 2 || s[0] != n {
            bail!("{}: `emb` must be [{n}, D], got {s:?}", ctx());
        }
        Some(input.f32("emb").with_context(ctx)?)
    } else {
        None
    };
    let cond = Conditioning {
        timesteps: &timesteps,
        labels: labels.as_deref(),
        embedding: embedding.as_deref(),
    };
    let shape = [n, c, h, w];
    let out = model
        .forward_nchw(&x, shape, &cond, &mut Workspace::new())
        .context("forward pass")?;
    let non_finite = out.iter().filter(|v| !v.is_finite()).count();
    if non_finite > 0 {
        bail!(
            "the forward pass produced {non_finite} non-finite value(s) (NaN or inf): the weights \
             or the inputs drive the network past the range of its number format; nothing written"
        );
    }
    let oc = model.config.unet.out_channels();
    let meta = BTreeMap::from([(
        "producer".to_string(),
        format!("mcdm {}", env!("CARGO_PKG_VERSION")),
    )]);
    write_safetensors(
        &args.output,
        &[("out", TensorData::F32(vec![n, oc, h, w], &out))],
        Some(meta),
    )
    .with_context(|| format!("writing {}", args.output.display()))?;
    report!(
        "wrote `out` [{n}, {oc}, {h}, {w}] to {}",
        args.output.display()
    );
    Ok(())
}
