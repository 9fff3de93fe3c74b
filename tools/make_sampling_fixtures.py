"""Writes the composed-sampling fixtures under tests/fixtures/sample/ (deterministic, fixed seeds).

Usage:
    /opt/gdenv/bin/python tools/make_sampling_fixtures.py [--out tests/fixtures/sample]

Models (random weights, f16 storage, image_size 16, num_channels 32, channel_mult 1,1, one res
block, attention at 8x8, diffusion_steps 100, linear schedule for all), in models/<name>.safetensors
(+ models/<name>.json):
  uncond   unconditional, learn_sigma (6 output channels)
  classes  class-conditional, num_classes 5, 3 output channels
  sketch   image-conditioned: in_channels 4 = x_t ++ a 1-channel condition, learn_sigma
  text     vector-conditioned: embed_dim 16, 3 output channels
  segment  image-conditioned: in_channels 6 = x_t ++ a 3-channel condition, 3 output channels
  uncond_cosine  unconditional, cosine schedule, 3 output channels
  xstart   unconditional, predicts x_0 (predict_xstart), 3 output channels

Each case runs guided_diffusion's sampler:
    diffusion = create_gaussian_diffusion(steps, learn_sigma=<uncond model's>, noise_schedule, ...,
                                          timestep_respacing=<case>)
    samples = diffusion.ddim_sample_loop(model_fn, shape, noise=x_T, clip_denoised=..., eta=...)
           or diffusion.p_sample_loop(model_fn, shape, noise=x_T, clip_denoised=...)   (DDPM)
The solver cases (sampler dpmpp-2m, dpmpp-3m, unipc; `respacing` is their number of steps)
run diffusers' DPMSolverMultistepScheduler / UniPCMultistepScheduler instead, configured as
`mcdm sample --help` states (trained_betas = the models' betas, epsilon prediction ("sample" for
a predict_xstart model), linspace
timesteps, lower_order_final, final sigma 0, Karras sigmas when `karras`, thresholding at 1 =
clip_denoised), on the composed eps (the variance channels dropped):
    sched.set_timesteps(steps); for t in sched.timesteps: x = sched.step(eps(x, t), t, x).prev_sample
Where a step adds noise (DDPM, DDIM with eta > 0), the reference's th.randn_like is replaced by
mcdm's noise for the case's seed (Philox4x32-10 and Box-Muller as documented in src/rng.rs,
written out here in numpy with f64 transcendentals: within 1e-6 of mcdm's f32 values), so that
both sides sample with the same noise.
with the composition
    out_i = model_i(cat[x, image_i] or x, t, y=class_i, emb=embedding_i)
    eps   = eps_u + sum_i w_i * (eps_i - eps_u)          (first 3 channels of each output)
    model_fn output = eps, ++ out_u[:, 3:] when the unconditional model has learned sigma.
SpacedDiffusion's wrapper gives the model the original timestep (int64, not rescaled).

Case files:
  <case>.safetensors: x_T [N,3,16,16] f32, samples [N,3,16,16] f32 (final ddim_sample_loop output),
      cond.<i> [N or 1, C, 16, 16] f32 image condition of expert i (uniform in [-1, 1]),
      emb.<i> [N or 1, D] f32 vector condition of expert i,
      trajectory [S, N, 3, 16, 16] f32 (x after each of the S sampling steps; the last is samples),
      timesteps [S] i64 (the original timestep given to the models at each step, in order)
  <case>.json: {"models": {name: "models/name.safetensors"}, "experts": [{"model", "class"?,
      "image"?, "embedding"?, "weight"}], "uncond": {"model", "class"?}, "sampler": "ddim" | "ddpm" | "dpmpp-2m" | "dpmpp-3m" | "unipc",
      "eta": float, "karras": bool, "seed": int (of the step noise), "timestep_respacing": "...",
      "clip_denoised": bool}
"""

import argparse
import contextlib
import json
import os
import sys

import numpy as np
import torch as th
from safetensors.torch import load_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gd_model  # noqa: E402

