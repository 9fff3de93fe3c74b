"""Writes the UNet forward fixtures under tests/fixtures/unet/ (deterministic, fixed seeds).

Usage:
    /opt/gdenv/bin/python tools/make_unet_fixtures.py [--out tests/fixtures/unet] [--only CASE ...]

For each case:
  <case>.safetensors     random weights (reference state_dict key names; f32, f16 or bf16
                         storage), config JSON string in metadata key `config`
  <case>.json            the same config (flat object, guided-diffusion flag names)
  <case>.io.safetensors  x    [B, in_channels, H, W] f32 (standard normal)
                         t    [B] f32 (fractional) or i64, fed to the network as it is
                         y    [B] i64 (class-conditional cases only)
                         emb  [B, embed_dim] f32 (embed_dim cases only)
                         out  [B, 3 or 6, H, W] f32: the reference forward in float32, computed with
                              the weights rounded to the storage dtype (exactly what the file holds)

Every written file is read back and the forward recomputed from it, to check the fixture.
A summary (case, params, bytes) is printed at the end.

Also (always, for every case): flops.json, PyTorch's FlopCounterMode count of one image's
forward pass of the reference model (on the meta device: shapes only), convolutions and the
attention's batched matmuls (the embeddings' small linear layers are left out), for every case
at its input size and for tools/configs/bench-cpu.json at 64x64: what `mcdm bench` and
`mcdm inspect` report as FLOPs. Config paths in it are relative to its folder.
"""

import argparse
import json
import os
import sys

import torch as th
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gd_model  # noqa: E402

BASE = dict(image_size=16, num_channels=32, num_res_blocks=1, channel_mult="1,1", dropout=0.0)

# name: (config, storage dtype, batch, input (H, W), t kind, seed)
CASES = {
    # legacy attention order, 2 heads, scale-shift on, conv up/down, f32, batch 2, fractional t
    "legacy_heads2_scaleshift": (
        dict(BASE, attention_resolutions="8", num_heads=2, use_scale_shift_norm=True,
             resblock_updown=False, use_new_attention_order=False),
        "f32", 2, (16, 16), "float", 101),
    # new attention order, head channels 16 (num_heads_upsample given but overridden by it),
    # resblock up/down, scale-shift off, 2 res blocks, 3 levels, f16 storage, use_fp16 flag set
    # (the reference output is still float32), batch 1, i64 t
    "neworder_headch16_updown_f16": (
        dict(BASE, num_res_blocks=2, channel_mult="1,1,1", attention_resolutions="8,4",
             num_heads=4, num_head_channels=16, num_heads_upsample=4,
             use_new_attention_order=True, resblock_updown=True, use_scale_shift_norm=False,
             use_fp16=True),
        "f16", 1, (16, 16), "int", 202),
    # class-conditional (10 classes) + learn_sigma, 1 head down / 2 heads up, bf16, batch 3
    "classcond_sigma_headsup_bf16": (
        dict(BASE, channel_mult="1,2", attention_resolutions="8", class_cond=True,
             num_classes=10, learn_sigma=True, num_heads=1, num_heads_upsample=2,
             use_scale_shift_norm=True),
        "bf16", 3, (16, 16), "int", 303),
    # vector condition (embed_dim 24) + image condition (in_channels 6), 3 levels, image 24
    "embed24_in6_3level": (
        dict(BASE, image_size=24, channel_mult="1,1,2", attention_resolutions="12",
             embed_dim=24, in_channels=6, num_head_channels=32, use_scale_shift_norm=False,
             timestep_respacing="ddim25", noise_schedule="cosine"),
        "f16", 2, (24, 24), "float", 404),
    # no attention outside the middle block (attention_resolutions ""), non-square input 16x8
    "noattn_nonsquare": (
        dict(BASE, attention_resolutions="", use_scale_shift_norm=True, resblock_updown=True,
             learn_sigma=True),
        "f16", 2, (16, 8), "int", 505),
    # input (32x32) larger than the config image_size (16): attention ds still from image_size
    "input32_config16": (
        dict(BASE, attention_resolutions="8", num_heads=2, use_scale_shift_norm=False),
        "bf16", 1, (32, 32), "float", 606),
    # attention at ds 1 and 2 ("16,8"), 4 heads of 8 channels, dropout 0.1 (inactive in eval),
    # use_checkpoint set (no effect)
    "attn_ds1_dropout": (
        dict(BASE, attention_resolutions="16,8", num_heads=4, dropout=0.1,
             use_scale_shift_norm=True, use_checkpoint=True),
        "f32", 2, (16, 16), "float", 707),
    # a single level with channel_mult 2 (64 channels, no up/downsampling)
    "single_level_mult2": (
        dict(BASE, image_size=8, num_res_blocks=1, channel_mult="2", attention_resolutions="8",
             num_head_channels=32, use_new_attention_order=True),
        "f16", 2, (8, 8), "int", 808),
}


