//! A BERT encoder (the architecture of all-MiniLM-L6-v2) on the CPU in f32, matching
//! `transformers.BertModel` in eval mode: embeddings, post-LayerNorm blocks with erf GELU,
//! and padded batches whose padding is removed from attention by the mask.
//!
//! This is the reference the GPU port (`super::gpu`) is checked against, so each op is written
//! plainly; only the linear layers go through the crate's GEMM. LayerNorm and GELU live with
//! their kernels in `crate::ops::layer_norm`.

use std::path::Path;
use std::sync::Arc;

use multiversion::multiversion;
use rayon::prelude::*;
use serde::Deserialize;

use crate::error::{Error, Result};
use crate::ops::layer_norm::gelu_in_place;
use crate::ops::linear::Linear;
use crate::ops::{dot, softmax_in_place};
use crate::weights::SafetensorsFile;

pub use crate::ops::layer_norm::{gelu, LayerNorm};

/// The architecture, read from the model's Hugging Face `config.json`.
#[derive(Clone, Debug, PartialEq)]
pub struct BertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub intermediate_size: usize,
    pub max_position_embeddings: usize,
    pub type_vocab_size: usize,
    pub layer_norm_eps: f32,
}

/// The fields of `config.json` that matter here; unknown ones are ignored.
#[derive(Deserialize)]
struct HfConfig {
    model_type: Option<String>,
    vocab_size: usize,
    hidden_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    intermediate_size: usize,
    max_position_embeddings: usize,
    type_vocab_size: usize,
    layer_norm_eps: f32,
    hidden_act: String,
    position_embedding_type: Option<String>,
}

impl BertConfig {
    /// Reads and checks a Hugging Face BERT `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let bad = |msg: String| Error::Config(format!("{}: {msg}", path.display()));
        let hf: HfConfig = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        if let Some(t) = hf.model_type.as_deref().filter(|t| *t != "bert") {
            return Err(bad(format!(
                "model_type `{t}` is not supported (expected `bert`)"
            )));
        }
        // transformers' "gelu" is the exact erf form; the tanh approximation would be "gelu_new".
        if hf.hidden_act != "gelu" {
            return Err(bad(format!(
                "hidden_act `{}` is not supported (expected `gelu`)",
                hf.hidden_act
            )));
        }
        if let Some(p) = hf
            .position_embedding_type
            .as_deref()
            .filter(|p| *p != "absolute")
        {
            return Err(bad(format!(
                "position_embedding_type `{p}` is not supported (expected `absolute`)"
            )));
        }
        if hf.num_attention_heads == 0 || !hf.hidden_size.is_multiple_of(hf.num_attention_heads) {
            return Err(bad(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                hf.hidden_size, hf.num_attention_heads
            )));
        }
        if hf.layer_norm_eps.is_nan() || hf.layer_norm_eps <= 0.0 {
            return Err(bad(format!(
                "layer_norm_eps {} must be positive",
                hf.layer_norm_eps
            )));
        }
        Ok(BertConfig {
            vocab_size: hf.vocab_size,
            hidden_size: hf.hidden_size,
            num_layers: hf.num_hidden_layers,
            num_heads: hf.num_attention_heads,
            intermediate_size: hf.intermediate_size,
            max_position_embeddings: hf.max_position_embeddings,
            type_vocab_size: hf.type_vocab_size,
            layer_norm_eps: hf.layer_norm_eps,
        })
    }

    /// Checks the token arrays of a padded batch of `n` sequences of `t` tokens (`ids`,
    /// `type_ids`, `mask` all `[n, t]`) against the model's vocabulary, types and positions.
    pub(crate) fn check_tokens(
        &self,
        ids: &[u32],
        type_ids: &[u32],
        mask: &[u32],
        n: usize,
        t: usize,
    ) -> Result<()> {
        let rows = n.checked_mul(t);
        if [ids.len(), type_ids.len(), mask.len()]
            .iter()
            .any(|&len| Some(len) != rows)
        {
            return Err(Error::Input(format!(
                "token arrays must hold n * t = {n} * {t} entries (ids {}, type ids {}, mask {})",
                ids.len(),
                type_ids.len(),
                mask.len()
            )));
        }
        if t > self.max_position_embeddings {
            return Err(Error::Input(format!(
                "{t} tokens exceed the model's {} positions",
                self.max_position_embeddings
            )));
        }
        if let Some(id) = ids.iter().find(|&&id| id as usize >= self.vocab_size) {
            return Err(Error::Input(format!(
                "token id {id} is outside the vocabulary ({} entries)",
                self.vocab_size
            )));
        }
        if let Some(tt) = type_ids
            .iter()
            .find(|&&tt| tt as usize >= self.type_vocab_size)
        {
            return Err(Error::Input(format!(
                "token type id {tt} is outside the model's {} types",
                self.type_vocab_size
            )));
        }
        Ok(())
    }
}

