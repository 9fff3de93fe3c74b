//! Linear layers in f32 (the time-embedding MLP, the condition projections), the class
//! embedding's row gather and SiLU over a vector: `kernels/linear.cu`.

use cudarc::driver::LaunchConfig;

use cudarc::driver::CudaSlice;

use super::matmul::{matmul, Mat};
use super::{check_len, elements, silu};
use crate::cuda::interface::{self as k, LinearArgs, RowsArgs, SiluArgs};
use crate::cuda::{grid_1d, Gpu, GpuBuffer};
use crate::error::Result;

/// `y = x W^T + b` with PyTorch's weight layout `[out, in]`.
#[derive(Clone)]
pub struct Linear {
    pub in_features: usize,
    pub out_features: usize,
    pub weight: Vec<f32>,
    pub bias: Vec<f32>,
}

impl Linear {
    /// x: `[n, in]`, out: `[n, out]` = act(x) W^T + b, act = SiLU when `silu_in`.
    pub fn forward(&self, x: &[f32], n: usize, out: &mut [f32], silu_in: bool) {
        let (i, o) = (self.in_features, self.out_features);
        for row in out[..n * o].chunks_exact_mut(o) {
            row.copy_from_slice(&self.bias);
        }
        let activated: Vec<f32>;
        let x = if silu_in {
            activated = x[..n * i].iter().map(|&v| silu(v)).collect();
            &activated
        } else {
            x
        };
        matmul(
            out,
            o,
            n,
            o,
            i,
            Mat::rows(x, i),
            Mat::transposed(&self.weight, i),
            true,
            1.0,
            true,
        );
    }
}

/// y `[n, dim]` += `table[labels[i]]` for each row i; a label outside the table's rows adds
/// nothing (the class embedding).
pub fn add_rows(y: &mut [f32], table: &[f32], labels: &[i64], n: usize, dim: usize) {
    let rows = table.len() / dim.max(1);
    for (row, &label) in y[..n * dim].chunks_exact_mut(dim.max(1)).zip(labels) {
        if let Ok(l) = usize::try_from(label) {
            if l < rows {
                row.iter_mut()
                    .zip(&table[l * dim..][..dim])
                    .for_each(|(a, b)| *a += b);
            }
        }
    }
}

/// A linear layer on the device, in f32 (the reference keeps the embedding path in f32).
pub struct GpuLinear {
    // Crate-visible only: they must stay those of the uploaded parameters.
    pub(crate) in_features: usize,
    pub(crate) out_features: usize,
    weight: GpuBuffer<f32>,
    bias: GpuBuffer<f32>,
}

impl Linear {
    pub fn upload(&self, gpu: &Gpu) -> Result<GpuLinear> {
        let (i, o) = (self.in_features, self.out_features);
        if Some(self.weight.len()) != i.checked_mul(o) || self.bias.len() != o {
            return Err(crate::Error::Input(format!(
                "a linear layer from {i} to {o} features needs {i}x{o} weights and {o} biases, \
                 got {} and {}",
                self.weight.len(),
                self.bias.len()
            )));
        }
        Ok(GpuLinear {
            in_features: self.in_features,
            out_features: self.out_features,
            weight: gpu.upload(&self.weight)?,
            bias: gpu.upload(&self.bias)?,
        })
    }
}

impl GpuLinear {
    /// `kernels/linear.cu`: y `[n, out]` = act(x) W^T + b, act = SiLU when `silu_in`.
    pub fn forward(
        &self,
        gpu: &Gpu,
        x: &GpuBuffer<f32>,
        n: usize,
        y: &mut GpuBuffer<f32>,
        silu_in: bool,
    ) -> Result<()> {
        check_len(
            "linear input",
            x.len(),
            elements("linear input", &[n, self.in_features])?,
        )?;
        let out = elements("linear output", &[n, self.out_features])?;
        check_len("linear output", y.len(), out)?;
        let cfg = LaunchConfig {
            // LINEAR_OUTPUTS outputs of LINEAR_ROWS rows a block.
            grid_dim: (
                self.out_features.div_ceil(k::LINEAR_OUTPUTS) as u32,
                n.div_ceil(k::LINEAR_ROWS) as u32,
                1,
            ),
            block_dim: (k::LINEAR_THREADS as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let i = |v: usize| v as i32;
        let args = LinearArgs {
            x: x.ptr(gpu),
            weight: self.weight.ptr(gpu),
            bias: self.bias.ptr(gpu),
            y: y.ptr(gpu),
            n: i(n),
            in_features: i(self.in_features),
            out_features: i(self.out_features),
            silu_in: silu_in as i32,
        };
        gpu.launch("linear", "linear_f32", cfg, &args)
    }
}

/// `kernels/linear.cu`: the device counterpart of [`add_rows`].
pub fn add_rows_gpu(
    gpu: &Gpu,
    y: &mut GpuBuffer<f32>,
    table: &GpuBuffer<f32>,
    labels: &CudaSlice<i64>,
    n: usize,
    dim: usize,
) -> Result<()> {
    check_len(
        "class embedding",
        y.len(),
        elements("class embedding", &[n, dim])?,
    )?;
    check_len("labels", labels.len(), n)?;
    let (lp, _sync) = cudarc::driver::DevicePtr::device_ptr(labels, gpu.stream());
    let cfg = LaunchConfig {
        grid_dim: (n as u32, 1, 1),
        block_dim: (k::EMBEDDING_THREADS as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    let args = RowsArgs {
        y: y.ptr(gpu),
        table: table.ptr(gpu),
        labels: lp,
        n: n as i32,
        dim: dim as i32,
        // The table's rows: the kernel skips labels past them.
        rows: (table.len() / dim.max(1)) as i32,
        ..Default::default()
    };
    gpu.launch("linear", "add_rows_f32", cfg, &args)
}

/// `kernels/linear.cu`: SiLU of the first `len` elements of `x`, in place.
pub fn silu_gpu(gpu: &Gpu, x: &mut GpuBuffer<f32>, len: usize) -> Result<()> {
    check_len("silu", x.len(), len)?;
    let args = SiluArgs {
        x: x.ptr(gpu),
        len: elements("silu", &[len])? as i32,
        ..Default::default()
    };
    let cfg = grid_1d(len, k::EMBEDDING_THREADS);
    gpu.launch("linear", "silu_f32", cfg, &args)
}
