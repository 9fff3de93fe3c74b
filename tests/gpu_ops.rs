//! Every CUDA kernel against its CPU reference over many shapes (odd sizes, batch 1), and the
//! whole forward pass against the CPU one, for f32, f16 and bf16 storage. Without a GPU each
//! test says so and passes: CI has none; `scripts/device-check.sh` runs these on one.

mod common;

use common::gpu::{for_each_dtype, gpu, gpu_err, rounded, tolerance, values};

use std::sync::Arc;

use common::{rel_l2, unet_case_names, UnetCase};
use mcdm::backend::{Cpu, Cuda};
use mcdm::cuda::{Gpu, GpuBuffer, GpuFloat};
use mcdm::ops::attention::{attend, attend_gpu};
use mcdm::ops::conv::{Conv2d, ConvInput, ConvKernel, Residual};
use mcdm::ops::group_norm::{GpuMoments, GroupNorm};
use mcdm::ops::layout::{
    nchw_to_nhwc, nchw_to_nhwc_gpu, pack_input, pack_input_gpu, unpack_output, unpack_output_gpu,
};
use mcdm::ops::linear::Linear;
use mcdm::ops::resample::{
    add_channel_bias_gpu, avg_pool2x, avg_pool2x_gpu, concat_channels, concat_channels_gpu,
    upsample_nearest2x, upsample_nearest2x_gpu,
};

/// Every conv case through every kernel variant that can run it (each forced explicitly), with
/// the three residual modes in turn; outputs start as NaN (or as the residual they add to).
fn conv_cases<T: GpuFloat>(g: &Gpu) -> Vec<(String, f64, f64)> {
    let shapes = [
        // (n, h, w, cin, cout, k, stride)
        (1, 5, 7, 3, 32, 3, 1),
        (2, 16, 16, 32, 64, 3, 1),
        (1, 9, 9, 64, 96, 3, 2),
        (3, 8, 8, 64, 64, 3, 2),
        (2, 12, 10, 96, 32, 1, 1),
        (1, 32, 32, 4, 64, 3, 1),
        (2, 7, 5, 40, 24, 3, 1),
        (1, 64, 64, 64, 64, 3, 1),
        // The large tiles' edges: M not a multiple of 128, cout 8 / 72 / 200 / 136 / 192
        // (column tiles partly outside), cin 8 and 264 (K 72 and 2376), stride 2, 1x1, batch 1.
        (1, 5, 7, 8, 8, 3, 1),
        (2, 9, 11, 16, 72, 3, 1),
        (1, 12, 13, 32, 200, 3, 1),
        (1, 7, 9, 264, 24, 3, 1),
        (2, 9, 10, 48, 136, 3, 2),
        (3, 6, 7, 40, 64, 1, 1),
        (2, 16, 9, 24, 192, 3, 1),
        (1, 40, 40, 64, 128, 3, 1),
        (4, 11, 13, 264, 200, 3, 1),
    ];
    let mut out = Vec::new();
    for (i, &(n, h, w, cin, cout, k, stride)) in shapes.iter().enumerate() {
        let weight = values(cout * cin * k * k, 1 + i as u32)
            .iter()
            .map(|v| v / (cin * k * k) as f32)
            .collect::<Vec<_>>();
        let conv = Conv2d::from_torch(
            &rounded::<T>(&weight),
            values(cout, 50 + i as u32),
            k,
            stride,
        );
        let x = rounded::<T>(&values(n * h * w * cin, 100 + i as u32));
        let (ho, wo) = conv.out_size(h, w);
        let residual = rounded::<T>(&values(n * ho * wo * cout, 200 + i as u32));
        // 0: a separate residual buffer, 1: the residual is y itself (aliased), 2: none.
        let mode = i % 3;
        let mut want = if mode == 2 {
            vec![0.0; residual.len()]
        } else {
            residual.clone()
        };
        conv.forward(&x, n, h, w, &mut want, mode != 2, &mut Vec::new());
        let dev = conv.upload::<T>(g).unwrap();
        let xd = g.upload::<T>(&x).unwrap();
        let rd = g.upload::<T>(&residual).unwrap();
        let kernels: Vec<ConvKernel> = ConvKernel::ALL
            .into_iter()
            .filter(|&kern| dev.supports(g, kern, &xd))
            .collect();
        let large = T::SUFFIX != "_f32" && cin.is_multiple_of(8) && cout.is_multiple_of(8);
        assert_eq!(
            kernels.len(),
            if large { ConvKernel::ALL.len() } else { 1 },
            "conv case {i}"
        );
        for kern in kernels {
            let init = if mode == 1 {
                residual.clone()
            } else {
                vec![f32::NAN; residual.len()]
            };
            let mut yd = g.upload::<T>(&init).unwrap();
            let res = match mode {
                0 => Residual::Buffer(&rd),
                1 => Residual::Output,
                _ => Residual::None,
            };
            dev.forward_with(g, kern, &xd, n, h, w, &mut yd, res)
                .unwrap();
            let got = g.download(&yd).unwrap();
            let name = format!(
                "conv {} n{n} {h}x{w} {cin}->{cout} k{k} s{stride} residual {}",
                kern.name(),
                ["buffer", "aliased", "none"][mode]
            );
            // f32 measured at most 4.9e-8 (2026-12-06).
            out.push((name, gpu_err(&got, &want), tolerance::<T>(5e-7)));
        }
    }
    out
}

#[test]
fn conv_matches_cpu() {
    for_each_dtype("conv", |g, name| match name {
        "f32" => conv_cases::<f32>(g),
        "f16" => conv_cases::<half::f16>(g),
        _ => conv_cases::<half::bf16>(g),
    });
}