/// Multi-head scaled dot-product self-attention over a padded batch.
///
/// `qkv`: `[n, t, 3 * hidden]`, each row all q, then all k, then all v, each head-major
/// (channel `h * d + j`). `mask`: `[n, t]`, nonzero for real tokens. `out`: `[n, t, hidden]`.
/// Padded keys get zero weight, which is what transformers' additive mask of the most
/// negative f32 amounts to after softmax. A row whose keys are all padding gets zeros.
pub fn masked_attention(
    qkv: &[f32],
    mask: &[u32],
    n: usize,
    t: usize,
    hidden: usize,
    heads: usize,
    out: &mut [f32],
) {
    out[..n * t * hidden]
        .par_chunks_mut(hidden)
        .enumerate()
        .for_each_init(
            || (Vec::with_capacity(t), Vec::with_capacity(t)),
            |(keys, scores): &mut (Vec<usize>, Vec<f32>), (row, out_row)| {
                let b = row / t;
                keys.clear();
                keys.extend((0..t).filter(|&j| mask[b * t + j] != 0));
                let seq = &qkv[b * t * 3 * hidden..][..t * 3 * hidden];
                let q = &qkv[row * 3 * hidden..][..hidden];
                attend_row(seq, q, keys, hidden, heads, scores, out_row);
            },
        );
}

/// One query row of [`masked_attention`]: `seq` is the sequence's `[t, 3 * hidden]` qkv, `q`
/// the row's queries, `keys` the positions of its real tokens.
#[multiversion(targets = "simd")]
fn attend_row(
    seq: &[f32],
    q: &[f32],
    keys: &[usize],
    hidden: usize,
    heads: usize,
    scores: &mut Vec<f32>,
    out_row: &mut [f32],
) {
    let d = hidden / heads;
    let scale = 1.0 / (d as f32).sqrt();
    for h in 0..heads {
        let q = &q[h * d..][..d];
        scores.clear();
        scores.extend(keys.iter().map(|&j| {
            let k = &seq[j * 3 * hidden + hidden + h * d..][..d];
            dot(q, k) * scale
        }));
        let o = &mut out_row[h * d..][..d];
        o.fill(0.0);
        if scores.is_empty() {
            continue;
        }
        softmax_in_place(scores);
        for (&j, &p) in keys.iter().zip(scores.iter()) {
            let v = &seq[j * 3 * hidden + 2 * hidden + h * d..][..d];
            for (o, v) in o.iter_mut().zip(v) {
                *o += p * v;
            }
        }
    }
}

/// Mean of the hidden states of the real tokens of each sequence: `[n, t, h]` -> `[n, h]`,
/// as sentence-transformers' mean pooling (a sequence with no real token gives zeros).
pub fn mean_pool(hidden: &[f32], mask: &[u32], n: usize, t: usize, h: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; n * h];
    for (b, pooled) in out.chunks_exact_mut(h).enumerate() {
        let mut count = 0usize;
        for i in (0..t).filter(|&i| mask[b * t + i] != 0) {
            count += 1;
            for (p, v) in pooled.iter_mut().zip(&hidden[(b * t + i) * h..][..h]) {
                *p += v;
            }
        }
        let inv = 1.0 / count.max(1) as f32;
        pooled.iter_mut().for_each(|p| *p *= inv);
    }
    out
}

/// Scales each row of `x` (`[rows, width]`) to unit L2 norm, as `F.normalize` (eps 1e-12).
pub fn l2_normalize(x: &mut [f32], width: usize) {
    for row in x.chunks_exact_mut(width) {
        let norm = row.iter().map(|&v| (v as f64).powi(2)).sum::<f64>().sqrt();
        let inv = (1.0 / norm.max(1e-12)) as f32;
        row.iter_mut().for_each(|v| *v *= inv);
    }
}

/// One post-norm encoder block.
pub(crate) struct Layer {
    /// q, k and v fused into one `[3 * hidden, hidden]` projection: one GEMM instead of three.
    pub(crate) qkv: Linear,
    pub(crate) attn_out: Linear,
    pub(crate) attn_norm: LayerNorm,
    pub(crate) intermediate: Linear,
    pub(crate) output: Linear,
    pub(crate) output_norm: LayerNorm,
}