from guided_diffusion.script_util import create_gaussian_diffusion  # noqa: E402

N = 3
SIZE = 16
BASE = dict(image_size=SIZE, num_channels=32, num_res_blocks=1, channel_mult="1,1",
            attention_resolutions="8", diffusion_steps=100, noise_schedule="linear",
            dropout=0.0)

MODELS = {
    "uncond": (dict(BASE, learn_sigma=True, use_scale_shift_norm=True, num_heads=2), 11),
    "classes": (dict(BASE, class_cond=True, num_classes=5, learn_sigma=False,
                     use_scale_shift_norm=True, num_head_channels=32,
                     use_new_attention_order=True), 12),
    "sketch": (dict(BASE, in_channels=4, learn_sigma=True, use_scale_shift_norm=False,
                    resblock_updown=True, num_heads=1), 13),
    "text": (dict(BASE, embed_dim=16, learn_sigma=False, use_scale_shift_norm=True,
                  num_heads=2), 14),
    "segment": (dict(BASE, in_channels=6, learn_sigma=False, use_scale_shift_norm=True,
                     num_heads=2), 15),
    "uncond_cosine": (dict(BASE, noise_schedule="cosine", learn_sigma=False, use_scale_shift_norm=True,
                           num_heads=2), 16),
    "xstart": (dict(BASE, predict_xstart=True, learn_sigma=False, use_scale_shift_norm=True, num_heads=2), 17),
}