/// A conv whose epilogue makes its output channels' moments (`GpuConv2d::forward_moments`),
/// from which `GpuGroupNorm::forward_from_moments` takes a norm's statistics, through every
/// kernel that can make them: the conv against the CPU conv, the norm against the CPU norm of
/// the GPU's conv output (so the moments alone decide it); then a norm over the concatenation
/// of two such outputs (the decoder's skip), a group across the two.
fn conv_moments_cases<T: GpuFloat>(g: &Gpu) -> Vec<(String, f64, f64)> {
    let mut out = Vec::new();
    let make_conv = |cin: usize, cout: usize, k: usize, salt: u32| {
        let weight: Vec<f32> = values(cout * cin * k * k, salt)
            .iter()
            .map(|v| v / (cin * k * k) as f32)
            .collect();
        Conv2d::from_torch(&rounded::<T>(&weight), values(cout, salt + 1), k, 1)
    };
    let make_norm = |c: usize, groups: usize, salt: u32| GroupNorm {
        channels: c,
        groups,
        weight: values(c, salt).iter().map(|v| 1.0 + 0.2 * v).collect(),
        bias: values(c, salt + 1),
        eps: mcdm::ops::group_norm::EPS,
    };
    // (n, h, w, cin, cout, k, groups, upsampled input, residual): 16x16 images take every row
    // tile (64, 128, 256 pixels), 8x8 ones the 64-row tiles only; cout 72 leaves the last
    // column tile partly outside.
    let shapes = [
        (2, 16, 16, 32, 64, 3, 32, false, false),
        (1, 32, 32, 64, 128, 3, 32, false, true),
        (3, 8, 8, 64, 128, 1, 8, false, false),
        (1, 16, 16, 48, 72, 3, 4, false, true),
        (2, 16, 16, 32, 64, 3, 32, true, false),
    ];
    for (i, &(n, h, w, cin, cout, k, groups, up, with_residual)) in shapes.iter().enumerate() {
        let salt = 300 + 10 * i as u32;
        let conv = make_conv(cin, cout, k, salt);
        let gn = make_norm(cout, groups, salt + 2);
        let (sh, sw) = if up { (h / 2, w / 2) } else { (h, w) };
        let x = rounded::<T>(&values(n * sh * sw * cin, salt + 4));
        let residual = rounded::<T>(&values(n * h * w * cout, salt + 5));
        let ss = values(n * 2 * cout, salt + 6);
        let mut x_full = vec![0.0; n * h * w * cin];
        if up {
            mcdm::ops::resample::upsample_nearest2x(&x, n, sh, sw, cin, &mut x_full);
        } else {
            x_full.clone_from(&x);
        }
        let mut want = if with_residual {
            residual.clone()
        } else {
            vec![0.0; residual.len()]
        };
        conv.forward(&x_full, n, h, w, &mut want, with_residual, &mut Vec::new());
        let dev = conv.upload::<T>(g).unwrap();
        let norm = gn.upload(g).unwrap();
        let xd = g.upload::<T>(&x).unwrap();
        let rd = g.upload::<T>(&residual).unwrap();
        let ssd = g.upload::<f32>(&ss).unwrap();
        let input = ConvInput {
            x: &xd,
            second: None,
            upsampled: up,
            norm: None,
        };
        let mut ran = 0;
        for kern in ConvKernel::ALL {
            let Some(chunks) = dev.moment_chunks(kern, h, w) else {
                continue;
            };
            if !dev.supports(g, kern, input) {
                continue;
            }
            ran += 1;
            let mut yd = g.upload::<T>(&vec![f32::NAN; want.len()]).unwrap();
            let mut part = g
                .upload::<f32>(&vec![f32::NAN; n * chunks * cout * 3])
                .unwrap();
            let res = if with_residual {
                Residual::Buffer(&rd)
            } else {
                Residual::None
            };
            dev.forward_moments(g, kern, input, [n, h, w], &mut yd, res, &mut part)
                .unwrap();
            let mut normed = g.upload::<T>(&vec![f32::NAN; want.len()]).unwrap();
            let mut stats = g.upload::<f32>(&vec![f32::NAN; n * groups * 2]).unwrap();
            let moments = GpuMoments {
                part: &part,
                chunks,
            };
            norm.forward_from_moments(
                g,
                (&yd, moments),
                None,
                [n, h * w],
                &mut normed,
                &mut stats,
                Some(&ssd),
                true,
            )
            .unwrap();
            let y = g.download(&yd).unwrap();
            let mut normed_want = vec![0.0; y.len()];
            gn.forward(&y, n, h * w, &mut normed_want, Some(&ss), true);
            let name = format!(
                "conv + moments {} n{n} {h}x{w} {cin}->{cout} k{k} groups {groups} up {up} residual {with_residual}",
                kern.name()
            );
            out.push((
                format!("{name}: conv"),
                gpu_err(&y, &want),
                tolerance::<T>(5e-7),
            ));
            let got = g.download(&normed).unwrap();
            // f32 measured at most 5.9e-7.
            out.push((
                format!("{name}: norm"),
                gpu_err(&got, &normed_want),
                tolerance::<T>(1e-6),
            ));
            // A downsampling ResBlock's norm, pooled 2x2 as it is applied (no scale-shift).
            let mut pooled = g.upload::<T>(&vec![f32::NAN; want.len() / 4]).unwrap();
            norm.forward_pool_from_moments(
                g,
                (&yd, moments),
                [n, h, w],
                &mut pooled,
                &mut stats,
                true,
            )
            .unwrap();
            gn.forward(&y, n, h * w, &mut normed_want, None, true);
            let mut pooled_want = vec![0.0; y.len() / 4];
            mcdm::ops::resample::avg_pool2x(&normed_want, n, h, w, cout, &mut pooled_want);
            let got = g.download(&pooled).unwrap();
            out.push((
                format!("{name}: norm + pool"),
                gpu_err(&got, &pooled_want),
                tolerance::<T>(1e-6),
            ));
        }
        assert!(ran > 0, "conv moments case {i}: no kernel makes them");
    }
    // The norm of cat([a, b]), a and b two convs' outputs with their moments from different
    // kernels: 40 + 56 channels in 32 groups of 3 (group 13 across the two).
    let (n, h, w, cin, ca, cb, groups) = (2, 16, 16, 32, 40, 56, 32);
    let gn = make_norm(ca + cb, groups, 400);
    let norm = gn.upload(g).unwrap();
    let x = g
        .upload::<T>(&rounded::<T>(&values(n * h * w * cin, 402)))
        .unwrap();
    let kernels = [ConvKernel::Tile64, ConvKernel::Tile128];
    let mut ys = Vec::new();
    let mut moments = Vec::new();
    for (j, (cout, kern)) in [ca, cb].into_iter().zip(kernels).enumerate() {
        let dev = make_conv(cin, cout, 3, 410 + j as u32)
            .upload::<T>(g)
            .unwrap();
        // f32 has the 64x64 tiles only.
        let kern = if dev.supports(g, kern, &x) {
            kern
        } else {
            ConvKernel::Tile64
        };
        let chunks = dev.moment_chunks(kern, h, w).unwrap();
        let mut yd = g.upload::<T>(&vec![f32::NAN; n * h * w * cout]).unwrap();
        let mut part = g
            .upload::<f32>(&vec![f32::NAN; n * chunks * cout * 3])
            .unwrap();
        dev.forward_moments(g, kern, &x, [n, h, w], &mut yd, Residual::None, &mut part)
            .unwrap();
        ys.push(yd);
        moments.push((part, chunks));
    }
    let mut normed = g
        .upload::<T>(&vec![f32::NAN; n * h * w * (ca + cb)])
        .unwrap();
    let mut stats = g.upload::<f32>(&vec![f32::NAN; n * groups * 2]).unwrap();
    let m = |k: usize| GpuMoments {
        part: &moments[k].0,
        chunks: moments[k].1,
    };
    let second = Some((&ys[1], ca, m(1)));
    norm.forward_from_moments(
        g,
        (&ys[0], m(0)),
        second,
        [n, h * w],
        &mut normed,
        &mut stats,
        None,
        true,
    )
    .unwrap();
    let (a, b) = (g.download(&ys[0]).unwrap(), g.download(&ys[1]).unwrap());
    let mut cat = vec![0.0; normed.len()];
    concat_channels(&a, &b, n, h * w, ca, cb, &mut cat);
    let mut want = vec![0.0; cat.len()];
    gn.forward(&cat, n, h * w, &mut want, None, true);
    out.push((
        format!("norm of cat({ca} + {cb}) from two convs' moments, groups {groups}"),
        gpu_err(&g.download(&normed).unwrap(), &want),
        tolerance::<T>(1e-6),
    ));
    out
}

