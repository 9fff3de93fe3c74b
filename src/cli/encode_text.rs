//! `mcdm encode-text`: sentence embeddings (all-MiniLM-L6-v2) for text-conditioned experts.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};

use mcdm::files::{read_string_limited, TEXT_LIMIT};
use mcdm::text::{TextEncoder, MODEL_NAME};
use mcdm::weights::{write_safetensors, TensorData};

use super::{check_output_file, open_device, DeviceArg, Dtype, Progress};

/// Texts encoded per call, so that the progress bar moves on long lists.
const CHUNK: usize = 64;
/// The same on the GPU, where a call batches its texts of equal token count: larger calls make
/// larger batches.
const GPU_CHUNK: usize = 1024;

/// Encode texts into unit-length sentence embeddings, as sentence-transformers'
/// all-MiniLM-L6-v2 does (texts past 256 tokens are cut).
#[derive(clap::Args)]
#[command(after_help = "Examples:\n  \
    mcdm encode-text --text \"This person has black hair.\" --output hair.safetensors\n  \
    mcdm encode-text --text \"a smiling woman\" --text \"a man with glasses\" \\\n    \
    --output captions.safetensors --text-model models/all-MiniLM-L6-v2\n  \
    mcdm encode-text --text-file captions.txt --device cuda --output captions.safetensors\n\n\
OUT holds `embedding` [N, 384] f32, one row per text in order (the --text ones first, then the\n\
lines of --text-file), each of L2 norm 1; use it as `mcdm sample --expert NAME,embedding=OUT`.\n\
Metadata `texts` lists the texts (JSON), `device` where they were encoded.\n\n\
The model directory: --text-model, else $MCDM_TEXT_MODEL, else models/all-MiniLM-L6-v2 in the\n\
current directory, else in the mcdm source tree. Get it with scripts/fetch-text-model.sh.")]
pub struct Args {
    /// A text to encode; repeat for several.
    #[arg(
        long = "text",
        value_name = "TEXT",
        required_unless_present = "text_file"
    )]
    texts: Vec<String>,
    /// A UTF-8 file of texts to encode, one per line (an empty line is an empty text).
    #[arg(long, value_name = "FILE")]
    text_file: Option<PathBuf>,
    /// Where to write `embedding` (safetensors).
    #[arg(long)]
    output: PathBuf,
    /// The model directory (default: $MCDM_TEXT_MODEL, then models/all-MiniLM-L6-v2).
    #[arg(long, value_name = "DIR")]
    text_model: Option<PathBuf>,
    /// Where the encoder runs: cpu (f32), cuda (GPU 0), cuda:N or auto; on a GPU through the
    /// UNet's kernels.
    #[arg(long, default_value = "cpu", value_parser = super::parse_device, value_name = "DEVICE")]
    device: DeviceArg,
    /// GPU storage type (the CPU computes in f32). f16 and bf16 round the activations: their
    /// embeddings are within cosine 0.999 of the f32 ones [default: f32].
    #[arg(long, value_enum, value_name = "DTYPE")]
    dtype: Option<Dtype>,
}

/// The texts of `--text`, then the lines of `--text-file`.
fn gather_texts(args: &Args) -> Result<Vec<String>> {
    let mut texts = args.texts.clone();
    if let Some(path) = &args.text_file {
        let content =
            read_string_limited(path, TEXT_LIMIT, "text file").context("reading --text-file")?;
        // Editors may start a UTF-8 file with a byte-order mark; it is not part of the text.
        let content = content.strip_prefix('\u{feff}').unwrap_or(&content);
        if content.trim().is_empty() {
            bail!("{} holds no texts (it is empty or blank)", path.display());
        }
        texts.extend(content.lines().map(str::to_string));
    }
    Ok(texts)
}

/// Encodes chunk by chunk through `encode`, reporting each chunk to `progress`.
fn encode_all(
    texts: &[&str],
    chunk_len: usize,
    progress: &mut Progress,
    mut encode: impl FnMut(&[&str]) -> mcdm::Result<Vec<f32>>,
) -> Result<Vec<f32>> {
    let mut out = Vec::new();
    let mut done = 0;
    for chunk in texts.chunks(chunk_len) {
        out.extend(encode(chunk).context("encoding the texts")?);
        done += chunk.len();
        progress.advance(chunk.len() as u64, || {
            format!("{done}/{} texts", texts.len())
        });
    }
    Ok(out)
}

pub fn run(args: Args) -> Result<()> {
    let text_file = args.text_file.as_deref().map(|p| ("--text-file", p));
    check_output_file(&args.output, "--output", text_file.as_slice())?;
    let owned = gather_texts(&args)?;
    let texts: Vec<&str> = owned.iter().map(String::as_str).collect();
    let dir = TextEncoder::locate(args.text_model.as_deref())
        .with_context(|| format!("finding the {MODEL_NAME} text model"))?;
    let encoder = TextEncoder::load(&dir)
        .with_context(|| format!("loading the text model from {}", dir.display()))?;
    let device = open_device(args.device)?;
    let dtype = super::storage_dtype(args.dtype, Dtype::F32, &device);
    let lengths = texts
        .iter()
        .map(|t| encoder.tokenize(t).map(|tok| tok.ids.len()))
        .collect::<mcdm::Result<Vec<_>>>()?;

    let mut progress = Progress::new(
        texts.len(),
        texts.len() > CHUNK,
        "{elapsed_precise} [{bar:30}] {pos}/{len} texts ETA {eta}",
    );
    let start = Instant::now();
    let encoder = encoder
        .to_device(&device, dtype.into())
        .context("uploading the text model to the GPU")?;
    let chunk = if device.is_cpu() { CHUNK } else { GPU_CHUNK };
    let embedding = encode_all(&texts, chunk, &mut progress, |chunk| encoder.encode(chunk))?;
    let device = device.describe(dtype.into());
    progress.finish();
    let elapsed = start.elapsed();

    let (n, d) = (texts.len(), encoder.dim());
    let meta = BTreeMap::from([
        (
            "producer".to_string(),
            format!("mcdm {}", env!("CARGO_PKG_VERSION")),
        ),
        ("model".to_string(), MODEL_NAME.to_string()),
        ("texts".to_string(), serde_json::to_string(&owned)?),
        ("device".to_string(), device.clone()),
    ]);
    write_safetensors(
        &args.output,
        &[("embedding", TensorData::F32(vec![n, d], &embedding))],
        Some(meta),
    )
    .with_context(|| format!("writing {}", args.output.display()))?;

    let max = encoder.max_tokens();
    let cut = lengths.iter().filter(|&&l| l == max).count();
    let tokens = if n <= 16 {
        format!("tokens per text: {lengths:?}")
    } else {
        format!(
            "{} tokens in all, at most {} per text",
            lengths.iter().sum::<usize>(),
            lengths.iter().max().copied().unwrap_or(0)
        )
    };
    report!(
        "encoded {n} text(s) with {MODEL_NAME} from {} on {device} in {:.1} ms ({tokens}{})",
        dir.display(),
        elapsed.as_secs_f64() * 1e3,
        if cut > 0 {
            format!("; {cut} at the {max}-token limit, possibly cut")
        } else {
            String::new()
        }
    );
    let empty = texts.iter().filter(|t| t.trim().is_empty()).count();
    if empty > 0 {
        report!("note: {empty} of the texts are empty or blank (each still has its row)");
    }
    report!("wrote `embedding` [{n}, {d}] to {}", args.output.display());
    Ok(())
}
