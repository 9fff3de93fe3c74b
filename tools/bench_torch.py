"""Times the reference guided-diffusion UNet forward in PyTorch (the baseline mcdm is compared to).

Usage:
    /opt/gdenv/bin/python tools/bench_torch.py [CONFIG] [--batch 1 16] [--warmup 2] [--runs 5]
        [--device cpu|cuda] [--fp16] [--channels-last] [--cudnn-benchmark]
        [--compile [--compile-mode MODE]] [--threads N] [--json results.json]
    /opt/gdenv/bin/python tools/bench_torch.py --list            # presets
    /opt/gdenv/bin/python tools/bench_torch.py --write-configs   # (re)writes tools/configs/*.json

CONFIG is a preset name (default bench-cpu) or a JSON config file (flat, guided-diffusion flag
names). The model gets random weights (gd_model.randomize, fixed seed), is put in eval mode and
run under torch.no_grad() on random inputs (x ~ N(0,1), t random integer timesteps, y / emb
when the config needs them). Each batch size: `--warmup` untimed forwards, then `--runs` timed
ones (torch.cuda.synchronize() around each on CUDA); the median is reported.

  --fp16     the reference fp16 path: model.convert_to_fp16() (torso convs in float16; Linear,
             GroupNorm, time embedding and `out` stay float32), as the reference scripts do
             with --use_fp16 True. Meant for --device cuda.
  --compile  torch.compile(model) (the compile time is part of the warm-up, not of the timing),
             in --compile-mode (default, reduce-overhead, max-autotune, ...).
  --channels-last   the models' weights and inputs in channels_last (NHWC) memory format, as
             cuDNN's fastest convolutions want.
  --cudnn-benchmark torch.backends.cudnn.benchmark = True (cuDNN picks its fastest algorithms
             during the warm-up).

Printed and (with --json) written as a JSON list, one record per batch size:
  {preset, config, batch, seconds_per_forward (median), seconds_min, images_per_second, times, torch, threads, cpu,
   device, gpu, fp16, compile, compile_mode, channels_last, cudnn_benchmark, params}

Presets (also written to tools/configs/<name>.json):
  bench-cpu       64x64, 64 ch, 2 res blocks, mult 1,2,3,4, attention 16,8, 32 head channels,
                  scale-shift, learn_sigma (23M params): a workload that fits a CPU.
  imagenet64-adm  OpenAI ADM ImageNet 64x64 (class_cond, 192 ch, 3 res blocks, head ch 64, new
                  attention order, cosine, updown, learn_sigma; 296M params).
  face256         256x256 face expert (192 ch, 2 res blocks, 1,1,2,2,4,4, attention 32,16,8,
                  head ch 64 legacy, scale-shift, updown, learn_sigma, linear; 311M params).
  face256-sketch  face256 with in_channels 6 (x_t ++ sketch).
  face256-ch128   face256 with 128 channels (138M params; REFERENCE.md section 3).
  adm256          256x256 ADM with 256 channels (553M params; REFERENCE.md section 3).
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch as th

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gd_model  # noqa: E402

FACE256 = dict(image_size=256, num_channels=192, num_res_blocks=2, channel_mult="",
               attention_resolutions="32,16,8", num_head_channels=64, num_heads=4,
               use_new_attention_order=False, use_scale_shift_norm=True, resblock_updown=True,
               learn_sigma=True, diffusion_steps=1000, noise_schedule="linear")

PRESETS = {
    "bench-cpu": dict(image_size=64, num_channels=64, num_res_blocks=2, channel_mult="1,2,3,4",
                      attention_resolutions="16,8", num_head_channels=32,
                      use_scale_shift_norm=True, resblock_updown=False, learn_sigma=True,
                      diffusion_steps=1000, noise_schedule="linear"),
    "imagenet64-adm": dict(image_size=64, num_channels=192, num_res_blocks=3, channel_mult="",
                           attention_resolutions="32,16,8", num_head_channels=64,
                           use_new_attention_order=True, class_cond=True, learn_sigma=True,
                           use_scale_shift_norm=True, resblock_updown=True, dropout=0.1,
                           use_fp16=True, diffusion_steps=1000, noise_schedule="cosine"),
    "face256": FACE256,
    "face256-sketch": dict(FACE256, in_channels=6),
    "face256-ch128": dict(FACE256, num_channels=128),
    "adm256": dict(FACE256, num_channels=256, use_fp16=True),
}

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


def write_configs():
    os.makedirs(CONFIG_DIR, exist_ok=True)
    for name, cfg in PRESETS.items():
        path = os.path.join(CONFIG_DIR, f"{name}.json")
        gd_model.atomic_write_bytes(path, gd_model.config_json(cfg).encode())
        print(f"wrote {path}")


def load_config(spec):
    if spec in PRESETS:
        return spec, gd_model.full_config(PRESETS[spec])
    if os.path.exists(spec):
        with open(spec) as f:
            return os.path.basename(spec), gd_model.full_config(json.load(f))
    raise SystemExit(f"error: `{spec}` is neither a preset ({', '.join(PRESETS)}) nor a file")


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", nargs="?", default="bench-cpu", help="preset name or JSON config file")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--fp16", action="store_true", help="reference convert_to_fp16() (GPU)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model")
    ap.add_argument("--compile-mode", default="default",
                    choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
                    help="torch.compile's mode (with --compile)")
    ap.add_argument("--channels-last", action="store_true", help="weights and inputs in channels_last")
    ap.add_argument("--cudnn-benchmark", action="store_true", help="torch.backends.cudnn.benchmark = True")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch CPU threads")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--compose", type=int, default=0,
                    help="time composed DDIM sampling instead: this many experts (random models of the config) "
                         "plus an unconditional model, eps = eps_u + sum_i (eps_i - eps_u), as mcdm bench --compose")
    ap.add_argument("--steps", type=int, default=10, help="DDIM steps of a composed run")
    ap.add_argument("--json", default=None, help="write the results (a JSON list) here")
    ap.add_argument("--list", action="store_true", help="list the presets and exit")
    ap.add_argument("--write-configs", action="store_true", help="write tools/configs/*.json and exit")
    args = ap.parse_args()

    if args.list:
        for name, cfg in PRESETS.items():
            print(f"{name:16} {json.dumps(cfg)}")
        return
    if args.write_configs:
        write_configs()
        return

    th.set_num_threads(args.threads)
    th.backends.cudnn.benchmark = args.cudnn_benchmark
    dev = th.device(args.device)
    name, cfg = load_config(args.config)
    model = gd_model.randomize(gd_model.build_model(cfg), args.seed)
    params = gd_model.count_params(model)
    if args.fp16:
        half = gd_model.build_model(cfg, fp16=True)
        half.load_state_dict(model.state_dict())
        model = half
    model = prepare(model.to(dev).eval(), args)
    run = compiled(model, args)
    cuda = dev.type == "cuda"
    gpu = th.cuda.get_device_name(dev) if cuda else None

    def sync():
        if cuda:
            th.cuda.synchronize(dev)

    if args.compose:
        return bench_compose(args, name, cfg, model, dev, sync, gpu, params)

    results = []
    g = th.Generator().manual_seed(args.seed + 1)
    for batch in args.batch:
        x = layout(th.randn(batch, cfg["in_channels"], cfg["image_size"], cfg["image_size"], generator=g).to(dev),
                   args)
        t = th.randint(0, cfg["diffusion_steps"], (batch,), generator=g).to(dev)
        y = th.randint(0, cfg["num_classes"], (batch,), generator=g).to(dev) if cfg.get("num_classes") else None
        emb = th.randn(batch, cfg["embed_dim"], generator=g).to(dev) if cfg.get("embed_dim") else None
        times = []
        with th.no_grad():
            for i in range(args.warmup + args.runs):
                sync()
                t0 = time.perf_counter()
                out = run(x, t, y=y, emb=emb)
                sync()
                dt = time.perf_counter() - t0
                if i >= args.warmup:
                    times.append(dt)
        assert th.isfinite(out.float()).all()
        med = statistics.median(times)
        rec = dict(preset=name, config=cfg, batch=batch, seconds_per_forward=med,
                   seconds_min=min(times),
                   images_per_second=batch / med, times=times, torch=th.__version__,
                   threads=th.get_num_threads(), cpu=cpu_name(), device=str(dev), gpu=gpu,
                   fp16=args.fp16, params=params, **setup_record(args))
        results.append(rec)
        print(f"{name} batch {batch:3d}: {med * 1e3:10.2f} ms/forward  {batch / med:9.2f} images/s  "
              f"(median of {args.runs}, {args.device}{setup_tag(args)}, {th.get_num_threads()} threads, "
              f"torch {th.__version__})",
              flush=True)
    if args.json:
        gd_model.atomic_write_bytes(args.json, (json.dumps(results, indent=2) + "\n").encode())
        print(f"wrote {args.json}")


def prepare(model, args):
    return model.to(memory_format=th.channels_last) if args.channels_last else model


def layout(x, args):
    return x.contiguous(memory_format=th.channels_last) if args.channels_last else x


def compiled(model, args):
    return th.compile(model, mode=args.compile_mode) if args.compile else model


def setup_record(args):
    return dict(compile=args.compile, compile_mode=args.compile_mode if args.compile else None,
                channels_last=args.channels_last, cudnn_benchmark=args.cudnn_benchmark)


def setup_tag(args):
    """How PyTorch ran, for the printed line: ' fp16 channels_last cudnn.benchmark compile(mode)'."""
    return "".join([" fp16" if args.fp16 else "", " channels_last" if args.channels_last else "",
                    " cudnn.benchmark" if args.cudnn_benchmark else "",
                    f" compile({args.compile_mode})" if args.compile else ""])


def bench_compose(args, name, cfg, first, dev, sync, gpu, params):
    """Composed DDIM sampling through guided_diffusion's ddim_sample_loop: `args.compose` experts
    plus an unconditional model (model 0), each a random model of `cfg`, all weights 1."""
    from guided_diffusion.script_util import create_gaussian_diffusion

    models = [first]
    for i in range(1, args.compose + 1):
        m = gd_model.randomize(gd_model.build_model(cfg), args.seed + i)
        if args.fp16:
            half = gd_model.build_model(cfg, fp16=True)
            half.load_state_dict(m.state_dict())
            m = half
        models.append(prepare(m.to(dev).eval(), args))
    runs = [compiled(m, args) for m in models]
    diffusion = create_gaussian_diffusion(
        steps=cfg["diffusion_steps"], learn_sigma=cfg["learn_sigma"], noise_schedule=cfg["noise_schedule"],
        timestep_respacing=str(args.steps))
    size, cin = cfg["image_size"], cfg["in_channels"]

    def model_fn_for(batch):
        image = th.full((batch, cin - 3, size, size), 0.5, device=dev) if cin > 3 else None
        emb = th.full((batch, cfg["embed_dim"]), 0.1, device=dev) if cfg.get("embed_dim") else None

        def model_fn(x, t):
            inp = layout(th.cat([x, image], 1) if image is not None else x, args)
            outs = []
            for i, m in enumerate(runs):
                y = th.full((batch,), i % cfg["num_classes"], device=dev, dtype=th.long) if cfg.get("num_classes") else None
                outs.append(m(inp, t, y=y, emb=emb).float())
            eps_u = outs[0][:, :3]
            eps = eps_u + sum(o[:, :3] - eps_u for o in outs[1:])
            return th.cat([eps, outs[0][:, 3:]], 1)
        return model_fn

    results = []
    g = th.Generator().manual_seed(args.seed + 1)
    for batch in args.batch:
        noise = th.randn(batch, 3, size, size, generator=g).to(dev)
        fn = model_fn_for(batch)
        times = []
        with th.no_grad():
            for i in range(args.warmup + args.runs):
                sync()
                t0 = time.perf_counter()
                out = diffusion.ddim_sample_loop(fn, noise.shape, noise=noise, clip_denoised=True,
                                                 device=dev, progress=False)
                sync()
                if i >= args.warmup:
                    times.append(time.perf_counter() - t0)
        assert th.isfinite(out).all()
        med = statistics.median(times)
        results.append(dict(preset=name, config=cfg, batch=batch, compose_experts=args.compose, steps=args.steps,
                            seconds_per_run=med, seconds_min=min(times), images_per_second=batch / med,
                            times=times, torch=th.__version__, device=str(dev), gpu=gpu, fp16=args.fp16,
                            params=params, **setup_record(args)))
        print(f"{name} composed ({args.compose} experts + uncond, {args.steps} steps) batch {batch:3d}: "
              f"{med:8.3f} s/run  {batch / med:9.2f} images/s  (median of {args.runs}, {args.device}"
              f"{setup_tag(args)}, torch {th.__version__})",
              flush=True)
    if args.json:
        gd_model.atomic_write_bytes(args.json, (json.dumps(results, indent=2) + "\n").encode())
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