#[test]
fn conv_moments_match_cpu() {
    for_each_dtype("conv_moments", |g, name| match name {
        "f32" => conv_moments_cases::<f32>(g),
        "f16" => conv_moments_cases::<half::f16>(g),
        _ => conv_moments_cases::<half::bf16>(g),
    });
}

/// The copies folded into the conv's addressing (`ConvInput`, `Residual::Upsampled`) through
/// every kernel that can run them, against the CPU conv of the copies made.
fn folded_conv_cases<T: GpuFloat>(g: &Gpu) -> Vec<(String, f64, f64)> {
    let mut out = Vec::new();
    // (n, h, w, ca, cb, cout, k, upsampled input, residual: at y's size, upsampled from half
    // size or pooled from twice the size): h, w as the conv sees them; cb > 0 reads the last cb
    // input channels from a second tensor.
    for (i, &(n, h, w, ca, cb, cout, k, up, res_mode)) in [
        (2, 8, 8, 32, 64, 64, 3, false, "same"),
        (1, 6, 10, 24, 40, 48, 1, false, "same"),
        (2, 5, 7, 3, 5, 16, 3, false, "same"), // ca 3: element by element, the 64x64 tile only
        (1, 16, 12, 64, 0, 64, 3, true, "same"),
        (2, 8, 8, 32, 0, 32, 3, false, "up"),
        (1, 8, 8, 16, 8, 32, 3, true, "up"),
        (2, 5, 7, 32, 0, 32, 3, false, "down"),
        (1, 8, 6, 3, 5, 16, 3, false, "down"),
    ]
    .iter()
    .enumerate()
    {
        let cin = ca + cb;
        let weight: Vec<f32> = values(cout * cin * k * k, 300 + i as u32)
            .iter()
            .map(|v| v / (cin * k * k) as f32)
            .collect();
        let conv = Conv2d::from_torch(&rounded::<T>(&weight), values(cout, 310 + i as u32), k, 1);
        let (sh, sw) = if up { (h / 2, w / 2) } else { (h, w) };
        let a = rounded::<T>(&values(n * sh * sw * ca, 320 + i as u32));
        let b = rounded::<T>(&values(n * sh * sw * cb, 330 + i as u32));
        let (rh, rw) = match res_mode {
            "up" => (h / 2, w / 2),
            "down" => (2 * h, 2 * w),
            _ => (h, w),
        };
        let r = rounded::<T>(&values(n * rh * rw * cout, 340 + i as u32));
        // The reference: the copies made, then the CPU conv accumulating into the residual.
        let mut stored = a.clone();
        if cb > 0 {
            stored = vec![0.0; n * sh * sw * cin];
            concat_channels(&a, &b, n, sh * sw, ca, cb, &mut stored);
        }
        let mut x = vec![0.0; n * h * w * cin];
        if up {
            upsample_nearest2x(&stored, n, sh, sw, cin, &mut x);
        } else {
            x = stored;
        }
        let mut want = vec![0.0; n * h * w * cout];
        match res_mode {
            "up" => upsample_nearest2x(&r, n, rh, rw, cout, &mut want),
            "down" => avg_pool2x(&r, n, rh, rw, cout, &mut want),
            _ => want.copy_from_slice(&r),
        }
        conv.forward(&x, n, h, w, &mut want, true, &mut Vec::new());

        let dev = conv.upload::<T>(g).unwrap();
        let (ad, bd, rd) = (
            g.upload::<T>(&a).unwrap(),
            g.upload::<T>(&b).unwrap(),
            g.upload::<T>(&r).unwrap(),
        );
        let input = ConvInput {
            x: &ad,
            second: (cb > 0).then_some((&bd, cb)),
            upsampled: up,
            norm: None,
        };
        for kern in ConvKernel::ALL {
            if !dev.supports(g, kern, input) {
                continue;
            }
            let mut yd = g.upload::<T>(&vec![f32::NAN; want.len()]).unwrap();
            let res = match res_mode {
                "up" => Residual::Upsampled(&rd),
                "down" => Residual::Pooled(&rd),
                _ => Residual::Buffer(&rd),
            };
            dev.forward_with(g, kern, input, n, h, w, &mut yd, res)
                .unwrap();
            let name = format!(
                "folded conv {} n{n} {h}x{w} {ca}+{cb}->{cout} k{k} up {up} residual {res_mode}",
                kern.name()
            );
            out.push((
                name,
                gpu_err(&g.download(&yd).unwrap(), &want),
                tolerance::<T>(5e-7),
            ));
        }
    }
    // The decoder's concatenation under group norm (+ scale-shift, SiLU), a group straddling
    // the two tensors (ca 40 of groups of 3 channels).
    for (i, &(n, hw, ca, cb)) in [(2, 37, 40, 56), (1, 300, 128, 64)].iter().enumerate() {
        let c = ca + cb;
        let gn = GroupNorm {
            channels: c,
            groups: mcdm::ops::group_norm::GROUPS,
            weight: values(c, 360 + i as u32)
                .iter()
                .map(|v| 1.0 + 0.2 * v)
                .collect(),
            bias: values(c, 370 + i as u32),
            eps: mcdm::ops::group_norm::EPS,
        };
        let a = rounded::<T>(&values(n * hw * ca, 380 + i as u32));
        let b = rounded::<T>(&values(n * hw * cb, 390 + i as u32));
        let ss = values(n * 2 * c, 400 + i as u32);
        let mut cat = vec![0.0; n * hw * c];
        concat_channels(&a, &b, n, hw, ca, cb, &mut cat);
        let mut want = vec![0.0; cat.len()];
        gn.forward(&cat, n, hw, &mut want, Some(&ss), true);
        let dev = gn.upload(g).unwrap();
        let (ad, bd) = (g.upload::<T>(&a).unwrap(), g.upload::<T>(&b).unwrap());
        assert!(dev.takes_concat(g, &bd, ca), "group norm concat case {i}");
        let ssd = g.upload::<f32>(&ss).unwrap();
        let mut yd = g.upload::<T>(&vec![f32::NAN; cat.len()]).unwrap();
        let mut stats = g.zeros::<f32>(dev.scratch_len(n, hw)).unwrap();
        dev.forward_concat(
            g,
            [&ad, &bd],
            ca,
            n,
            hw,
            &mut yd,
            &mut stats,
            Some(&ssd),
            true,
        )
        .unwrap();
        out.push((
            format!("group norm of a concatenation n{n} hw{hw} c{ca}+{cb}"),
            gpu_err(&g.download(&yd).unwrap(), &want),
            tolerance::<T>(1e-6),
        ));
    }
    out
}

