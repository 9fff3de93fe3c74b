//! The CPU backend: f32 everywhere, the multithreaded references of `crate::ops`.
//!
//! Like slice indexing, its operations panic when a buffer is shorter than the sizes given say;
//! the networks and the sampler size every buffer they pass.

use std::convert::Infallible;

use rayon::prelude::*;

use super::{Backend, Buffer, Cond, Pass, PassSizes, Residual};
use crate::diffusion::StepParams;
use crate::error::{Error, Result};
use crate::memory::{best_fit, check_host_memory};
use crate::ops::attention::attend;
use crate::ops::conv::Conv2d;
use crate::ops::embedding::{timestep_embedding, TimeFeatures};
use crate::ops::group_norm::GroupNorm;
use crate::ops::layer_norm::{gelu_in_place, LayerNorm};
use crate::ops::layout::{nchw_to_nhwc, nhwc_to_nchw, pack_input, unpack_output};
use crate::ops::linear::{add_rows, Linear};
use crate::ops::resample::{add_channel_bias, avg_pool2x, concat_channels, upsample_nearest2x};
use crate::ops::silu;
use crate::ops::step::diffusion_step;
use crate::rng::fill_normals;

impl<T> Buffer for Vec<T> {
    fn len(&self) -> usize {
        Vec::len(self)
    }
}

/// Images per forward group: activations of about 1M floats for the widest tensor stay in
/// cache, so a large batch runs in groups of images.
const GROUP_FLOATS: usize = 1 << 20;

/// The CPU backend, with its pool of f32 buffers recycled across layers and calls.
#[derive(Default)]
pub struct Cpu {
    free: Vec<Vec<f32>>,
    /// Convolution scratch (im2col rows, Winograd tiles).
    scratch: Vec<f32>,
    allocations: usize,
    /// The largest forward pass (in floats) already checked against the available memory.
    memory_checked: usize,
}

impl Cpu {
    pub fn new() -> Self {
        Self::default()
    }

    /// Bytes the pool holds (free buffers and scratch).
    pub fn pool_bytes(&self) -> usize {
        (self.free.iter().map(Vec::capacity).sum::<usize>() + self.scratch.capacity()) * 4
    }

    /// Floats of convolution scratch held.
    pub fn scratch_floats(&self) -> usize {
        self.scratch.capacity()
    }

    fn take_buffer(&mut self, len: usize) -> Vec<f32> {
        let mut buf = match best_fit(self.free.iter().map(Vec::capacity), len) {
            Some(i) => self.free.swap_remove(i),
            None => {
                self.allocations += 1;
                Vec::with_capacity(len)
            }
        };
        buf.resize(len, 0.0);
        buf
    }
}

impl Backend for Cpu {
    type Tensor = Vec<f32>;
    type Vector = Vec<f32>;
    type Labels = Vec<i64>;
    type Conv = Conv2d;
    type GroupNorm = GroupNorm;
    type Linear = Linear;
    type LayerNorm = LayerNorm;
    type Graph = Infallible;

    fn conv_params(&self, conv: &Conv2d) -> Result<Conv2d> {
        Ok(conv.clone())
    }
    fn group_norm_params(&self, norm: &GroupNorm) -> Result<GroupNorm> {
        Ok(norm.clone())
    }
    fn linear_params(&self, linear: &Linear) -> Result<Linear> {
        Ok(linear.clone())
    }
    fn layer_norm_params(&self, norm: &LayerNorm) -> Result<LayerNorm> {
        Ok(norm.clone())
    }

    fn take(&mut self, len: usize) -> Result<Vec<f32>> {
        Ok(self.take_buffer(len))
    }
    fn give(&mut self, tensor: Vec<f32>) {
        self.free.push(tensor);
    }
    fn take_vector(&mut self, len: usize) -> Result<Vec<f32>> {
        Ok(self.take_buffer(len))
    }
    fn give_vector(&mut self, vector: Vec<f32>) {
        self.free.push(vector);
    }
    fn allocations(&self) -> usize {
        self.allocations
    }
    fn release_buffers(&mut self) {
        self.free = Vec::new();
        self.scratch = Vec::new();
    }

