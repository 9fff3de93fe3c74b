//! The seam between the networks and the devices: every operation that the UNet, the text
//! encoder and the sampler's step loop perform, written once per device ([`Cpu`], [`Cuda`]).
//! The networks (`crate::model`, `crate::text`) and the step loop (`crate::sample`) are written
//! once against [`Backend`]: the graph says what is computed, the backend how.
//!
//! A backend value is an executor: it owns the buffer pools its operations take activations
//! from, so that after the first forward pass at a given size no layer allocates. A fused
//! operation (a nearest upsampling folded into the convolution after it, say) is a method whose
//! default is the plain sequence of operations, overridden by a backend that fuses it.
//!
//! Layouts: activations NHWC in the backend's storage type ([`Backend::Tensor`]); conditioning,
//! embeddings, timesteps and the sampler's state f32 ([`Backend::Vector`]), images of the
//! sampler's state NCHW.

pub mod cpu;
pub mod cuda;

pub use cpu::Cpu;
pub use cuda::Cuda;

use crate::diffusion::StepParams;
use crate::error::Result;
use crate::ops::conv::Conv2d;
use crate::ops::embedding::TimeFeatures;
use crate::ops::group_norm::GroupNorm;
use crate::ops::layer_norm::LayerNorm;
use crate::ops::linear::Linear;

pub use crate::ops::conv::Residual;

/// A buffer of some elements on a backend's device.
pub trait Buffer {
    /// Elements in use (an allocation recycled from a pool may be larger).
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A forward pass's conditioning on the device: `[n]` timesteps, `[n]` class labels and
/// `[n, embed_dim]` vector conditions, each present where the model takes it.
pub struct Cond<'a, B: Backend> {
    pub timesteps: &'a B::Vector,
    pub labels: Option<&'a B::Labels>,
    pub embedding: Option<&'a B::Vector>,
}

impl<B: Backend> Clone for Cond<'_, B> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<B: Backend> Copy for Cond<'_, B> {}

/// The sizes [`Backend::in_groups`] needs of a forward pass over `n` images, per image.
#[derive(Clone, Copy, Debug)]
pub struct PassSizes {
    pub n: usize,
    /// Input and output elements.
    pub input: usize,
    pub output: usize,
    /// The widest activation, which the CPU keeps cache-sized.
    pub widest: usize,
    /// What the pass holds at once, at most (see `UNet::working_floats_per_image`).
    pub working: usize,
    /// The image's height and width, for messages.
    pub image: [usize; 2],
}

/// The per-channel moments of a tensor `[n, hw, c]`, made by the conv that wrote it
/// ([`Backend::conv_moments`]): `part` f32 `[n, chunks, c, 3]`, the count, mean and sum of
/// squared deviations of each channel over each of `chunks` runs of `hw / chunks` pixels.
pub struct Moments<V> {
    pub part: V,
    pub chunks: usize,
}

/// One of a conv's input tensors, `[n, h, w, c]`, with the per-channel moments of the conv
/// that made it, where there are some ([`Backend::conv_moments`]).
pub struct Source<'a, B: Backend> {
    pub data: &'a B::Tensor,
    pub c: usize,
    pub moments: Option<&'a Moments<B::Vector>>,
}

impl<B: Backend> Clone for Source<'_, B> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<B: Backend> Copy for Source<'_, B> {}

/// The group norm of a conv's input, then `* (1 + scale) + shift` with `scale_shift` `[n, 2c]`
/// (scale first), then SiLU when `silu`: [`Backend::normed_conv`].
pub struct InputNorm<'a, B: Backend> {
    pub norm: &'a B::GroupNorm,
    pub scale_shift: Option<&'a B::Vector>,
    pub silu: bool,
}

impl<B: Backend> Clone for InputNorm<'_, B> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<B: Backend> Copy for InputNorm<'_, B> {}

/// One forward pass over a batch: `pass(backend, x, n, cond)` returns the output of `n` images.
pub type Pass<'p, B> = dyn FnMut(&mut B, &<B as Backend>::Tensor, usize, Cond<'_, B>) -> Result<<B as Backend>::Tensor>
    + 'p;