def make_inputs(cfg, batch, hw, t_kind, seed):
    g = th.Generator().manual_seed(seed + 1)
    h, w = hw
    io = {"x": th.randn(batch, cfg["in_channels"], h, w, generator=g)}
    if t_kind == "float":
        io["t"] = (th.rand(batch, generator=g) * 999.0).float()
    else:
        t = th.randint(0, 1000, (batch,), generator=g, dtype=th.int64)
        if batch >= 3:
            t[-1] = 999
        io["t"] = t
    if cfg.get("num_classes") is not None:
        io["y"] = th.randint(0, cfg["num_classes"], (batch,), generator=g, dtype=th.int64)
    if cfg.get("embed_dim"):
        io["emb"] = th.randn(batch, cfg["embed_dim"], generator=g)
    return io


def run_case(name, spec, out_dir):
    cfg, dtype, batch, hw, t_kind, seed = spec
    cfg = gd_model.full_config(cfg)
    model = gd_model.randomize(gd_model.build_model(cfg), seed)
    wpath = os.path.join(out_dir, f"{name}.safetensors")
    wbytes = gd_model.save_weights(model, cfg, wpath, dtype)  # rounds the weights in place
    io = make_inputs(cfg, batch, hw, t_kind, seed)
    out = gd_model.forward(model, io["x"], io["t"], io.get("y"), io.get("emb"))
    assert out.dtype == th.float32 and th.isfinite(out).all()
    io["out"] = out
    iopath = os.path.join(out_dir, f"{name}.io.safetensors")
    gd_model.save_safetensors(io, iopath, metadata={"weights": f"{name}.safetensors"})

    # Read back and recompute from the files.
    re_model, _ = gd_model.load_weights(wpath)
    from safetensors.torch import load_file

    rio = load_file(iopath)
    re_out = gd_model.forward(re_model, rio["x"], rio["t"], rio.get("y"), rio.get("emb"))
    # Not bit-exact: PyTorch's CPU kernels vary in the last bits with thread split / alignment.
    recheck = float((re_out - rio["out"]).abs().max())
    assert recheck < 1e-4, f"{name}: recomputed output differs by {recheck}"
    return dict(case=name, params=gd_model.count_params(model), dtype=dtype, batch=batch,
                hw=hw, t=str(io["t"].dtype).replace("torch.", ""), weights_bytes=wbytes,
                io_bytes=os.path.getsize(iopath), out_std=float(out.std()),
                out_shape=tuple(out.shape), recheck=recheck)


def reference_flops(cfg, hw):
    """Convolution + bmm FLOPs of one image's forward pass through the reference model."""
    cfg = gd_model.full_config(cfg)
    with th.device("meta"):
        model = gd_model.build_model(cfg).eval()
    meta = dict(device="meta")
    x = th.empty(1, cfg["in_channels"], *hw, **meta)
    y = th.zeros(1, dtype=th.int64, **meta) if cfg.get("num_classes") is not None else None
    emb = th.zeros(1, cfg["embed_dim"], **meta) if cfg.get("embed_dim") else None
    with FlopCounterMode(display=False) as counter, th.no_grad():
        gd_model.forward(model, x, th.zeros(1, **meta), y, emb)
    counts = counter.get_flop_counts()["Global"]
    assert set(map(str, counts)) <= {"aten.convolution", "aten.bmm", "aten.addmm"}, counts
    return sum(v for k, v in counts.items() if str(k) in ("aten.convolution", "aten.bmm"))


def write_flops(out_dir, root):
    """flops.json: per case its config (a path relative to out_dir), input size and FLOPs."""
    entries = {name: (f"{name}.json", spec[0], spec[3]) for name, spec in CASES.items()}
    bench = os.path.join(root, "tools", "configs", "bench-cpu.json")
    with open(bench) as f:
        entries["bench-cpu"] = (os.path.relpath(bench, out_dir), json.load(f), (64, 64))
    rows = {name: {"config": path, "height": hw[0], "width": hw[1],
                   "flops": reference_flops(cfg, hw)}
            for name, (path, cfg, hw) in entries.items()}
    text = "{\n" + ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in rows.items()) + "\n}\n"
    gd_model.atomic_write_bytes(os.path.join(out_dir, "flops.json"), text.encode())
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ap.add_argument("--out", default=os.path.join(root, "tests", "fixtures", "unet"))
    ap.add_argument("--only", nargs="*", default=None, help="case names to (re)write")
    args = ap.parse_args()
    th.manual_seed(0)
    th.set_num_threads(max(1, os.cpu_count() or 1))
    os.makedirs(args.out, exist_ok=True)
    rows = []
    for name, spec in CASES.items():
        if args.only and name not in args.only:
            continue
        rows.append(run_case(name, spec, args.out))
    print(f"{'case':32} {'params':>8} {'dtype':>5} {'B':>2} {'HxW':>6} {'t':>7} {'weights':>9} {'io':>7} {'out std':>7} {'recheck':>8}")
    total = 0
    for r in rows:
        total += r["weights_bytes"] + r["io_bytes"]
        print(f"{r['case']:32} {r['params']:8d} {r['dtype']:>5} {r['batch']:2d} "
              f"{r['hw'][0]:>3}x{r['hw'][1]:<2} {r['t']:>7} {r['weights_bytes']:9d} {r['io_bytes']:7d} {r['out_std']:7.3f} {r['recheck']:8.1e}")
    print(f"total bytes (safetensors): {total}")
    for name, r in write_flops(args.out, root).items():
        print(f"flops {name:32} {r['height']}x{r['width']} {r['flops'] / 1e9:.4f} GFLOP")


if __name__ == "__main__":
    main()
