//! CPU microbenchmarks of the UNet's ops (convolution, group norm + SiLU, attention) at the
//! shapes in `benches/cpu_ops.json`. `tools/bench_torch_ops.py` times PyTorch on the same
//! shapes and prints both side by side from criterion's estimates.
//!
//!     cargo bench --bench cpu_ops [-- FILTER]
//!
//! Criterion's throughput for conv and attention counts FLOP (its "elem/s" are FLOP/s), for
//! group norm bytes moved.
//!
//! GPU kernels have their own table: `mcdm bench --kernels` (times on the device, against its
//! measured peaks).

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use serde_json::Value;

use mcdm::ops::attention::attend;
use mcdm::ops::conv::Conv2d;
use mcdm::ops::group_norm::GroupNorm;

fn shapes(op: &str) -> Vec<Value> {
    let text = include_str!("cpu_ops.json");
    let all: Value = serde_json::from_str(text).expect("benches/cpu_ops.json is valid JSON");
    all[op].as_array().cloned().unwrap_or_default()
}

fn dim(shape: &Value, key: &str) -> usize {
    shape[key]
        .as_u64()
        .unwrap_or_else(|| panic!("benches/cpu_ops.json: {shape} has no integer `{key}`"))
        as usize
}

/// Deterministic values in [-1, 1), not zeros (zeros would let a GEMM skip work).
fn fill(len: usize) -> Vec<f32> {
    (0..len)
        .map(|i| ((i * 7919) % 2003) as f32 / 1001.5 - 1.0)
        .collect()
}

fn conv(c: &mut Criterion) {
    let mut group = c.benchmark_group("conv");
    for s in shapes("conv") {
        let (n, h, w) = (dim(&s, "n"), dim(&s, "h"), dim(&s, "w"));
        let (cin, cout, k, stride) = (
            dim(&s, "cin"),
            dim(&s, "cout"),
            dim(&s, "k"),
            dim(&s, "stride"),
        );
        let conv = Conv2d::from_torch(&fill(cout * cin * k * k), fill(cout), k, stride);
        let (ho, wo) = conv.out_size(h, w);
        let x = fill(n * h * w * cin);
        let mut out = vec![0.0; n * ho * wo * cout];
        let mut scratch = Vec::new();
        group.throughput(Throughput::Elements(
            (2 * n * ho * wo * cout * cin * k * k) as u64,
        ));
        let id = format!("{k}x{k}s{stride}_n{n}_{h}x{w}_{cin}-{cout}");
        group.bench_function(BenchmarkId::from_parameter(id), |b| {
            b.iter(|| conv.forward(black_box(&x), n, h, w, &mut out, false, &mut scratch))
        });
    }
    group.finish();
}

fn group_norm_silu(c: &mut Criterion) {
    let mut group = c.benchmark_group("group_norm_silu");
    for s in shapes("group_norm_silu") {
        let (n, hw, ch) = (dim(&s, "n"), dim(&s, "h") * dim(&s, "w"), dim(&s, "c"));
        let gn = GroupNorm {
            channels: ch,
            groups: mcdm::ops::group_norm::GROUPS,
            weight: fill(ch),
            bias: fill(ch),
            eps: mcdm::ops::group_norm::EPS,
        };
        let x = fill(n * hw * ch);
        let mut out = vec![0.0; x.len()];
        // Bytes moved: the statistics pass reads x, the apply pass reads x and writes out.
        group.throughput(Throughput::Bytes((3 * x.len() * 4) as u64));
        let id = format!("n{n}_{}x{}_c{ch}", dim(&s, "h"), dim(&s, "w"));
        group.bench_function(BenchmarkId::from_parameter(id), |b| {
            b.iter(|| gn.forward(black_box(&x), n, hw, &mut out, None, true))
        });
    }
    group.finish();
}

fn attention(c: &mut Criterion) {
    let mut group = c.benchmark_group("attention");
    for s in shapes("attention") {
        let (n, t, ch, heads) = (dim(&s, "n"), dim(&s, "t"), dim(&s, "c"), dim(&s, "heads"));
        // Scores of order 1, as after a trained model's scaling: a softmax over random
        // logits of a few units.
        let qkv: Vec<f32> = fill(n * t * 3 * ch).iter().map(|v| 0.5 * v).collect();
        let mut out = vec![0.0; n * t * ch];
        group.throughput(Throughput::Elements((4 * n * t * t * ch) as u64));
        let id = format!("n{n}_t{t}_c{ch}_heads{heads}");
        group.bench_function(BenchmarkId::from_parameter(id), |b| {
            b.iter(|| attend(black_box(&qkv), n, t, ch, heads, &mut out))
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    // The largest shapes take tens of milliseconds; 20 samples keep a full run near a minute.
    config = Criterion::default().sample_size(20);
    targets = conv, group_norm_silu, attention
}
criterion_main!(benches);