/// The operations of a device. Sizes are in elements; `n` images, `h x w` pixels, `c`
/// channels. Each operation checks that its buffers hold what it touches.
pub trait Backend: Sized {
    /// Activations in the storage type (f32 on the CPU; f32, f16 or bf16 on a GPU).
    type Tensor: Buffer;
    /// f32 vectors: embeddings, timesteps, tables, the sampler's state.
    type Vector: Buffer;
    /// Class labels.
    type Labels: Buffer;
    /// Layer parameters as this device keeps them.
    type Conv;
    type GroupNorm;
    type Linear;
    type LayerNorm;
    /// Work recorded once and replayed with one launch (CUDA graphs).
    type Graph;

    /// A convolution's parameters, from their host form.
    fn conv_params(&self, conv: &Conv2d) -> Result<Self::Conv>;
    fn group_norm_params(&self, norm: &GroupNorm) -> Result<Self::GroupNorm>;
    fn linear_params(&self, linear: &Linear) -> Result<Self::Linear>;
    fn layer_norm_params(&self, norm: &LayerNorm) -> Result<Self::LayerNorm>;

    /// A tensor of `len` elements from the pool, contents unspecified.
    fn take(&mut self, len: usize) -> Result<Self::Tensor>;
    /// Returns a tensor to the pool.
    fn give(&mut self, tensor: Self::Tensor);
    fn take_vector(&mut self, len: usize) -> Result<Self::Vector>;
    fn give_vector(&mut self, vector: Self::Vector);
    /// Buffers the pools allocated so far: a stretch of work that leaves this unchanged (and
    /// gives back what it took) allocates nothing when repeated.
    fn allocations(&self) -> usize;
    /// Frees the pools' buffers (after running out of memory, before a smaller retry).
    fn release_buffers(&mut self);

    /// Host values to a new vector (not from the pool).
    fn upload(&mut self, host: &[f32]) -> Result<Self::Vector>;
    fn upload_labels(&mut self, host: &[i64]) -> Result<Self::Labels>;
    /// Host values to a new tensor in the storage type.
    fn upload_tensor(&mut self, host: &[f32]) -> Result<Self::Tensor>;
    /// Waits for the work queued before, then copies back.
    fn download(&mut self, vector: &Self::Vector) -> Result<Vec<f32>>;
    fn download_tensor(&mut self, tensor: &Self::Tensor) -> Result<Vec<f32>>;
    /// `dst` = elements `offset .. offset + dst.len()` of `src`.
    fn copy(&mut self, src: &Self::Vector, offset: usize, dst: &mut Self::Vector) -> Result<()>;