/// The embedding tables (f32, row-major `[entries, hidden]`), shared with the GPU encoder,
/// which gathers on the host too.
pub(crate) struct Embeddings {
    hidden: usize,
    word: Vec<f32>,
    position: Vec<f32>,
    token_type: Vec<f32>,
}

impl Embeddings {
    /// word + absolute position + token type of each token of a batch of sequences of `t`
    /// tokens (position = index within its sequence), `[ids.len(), hidden]`, before the
    /// LayerNorm. The ids must have been checked ([`BertConfig::check_tokens`]).
    pub(crate) fn sum(&self, ids: &[u32], type_ids: &[u32], t: usize) -> Vec<f32> {
        let h = self.hidden;
        let mut x = vec![0.0f32; ids.len() * h];
        for (r, out) in x.chunks_exact_mut(h).enumerate() {
            let word = &self.word[ids[r] as usize * h..][..h];
            let pos = &self.position[(r % t) * h..][..h];
            let typ = &self.token_type[type_ids[r] as usize * h..][..h];
            for (((o, a), b), c) in out.iter_mut().zip(word).zip(pos).zip(typ) {
                *o = a + b + c;
            }
        }
        x
    }
}

/// A BERT encoder with its weights in memory (f32).
pub struct Bert {
    config: BertConfig,
    embeddings: Arc<Embeddings>,
    embeddings_norm: LayerNorm,
    layers: Vec<Layer>,
}

/// Reads tensors of one file with their shapes checked against the config.
struct Loader<'a> {
    file: &'a SafetensorsFile,
    /// "" for a bare `BertModel` export (as all-MiniLM-L6-v2), "bert." for one saved
    /// from a task head.
    prefix: &'static str,
}

impl Loader<'_> {
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let name = format!("{}{name}", self.prefix);
        let actual = self.file.shape(&name)?;
        if actual != shape {
            return Err(Error::WeightsMismatch(format!(
                "{}: `{name}` is {actual:?}, the config needs {shape:?}",
                self.file.path().display()
            )));
        }
        self.file.f32(&name)
    }

    fn linear(&self, name: &str, out_features: usize, in_features: usize) -> Result<Linear> {
        Ok(Linear {
            in_features,
            out_features,
            weight: self.tensor(&format!("{name}.weight"), &[out_features, in_features])?,
            bias: self.tensor(&format!("{name}.bias"), &[out_features])?,
        })
    }

    fn layer_norm(&self, name: &str, width: usize, eps: f32) -> Result<LayerNorm> {
        Ok(LayerNorm {
            weight: self.tensor(&format!("{name}.weight"), &[width])?,
            bias: self.tensor(&format!("{name}.bias"), &[width])?,
            eps,
        })
    }
}

impl Bert {
    /// Loads the weights of `config` from a safetensors file with transformers' key names.
    pub fn load(file: &SafetensorsFile, config: BertConfig) -> Result<Self> {
        let prefix = if file.contains("bert.embeddings.word_embeddings.weight") {
            "bert."
        } else {
            ""
        };
        let ld = Loader { file, prefix };
        let (h, eps) = (config.hidden_size, config.layer_norm_eps);
        // Not preallocated: a config naming absurdly many layers fails at the first missing one.
        let mut layers = Vec::new();
        for l in 0..config.num_layers {
            let p = format!("encoder.layer.{l}");
            let [q, k, v] = ["query", "key", "value"]
                .map(|s| ld.linear(&format!("{p}.attention.self.{s}"), h, h));
            let (q, k, v) = (q?, k?, v?);
            layers.push(Layer {
                qkv: Linear {
                    in_features: h,
                    out_features: 3 * h,
                    weight: [q.weight, k.weight, v.weight].concat(),
                    bias: [q.bias, k.bias, v.bias].concat(),
                },
                attn_out: ld.linear(&format!("{p}.attention.output.dense"), h, h)?,
                attn_norm: ld.layer_norm(&format!("{p}.attention.output.LayerNorm"), h, eps)?,
                intermediate: ld.linear(
                    &format!("{p}.intermediate.dense"),
                    config.intermediate_size,
                    h,
                )?,
                output: ld.linear(&format!("{p}.output.dense"), h, config.intermediate_size)?,
                output_norm: ld.layer_norm(&format!("{p}.output.LayerNorm"), h, eps)?,
            });
        }
        Ok(Bert {
            embeddings: Arc::new(Embeddings {
                hidden: h,
                word: ld.tensor("embeddings.word_embeddings.weight", &[config.vocab_size, h])?,
                position: ld.tensor(
                    "embeddings.position_embeddings.weight",
                    &[config.max_position_embeddings, h],
                )?,
                token_type: ld.tensor(
                    "embeddings.token_type_embeddings.weight",
                    &[config.type_vocab_size, h],
                )?,
            }),
            embeddings_norm: ld.layer_norm("embeddings.LayerNorm", h, eps)?,
            layers,
            config,
        })
    }

