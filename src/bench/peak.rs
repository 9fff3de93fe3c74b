//! The device's own peaks (`kernels/peak.cu`): tensor-core throughput of `mma.sync` m16n8k16
//! (what the f16/bf16 conv and attention kernels issue), f32 FMA throughput (the f32 kernels)
//! and DRAM bandwidth (a streaming copy). `mcdm bench --kernels` states every kernel's rate as a
//! share of these.
//!
//! The CPU references give each thread's exact output: the operands are chosen so that every
//! sum is exact in f32 whatever order the hardware adds in, so comparing the output proves that
//! all the timed work was done.

use cudarc::driver::LaunchConfig;

use crate::cuda::interface::{CopyArgs, PeakArgs, PEAK_BLOCK, PEAK_CHAINS};
use crate::cuda::{Gpu, GpuBuffer, GpuFloat};
use crate::error::{Error, Result};
use crate::ops::{check_len, elements};

/// Independent accumulator chains per warp (MMA) or per thread (FMA).
pub const CHAINS: usize = PEAK_CHAINS;
/// Threads per block.
pub const BLOCK: usize = PEAK_BLOCK;
/// Blocks per SM for the peak launches: 4 x 256 threads, one wave on every architecture (the
/// kernels take 43 registers, so 5 blocks are resident at most; sm_86/89 hold 1536 threads), and
/// 32 warps of independent chains or loads, enough to keep an SM's tensor cores, FMA pipes or
/// memory requests busy.
pub const BLOCKS_PER_SM: usize = 4;
/// The most rounds [`compute_peak_gpu`] runs: up to 2^18 every sum in its output stays an
/// integer below 2^24 (MMA: 4 (28 + 8 rounds)), exact in f32 whatever the order of the adds.
pub const MAX_EXACT_ROUNDS: usize = 1 << 18;

/// Every A element is `MMA_A` and every B element `MMA_B` (both exact in f16 and bf16), so an
/// `mma` adds 16 * a * b = 1 to every accumulator.
const MMA_A: f32 = 0.25;
const MMA_B: f32 = 0.25;
/// `x = fma(x, FMA_B, FMA_C)`: every round adds 1 to every chain.
const FMA_B: f32 = 1.0;
const FMA_C: f32 = 1.0;

/// The compute-peak kernel of one storage type.
pub struct ComputePeak {
    /// The kernel in `kernels/peak.cu`.
    pub kernel: &'static str,
    /// The instruction it times.
    pub instruction: &'static str,
    /// The kernel's f32 arguments after `iters`: a, b for mma; b, c for the FMA.
    operands: [f32; 2],
    /// Flops per thread per round.
    flop_per_thread_round: usize,
}

/// The compute-peak kernel for storage type `T`: FMA chains for f32, mma.sync for 16 bits.
pub fn compute_peak<T: GpuFloat>() -> Result<ComputePeak> {
    // Per warp and round: CHAINS mma of 16 x 8 x 16 multiply-adds, shared by 32 threads.
    let mma = |kernel, instruction| ComputePeak {
        kernel,
        instruction,
        operands: [MMA_A, MMA_B],
        flop_per_thread_round: CHAINS * 2 * 16 * 8 * 16 / 32,
    };
    match T::SUFFIX {
        "_f32" => Ok(ComputePeak {
            kernel: "peak_fma_f32",
            instruction: "f32 FMA",
            operands: [FMA_B, FMA_C],
            flop_per_thread_round: 2 * CHAINS,
        }),
        "_f16" => Ok(mma("peak_mma_f16", "mma.sync f16")),
        "_bf16" => Ok(mma("peak_mma_bf16", "mma.sync bf16")),
        other => Err(Error::Cuda(format!("no peak kernel for storage {other}"))),
    }
}

/// CPU reference: every thread's output of the compute-peak kernel for `T` after `iters`
/// rounds (`peak_mma_{f16,bf16}` or `peak_fma_f32`, in the kernel's order); exact up to
/// [`MAX_EXACT_ROUNDS`].
pub fn compute_reference<T: GpuFloat>(iters: usize) -> f32 {
    let mut sum = 0.0f32;
    if T::SUFFIX == "_f32" {
        for chain in 0..CHAINS {
            let mut x = chain as f32;
            for _ in 0..iters {
                x = x.mul_add(FMA_B, FMA_C);
            }
            sum += x;
        }
    } else {
        let product = T::from_f32(MMA_A).to_f32() * T::from_f32(MMA_B).to_f32();
        let round: f32 = (0..16).map(|_| product).sum();
        for chain in 0..CHAINS {
            let mut acc = chain as f32;
            for _ in 0..iters {
                acc += round;
            }
            // The thread's 4 accumulator elements of this chain are all equal.
            for _ in 0..4 {
                sum += acc;
            }
        }
    }
    sum
}

/// The peak launches' grid: [`BLOCKS_PER_SM`] blocks on every SM.
pub fn blocks_to_fill(gpu: &Gpu) -> usize {
    gpu.info().multiprocessors.max(1) * BLOCKS_PER_SM
}