    /// x `[n, h, w, cin]` -> y `[n, ho, wo, cout]`: `y = conv(x) + bias`, plus the residual.
    fn conv(
        &mut self,
        conv: &Self::Conv,
        x: &Self::Tensor,
        nhw: [usize; 3],
        y: &mut Self::Tensor,
        residual: Residual<'_, Self::Tensor>,
    ) -> Result<()>;
    /// A nearest 2x upsampling of x `[n, h, w, c]` then `conv` into y `[n, 2h, 2w, cout]`.
    /// This default makes the upsampled copy; a backend may read x upsampled instead.
    fn upsample_conv(
        &mut self,
        conv: &Self::Conv,
        x: &Self::Tensor,
        nhwc: [usize; 4],
        y: &mut Self::Tensor,
    ) -> Result<()> {
        copying::upsample_conv(self, conv, x, nhwc, y)
    }
    /// `conv` of the channel concatenation `cat([a, b])`, a `[n, h, w, ca]` and b
    /// `[n, h, w, cb]` (the decoder's skip). This default makes the concatenation; a backend
    /// may read the two tensors instead.
    fn concat_conv(
        &mut self,
        conv: &Self::Conv,
        ab: [&Self::Tensor; 2],
        sizes: [usize; 5],
        y: &mut Self::Tensor,
        residual: Residual<'_, Self::Tensor>,
    ) -> Result<()> {
        copying::concat_conv(self, conv, ab, sizes, y, residual)
    }
    /// `group_norm` of the channel concatenation `cat([a, b])`, a `[n, hw, ca]` and b
    /// `[n, hw, cb]`, into y `[n, hw, ca + cb]`. This default makes the concatenation.
    #[allow(clippy::too_many_arguments)]
    fn concat_group_norm(
        &mut self,
        norm: &Self::GroupNorm,
        ab: [&Self::Tensor; 2],
        sizes: [usize; 4],
        y: &mut Self::Tensor,
        scale_shift: Option<&Self::Vector>,
        silu: bool,
    ) -> Result<()> {
        copying::concat_group_norm(self, norm, ab, sizes, y, scale_shift, silu)
    }
    /// GroupNorm (the norm's groups) of x `[n, hw, c]`, then `* (1 + scale) + shift` with `scale_shift`
    /// `[n, 2c]` (scale first), then SiLU when `silu`.
    #[allow(clippy::too_many_arguments)]
    fn group_norm(
        &mut self,
        norm: &Self::GroupNorm,
        x: &Self::Tensor,
        n: usize,
        hw: usize,
        y: &mut Self::Tensor,
        scale_shift: Option<&Self::Vector>,
        silu: bool,
    ) -> Result<()>;
    /// `conv` of x `[n, h, w, c]` (or `upsample_conv`, when `upsampled`; then without a
    /// residual), and where the backend can, the per-channel moments of its output, from which
    /// [`Backend::group_norm_from`] and [`Backend::concat_group_norm_from`] take a later
    /// norm's statistics instead of a pass over it. This default makes none.
    fn conv_moments(
        &mut self,
        conv: &Self::Conv,
        x: &Self::Tensor,
        nhwc: [usize; 4],
        upsampled: bool,
        y: &mut Self::Tensor,
        residual: Residual<'_, Self::Tensor>,
    ) -> Result<Option<Moments<Self::Vector>>> {
        copying::conv_without_moments(self, conv, x, nhwc, upsampled, y, residual)
    }
    /// `conv` of the group norm of x (`norm`), x being one tensor or the channel concatenation
    /// of two (`parts`, each `[n, h, w, c_i]`; `nhw` is their stored size, which an `upsampled`
    /// conv reads at twice the size, then without a residual); with the moments of its output
    /// as [`Backend::conv_moments`] makes them when `moments` asks for them. The norm takes its
    /// statistics from the parts' moments where they all have some. This default stores the
    /// normalised tensor first; a backend may normalise as the conv reads.
    #[allow(clippy::too_many_arguments)]
    fn normed_conv(
        &mut self,
        norm: InputNorm<'_, Self>,
        conv: &Self::Conv,
        parts: &[Source<'_, Self>],
        nhw: [usize; 3],
        upsampled: bool,
        y: &mut Self::Tensor,
        residual: Residual<'_, Self::Tensor>,
        moments: bool,
    ) -> Result<Option<Moments<Self::Vector>>> {
        copying::normed_conv(
            self, norm, conv, parts, nhw, upsampled, y, residual, moments,
        )
    }
    /// `group_norm` of x, whose per-channel moments [`Backend::conv_moments`] made. This
    /// default makes its own statistics.
    #[allow(clippy::too_many_arguments)]
    fn group_norm_from(
        &mut self,
        norm: &Self::GroupNorm,
        (x, moments): (&Self::Tensor, &Moments<Self::Vector>),
        n: usize,
        hw: usize,
        y: &mut Self::Tensor,
        scale_shift: Option<&Self::Vector>,
        silu: bool,
    ) -> Result<()> {
        let _ = moments;
        self.group_norm(norm, x, n, hw, y, scale_shift, silu)
    }
    /// `concat_group_norm` of a and b, whose per-channel moments [`Backend::conv_moments`] made.
    /// This default makes its own statistics.
    #[allow(clippy::too_many_arguments)]
    fn concat_group_norm_from(
        &mut self,
        norm: &Self::GroupNorm,
        ab: [&Self::Tensor; 2],
        moments: [&Moments<Self::Vector>; 2],
        sizes: [usize; 4],
        y: &mut Self::Tensor,
        scale_shift: Option<&Self::Vector>,
        silu: bool,
    ) -> Result<()> {
        let _ = moments;
        self.concat_group_norm(norm, ab, sizes, y, scale_shift, silu)
    }
    /// Softmax attention per head: qkv `[n, t, 3c]` (all q, then all k, then all v, each
    /// head-major) -> out `[n, t, c]`; `ntch` is `[n, t, c, heads]`.
    fn attend(
        &mut self,
        qkv: &Self::Tensor,
        ntch: [usize; 4],
        out: &mut Self::Tensor,
    ) -> Result<()>;
    /// Nearest 2x: x `[n, h, w, c]` -> y `[n, 2h, 2w, c]`.
    fn upsample2x(
        &mut self,
        x: &Self::Tensor,
        nhwc: [usize; 4],
        y: &mut Self::Tensor,
    ) -> Result<()>;
    /// `group_norm` (without scale-shift) of x `[n, h, w, c]`, then 2x2 average pooling into
    /// y `[n, h/2, w/2, c]`: a downsampling ResBlock's normalised branch. This default stores
    /// the full-size result first.
    fn group_norm_pool2x(
        &mut self,
        norm: &Self::GroupNorm,
        x: &Self::Tensor,
        nhwc: [usize; 4],
        y: &mut Self::Tensor,
        silu: bool,
    ) -> Result<()> {
        copying::group_norm_pool2x(self, norm, x, nhwc, y, silu)
    }
    /// `group_norm_pool2x` of x, whose per-channel moments [`Backend::conv_moments`] made.
    /// This default makes its own statistics.
    fn group_norm_pool2x_from(
        &mut self,
        norm: &Self::GroupNorm,
        (x, moments): (&Self::Tensor, &Moments<Self::Vector>),
        nhwc: [usize; 4],
        y: &mut Self::Tensor,
        silu: bool,
    ) -> Result<()> {
        let _ = moments;
        self.group_norm_pool2x(norm, x, nhwc, y, silu)
    }
    /// 2x2 average pooling: x `[n, h, w, c]` -> y `[n, h/2, w/2, c]`.
    fn avg_pool2x(
        &mut self,
        x: &Self::Tensor,
        nhwc: [usize; 4],
        y: &mut Self::Tensor,
    ) -> Result<()>;
    /// `cat([a, b], channels)`: a `[n, hw, ca]`, b `[n, hw, cb]` -> y `[n, hw, ca + cb]`;
    /// `sizes` is `[n, hw, ca, cb]`.
    fn concat_channels(
        &mut self,
        a: &Self::Tensor,
        b: &Self::Tensor,
        sizes: [usize; 4],
        y: &mut Self::Tensor,
    ) -> Result<()>;
    /// x `[n, hw, c]` += bias `[n, c]` at every pixel.
    fn add_channel_bias(
        &mut self,
        x: &mut Self::Tensor,
        bias: &Self::Vector,
        n: usize,
        hw: usize,
        c: usize,
    ) -> Result<()>;

    /// The sinusoidal embedding of `[n]` timesteps, `[n, dim]` (guided-diffusion's `[cos | sin]`
    /// unless `features` say otherwise).
    fn timestep_embedding(
        &mut self,
        t: &Self::Vector,
        n: usize,
        dim: usize,
        features: TimeFeatures,
        out: &mut Self::Vector,
    ) -> Result<()>;
    /// y `[n, out]` = act(x) W^T + b for x `[n, in]`, act = SiLU when `silu_in`.
    fn linear(
        &mut self,
        linear: &Self::Linear,
        x: &Self::Vector,
        n: usize,
        y: &mut Self::Vector,
        silu_in: bool,
    ) -> Result<()>;
    /// y `[n, dim]` += table row `labels[i]` for each row i.
    fn add_rows(
        &mut self,
        y: &mut Self::Vector,
        table: &Self::Vector,
        labels: &Self::Labels,
        n: usize,
        dim: usize,
    ) -> Result<()>;
    /// y += x, elementwise over x's length.
    fn add(&mut self, y: &mut Self::Vector, x: &Self::Vector) -> Result<()>;
    /// SiLU in place over the first `len` elements.
    fn silu(&mut self, x: &mut Self::Vector, len: usize) -> Result<()>;

    /// LayerNorm of each of `rows` rows of x, in place.
    fn layer_norm(
        &mut self,
        norm: &Self::LayerNorm,
        x: &mut Self::Tensor,
        rows: usize,
    ) -> Result<()>;
    /// Erf GELU in place over the first `len` elements.
    fn gelu(&mut self, x: &mut Self::Tensor, len: usize) -> Result<()>;

    /// x `[n, c, hw]` (f32) -> y `[n, hw, c]` (storage type).
    fn nchw_to_nhwc(
        &mut self,
        x: &Self::Vector,
        nchw: [usize; 3],
        y: &mut Self::Tensor,
    ) -> Result<()>;
    /// x `[n, hw, c]` (storage type) -> y `[n, c, hw]` (f32).
    fn nhwc_to_nchw(
        &mut self,
        x: &Self::Tensor,
        nhwc: [usize; 3],
        y: &mut Self::Vector,
    ) -> Result<()>;

    /// A model's input for `b` images at `y[y_offset..]`, NHWC `[b, hw, 3 + cc]`: x_t
    /// `[b, 3, hw]` then the image condition `[count, cc, hw]` (item `first_image + k` for
    /// image k, or the one item when `count` is 1; zeros without one); `sizes` is
    /// `[b, hw, cc]`.
    #[allow(clippy::too_many_arguments)]
    fn pack_input(
        &mut self,
        x: &Self::Vector,
        cond: Option<(&Self::Vector, usize)>,
        first_image: usize,
        sizes: [usize; 3],
        y: &mut Self::Tensor,
        y_offset: usize,
    ) -> Result<()>;
    /// From a model's output `[b, hw, oc]` at `y[offset..]`: eps (channels 0..3) into
    /// `eps[eps_offset..]` and, when `var` is given, channels 3..6 into it, both `[b, 3, hw]`;
    /// `sizes` is `[b, hw]`.
    #[allow(clippy::too_many_arguments)]
    fn unpack_output(
        &mut self,
        y: &Self::Tensor,
        offset: usize,
        oc: usize,
        eps: &mut Self::Vector,
        eps_offset: usize,
        var: Option<&mut Self::Vector>,
        sizes: [usize; 2],
    ) -> Result<()>;
    /// The Philox normals of [`crate::rng::fill_normals`] for images `first_image ..` of `b`
    /// images of `len` elements (`sizes` is `[b, len]`).
    fn fill_normals(
        &mut self,
        out: &mut Self::Vector,
        sizes: [usize; 2],
        first_image: usize,
        seed: u64,
        step: u32,
    ) -> Result<()>;
    /// x = update(x, eps_u + sum_i w_i (eps_i - eps_u)) in place for `b` images of `len`:
    /// `eps` holds `terms` blocks `[b, len]` (`sizes`), the experts then the unconditional
    /// term. A multistep solver's step (mode 2) needs `history` `[3, b, len]`, which it updates.
    #[allow(clippy::too_many_arguments)]
    fn diffusion_step(
        &mut self,
        x: &mut Self::Vector,
        eps: &Self::Vector,
        weights: &Self::Vector,
        terms: usize,
        var: Option<&Self::Vector>,
        sizes: [usize; 2],
        first_image: usize,
        params: StepParams,
        history: Option<&mut Self::Vector>,
    ) -> Result<()>;

    /// Runs `pass` over the batch `x`. A backend may run it over groups of images instead and
    /// join the outputs (images are independent, so the result is the same); it may refuse a
    /// pass past its memory.
    fn in_groups(
        &mut self,
        x: &Self::Tensor,
        sizes: PassSizes,
        cond: Cond<'_, Self>,
        pass: &mut Pass<'_, Self>,
    ) -> Result<Self::Tensor> {
        let _ = sizes;
        pass(self, x, sizes.n, cond)
    }
    /// An error when `bytes` of working memory are more than the device can give (checked
    /// before allocating, where allocating too much would not fail cleanly).
    fn check_memory(&self, bytes: usize, what: &str) -> Result<()> {
        let _ = (bytes, what);
        Ok(())
    }

    /// Whether [`Backend::capture`] can record work.
    fn can_capture(&self) -> bool {
        false
    }
    /// Records the work `enqueue` would queue, without running it.
    fn capture(&mut self, enqueue: &mut dyn FnMut(&mut Self) -> Result<()>) -> Result<Self::Graph>;
    /// Queues the work `graph` recorded.
    ///
    /// # Safety
    /// Every buffer the recorded work touched must still be alive at the address it had, and
    /// hold what the work expects.
    unsafe fn replay(&mut self, graph: &Self::Graph) -> Result<()>;
    /// Keeps why a capture failed (the work then ran unrecorded), for the caller to report.
    fn note_capture_failure(&mut self, error: &crate::Error) {
        let _ = error;
    }
    /// Called after step `done` (from 0) of a batch was queued; returns how many of the
    /// batch's steps have finished. A device that runs ahead of the host waits here for all
    /// but the last step, so that progress follows the device.
    fn step_queued(&mut self, done: usize) -> Result<usize> {
        Ok(done + 1)
    }
}

/// The copies [`Backend::upsample_conv`], [`Backend::concat_conv`] and
/// [`Backend::concat_group_norm`] let a backend avoid, made, and the other fused operations as
/// their plain sequences: their defaults, and a backend's fallback where it cannot fuse.
pub mod copying {
    use super::{Backend, InputNorm, Moments, Residual, Source};
    use crate::error::Result;