#[test]
fn folded_copies_match_cpu() {
    for_each_dtype("folded copies", |g, name| match name {
        "f32" => folded_conv_cases::<f32>(g),
        "f16" => folded_conv_cases::<half::f16>(g),
        _ => folded_conv_cases::<half::bf16>(g),
    });
}

fn group_norm_cases<T: GpuFloat>(g: &Gpu) -> Vec<(String, f64, f64)> {
    let mut out = Vec::new();
    const G: usize = mcdm::ops::group_norm::GROUPS;
    for (i, &(n, hw, c, groups, scale_shift, silu)) in [
        (1, 25, 32, G, false, false),
        (2, 64, 64, G, true, true),
        (3, 17, 96, G, false, true),
        (1, 4096, 128, G, true, false),
        // Several chunks with a partial last one; channels over the block (two and six per
        // thread); a batch whose chunks are longer than 32 rows.
        (2, 1000, 384, G, true, true),
        (1, 33, 1536, G, false, true),
        (8, 1024, 192, G, true, true),
        // Other group counts (diffusers' norm_num_groups): groups of 40 channels, one group,
        // groups of one channel, the most groups the kernels take.
        (2, 100, 320, 8, true, true),
        (1, 50, 24, 1, false, false),
        (2, 30, 16, 16, true, false),
        (1, 70, 1024, 256, false, true),
    ]
    .iter()
    .enumerate()
    {
        let gn = GroupNorm {
            channels: c,
            groups,
            weight: values(c, 10 + i as u32)
                .iter()
                .map(|v| 1.0 + 0.2 * v)
                .collect(),
            bias: values(c, 20 + i as u32),
            // A model's own eps (diffusers' norm_eps) reaches the kernel: 1e-2 moves this
            // case's output by about 0.2%, far past the f32 and f16 tolerances.
            eps: if i == 0 {
                1e-2
            } else {
                mcdm::ops::group_norm::EPS
            },
        };
        let x = rounded::<T>(
            &values(n * hw * c, 30 + i as u32)
                .iter()
                .map(|v| 3.0 * v + 0.5)
                .collect::<Vec<_>>(),
        );
        let ss = values(n * 2 * c, 40 + i as u32);
        let mut want = vec![0.0; x.len()];
        gn.forward(&x, n, hw, &mut want, scale_shift.then_some(&ss[..]), silu);
        let dev = gn.upload(g).unwrap();
        let xd = g.upload::<T>(&x).unwrap();
        let ssd = g.upload::<f32>(&ss).unwrap();
        let mut yd = g.upload::<T>(&vec![f32::NAN; x.len()]).unwrap();
        let mut stats = g.zeros::<f32>(dev.scratch_len(n, hw)).unwrap();
        dev.forward(
            g,
            &xd,
            n,
            hw,
            &mut yd,
            &mut stats,
            scale_shift.then_some(&ssd),
            silu,
        )
        .unwrap();
        out.push((
            format!("group norm n{n} hw{hw} c{c} groups {groups} ss{scale_shift} silu{silu}"),
            gpu_err(&g.download(&yd).unwrap(), &want),
            // f32 measured at most 1.2e-7 (2026-12-06).
            tolerance::<T>(1e-6),
        ));
    }
    // A downsampling block's normalised branch, pooled 2x2 as it is normalised: against the
    // CPU's group norm then pooling.
    for (i, &(n, h, w, c, groups, silu)) in [
        (2, 8, 6, 64, 32, true),
        (1, 32, 32, 128, 32, true),
        (3, 4, 10, 48, 8, false),
    ]
    .iter()
    .enumerate()
    {
        let gn = GroupNorm {
            channels: c,
            groups,
            weight: values(c, 50 + i as u32)
                .iter()
                .map(|v| 1.0 + 0.2 * v)
                .collect(),
            bias: values(c, 60 + i as u32),
            eps: mcdm::ops::group_norm::EPS,
        };
        let x = rounded::<T>(&values(n * h * w * c, 70 + i as u32));
        let mut normed = vec![0.0; x.len()];
        gn.forward(&x, n, h * w, &mut normed, None, silu);
        let mut want = vec![0.0; x.len() / 4];
        mcdm::ops::resample::avg_pool2x(&normed, n, h, w, c, &mut want);
        let dev = gn.upload(g).unwrap();
        let xd = g.upload::<T>(&x).unwrap();
        let mut yd = g.upload::<T>(&vec![f32::NAN; want.len()]).unwrap();
        let mut stats = g.zeros::<f32>(dev.scratch_len(n, h * w)).unwrap();
        dev.forward_pool(g, &xd, [n, h, w], &mut yd, &mut stats, silu)
            .unwrap();
        out.push((
            format!("group norm + 2x2 pool n{n} {h}x{w} c{c} groups {groups} silu{silu}"),
            gpu_err(&g.download(&yd).unwrap(), &want),
            tolerance::<T>(1e-6),
        ));
    }
    out
}