# Conditions are described as (kind, batch): batch N = one per sample, 1 = shared (broadcast).
CASES = {
    # (a) the paper's eq. 12: sketch + text experts, weights 1, separate unconditional model
    "a_sketch_text_eq12": dict(
        experts=[dict(model="sketch", image=N, weight=1.0),
                 dict(model="text", embedding=1, weight=1.0)],
        uncond=dict(model="uncond"), respacing="ddim10", clip=True, seed=21),
    # (b) class 3 (1.5) + NOT sketch (-0.5) + text (0.7), respacing "10", not clipped
    "b_class_notsketch_text": dict(
        experts=[dict(model="classes", cls=3, weight=1.5),
                 dict(model="sketch", image=1, weight=-0.5),
                 dict(model="text", embedding=N, weight=0.7)],
        uncond=dict(model="uncond"), respacing="10", clip=False, seed=22),
    # (c) plain sampling: the unconditional model alone
    "c_uncond_only": dict(experts=[], uncond=dict(model="uncond"), respacing="ddim8",
                          clip=True, seed=23),
    # (d) classifier-free-guidance style: unconditional term = `classes` with null class 4
    "d_cfg_null_class": dict(
        experts=[dict(model="classes", cls=1, weight=2.0)],
        uncond=dict(model="classes", cls=4), respacing="ddim5", clip=False, seed=24),
    # (e) DDPM (the paper's eq. 13 update) with the unconditional model's learned variance
    "e_ddpm_learned_sigma": dict(
        experts=[dict(model="sketch", image=N, weight=1.0),
                 dict(model="text", embedding=1, weight=0.8)],
        uncond=dict(model="uncond"), respacing="10", clip=True, seed=25, sampler="ddpm"),
    # (f) DDPM with a fixed (large) variance: unconditional term `classes`, null class 4
    "f_ddpm_fixed_sigma": dict(
        experts=[dict(model="classes", cls=2, weight=1.5)],
        uncond=dict(model="classes", cls=4), respacing="8", clip=False, seed=26, sampler="ddpm"),
    # (g) DDIM with eta 0.6: noise at every step but the last
    "g_ddim_eta": dict(
        experts=[dict(model="classes", cls=0, weight=1.0)],
        uncond=dict(model="uncond"), respacing="ddim10", clip=True, seed=27, eta=0.6),
    # (h) one model, two prompts: text (one per sample) AND NOT text (shared); both run as one
    # batched forward whose embeddings are packed term by term
    "h_text_not_text": dict(
        experts=[dict(model="text", embedding=N, weight=1.0),
                 dict(model="text", embedding=1, weight=-0.6)],
        uncond=dict(model="uncond"), respacing="ddim6", clip=True, seed=28),
    # (i) a 3-channel image condition (one per sample) with a shared 1-channel one, DDPM
    "i_segment_sketch": dict(
        experts=[dict(model="segment", image=N, weight=1.0),
                 dict(model="sketch", image=1, weight=0.5)],
        uncond=dict(model="uncond"), respacing="6", clip=True, seed=29, sampler="ddpm"),
    # (j) an image-conditioned model as its own unconditional term: no condition, so zeros
    # stand in for the image (the null condition the experts were trained with)
    "j_sketch_zero_uncond": dict(
        experts=[dict(model="sketch", image=N, weight=1.5)],
        uncond=dict(model="sketch"), respacing="ddim6", clip=True, seed=30),
    # The multistep solvers, driven by diffusers' schedulers (respacing: the number of steps):
    # (k) DPM-Solver++(2M), eq. 12 with a learned-sigma unconditional model, clipped
    "k_dpmpp2m_sketch_text": dict(
        experts=[dict(model="sketch", image=N, weight=1.0),
                 dict(model="text", embedding=1, weight=0.8)],
        uncond=dict(model="uncond"), respacing="10", clip=True, seed=31, sampler="dpmpp-2m"),
    # (l) DPM-Solver++(3M) on Karras sigmas: a class term against a null class, NOT sketch
    "l_dpmpp3m_karras_cfg": dict(
        experts=[dict(model="classes", cls=1, weight=2.0),
                 dict(model="sketch", image=1, weight=-0.5)],
        uncond=dict(model="classes", cls=4), respacing="12", clip=False, seed=32, sampler="dpmpp-3m",
        karras=True),
    # (m) UniPC: text AND NOT text, clipped
    "m_unipc_text_not_text": dict(
        experts=[dict(model="text", embedding=N, weight=1.0),
                 dict(model="text", embedding=1, weight=-0.6)],
        uncond=dict(model="uncond"), respacing="8", clip=True, seed=33, sampler="unipc"),
    # (n) UniPC on a cosine schedule, not clipped (Karras sigmas of this 100-step cosine chain
    # round their first two timesteps to the same one, where diffusers starts at step 1)
    "n_unipc_cosine": dict(
        experts=[], uncond=dict(model="uncond_cosine"), respacing="7", clip=False, seed=34,
        sampler="unipc"),
    # (p) UniPC on Karras sigmas, a learned-sigma unconditional model and a segment expert
    "p_unipc_karras_segment": dict(
        experts=[dict(model="segment", image=N, weight=1.2)],
        uncond=dict(model="uncond"), respacing="6", clip=True, seed=36, sampler="unipc", karras=True),
    # (o) DPM-Solver++(3M), 16 steps of a cosine schedule: third order without the last steps'
    # lower orders of short runs
    "o_dpmpp3m_cosine_16": dict(
        experts=[], uncond=dict(model="uncond_cosine"), respacing="16", clip=True, seed=35,
        sampler="dpmpp-3m"),
    # (q) UniPC with a model that predicts x_0 (diffusers' prediction_type "sample")
    "q_unipc_predict_xstart": dict(
        experts=[], uncond=dict(model="xstart"), respacing="6", clip=True, seed=37, sampler="unipc"),
}
SOLVERS = ("dpmpp-2m", "dpmpp-3m", "unipc")

# mcdm's step noise (src/rng.rs): element e of image k at spaced step i is normal e % 4 of
# Philox4x32-10 block [e / 4, k, i, 0] under key [seed low, seed high]; words (w0, w1) and
# (w2, w3) each make a Box-Muller pair from u = ((a >> 8) + 1) 2^-24 and v = (b >> 8) 2^-24.
PHILOX_M = (0xD2511F53, 0xCD9E8D57)
PHILOX_W = (0x9E3779B9, 0xBB67AE85)
MASK32 = np.uint64(0xFFFFFFFF)


