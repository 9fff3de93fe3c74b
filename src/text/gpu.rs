//! The text encoder on the GPU, through the UNet's kernels: every linear layer is a 1x1
//! convolution (`[t, in] x W^T + b` is a 1x1 conv over `[1, t, 1, in]`, so the implicit-GEMM
//! kernel serves, residual adds fused in its epilogue), attention is `attend_gpu` (BERT's fused
//! qkv, `[q heads | k heads | v heads]`, is exactly its layout), LayerNorm and GELU are
//! `kernels/layer_norm.cu`. Activations are stored in `T`, weights too (norms and biases f32).
//!
//! Texts of equal token count run together as one batch (the attention kernel attends within
//! each sequence of a batch), so no padding, and no mask, is needed. The embedding gather
//! (host tables, shared with the CPU encoder) and the mean pooling and L2 normalisation of the
//! downloaded hidden states are done on the host: they are tiny. The result is what
//! [`TextEncoder::encode`] gives, up to the rounding of `T`.

use std::sync::Arc;

use super::bert::{l2_normalize, mean_pool, BertConfig, Embeddings};
use super::tokenize::TextTokenizer;
use super::TextEncoder;
use crate::cuda::buffer::GpuPool;
use crate::cuda::{Gpu, GpuFloat};
use crate::error::{Error, Result};
use crate::ops::attention::attend_gpu;
use crate::ops::conv::{Conv2d, GpuConv2d, Residual};
use crate::ops::layer_norm::{gelu_gpu, GpuLayerNorm};
use crate::ops::linear::Linear;

/// Most tokens per forward pass: texts of one length are batched up to it (the activations of
/// a pass take about 115 MB at 8192 rows in f32).
const MAX_ROWS: usize = 8192;

/// One encoder block on the device.
struct GpuLayer<T> {
    qkv: GpuConv2d<T>,
    attn_out: GpuConv2d<T>,
    attn_norm: GpuLayerNorm,
    intermediate: GpuConv2d<T>,
    output: GpuConv2d<T>,
    output_norm: GpuLayerNorm,
}

/// A sentence encoder whose network runs on the GPU with activations stored in `T`.
pub struct GpuTextEncoder<T> {
    gpu: Arc<Gpu>,
    tokenizer: Arc<TextTokenizer>,
    config: BertConfig,
    embeddings: Arc<Embeddings>,
    embeddings_norm: GpuLayerNorm,
    layers: Vec<GpuLayer<T>>,
}

/// A linear layer as the 1x1 convolution computing the same GEMM.
fn linear_as_conv<T: GpuFloat>(gpu: &Gpu, lin: &Linear) -> Result<GpuConv2d<T>> {
    Conv2d::from_torch(&lin.weight, lin.bias.clone(), 1, 1).upload(gpu)
}