#[test]
fn group_norm_matches_cpu() {
    for_each_dtype("group_norm", |g, name| match name {
        "f32" => group_norm_cases::<f32>(g),
        "f16" => group_norm_cases::<half::f16>(g),
        _ => group_norm_cases::<half::bf16>(g),
    });
}

fn attention_cases<T: GpuFloat>(g: &Gpu) -> Vec<(String, f64, f64)> {
    let mut out = Vec::new();
    for (i, &(n, t, c, heads)) in [
        (1, 64, 64, 1),
        (2, 100, 128, 4),
        (1, 256, 192, 3),
        (2, 1024, 64, 2),
        (1, 4096, 128, 2),
        (3, 17, 32, 1),
        // Heads over 64 wide take the wide 16-bit kernel; d 40 has an odd number of 8-wide tiles.
        (2, 70, 256, 2),
        (1, 130, 96, 1),
        (2, 33, 80, 2),
    ]
    .iter()
    .enumerate()
    {
        let qkv = rounded::<T>(
            &values(n * t * 3 * c, 60 + i as u32)
                .iter()
                .map(|v| 2.0 * v)
                .collect::<Vec<_>>(),
        );
        let mut want = vec![0.0; n * t * c];
        attend(&qkv, n, t, c, heads, &mut want);
        let qd = g.upload::<T>(&qkv).unwrap();
        let mut od = g.upload::<T>(&vec![f32::NAN; n * t * c]).unwrap();
        attend_gpu(g, &qd, n, t, c, heads, &mut od).unwrap();
        out.push((
            format!("attention n{n} t{t} c{c} heads{heads}"),
            gpu_err(&g.download(&od).unwrap(), &want),
            // f32 measured at most 1.6e-6 (2026-12-06).
            tolerance::<T>(1e-5),
        ));
    }
    out
}

#[test]
fn attention_matches_cpu() {
    for_each_dtype("attention", |g, name| match name {
        "f32" => attention_cases::<f32>(g),
        "f16" => attention_cases::<half::f16>(g),
        _ => attention_cases::<half::bf16>(g),
    });
}

fn resample_cases<T: GpuFloat>(g: &Gpu) -> Vec<(String, f64, f64)> {
    let mut out = Vec::new();
    for (i, &(n, h, w, c)) in [(1, 4, 6, 32), (2, 9, 8, 64), (3, 16, 16, 3)]
        .iter()
        .enumerate()
    {
        let x = rounded::<T>(&values(n * h * w * c, 70 + i as u32));
        let xd = g.upload::<T>(&x).unwrap();
        let mut want = vec![0.0; 4 * x.len()];
        upsample_nearest2x(&x, n, h, w, c, &mut want);
        let mut yd = g.upload::<T>(&vec![f32::NAN; 4 * x.len()]).unwrap();
        upsample_nearest2x_gpu(g, &xd, n, h, w, c, &mut yd).unwrap();
        out.push((
            format!("upsample n{n} {h}x{w}x{c}"),
            gpu_err(&g.download(&yd).unwrap(), &want),
            0.0,
        ));
        let (h2, w2) = (h / 2 * 2, w / 2 * 2);
        let x = rounded::<T>(&values(n * h2 * w2 * c, 80 + i as u32));
        let xd = g.upload::<T>(&x).unwrap();
        let mut want = vec![0.0; x.len() / 4];
        avg_pool2x(&x, n, h2, w2, c, &mut want);
        let mut yd = g.upload::<T>(&vec![f32::NAN; x.len() / 4]).unwrap();
        avg_pool2x_gpu(g, &xd, n, h2, w2, c, &mut yd).unwrap();
        out.push((
            format!("avgpool n{n} {h2}x{w2}x{c}"),
            gpu_err(
                &rounded::<T>(&g.download(&yd).unwrap()),
                &rounded::<T>(&want),
            ),
            // f32: the CPU's operations in its order, measured exact (2026-12-06).
            tolerance::<T>(1e-7),
        ));
        // cat([x, skip]) and a per-image bias: eight channels a thread where both counts are
        // multiples of 8, else one element.
        let cb = c + if c % 8 == 0 { 8 } else { 3 };
        let (x, skip) = (
            rounded::<T>(&values(n * h * w * c, 100 + i as u32)),
            rounded::<T>(&values(n * h * w * cb, 110 + i as u32)),
        );
        let want: Vec<f32> = (0..n * h * w)
            .flat_map(|p| x[p * c..][..c].iter().chain(&skip[p * cb..][..cb]).copied())
            .collect();
        let (xd, sd) = (g.upload::<T>(&x).unwrap(), g.upload::<T>(&skip).unwrap());
        let mut yd = g.upload::<T>(&vec![f32::NAN; want.len()]).unwrap();
        concat_channels_gpu(g, &xd, &sd, n, h * w, c, cb, &mut yd).unwrap();
        out.push((
            format!("concat n{n} {h}x{w} {c}+{cb}"),
            gpu_err(&g.download(&yd).unwrap(), &want),
            0.0,
        ));
        let bias = values(n * c, 120 + i as u32);
        let want: Vec<f32> = x
            .iter()
            .enumerate()
            .map(|(k, v)| v + bias[k / (h * w * c) * c + k % c])
            .collect();
        let mut xd = g.upload::<T>(&x).unwrap();
        add_channel_bias_gpu(g, &mut xd, &g.upload::<f32>(&bias).unwrap(), n, h * w, c).unwrap();
        out.push((
            format!("channel bias n{n} {h}x{w}x{c}"),
            gpu_err(&g.download(&xd).unwrap(), &want),
            // f32: one addition, measured exact (2026-12-06).
            tolerance::<T>(1e-7),
        ));
        let nchw = values(n * c * h * w, 90 + i as u32);
        let mut want = vec![0.0; nchw.len()];
        nchw_to_nhwc(&nchw, n, c, h * w, &mut want);
        let d = g.upload::<f32>(&nchw).unwrap();
        let mut yd: GpuBuffer<T> = g.zeros(nchw.len()).unwrap();
        nchw_to_nhwc_gpu(g, &d, n, c, h * w, &mut yd).unwrap();
        out.push((
            format!("nchw->nhwc n{n} c{c}"),
            gpu_err(&g.download(&yd).unwrap(), &rounded::<T>(&want)),
            0.0,
        ));
        out.extend(sampler_layout_cases::<T>(g, n, h * w, i as u32));
    }
    out
}

