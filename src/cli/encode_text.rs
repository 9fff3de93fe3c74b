//! `mcdm encode-text`: sentence embeddings (all-MiniLM-L6-v2) for text-conditioned experts.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};

use mcdm::text::{TextEncoder, MODEL_NAME};
use mcdm::weights::{write_safetensors, TensorData};

/// Encode texts into unit-length sentence embeddings, as sentence-transformers'
/// all-MiniLM-L6-v2 does (texts past 256 tokens are cut).
#[derive(clap::Args)]
#[command(after_help = "Examples:\n  \
    mcdm encode-text --text \"This person has black hair.\" --output hair.safetensors\n  \
    mcdm encode-text --text \"a smiling woman\" --text \"a man with glasses\" \\\n    \
    --output captions.safetensors --text-model models/all-MiniLM-L6-v2\n\n\
OUT holds `embedding` [N, 384] f32, one row per --text in order, each of L2 norm 1; use it as\n\
`mcdm sample --expert NAME,embedding=OUT`. Metadata `texts` lists the texts (JSON).\n\n\
The model directory: --text-model, else $MCDM_TEXT_MODEL, else models/all-MiniLM-L6-v2 in the\n\
current directory, else in the mcdm source tree. Get it with scripts/fetch-text-model.sh.")]
pub struct Args {
    /// A text to encode; repeat for several.
    #[arg(long = "text", value_name = "TEXT", required = true)]
    texts: Vec<String>,
    /// Where to write `embedding` (safetensors).
    #[arg(long)]
    output: PathBuf,
    /// The model directory (default: $MCDM_TEXT_MODEL, then models/all-MiniLM-L6-v2).
    #[arg(long, value_name = "DIR")]
    text_model: Option<PathBuf>,
}

pub fn run(args: Args) -> Result<()> {
    let dir = TextEncoder::locate(args.text_model.as_deref())
        .with_context(|| format!("finding the {MODEL_NAME} text model"))?;
    let encoder = TextEncoder::load(&dir)
        .with_context(|| format!("loading the text model from {}", dir.display()))?;
    let texts: Vec<&str> = args.texts.iter().map(String::as_str).collect();
    let lengths = texts
        .iter()
        .map(|t| encoder.tokenize(t).map(|tok| tok.ids.len()))
        .collect::<mcdm::Result<Vec<_>>>()?;
    let start = Instant::now();
    let embedding = encoder.encode(&texts).context("encoding the texts")?;
    let elapsed = start.elapsed();

    let (n, d) = (texts.len(), encoder.dim());
    let meta = BTreeMap::from([
        (
            "producer".to_string(),
            format!("mcdm {}", env!("CARGO_PKG_VERSION")),
        ),
        ("model".to_string(), MODEL_NAME.to_string()),
        ("texts".to_string(), serde_json::to_string(&args.texts)?),
    ]);
    write_safetensors(
        &args.output,
        &[("embedding", TensorData::F32(vec![n, d], &embedding))],
        Some(meta),
    )
    .with_context(|| format!("writing {}", args.output.display()))?;

    let max = encoder.max_tokens();
    let cut = lengths.iter().filter(|&&l| l == max).count();
    eprintln!(
        "encoded {n} text(s) with {MODEL_NAME} from {} in {:.1} ms (tokens per text: {:?}{})",
        dir.display(),
        elapsed.as_secs_f64() * 1e3,
        lengths,
        if cut > 0 {
            format!("; {cut} at the {max}-token limit, possibly cut")
        } else {
            String::new()
        }
    );
    eprintln!("wrote `embedding` [{n}, {d}] to {}", args.output.display());
    Ok(())
}