impl<T: GpuFloat> GpuTextEncoder<T> {
    /// Uploads the weights of `encoder` once (the tokenizer and the embedding tables stay on
    /// the host, shared with it).
    pub fn upload(encoder: &TextEncoder, gpu: Arc<Gpu>) -> Result<Self> {
        let bert = encoder.bert();
        let config = bert.config().clone();
        let d = config.hidden_size / config.num_heads;
        if d > 128 || !d.is_multiple_of(8) {
            return Err(Error::Config(format!(
                "the GPU text encoder needs an attention head width that is a multiple of 8, at \
                 most 128; this model's is {} / {} = {d}",
                config.hidden_size, config.num_heads
            )));
        }
        let layers = bert
            .layers()
            .iter()
            .map(|l| {
                Ok(GpuLayer {
                    qkv: linear_as_conv(&gpu, &l.qkv)?,
                    attn_out: linear_as_conv(&gpu, &l.attn_out)?,
                    attn_norm: l.attn_norm.upload(&gpu)?,
                    intermediate: linear_as_conv(&gpu, &l.intermediate)?,
                    output: linear_as_conv(&gpu, &l.output)?,
                    output_norm: l.output_norm.upload(&gpu)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(GpuTextEncoder {
            embeddings_norm: bert.embeddings_norm().upload(&gpu)?,
            embeddings: bert.embeddings().clone(),
            tokenizer: encoder.tokenizer().clone(),
            config,
            layers,
            gpu,
        })
    }

    pub fn gpu(&self) -> &Arc<Gpu> {
        &self.gpu
    }

    /// Width of an embedding (384 for all-MiniLM-L6-v2).
    pub fn dim(&self) -> usize {
        self.config.hidden_size
    }

    /// Unit-length embeddings of `texts`, row-major `[texts.len(), dim()]`, as
    /// [`TextEncoder::encode`]: each text is encoded independently of the others.
    pub fn encode(&self, texts: &[&str]) -> Result<Vec<f32>> {
        let tokens = texts
            .iter()
            .map(|t| self.tokenizer.encode(t))
            .collect::<Result<Vec<_>>>()?;
        let h = self.dim();
        let mut out = vec![0.0f32; texts.len() * h];
        let mut order: Vec<usize> = (0..texts.len()).collect();
        order.sort_by_key(|&i| tokens[i].ids.len());
        let mut pool = GpuPool::default();
        for same_length in order.chunk_by(|&a, &b| tokens[a].ids.len() == tokens[b].ids.len()) {
            let t = tokens[same_length[0]].ids.len();
            for batch in same_length.chunks((MAX_ROWS / t.max(1)).max(1)) {
                let n = batch.len();
                let ids: Vec<u32> = batch
                    .iter()
                    .flat_map(|&i| &tokens[i].ids)
                    .copied()
                    .collect();
                let type_ids: Vec<u32> = batch
                    .iter()
                    .flat_map(|&i| &tokens[i].type_ids)
                    .copied()
                    .collect();
                let hidden = self.hidden_states(&ids, &type_ids, n, t, &mut pool)?;
                let mut pooled = mean_pool(&hidden, &vec![1; n * t], n, t, h);
                l2_normalize(&mut pooled, h);
                for (&i, row) in batch.iter().zip(pooled.chunks_exact(h)) {
                    out[i * h..][..h].copy_from_slice(row);
                }
            }
        }
        Ok(out)
    }

    /// The last hidden states `[n, t, hidden]` of `n` sequences of `t` tokens each (`ids` and
    /// `type_ids` are `[n, t]`, no padding).
    fn hidden_states(
        &self,
        ids: &[u32],
        type_ids: &[u32],
        n: usize,
        t: usize,
        pool: &mut GpuPool<T>,
    ) -> Result<Vec<f32>> {
        let c = &self.config;
        let (rows, h) = (ids.len(), c.hidden_size);
        c.check_tokens(ids, type_ids, &vec![1; rows], n, t)?;
        if rows == 0 {
            return Ok(Vec::new());
        }
        let gpu = &*self.gpu;
        let mut x = gpu.upload::<T>(&self.embeddings.sum(ids, type_ids, t))?;
        self.embeddings_norm.forward_in_place(gpu, &mut x, rows)?;
        let mut qkv = pool.take(gpu, rows * 3 * h)?;
        let mut context = pool.take(gpu, rows * h)?;
        let mut inter = pool.take(gpu, rows * c.intermediate_size)?;
        for layer in &self.layers {
            // Post-norm blocks: x = LN(x + Attn(x)); x = LN(x + FFN(x)). A linear layer over
            // the rows is a 1x1 conv over an image of 1 x rows x 1 pixels; attention stays
            // within each of the n sequences.
            layer
                .qkv
                .forward(gpu, &x, 1, rows, 1, &mut qkv, Residual::None)?;
            attend_gpu(gpu, &qkv, n, t, h, c.num_heads, &mut context)?;
            layer
                .attn_out
                .forward(gpu, &context, 1, rows, 1, &mut x, Residual::Output)?;
            layer.attn_norm.forward_in_place(gpu, &mut x, rows)?;

            layer
                .intermediate
                .forward(gpu, &x, 1, rows, 1, &mut inter, Residual::None)?;
            gelu_gpu(gpu, &mut inter, rows * c.intermediate_size)?;
            layer
                .output
                .forward(gpu, &inter, 1, rows, 1, &mut x, Residual::Output)?;
            layer.output_norm.forward_in_place(gpu, &mut x, rows)?;
        }
        let hidden = gpu.download(&x)?;
        pool.give(qkv);
        pool.give(context);
        pool.give(inter);
        Ok(hidden)
    }
}