def philox4x32_10(counter, key):
    c = [np.asarray(w, dtype=np.uint64) for w in counter]
    k = [np.uint64(w) for w in key]
    for r in range(10):
        if r > 0:
            k = [(k[0] + np.uint64(PHILOX_W[0])) & MASK32, (k[1] + np.uint64(PHILOX_W[1])) & MASK32]
        p0 = np.uint64(PHILOX_M[0]) * c[0]
        p1 = np.uint64(PHILOX_M[1]) * c[2]
        c = [(p1 >> np.uint64(32)) ^ c[1] ^ k[0], p1 & MASK32,
             (p0 >> np.uint64(32)) ^ c[3] ^ k[1], p0 & MASK32]
    return c


def mcdm_normals(seed, image, step, count):
    blocks = np.arange((count + 3) // 4, dtype=np.uint64)
    z = np.zeros_like(blocks)
    w = philox4x32_10([blocks, z + image, z + step, z], [seed & 0xFFFFFFFF, seed >> 32])
    out = np.empty((len(blocks), 4))
    for pair, (a, b) in enumerate([(w[0], w[1]), (w[2], w[3])]):
        u = ((a >> np.uint64(8)) + np.uint64(1)).astype(np.float64) * 2.0**-24
        v = (b >> np.uint64(8)).astype(np.float64) * 2.0**-24
        r = np.sqrt(-2.0 * np.log(u))
        out[:, 2 * pair] = r * np.cos(2 * np.pi * v)
        out[:, 2 * pair + 1] = r * np.sin(2 * np.pi * v)
    return out.reshape(-1)[:count]


@contextlib.contextmanager
def mcdm_step_noise(seed, num_steps):
    """Makes th.randn_like (called once per step by p_sample and ddim_sample, from spaced step
    num_steps - 1 down to 0) return mcdm's noise of that step, image k of the batch = key k."""
    calls = []
    original = th.randn_like

    def randn_like(x):
        step = num_steps - 1 - len(calls)
        calls.append(step)
        n, per_image = x.shape[0], x[0].numel()
        noise = np.stack([mcdm_normals(seed, k, step, per_image) for k in range(n)])
        return th.from_numpy(noise).to(x.dtype).reshape(x.shape)

    th.randn_like = randn_like
    try:
        yield calls
    finally:
        th.randn_like = original


def write_models(out_dir):
    mdir = os.path.join(out_dir, "models")
    os.makedirs(mdir, exist_ok=True)
    rows = []
    for name, (cfg, seed) in MODELS.items():
        cfg = gd_model.full_config(cfg)
        model = gd_model.randomize(gd_model.build_model(cfg), seed)
        size = gd_model.save_weights(model, cfg, os.path.join(mdir, f"{name}.safetensors"), "f16")
        rows.append((name, gd_model.count_params(model), size))
    return rows


def load_models(out_dir):
    return {name: gd_model.load_weights(os.path.join(out_dir, "models", f"{name}.safetensors"))
            for name in MODELS}


def run_case(name, case, models, out_dir):
    g = th.Generator().manual_seed(case["seed"])
    x_T = th.randn(N, 3, SIZE, SIZE, generator=g)
    tensors = {"x_T": x_T}

    def term(spec, idx):
        """Returns (model, description dict, kwargs builder) for one row of the composition."""
        model, cfg = models[spec["model"]]
        desc = {"model": spec["model"]}
        image = emb = y = None
        if "cls" in spec:
            desc["class"] = spec["cls"]
            y = th.full((N,), spec["cls"], dtype=th.int64)
        if "image" in spec:
            c = cfg["in_channels"] - 3
            image = th.rand(spec["image"], c, SIZE, SIZE, generator=g) * 2 - 1
            tensors[f"cond.{idx}"] = image
            desc["image"] = f"cond.{idx}"
        if "embedding" in spec:
            emb = th.randn(spec["embedding"], cfg["embed_dim"], generator=g)
            tensors[f"emb.{idx}"] = emb
            desc["embedding"] = f"emb.{idx}"
        if "weight" in spec:
            desc["weight"] = spec["weight"]

        if image is None and cfg["in_channels"] > 3:
            image = th.zeros(1, cfg["in_channels"] - 3, SIZE, SIZE)

        def call(x, t):
            inp = x if image is None else th.cat([x, image.expand(x.shape[0], -1, -1, -1)], dim=1)
            e = None if emb is None else emb.expand(x.shape[0], -1)
            return model(inp, t, y=y, emb=e)

        return desc, call, spec.get("weight")

    experts = [term(s, i) for i, s in enumerate(case["experts"])]
    u_desc, u_call, _ = term(case["uncond"], "u")
    assert "image" not in case["uncond"] and "embedding" not in case["uncond"]
    assert models[case["uncond"]["model"]][1].get("embed_dim") is None, "zero embeddings: untested"
    u_cfg = models[case["uncond"]["model"]][1]
    seen_t = []

    def model_fn(x, t):
        seen_t.append(int(t[0]))
        assert (t == t[0]).all()
        out_u = u_call(x, t)
        eps_u = out_u[:, :3]
        eps = eps_u
        for _, call, w in experts:
            eps = eps + w * (call(x, t)[:, :3] - eps_u)
        if out_u.shape[1] > 3:
            return th.cat([eps, out_u[:, 3:]], dim=1)
        return eps

    diffusion = create_gaussian_diffusion(
        steps=u_cfg["diffusion_steps"],
        learn_sigma=u_cfg["learn_sigma"],
        sigma_small=u_cfg["sigma_small"],
        noise_schedule=u_cfg["noise_schedule"],
        use_kl=u_cfg["use_kl"],
        predict_xstart=u_cfg["predict_xstart"],
        rescale_timesteps=u_cfg["rescale_timesteps"],
        rescale_learned_sigmas=u_cfg["rescale_learned_sigmas"],
        timestep_respacing=case["respacing"],
    )
    for _, (c, _s) in MODELS.items():  # one length for all models
        assert c["diffusion_steps"] == u_cfg["diffusion_steps"]
    sampler, eta = case.get("sampler", "ddim"), case.get("eta", 0.0)
    if sampler in SOLVERS:
        traj, seen_t = run_solver(case, u_cfg, diffusion, model_fn, x_T)
        samples = traj[-1]
        steps = len(traj)
        return finish(name, case, tensors, traj, seen_t, samples, experts, u_desc, sampler, eta, out_dir)
    noisy = sampler == "ddpm" or eta != 0.0
    kwargs = dict(clip_denoised=case["clip"], device=th.device("cpu"), progress=False)
    if sampler == "ddim":
        kwargs["eta"] = eta
    loop = diffusion.p_sample_loop if sampler == "ddpm" else diffusion.ddim_sample_loop
    progressive = (diffusion.p_sample_loop_progressive if sampler == "ddpm"
                   else diffusion.ddim_sample_loop_progressive)
    th.manual_seed(case["seed"])  # ddim_sample draws (unused, eta = 0) noise from the global RNG
    def step_noise():
        if noisy:
            return mcdm_step_noise(case["seed"], diffusion.num_timesteps)
        return contextlib.nullcontext([])

    traj = []
    with th.no_grad():
        with step_noise() as calls:
            for step in progressive(model_fn, (N, 3, SIZE, SIZE), noise=x_T.clone(), **kwargs):
                traj.append(step["sample"])
        # The reference draws noise at every step, the last included (and then masks it out).
        assert calls == list(range(diffusion.num_timesteps))[::-1] or not noisy, calls
        with step_noise():
            samples = loop(model_fn, (N, 3, SIZE, SIZE), noise=x_T.clone(), **kwargs)
    assert len(seen_t) == 2 * len(traj)
    assert th.equal(samples, traj[-1]), "ddim_sample_loop and its progressive form disagree"
    return finish(name, case, tensors, traj, seen_t[:len(traj)], samples, experts, u_desc, sampler, eta,
                  out_dir)


def run_solver(case, u_cfg, diffusion, model_fn, x_T):
    """diffusers' DPMSolverMultistepScheduler / UniPCMultistepScheduler as mcdm's contract names
    them (README, `mcdm sample --help`), with the model's betas, on the composed eps."""
    from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler
    from guided_diffusion.gaussian_diffusion import get_named_beta_schedule

    betas = get_named_beta_schedule(u_cfg["noise_schedule"], u_cfg["diffusion_steps"])
    common = dict(num_train_timesteps=u_cfg["diffusion_steps"], trained_betas=betas.tolist(),
                  prediction_type="sample" if u_cfg["predict_xstart"] else "epsilon",
                  timestep_spacing="linspace", lower_order_final=True,
                  final_sigmas_type="zero", use_karras_sigmas=case.get("karras", False),
                  thresholding=case["clip"], sample_max_value=1.0)
    sampler = case["sampler"]
    if sampler == "unipc":
        sched = UniPCMultistepScheduler(**common, solver_order=2, solver_type="bh2", predict_x0=True)
    else:
        sched = DPMSolverMultistepScheduler(**common, solver_order=2 if sampler == "dpmpp-2m" else 3,
                                            algorithm_type="dpmsolver++", solver_type="midpoint")
    sched.set_timesteps(int(case["respacing"]))
    x = x_T.clone() * sched.init_noise_sigma
    traj, seen_t = [], []
    with th.no_grad():
        for t in sched.timesteps:
            seen_t.append(int(t))
            eps = model_fn(x, t.expand(x.shape[0]))[:, :3]
            x = sched.step(eps, t, x).prev_sample
            traj.append(x)
    return traj, seen_t


def finish(name, case, tensors, traj, seen_t, samples, experts, u_desc, sampler, eta, out_dir):
    steps = len(traj)
    assert th.isfinite(samples).all()
    tensors["samples"] = samples
    tensors["trajectory"] = th.stack(traj)
    tensors["timesteps"] = th.tensor(seen_t, dtype=th.int64)

    used = [case["uncond"]["model"]] + [s["model"] for s in case["experts"]]
    desc = {
        "models": {m: f"models/{m}.safetensors" for m in dict.fromkeys(used)},
        "experts": [d for d, _, _ in experts],
        "uncond": u_desc,
        "sampler": sampler,
        "eta": eta,
        "karras": case.get("karras", False),
        "seed": case["seed"],
        "timestep_respacing": case["respacing"],
        "clip_denoised": case["clip"],
    }
    path = os.path.join(out_dir, f"{name}.safetensors")
    gd_model.save_safetensors(tensors, path, metadata={"case": name})
    gd_model.atomic_write_bytes(os.path.join(out_dir, f"{name}.json"),
                                (json.dumps(desc, indent=2) + "\n").encode())
    back = load_file(path)
    assert all(th.equal(back[k], v) for k, v in tensors.items())
    return dict(case=name, steps=steps, timesteps=seen_t, bytes=os.path.getsize(path),
                absmax=float(samples.abs().max()), std=float(samples.std()),
                keys={k: tuple(v.shape) for k, v in tensors.items()})


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ap.add_argument("--out", default=os.path.join(root, "tests", "fixtures", "sample"))
    ap.add_argument("--case", action="append", choices=sorted(CASES),
                    help="make only this case (repeatable; default: all)")
    args = ap.parse_args()
    th.set_num_threads(max(1, os.cpu_count() or 1))
    os.makedirs(args.out, exist_ok=True)
    for name, params, size in write_models(args.out):
        print(f"model {name:8} params {params:7d} bytes {size}")
    models = load_models(args.out)  # the float32 models with the stored (f16-rounded) weights
    for name, case in CASES.items():
        if args.case and name not in args.case:
            continue
        r = run_case(name, case, models, args.out)
        print(f"case {r['case']:24} steps {r['steps']:2d} t {r['timesteps']} bytes {r['bytes']} "
              f"|samples|max {r['absmax']:.3f} std {r['std']:.3f}")
        print(f"    tensors {r['keys']}")


if __name__ == "__main__":
    main()