    fn upload(&mut self, host: &[f32]) -> Result<Vec<f32>> {
        Ok(host.to_vec())
    }
    fn upload_labels(&mut self, host: &[i64]) -> Result<Vec<i64>> {
        Ok(host.to_vec())
    }
    fn upload_tensor(&mut self, host: &[f32]) -> Result<Vec<f32>> {
        Ok(host.to_vec())
    }
    fn download(&mut self, vector: &Vec<f32>) -> Result<Vec<f32>> {
        Ok(vector.clone())
    }
    fn download_tensor(&mut self, tensor: &Vec<f32>) -> Result<Vec<f32>> {
        Ok(tensor.clone())
    }
    fn copy(&mut self, src: &Vec<f32>, offset: usize, dst: &mut Vec<f32>) -> Result<()> {
        let n = dst.len();
        let from = offset
            .checked_add(n)
            .and_then(|end| src.get(offset..end))
            .ok_or_else(|| {
                Error::Input(format!(
                    "copying {n} elements from element {offset} of a buffer of {}",
                    src.len()
                ))
            })?;
        dst.copy_from_slice(from);
        Ok(())
    }

    fn conv(
        &mut self,
        conv: &Conv2d,
        x: &Vec<f32>,
        [n, h, w]: [usize; 3],
        y: &mut Vec<f32>,
        residual: Residual<'_, Vec<f32>>,
    ) -> Result<()> {
        let accumulate = match residual {
            Residual::None => false,
            Residual::Output => true,
            Residual::Buffer(r) => {
                let (ho, wo) = conv.out_size(h, w);
                let len = n * ho * wo * conv.cout;
                y[..len].copy_from_slice(&r[..len]);
                true
            }
            Residual::Upsampled(r) => {
                let (ho, wo) = conv.out_size(h, w);
                if !ho.is_multiple_of(2) || !wo.is_multiple_of(2) {
                    return Err(Error::Input(format!(
                        "an upsampled residual for an output of odd size {ho}x{wo}"
                    )));
                }
                upsample_nearest2x(r, n, ho / 2, wo / 2, conv.cout, y);
                true
            }
            Residual::Pooled(r) => {
                let (ho, wo) = conv.out_size(h, w);
                avg_pool2x(r, n, 2 * ho, 2 * wo, conv.cout, y);
                true
            }
        };
        conv.forward(x, n, h, w, y, accumulate, &mut self.scratch);
        Ok(())
    }
    fn group_norm(
        &mut self,
        norm: &GroupNorm,
        x: &Vec<f32>,
        n: usize,
        hw: usize,
        y: &mut Vec<f32>,
        scale_shift: Option<&Vec<f32>>,
        silu: bool,
    ) -> Result<()> {
        norm.forward(x, n, hw, y, scale_shift.map(Vec::as_slice), silu);
        Ok(())
    }
    fn attend(
        &mut self,
        qkv: &Vec<f32>,
        [n, t, c, heads]: [usize; 4],
        out: &mut Vec<f32>,
    ) -> Result<()> {
        attend(qkv, n, t, c, heads, out);
        Ok(())
    }
    fn upsample2x(
        &mut self,
        x: &Vec<f32>,
        [n, h, w, c]: [usize; 4],
        y: &mut Vec<f32>,
    ) -> Result<()> {
        upsample_nearest2x(x, n, h, w, c, y);
        Ok(())
    }
    fn avg_pool2x(
        &mut self,
        x: &Vec<f32>,
        [n, h, w, c]: [usize; 4],
        y: &mut Vec<f32>,
    ) -> Result<()> {
        avg_pool2x(x, n, h, w, c, y);
        Ok(())
    }
    fn concat_channels(
        &mut self,
        a: &Vec<f32>,
        b: &Vec<f32>,
        [n, hw, ca, cb]: [usize; 4],
        y: &mut Vec<f32>,
    ) -> Result<()> {
        concat_channels(a, b, n, hw, ca, cb, y);
        Ok(())
    }
    fn add_channel_bias(
        &mut self,
        x: &mut Vec<f32>,
        bias: &Vec<f32>,
        n: usize,
        hw: usize,
        c: usize,
    ) -> Result<()> {
        add_channel_bias(x, bias, n, hw, c);
        Ok(())
    }

