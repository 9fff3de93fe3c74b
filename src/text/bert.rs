//! A BERT encoder (the architecture of all-MiniLM-L6-v2), written once over [`Backend`],
//! matching `transformers.BertModel` in eval mode: embeddings, post-LayerNorm blocks with erf
//! GELU.
//!
//! Every linear layer is a 1x1 convolution (`[t, in] x W^T + b` is a 1x1 conv over
//! `[1, t, 1, in]`, so the implicit-GEMM kernel serves on a GPU, residual adds fused in its
//! epilogue); attention is the UNet's (BERT's fused qkv, `[q heads | k heads | v heads]`, is
//! exactly its layout); LayerNorm and GELU are `crate::ops::layer_norm`. A batch holds
//! sequences of one token count (attention stays within each sequence), so no padding and no
//! mask are needed. The embedding gather is done on the host: it is tiny.

use std::path::Path;
use std::sync::Arc;

use serde::Deserialize;

use crate::backend::{Backend, Cpu, Residual};
use crate::error::{Error, Result};
use crate::files::{read_string_limited, JSON_LIMIT};
use crate::ops::conv::Conv2d;
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
        let text = read_string_limited(path, JSON_LIMIT, "config file")?;
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

    /// Checks the token arrays of a batch of `n` sequences of `t` tokens (`ids` and
    /// `type_ids` both `[n, t]`) against the model's vocabulary, types and positions.
    pub(crate) fn check_tokens(
        &self,
        ids: &[u32],
        type_ids: &[u32],
        n: usize,
        t: usize,
    ) -> Result<()> {
        let rows = n.checked_mul(t);
        if [ids.len(), type_ids.len()]
            .iter()
            .any(|&len| Some(len) != rows)
        {
            return Err(Error::Input(format!(
                "token arrays must hold n * t = {n} * {t} entries (ids {}, type ids {})",
                ids.len(),
                type_ids.len()
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

/// Mean of the hidden states of each sequence: `[n, t, h]` -> `[n, h]`, as
/// sentence-transformers' mean pooling over a sequence without padding.
pub fn mean_pool(hidden: &[f32], n: usize, t: usize, h: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; n * h];
    for (b, pooled) in out.chunks_exact_mut(h).enumerate() {
        for i in 0..t {
            for (p, v) in pooled.iter_mut().zip(&hidden[(b * t + i) * h..][..h]) {
                *p += v;
            }
        }
        let inv = 1.0 / t.max(1) as f32;
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

/// One post-norm encoder block; each linear layer a 1x1 convolution.
pub(crate) struct Layer<B: Backend> {
    /// q, k and v fused into one `[3 * hidden, hidden]` projection: one GEMM instead of three.
    qkv: B::Conv,
    attn_out: B::Conv,
    attn_norm: B::LayerNorm,
    intermediate: B::Conv,
    output: B::Conv,
    output_norm: B::LayerNorm,
}

/// The embedding tables (f32, row-major `[entries, hidden]`), kept on the host on every
/// backend: the gather is done there.
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

/// A BERT encoder with its layers on backend `B`.
pub struct Bert<B: Backend> {
    config: BertConfig,
    embeddings: Arc<Embeddings>,
    embeddings_norm: B::LayerNorm,
    layers: Vec<Layer<B>>,
}

/// A linear layer's weight `[out, in]` and bias `[out]` as read.
type Linear = (Vec<f32>, Vec<f32>);

/// A linear layer as the 1x1 convolution computing the same GEMM.
fn conv1x1((weight, bias): Linear) -> Conv2d {
    Conv2d::from_torch(&weight, bias, 1, 1)
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

    /// A linear layer's weight `[out, in]` and bias `[out]`.
    fn linear(&self, name: &str, out_features: usize, in_features: usize) -> Result<Linear> {
        Ok((
            self.tensor(&format!("{name}.weight"), &[out_features, in_features])?,
            self.tensor(&format!("{name}.bias"), &[out_features])?,
        ))
    }

    fn layer_norm(&self, name: &str, width: usize, eps: f32) -> Result<LayerNorm> {
        Ok(LayerNorm {
            weight: self.tensor(&format!("{name}.weight"), &[width])?,
            bias: self.tensor(&format!("{name}.bias"), &[width])?,
            eps,
        })
    }
}

impl Bert<Cpu> {
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
            let ((qw, qb), (kw, kb), (vw, vb)) = (q?, k?, v?);
            layers.push(Layer {
                qkv: conv1x1(([qw, kw, vw].concat(), [qb, kb, vb].concat())),
                attn_out: conv1x1(ld.linear(&format!("{p}.attention.output.dense"), h, h)?),
                attn_norm: ld.layer_norm(&format!("{p}.attention.output.LayerNorm"), h, eps)?,
                intermediate: conv1x1(ld.linear(
                    &format!("{p}.intermediate.dense"),
                    config.intermediate_size,
                    h,
                )?),
                output: conv1x1(ld.linear(
                    &format!("{p}.output.dense"),
                    h,
                    config.intermediate_size,
                )?),
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

    /// The same encoder with its layers moved to `backend` (the embedding tables stay on the
    /// host, shared).
    pub fn to_backend<B: Backend>(&self, backend: &B) -> Result<Bert<B>> {
        let d = self.config.hidden_size / self.config.num_heads;
        if d > 128 || !d.is_multiple_of(8) {
            return Err(Error::Config(format!(
                "the GPU text encoder needs an attention head width that is a multiple of 8, at \
                 most 128; this model's is {} / {} = {d}",
                self.config.hidden_size, self.config.num_heads
            )));
        }
        let layers = self
            .layers
            .iter()
            .map(|l| {
                Ok(Layer {
                    qkv: backend.conv_params(&l.qkv)?,
                    attn_out: backend.conv_params(&l.attn_out)?,
                    attn_norm: backend.layer_norm_params(&l.attn_norm)?,
                    intermediate: backend.conv_params(&l.intermediate)?,
                    output: backend.conv_params(&l.output)?,
                    output_norm: backend.layer_norm_params(&l.output_norm)?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Bert {
            config: self.config.clone(),
            embeddings: self.embeddings.clone(),
            embeddings_norm: backend.layer_norm_params(&self.embeddings_norm)?,
            layers,
        })
    }
}

impl<B: Backend> Bert<B> {
    pub fn config(&self) -> &BertConfig {
        &self.config
    }

    /// The last hidden states `[n, t, hidden]` of `n` sequences of `t` tokens each (`ids` and
    /// `type_ids` are `[n, t]`, no padding).
    pub fn hidden_states(
        &self,
        be: &mut B,
        ids: &[u32],
        type_ids: &[u32],
        n: usize,
        t: usize,
    ) -> Result<Vec<f32>> {
        let c = &self.config;
        c.check_tokens(ids, type_ids, n, t)?;
        let (rows, h) = (ids.len(), c.hidden_size);
        if rows == 0 {
            return Ok(Vec::new());
        }
        // Embeddings: word + absolute position + token type, then LayerNorm.
        let mut x = be.upload_tensor(&self.embeddings.sum(ids, type_ids, t))?;
        be.layer_norm(&self.embeddings_norm, &mut x, rows)?;
        let mut qkv = be.take(rows * 3 * h)?;
        let mut context = be.take(rows * h)?;
        let mut inter = be.take(rows * c.intermediate_size)?;
        // The rows as an image of 1 x rows x 1 pixels, for the 1x1 convolutions.
        let pixels = [1, rows, 1];
        for layer in &self.layers {
            // Post-norm blocks: x = LN(x + Attn(x)); x = LN(x + FFN(x)).
            be.conv(&layer.qkv, &x, pixels, &mut qkv, Residual::None)?;
            be.attend(&qkv, [n, t, h, c.num_heads], &mut context)?;
            be.conv(&layer.attn_out, &context, pixels, &mut x, Residual::Output)?;
            be.layer_norm(&layer.attn_norm, &mut x, rows)?;

            be.conv(&layer.intermediate, &x, pixels, &mut inter, Residual::None)?;
            be.gelu(&mut inter, rows * c.intermediate_size)?;
            be.conv(&layer.output, &inter, pixels, &mut x, Residual::Output)?;
            be.layer_norm(&layer.output_norm, &mut x, rows)?;
        }
        let hidden = be.download_tensor(&x);
        be.give(qkv);
        be.give(context);
        be.give(inter);
        hidden
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_pool_and_normalize() {
        let hidden = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let mut pooled = mean_pool(&hidden, 1, 3, 2);
        assert_eq!(pooled, [3.0, 4.0]);
        l2_normalize(&mut pooled, 2);
        let norm = (pooled[0].powi(2) + pooled[1].powi(2)).sqrt();
        assert!((norm - 1.0).abs() < 1e-6);
        let mut zeros = [0.0f32; 3];
        l2_normalize(&mut zeros, 3);
        assert_eq!(zeros, [0.0; 3]);
    }
}