/// The sampler's input packing and output unpacking against their CPU references: x_t with no,
/// one shared or per-image image conditions (image k takes item `first + k`), written at an
/// offset into a larger buffer; eps and the variance channels read from one.
fn sampler_layout_cases<T: GpuFloat>(
    g: &Gpu,
    b: usize,
    hw: usize,
    seed: u32,
) -> Vec<(String, f64, f64)> {
    let mut out = Vec::new();
    let x = values(b * 3 * hw, 130 + seed);
    for (cc, count) in [(0, 0), (1, 1), (3, b + 1)] {
        let cond = (count > 0).then(|| values(count * cc * hw, 140 + seed));
        let (first, at) = (1, 5);
        let len = at + b * hw * (3 + cc);
        let mut want = vec![f32::NAN; len];
        let host_cond = cond.as_deref().map(|c| (c, count));
        pack_input(&x, host_cond, first, b, hw, cc, &mut want, at);
        let xd = g.upload::<f32>(&x).unwrap();
        let cd = cond.as_ref().map(|c| g.upload::<f32>(c).unwrap());
        let mut yd = g.upload::<T>(&vec![f32::NAN; len]).unwrap();
        let dev_cond = cd.as_ref().map(|c| (c, count));
        pack_input_gpu(g, &xd, dev_cond, first, b, hw, cc, &mut yd, at).unwrap();
        let got = g.download(&yd).unwrap();
        out.push((
            format!("pack_input b{b} hw{hw} cc{cc} items{count}"),
            gpu_err(&got[at..], &rounded::<T>(&want[at..])),
            0.0,
        ));
    }
    let (oc, at, eps_at) = (6, 7, 3);
    let y = rounded::<T>(&values(at + b * hw * oc, 150 + seed));
    let (mut eps, mut var) = (vec![0.0; eps_at + b * 3 * hw], vec![0.0; b * 3 * hw]);
    unpack_output(&y, at, oc, &mut eps, eps_at, Some(&mut var), b, hw);
    let yd = g.upload::<T>(&y).unwrap();
    let mut eps_d = g.upload::<f32>(&vec![f32::NAN; eps.len()]).unwrap();
    let mut var_d = g.upload::<f32>(&vec![f32::NAN; var.len()]).unwrap();
    unpack_output_gpu(g, &yd, at, oc, &mut eps_d, eps_at, Some(&mut var_d), b, hw).unwrap();
    let got = g.download(&eps_d).unwrap();
    out.push((
        format!("unpack_output eps b{b} hw{hw}"),
        gpu_err(&got[eps_at..], &eps[eps_at..]),
        0.0,
    ));
    out.push((
        format!("unpack_output var b{b} hw{hw}"),
        gpu_err(&g.download(&var_d).unwrap(), &var),
        0.0,
    ));
    out
}

#[test]
fn resample_and_layout_match_cpu() {
    for_each_dtype("resample", |g, name| match name {
        "f32" => resample_cases::<f32>(g),
        "f16" => resample_cases::<half::f16>(g),
        _ => resample_cases::<half::bf16>(g),
    });
}

#[test]
fn linear_matches_cpu() {
    let Some(g) = gpu("linear") else { return };
    for (i, &(n, fin, fout)) in [
        (1, 32, 128),
        (5, 128, 128),
        (64, 384, 512),
        (3, 7, 300),
        (11, 1500, 70),
    ]
    .iter()
    .enumerate()
    {
        let lin = Linear {
            in_features: fin,
            out_features: fout,
            weight: values(fout * fin, 5 + i as u32),
            bias: values(fout, 6 + i as u32),
        };
        let x = values(n * fin, 7 + i as u32);
        for silu_in in [false, true] {
            let mut want = vec![0.0; n * fout];
            lin.forward(&x, n, &mut want, silu_in);
            let dev = lin.upload(&g).unwrap();
            let xd = g.upload::<f32>(&x).unwrap();
            let mut yd = g.upload::<f32>(&vec![f32::NAN; n * fout]).unwrap();
            dev.forward(&g, &xd, n, &mut yd, silu_in).unwrap();
            let err = gpu_err(&g.download(&yd).unwrap(), &want);
            // Measured at most 4.1e-7 (2026-12-06).
            let case = format!("linear n{n} {fin}->{fout} silu{silu_in}, error");
            common::within(&case, err, 1e-6);
        }
    }
}