    fn timestep_embedding(
        &mut self,
        t: &Vec<f32>,
        n: usize,
        dim: usize,
        features: TimeFeatures,
        out: &mut Vec<f32>,
    ) -> Result<()> {
        timestep_embedding(&t[..n], dim, features, &mut out[..n * dim]);
        Ok(())
    }
    fn linear(
        &mut self,
        linear: &Linear,
        x: &Vec<f32>,
        n: usize,
        y: &mut Vec<f32>,
        silu_in: bool,
    ) -> Result<()> {
        linear.forward(x, n, y, silu_in);
        Ok(())
    }
    fn add_rows(
        &mut self,
        y: &mut Vec<f32>,
        table: &Vec<f32>,
        labels: &Vec<i64>,
        n: usize,
        dim: usize,
    ) -> Result<()> {
        add_rows(y, table, labels, n, dim);
        Ok(())
    }
    fn add(&mut self, y: &mut Vec<f32>, x: &Vec<f32>) -> Result<()> {
        y.iter_mut().zip(x).for_each(|(a, b)| *a += b);
        Ok(())
    }
    fn silu(&mut self, x: &mut Vec<f32>, len: usize) -> Result<()> {
        x[..len].iter_mut().for_each(|v| *v = silu(*v));
        Ok(())
    }

    fn layer_norm(&mut self, norm: &LayerNorm, x: &mut Vec<f32>, rows: usize) -> Result<()> {
        norm.forward(&mut x[..rows * norm.weight.len()]);
        Ok(())
    }
    fn gelu(&mut self, x: &mut Vec<f32>, len: usize) -> Result<()> {
        x[..len].par_chunks_mut(4096).for_each(gelu_in_place);
        Ok(())
    }

    fn nchw_to_nhwc(
        &mut self,
        x: &Vec<f32>,
        [n, c, hw]: [usize; 3],
        y: &mut Vec<f32>,
    ) -> Result<()> {
        nchw_to_nhwc(x, n, c, hw, y);
        Ok(())
    }
    fn nhwc_to_nchw(
        &mut self,
        x: &Vec<f32>,
        [n, hw, c]: [usize; 3],
        y: &mut Vec<f32>,
    ) -> Result<()> {
        nhwc_to_nchw(x, n, c, hw, y);
        Ok(())
    }