    /// [`Backend::normed_conv`] with the normalised input stored first.
    #[allow(clippy::too_many_arguments)]
    pub fn normed_conv<B: Backend>(
        be: &mut B,
        norm: InputNorm<'_, B>,
        conv: &B::Conv,
        parts: &[Source<'_, B>],
        [n, h, w]: [usize; 3],
        upsampled: bool,
        y: &mut B::Tensor,
        residual: Residual<'_, B::Tensor>,
        moments: bool,
    ) -> Result<Option<Moments<B::Vector>>> {
        let c = parts.iter().map(|p| p.c).sum::<usize>();
        let mut normed = be.take(n * h * w * c)?;
        let nhwc = [n, h, w, c];
        let result = group_norm_parts(be, norm, parts, [n, h * w], &mut normed).and_then(|()| {
            if moments {
                be.conv_moments(conv, &normed, nhwc, upsampled, y, residual)
            } else {
                conv_without_moments(be, conv, &normed, nhwc, upsampled, y, residual)
            }
        });
        be.give(normed);
        result
    }

    /// The group norm of one tensor or of the channel concatenation of two, its statistics from
    /// their moments where they all have some.
    fn group_norm_parts<B: Backend>(
        be: &mut B,
        InputNorm {
            norm,
            scale_shift,
            silu,
        }: InputNorm<'_, B>,
        parts: &[Source<'_, B>],
        [n, hw]: [usize; 2],
        y: &mut B::Tensor,
    ) -> Result<()> {
        match parts {
            [x] => match x.moments {
                Some(m) => be.group_norm_from(norm, (x.data, m), n, hw, y, scale_shift, silu),
                None => be.group_norm(norm, x.data, n, hw, y, scale_shift, silu),
            },
            [a, b] => {
                let (ab, sizes) = ([a.data, b.data], [n, hw, a.c, b.c]);
                match (a.moments, b.moments) {
                    (Some(ma), Some(mb)) => {
                        be.concat_group_norm_from(norm, ab, [ma, mb], sizes, y, scale_shift, silu)
                    }
                    _ => be.concat_group_norm(norm, ab, sizes, y, scale_shift, silu),
                }
            }
            _ => Err(crate::Error::Input(format!(
                "a conv reads one tensor or the concatenation of two, not {}",
                parts.len()
            ))),
        }
    }

    pub fn upsample_conv<B: Backend>(
        be: &mut B,
        conv: &B::Conv,
        x: &B::Tensor,
        [n, h, w, c]: [usize; 4],
        y: &mut B::Tensor,
    ) -> Result<()> {
        let mut up = be.take(4 * n * h * w * c)?;
        let result = be
            .upsample2x(x, [n, h, w, c], &mut up)
            .and_then(|()| be.conv(conv, &up, [n, 2 * h, 2 * w], y, Residual::None));
        be.give(up);
        result
    }

    pub fn concat_conv<B: Backend>(
        be: &mut B,
        conv: &B::Conv,
        [a, b]: [&B::Tensor; 2],
        [n, h, w, ca, cb]: [usize; 5],
        y: &mut B::Tensor,
        residual: Residual<'_, B::Tensor>,
    ) -> Result<()> {
        let mut cat = be.take(n * h * w * (ca + cb))?;
        let result = be
            .concat_channels(a, b, [n, h * w, ca, cb], &mut cat)
            .and_then(|()| be.conv(conv, &cat, [n, h, w], y, residual));
        be.give(cat);
        result
    }

    #[allow(clippy::too_many_arguments)]
    pub fn concat_group_norm<B: Backend>(
        be: &mut B,
        norm: &B::GroupNorm,
        [a, b]: [&B::Tensor; 2],
        [n, hw, ca, cb]: [usize; 4],
        y: &mut B::Tensor,
        scale_shift: Option<&B::Vector>,
        silu: bool,
    ) -> Result<()> {
        let mut cat = be.take(n * hw * (ca + cb))?;
        let result = be
            .concat_channels(a, b, [n, hw, ca, cb], &mut cat)
            .and_then(|()| be.group_norm(norm, &cat, n, hw, y, scale_shift, silu));
        be.give(cat);
        result
    }

    /// [`Backend::conv_moments`] without the moments: `conv`, or `upsample_conv`.
    pub fn conv_without_moments<B: Backend>(
        be: &mut B,
        conv: &B::Conv,
        x: &B::Tensor,
        [n, h, w, c]: [usize; 4],
        upsampled: bool,
        y: &mut B::Tensor,
        residual: Residual<'_, B::Tensor>,
    ) -> Result<Option<super::Moments<B::Vector>>> {
        match (upsampled, residual) {
            (false, residual) => be.conv(conv, x, [n, h, w], y, residual)?,
            (true, Residual::None) => be.upsample_conv(conv, x, [n, h, w, c], y)?,
            (true, _) => {
                return Err(crate::Error::Input(
                    "an upsampled conv takes no residual".into(),
                ))
            }
        }
        Ok(None)
    }

    pub fn group_norm_pool2x<B: Backend>(
        be: &mut B,
        norm: &B::GroupNorm,
        x: &B::Tensor,
        [n, h, w, c]: [usize; 4],
        y: &mut B::Tensor,
        silu: bool,
    ) -> Result<()> {
        let mut full = be.take(n * h * w * c)?;
        let result = be
            .group_norm(norm, x, n, h * w, &mut full, None, silu)
            .and_then(|()| be.avg_pool2x(&full, [n, h, w, c], y));
        be.give(full);
        result
    }

    /// `conv` with `y = conv(x) + bias + upsample2x(r)` (r `[n, ho/2, wo/2, cout]`) or, when
    /// `pooled`, `+ avg_pool2x(r)` (r `[n, 2ho, 2wo, cout]`), the resampled residual made
    /// first (y `[n, ho, wo, cout]`).
    #[allow(clippy::too_many_arguments)]
    pub fn conv_resampled_residual<B: Backend>(
        be: &mut B,
        conv: &B::Conv,
        x: &B::Tensor,
        nhw: [usize; 3],
        y: &mut B::Tensor,
        (r, pooled): (&B::Tensor, bool),
        [ho, wo, cout]: [usize; 3],
    ) -> Result<()> {
        let n = nhw[0];
        let mut resampled = be.take(n * ho * wo * cout)?;
        let made = if pooled {
            be.avg_pool2x(r, [n, 2 * ho, 2 * wo, cout], &mut resampled)
        } else {
            be.upsample2x(r, [n, ho / 2, wo / 2, cout], &mut resampled)
        };
        let result = made.and_then(|()| be.conv(conv, x, nhw, y, Residual::Buffer(&resampled)));
        be.give(resampled);
        result
    }
}