/// The whole forward pass of every reference fixture model, GPU against CPU.
fn forward_cases<T: GpuFloat>(g: &Arc<Gpu>) -> Vec<(String, f64, f64)> {
    let mut out = Vec::new();
    for name in unet_case_names() {
        let case = UnetCase::load(&name);
        let (model, cond) = (&case.model, case.conditioning());
        let (x, shape) = (&case.x, case.shape);
        let unet = model.cpu_unet().unwrap();
        let want = unet.forward_nchw(&mut Cpu::new(), x, shape, &cond).unwrap();
        // Every activation is stored in T between ~40 layers, so the rounding adds up: measured
        // (kernels emulated on the CPU, 2026-12-06) f32 7.6e-7..1.1e-6, f16 0.9e-3..1.7e-3,
        // bf16 7e-3..1.45e-2, about 8x f16 as bf16 keeps 3 fewer mantissa bits.
        let tol = match T::SUFFIX {
            "_f32" => 1e-5,
            "_f16" => 1e-2,
            _ => 3e-2,
        };
        // With the norm fusions (statistics from the moments of the convs that made a norm's
        // input; the norm applied as the next conv reads it, its table from those moments or,
        // where there are none, from a statistics pass): in bf16 (the GPU default) the first
        // alone and both; in f32 (the SIMT conv's element-by-element loads) both. Measured
        // (2026-12-07) as unfused: bf16 1.05e-2 vs 1.05e-2, f32 1.16e-6 vs 1.13e-6.
        // On the half of the models that between them have every block kind (scale-shift and
        // not, resampling ResBlocks, attention at full resolution, three levels, a non-square
        // image): CI runs these tests again under AddressSanitizer, one at a time.
        const FUSED: [&str; 4] = [
            "attn_ds1_dropout",
            "embed24_in6_3level",
            "neworder_headch16_updown_f16",
            "noattn_nonsquare",
        ];
        let fusions: &[(bool, bool)] = match T::SUFFIX {
            _ if !FUSED.contains(&name.as_str()) => &[(false, false)],
            "_bf16" => &[(false, false), (true, false), (true, true)],
            "_f32" => &[(false, false), (true, true)],
            _ => &[(false, false)],
        };
        for &(stats, apply) in fusions {
            let mut cuda = Cuda::<T>::new(g.clone());
            cuda.set_norm_stats_in_conv(stats);
            cuda.set_norm_apply_in_conv(apply);
            let dev = unet.to_backend(&mut cuda).unwrap();
            let got = dev.forward_nchw(&mut cuda, x, shape, &cond).unwrap();
            let how = match (stats, apply) {
                (false, false) => "",
                (true, false) => " (norm stats in conv)",
                _ => " (norm stats and apply in conv)",
            };
            out.push((format!("forward {name}{how}"), rel_l2(&got, &want), tol));
        }
    }
    // diffusers UNet2DModel folders run through the same graph (both time-feature layouts,
    // another group count).
    for name in ["attn_scale_shift_classes", "ddpm_sin_first", "groups_4"] {
        let dir = common::fixtures(&format!("diffusers/{name}"));
        let model = mcdm::model::load_model(&dir, None).unwrap();
        let io = mcdm::weights::SafetensorsFile::open(&dir.join("io.safetensors")).unwrap();
        let shape: [usize; 4] = io.shape("x").unwrap().try_into().unwrap();
        let (x, t) = (io.f32("x").unwrap(), io.f32("t").unwrap());
        let labels = io.contains("y").then(|| io.i64("y").unwrap());
        let cond = mcdm::model::Conditioning {
            timesteps: &t,
            labels: labels.as_deref(),
            embedding: None,
        };
        let unet = model.cpu_unet().unwrap();
        let want = unet
            .forward_nchw(&mut Cpu::new(), &x, shape, &cond)
            .unwrap();
        let mut cuda = Cuda::<T>::new(g.clone());
        let dev = unet.to_backend(&mut cuda).unwrap();
        let got = dev.forward_nchw(&mut cuda, &x, shape, &cond).unwrap();
        let tol = match T::SUFFIX {
            "_f32" => 1e-5,
            "_f16" => 1e-2,
            _ => 3e-2,
        };
        out.push((
            format!("forward diffusers/{name}"),
            rel_l2(&got, &want),
            tol,
        ));
    }
    out
}