    fn pack_input(
        &mut self,
        x: &Vec<f32>,
        cond: Option<(&Vec<f32>, usize)>,
        first_image: usize,
        [b, hw, cc]: [usize; 3],
        y: &mut Vec<f32>,
        y_offset: usize,
    ) -> Result<()> {
        let cond = cond.map(|(c, count)| (c.as_slice(), count));
        pack_input(x, cond, first_image, b, hw, cc, y, y_offset);
        Ok(())
    }
    fn unpack_output(
        &mut self,
        y: &Vec<f32>,
        offset: usize,
        oc: usize,
        eps: &mut Vec<f32>,
        eps_offset: usize,
        var: Option<&mut Vec<f32>>,
        [b, hw]: [usize; 2],
    ) -> Result<()> {
        unpack_output(
            y,
            offset,
            oc,
            eps,
            eps_offset,
            var.map(Vec::as_mut_slice),
            b,
            hw,
        );
        Ok(())
    }
    fn fill_normals(
        &mut self,
        out: &mut Vec<f32>,
        [b, len]: [usize; 2],
        first_image: usize,
        seed: u64,
        step: u32,
    ) -> Result<()> {
        crate::rng::check_image_keys(first_image, b)?;
        for (k, img) in out[..b * len].chunks_exact_mut(len.max(1)).enumerate() {
            fill_normals(seed, (first_image + k) as u32, step, img);
        }
        Ok(())
    }
    fn diffusion_step(
        &mut self,
        x: &mut Vec<f32>,
        eps: &Vec<f32>,
        weights: &Vec<f32>,
        terms: usize,
        var: Option<&Vec<f32>>,
        [b, len]: [usize; 2],
        first_image: usize,
        params: StepParams,
        history: Option<&mut Vec<f32>>,
    ) -> Result<()> {
        crate::rng::check_image_keys(first_image, b)?;
        let var = var.map(Vec::as_slice);
        let history = match (history, params.mode) {
            (Some(h), 2) if h.len() == 3 * b * len => Some(h.as_mut_slice()),
            (None, m) if m != 2 => None,
            (h, _) => {
                return Err(Error::Input(format!(
                    "a multistep solver step needs a history of {} values, and only it; got {:?}",
                    3 * b * len,
                    h.map(|h| h.len())
                )))
            }
        };
        diffusion_step(
            x,
            eps,
            weights,
            terms,
            var,
            b,
            len,
            first_image,
            params,
            history,
        );
        Ok(())
    }

    fn in_groups(
        &mut self,
        x: &Vec<f32>,
        sizes: PassSizes,
        cond: Cond<'_, Self>,
        pass: &mut Pass<'_, Self>,
    ) -> Result<Vec<f32>> {
        let n = sizes.n;
        let group = (GROUP_FLOATS / sizes.widest.max(1)).clamp(1, n.max(1));
        let floats = group
            .saturating_mul(sizes.working)
            .saturating_add(n.saturating_mul(sizes.input + sizes.output));
        // Once per size the pool has not yet served, not on every pass of a sampling run.
        if floats > self.memory_checked {
            let [h, w] = sizes.image;
            check_host_memory(
                floats.saturating_mul(std::mem::size_of::<f32>()),
                &format!("a forward pass of {n} image(s) of {h}x{w}"),
            )?;
            self.memory_checked = floats;
        }
        if group >= n {
            return pass(self, x, n, cond);
        }
        let mut out = self.take_buffer(n * sizes.output);
        let d = cond.embedding.map_or(0, |e| e.len() / n);
        for first in (0..n).step_by(group) {
            let g = group.min(n - first);
            let mut part_x = self.take_buffer(g * sizes.input);
            part_x.copy_from_slice(&x[first * sizes.input..][..g * sizes.input]);
            let timesteps = cond.timesteps[first..first + g].to_vec();
            let labels = cond.labels.map(|y| y[first..first + g].to_vec());
            let embedding = cond
                .embedding
                .map(|e| e[first * d..(first + g) * d].to_vec());
            let part_cond = Cond {
                timesteps: &timesteps,
                labels: labels.as_ref(),
                embedding: embedding.as_ref(),
            };
            let part = pass(self, &part_x, g, part_cond);
            self.give(part_x);
            let part = part?;
            out[first * sizes.output..][..g * sizes.output].copy_from_slice(&part);
            self.give(part);
        }
        Ok(out)
    }
    fn check_memory(&self, bytes: usize, what: &str) -> Result<()> {
        check_host_memory(bytes, what)
    }

    fn capture(&mut self, _: &mut dyn FnMut(&mut Self) -> Result<()>) -> Result<Infallible> {
        Err(Error::Input("the CPU backend records no graphs".into()))
    }
    unsafe fn replay(&mut self, graph: &Infallible) -> Result<()> {
        match *graph {}
    }
}