/// Launches the compute-peak kernel for `T` (`peak_mma_{f16,bf16}` on the tensor cores,
/// `peak_fma_f32` for f32) on `blocks` blocks, `iters` rounds (at most [`MAX_EXACT_ROUNDS`]);
/// `out` gets one value per thread (`blocks * BLOCK`, see [`compute_reference`]). Returns the
/// flops it performs.
pub fn compute_peak_gpu<T: GpuFloat>(
    gpu: &Gpu,
    out: &mut GpuBuffer<f32>,
    blocks: usize,
    iters: usize,
) -> Result<f64> {
    if blocks == 0 || iters > MAX_EXACT_ROUNDS {
        return Err(Error::Cuda(format!(
            "peak: {blocks} blocks and {iters} rounds (at least 1 block, at most \
             {MAX_EXACT_ROUNDS} rounds)"
        )));
    }
    let threads = elements("peak output", &[blocks, BLOCK])?;
    check_len("peak output", out.len(), threads)?;
    let peak = compute_peak::<T>()?;
    let [u, v] = peak.operands;
    let args = PeakArgs {
        out: out.ptr(gpu),
        iters: iters as i32,
        u,
        v,
        ..Default::default()
    };
    gpu.launch("peak", peak.kernel, launch(blocks), &args)?;
    Ok((peak.flop_per_thread_round * threads) as f64 * iters as f64)
}

/// `copy_u4`: y = x over `x.len()` floats (a whole number of 16-byte words), on `blocks`
/// blocks. Returns the bytes moved (read and written).
pub fn copy_gpu(
    gpu: &Gpu,
    x: &GpuBuffer<f32>,
    y: &mut GpuBuffer<f32>,
    blocks: usize,
) -> Result<f64> {
    let len = x.len();
    if blocks == 0 || blocks > i32::MAX as usize {
        return Err(Error::Cuda(format!("peak copy: {blocks} blocks")));
    }
    if !len.is_multiple_of(4) {
        return Err(Error::Cuda(format!(
            "peak copy: {len} floats is not a whole number of 16-byte words"
        )));
    }
    check_len("peak copy output", y.len(), len)?;
    let words = i32::try_from(len / 4)
        .map_err(|_| Error::Cuda(format!("peak copy: {len} floats is too many")))?;
    let args = CopyArgs {
        x: x.ptr(gpu),
        y: y.ptr(gpu),
        n: words,
        ..Default::default()
    };
    gpu.launch("peak", "copy_u4", launch(blocks), &args)?;
    Ok((2 * len * std::mem::size_of::<f32>()) as f64)
}

fn launch(blocks: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (BLOCK as u32, 1, 1),
        shared_mem_bytes: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The timed work survives compilation: in the embedded compute_90 PTX every round of the
    /// compute loops issues at least its CHAINS instructions (the loops are unrolled, so more),
    /// and the copy loads 16-byte vectors.
    #[test]
    fn compiled_kernels_keep_the_timed_work() {
        let Some((_, _, ptx)) = crate::cuda::KERNEL_IMAGES
            .iter()
            .find(|(file, arch, _)| *file == "peak" && *arch == "compute_90")
        else {
            crate::skip_check("peak PTX check", "built without NVRTC");
            return;
        };
        let ptx = String::from_utf8_lossy(ptx);
        let body = |entry: &str| {
            let start = ptx.find(&format!(".entry {entry}(")).expect(entry);
            let rest = &ptx[start..];
            rest[..rest.find("\n}\n").expect("end of entry")].to_string()
        };
        for (entry, instruction) in [
            ("peak_mma_f16", "mma.sync.aligned.m16n8k16"),
            ("peak_mma_bf16", "mma.sync.aligned.m16n8k16"),
            ("peak_fma_f32", "fma.rn.f32"),
        ] {
            let count = body(entry).matches(instruction).count();
            assert!(count >= CHAINS, "{entry}: {count} x {instruction}");
        }
        assert!(
            body("copy_u4").contains("ld.global.nc.v4"),
            "copy_u4 without vector loads"
        );
    }

    /// The flops claimed are the work the output proves: each round adds `ref(1) - ref(0)` to
    /// a thread's output, in steps of one multiply-add's product (a * b for mma, c for the FMA).
    #[test]
    fn flops_are_the_multiply_adds_the_output_counts() {
        fn check<T: GpuFloat>() {
            let peak = compute_peak::<T>().unwrap();
            let per_round = compute_reference::<T>(1) - compute_reference::<T>(0);
            // mma: [a, b], each product a * b; FMA: [b, c] with b = 1, each adding c.
            let [first, second] = peak.operands;
            let step = if T::SUFFIX == "_f32" {
                second
            } else {
                first * second
            };
            assert_eq!(
                peak.flop_per_thread_round as f32,
                2.0 * per_round / step,
                "{}",
                peak.kernel
            );
        }
        check::<f32>();
        check::<half::f16>();
        check::<half::bf16>();
    }

    /// MAX_EXACT_ROUNDS is the largest power of two whose MMA sums, 4 (28 + 8 rounds), stay
    /// below 2^24.
    #[test]
    fn exact_rounds_bound_is_tight() {
        let largest_sum = |rounds: usize| 4 * (CHAINS * (CHAINS - 1) / 2 + CHAINS * rounds);
        assert!(largest_sum(MAX_EXACT_ROUNDS) < 1 << 24);
        assert!(largest_sum(2 * MAX_EXACT_ROUNDS) >= 1 << 24);
    }

    /// The references in closed form: chains 0..7 plus one per round, summed (MMA: four
    /// elements per chain), all exact in f32.
    #[test]
    fn references_count_every_round() {
        for iters in [0, 1, 5, MAX_EXACT_ROUNDS] {
            let chains = (CHAINS * (CHAINS - 1) / 2 + CHAINS * iters) as f32;
            assert_eq!(compute_reference::<f32>(iters), chains);
            assert_eq!(compute_reference::<half::f16>(iters), 4.0 * chains);
            assert_eq!(compute_reference::<half::bf16>(iters), 4.0 * chains);
        }
    }
}