#[test]
fn forward_matches_cpu() {
    let Some(g) = gpu("forward") else { return };
    let mut failures = Vec::new();
    for (name, cases) in [
        ("f32", forward_cases::<f32>(&g)),
        ("f16", forward_cases::<half::f16>(&g)),
        ("bf16", forward_cases::<half::bf16>(&g)),
    ] {
        for (case, err, tol) in cases {
            eprintln!("{name} {case}: rel L2 {err:.2e} (tolerance {tol:.0e})");
            if err.is_nan() || err > tol {
                failures.push(format!("{name} {case}: {err:.3e}"));
            }
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// The peak kernels of `bench --kernels` (their outputs are exact, so they must match
/// bit for bit), and the streaming copy.
#[test]
fn peak_kernels_match_cpu() {
    use mcdm::bench::peak::{compute_peak_gpu, compute_reference, copy_gpu, BLOCK};
    fn compute<T: GpuFloat>(g: &Gpu) {
        let (blocks, iters) = (3, 7);
        let mut out = g.upload::<f32>(&vec![f32::NAN; blocks * BLOCK]).unwrap();
        compute_peak_gpu::<T>(g, &mut out, blocks, iters).unwrap();
        let want = compute_reference::<T>(iters);
        let got = g.download(&out).unwrap();
        assert!(
            got.iter().all(|&v| v == want),
            "peak {}: {:?} against {want}",
            T::SUFFIX,
            &got[..4]
        );
    }
    let Some(g) = gpu("peak") else { return };
    compute::<f32>(&g);
    compute::<half::f16>(&g);
    compute::<half::bf16>(&g);
    for words in [1, 300, 5001] {
        let x = values(4 * words, 11);
        let xd = g.upload::<f32>(&x).unwrap();
        let mut yd = g.upload::<f32>(&vec![f32::NAN; 4 * words]).unwrap();
        copy_gpu(&g, &xd, &mut yd, 2).unwrap();
        assert_eq!(g.download(&yd).unwrap(), x, "copy of {words} words");
    }
}

/// Public GPU calls given sizes that wrap, offsets past the end, parameters that do not fit
/// their shapes or empty work: an error naming the problem, or (empty work) nothing done, never
/// a launch outside a buffer (on the fake driver, AddressSanitizer would abort on one).
#[test]
fn bad_sizes_are_errors() {
    use mcdm::ops::embedding::{timestep_embedding_gpu, TimeFeatures};
    use mcdm::ops::layout::{pack_input_gpu, unpack_output_gpu};
    use mcdm::ops::step::{diffusion_step_gpu, fill_normals_gpu};
    let Some(g) = gpu("bad sizes") else { return };
    // w3 * 3 wraps to 2 in usize, while the kernels would see w3 as 1,431,655,766.
    const W3: usize = 0x5555_5555_5555_5556;
    let fails = |what: &str, r: mcdm::Result<()>, needle: &str| match r {
        Ok(()) => panic!("{what}: accepted"),
        Err(e) => assert!(e.to_string().contains(needle), "{what}: {e}"),
    };
    let buf = |len: usize| g.upload::<f32>(&values(len, len as u32)).unwrap();
    fails(
        "a buffer whose bytes overflow",
        g.zeros::<f32>((1 << 62) + 16).map(|_| ()),
        "out of device memory",
    );
    assert_eq!(g.upload::<f32>(&[]).unwrap().len(), 0);

    let (x2, mut y2) = (buf(2), buf(2));
    fails(
        "nchw_to_nhwc, n * c wraps",
        nchw_to_nhwc_gpu(&g, &x2, W3, 3, 1, &mut y2),
        "more than a kernel takes",
    );
    fails(
        "fill_normals, b * len wraps",
        fill_normals_gpu(&g, &mut y2, W3, 3, 0, 1, 0),
        "more than a kernel takes",
    );
    let t = buf(3);
    fails(
        "timestep embedding, n * dim wraps",
        timestep_embedding_gpu(&g, &t, 3, W3, TimeFeatures::GUIDED_DIFFUSION, &mut y2),
        "more than a kernel takes",
    );
    let conv = Conv2d::from_torch(&values(9, 1), values(3, 2), 1, 1)
        .upload::<f32>(&g)
        .unwrap();
    fails(
        "conv, n * h * w * c wraps",
        conv.forward(&g, &x2, W3, 1, 1, &mut y2, Residual::None),
        "more than a kernel takes",
    );
    fails(
        "conv, output pixels past the kernels' 32-bit rows",
        conv.forward(&g, &x2, 1 << 16, 1 << 8, 1 << 8, &mut y2, Residual::None),
        "more than a kernel indexes",
    );
    let norm = GroupNorm {
        channels: 32,
        groups: 32,
        weight: vec![1.0; 32],
        bias: vec![0.0; 32],
        eps: mcdm::ops::group_norm::EPS,
    }
    .upload(&g)
    .unwrap();
    let mut stats = buf(64);
    fails(
        "group norm, an image past the kernel's 32-bit index",
        norm.forward(&g, &x2, 1, 1 << 26, &mut y2, &mut stats, None, false),
        "more than a kernel indexes",
    );
    fails(
        "group norm + pooling of an odd side",
        norm.forward_pool(&g, &x2, [1, 3, 4], &mut y2, &mut stats, false),
        "the sides must be even",
    );
    let (x4, mut y4) = (buf(4), buf(4));
    fails(
        "a copy on more blocks than a grid holds",
        mcdm::bench::peak::copy_gpu(&g, &x4, &mut y4, 1 << 32).map(drop),
        "blocks",
    );
    // A large-tile conv launched through a handle other than the uploading one: its shared
    // memory limit is raised per handle, at the kernel's first launch there.
    {
        let other = mcdm::cuda::Gpu::new(0).unwrap();
        let (cin, cout, h, w) = (64, 64, 4, 4);
        let big = Conv2d::from_torch(&values(cout * cin * 9, 5), values(cout, 6), 3, 1)
            .upload::<half::f16>(&g)
            .unwrap();
        let x = other.upload::<half::f16>(&values(h * w * cin, 7)).unwrap();
        let mut y = other.zeros::<half::f16>(h * w * cout).unwrap();
        if big.supports(&other, ConvKernel::Tile128, &x) {
            big.forward_with(
                &other,
                ConvKernel::Tile128,
                &x,
                1,
                h,
                w,
                &mut y,
                Residual::None,
            )
            .expect("a large-tile conv on a second handle");
        }
    }
    // Empty work launches nothing.
    conv.forward(&g, &x2, 0, 4, 4, &mut y2, Residual::None)
        .unwrap();

    let (xt, mut packed) = (buf(12), buf(16));
    fails(
        "pack_input at an offset that wraps",
        pack_input_gpu(&g, &xt, None, 0, 1, 4, 1, &mut packed, usize::MAX),
        "past any buffer",
    );
    let (out4, mut eps) = (buf(4), buf(12));
    fails(
        "unpack_output of a 1-channel output",
        unpack_output_gpu(&g, &out4, 0, 1, &mut eps, 0, None, 1, 4),
        "has 1 channels",
    );
    let (qkv, mut att) = (buf(96), buf(32));
    fails(
        "attention with 0 heads",
        attend_gpu(&g, &qkv, 1, 4, 8, 0, &mut att),
        "head width",
    );
    let weights = buf(1);
    let mut x = buf(12);
    let step = mcdm::diffusion::Diffusion::from_config(&mcdm::diffusion::DiffusionConfig {
        timestep_respacing: "10".into(),
        ..Default::default()
    })
    .unwrap()
    .ddim_params(5, 0.0, true)
    .unwrap();
    fails(
        "a step with no terms",
        diffusion_step_gpu(&g, &mut x, &eps, &weights, 0, None, 1, 12, 0, step, None),
        "at least the unconditional term",
    );

    let mut short_bias = Conv2d::from_torch(&values(9, 1), values(3, 2), 1, 1);
    short_bias.bias.pop();
    for (what, conv) in [
        ("a conv without parameters", Conv2d::empty(4, 8, 3, 1)),
        ("a conv missing a bias", short_bias),
        (
            "a conv of stride 0",
            Conv2d::from_torch(&values(9, 1), values(3, 2), 1, 0),
        ),
    ] {
        fails(what, conv.upload::<f32>(&g).map(|_| ()), "conv");
    }
    let linear = Linear {
        in_features: 4,
        out_features: 4,
        weight: values(4, 3),
        bias: values(4, 4),
    };
    fails(
        "a linear layer short of weights",
        linear.upload(&g).map(|_| ()),
        "needs 4x4 weights",
    );
    for (channels, groups, params) in [
        (32, 32, 1),
        (0, 32, 0),
        (48, 7, 48),
        (12, 4, 12),
        (1024, 512, 1024),
    ] {
        let norm = GroupNorm {
            channels,
            groups,
            weight: vec![1.0; params],
            bias: vec![0.0; params],
            eps: mcdm::ops::group_norm::EPS,
        };
        fails(
            "a group norm that does not fit",
            norm.upload(&g).map(|_| ()),
            "group norm over",
        );
    }
}