    pub fn config(&self) -> &BertConfig {
        &self.config
    }

    pub(crate) fn embeddings(&self) -> &Arc<Embeddings> {
        &self.embeddings
    }

    pub(crate) fn embeddings_norm(&self) -> &LayerNorm {
        &self.embeddings_norm
    }

    pub(crate) fn layers(&self) -> &[Layer] {
        &self.layers
    }

    /// The last hidden states `[n, t, hidden]` of a padded batch of `n` sequences of `t`
    /// tokens: `ids`, `type_ids` and `mask` are `[n, t]` (mask nonzero for real tokens).
    /// Rows at padded positions are computed but meaningless.
    pub fn forward(
        &self,
        ids: &[u32],
        type_ids: &[u32],
        mask: &[u32],
        n: usize,
        t: usize,
    ) -> Result<Vec<f32>> {
        let c = &self.config;
        c.check_tokens(ids, type_ids, mask, n, t)?;
        let (h, rows) = (c.hidden_size, n * t);

        // Embeddings: word + absolute position + token type, then LayerNorm.
        let mut x = self.embeddings.sum(ids, type_ids, t);
        self.embeddings_norm.forward(&mut x);

        let mut qkv = vec![0.0f32; rows * 3 * h];
        let mut context = vec![0.0f32; rows * h];
        let mut y = vec![0.0f32; rows * h];
        let mut inter = vec![0.0f32; rows * c.intermediate_size];
        for layer in &self.layers {
            // Post-norm blocks: x = LN(x + Attn(x)); x = LN(x + FFN(x)).
            layer.qkv.forward(&x, rows, &mut qkv, false);
            masked_attention(&qkv, mask, n, t, h, c.num_heads, &mut context);
            layer.attn_out.forward(&context, rows, &mut y, false);
            add_into(&mut x, &y);
            layer.attn_norm.forward(&mut x);

            layer.intermediate.forward(&x, rows, &mut inter, false);
            inter.par_chunks_mut(4096).for_each(gelu_in_place);
            layer.output.forward(&inter, rows, &mut y, false);
            add_into(&mut x, &y);
            layer.output_norm.forward(&mut x);
        }
        Ok(x)
    }
}

/// `x += y`.
fn add_into(x: &mut [f32], y: &[f32]) {
    x.iter_mut().zip(y).for_each(|(a, b)| *a += b);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attention_ignores_padded_keys() {
        // One head of width 1, two sequences of 3 slots; the second has one real token.
        let (n, t, h) = (2, 3, 1);
        let qkv: Vec<f32> = (0..n * t)
            .flat_map(|r| [0.5, r as f32 * 0.1, r as f32 + 1.0])
            .collect();
        let mask = [1, 1, 0, 1, 0, 0];
        let mut out = vec![f32::NAN; n * t * h];
        masked_attention(&qkv, &mask, n, t, h, 1, &mut out);
        // Sequence 0 attends over rows 0 and 1 only.
        let (s0, s1) = (0.5f32 * 0.0, 0.5f32 * 0.1);
        let (e0, e1) = (s0.exp(), s1.exp());
        let want = (e0 * 1.0 + e1 * 2.0) / (e0 + e1);
        for i in 0..t {
            assert!((out[i] - want).abs() < 1e-6, "{out:?}");
        }
        // Sequence 1 has one real key: every query returns its value.
        for i in 0..t {
            assert!((out[t + i] - 4.0).abs() < 1e-6, "{out:?}");
        }
    }

    #[test]
    fn mean_pool_and_normalize() {
        let hidden = [1.0, 2.0, 3.0, 4.0, 100.0, 100.0];
        let mut pooled = mean_pool(&hidden, &[1, 1, 0], 1, 3, 2);
        assert_eq!(pooled, [2.0, 3.0]);
        l2_normalize(&mut pooled, 2);
        let norm = (pooled[0].powi(2) + pooled[1].powi(2)).sqrt();
        assert!((norm - 1.0).abs() < 1e-6);
        let mut zeros = [0.0f32; 3];
        l2_normalize(&mut zeros, 3);
        assert_eq!(zeros, [0.0; 3]);
    }
}
