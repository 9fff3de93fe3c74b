"""Reference fixtures for tests/diffusion.rs, from OpenAI's guided_diffusion.

Run with the reference environment (guided_diffusion, torch, numpy, safetensors):

    /opt/gdenv/bin/python tools/make_diffusion_fixtures.py

Writes, under tests/fixtures/diffusion/:
  tables_<name>.safetensors  f64 tables, the unspaced schedule's betas, the timestep map and
                             the model timesteps of one create_gaussian_diffusion(...) setting
                             (given in the file's metadata);
  steps.safetensors          single ddim_sample / p_sample updates with given x, model output
                             and noise; metadata "cases" is a JSON list describing each case;
  respacing.json             space_timesteps results and errors for many specs.
"""

import json
import os

import numpy as np
import torch as th
from safetensors.numpy import save_file

from guided_diffusion import gaussian_diffusion as gd
from guided_diffusion.respace import space_timesteps
from guided_diffusion.script_util import create_gaussian_diffusion

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "diffusion")

TABLE_NAMES = [
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
]


def make(steps, schedule, respacing, rescale=False, learn_sigma=False, sigma_small=False,
         predict_xstart=False):
    return create_gaussian_diffusion(
        steps=steps,
        noise_schedule=schedule,
        timestep_respacing=respacing,
        rescale_timesteps=rescale,
        learn_sigma=learn_sigma,
        sigma_small=sigma_small,
        predict_xstart=predict_xstart,
    )


def model_timesteps(diffusion):
    """What the network receives at every spaced step (through SpacedDiffusion's wrapper)."""
    seen = {}

    def model(x, ts, **kwargs):
        seen["ts"] = ts
        return x

    wrapped = diffusion._wrap_model(model)
    n = diffusion.num_timesteps
    wrapped(th.zeros(n, 1), th.arange(n))
    return seen["ts"].float().numpy()


def write_tables():
    combos = [
        ("linear_1000_full", 1000, "linear", "", False),
        ("linear_1000_ddim10_rescale", 1000, "linear", "ddim10", True),
        ("linear_1000_25", 1000, "linear", "25", False),
        ("cosine_1000_sections", 1000, "cosine", "10,10,5", False),
        ("cosine_100_sections_rescale", 100, "cosine", "10,10,5", True),
        ("linear_100_ddim10", 100, "linear", "ddim10", False),
        ("cosine_4000_250_rescale", 4000, "cosine", "250", True),
        ("linear_300_ddim30_rescale", 300, "linear", "ddim30", True),
        ("cosine_50_full", 50, "cosine", "", False),
    ]
    for name, steps, schedule, respacing, rescale in combos:
        d = make(steps, schedule, respacing, rescale)
        tensors = {k: np.ascontiguousarray(getattr(d, k), dtype=np.float64) for k in TABLE_NAMES}
        tensors["schedule_betas"] = gd.get_named_beta_schedule(schedule, steps).astype(np.float64)
        tensors["timestep_map"] = np.asarray(d.timestep_map, dtype=np.int64)
        tensors["model_timesteps"] = model_timesteps(d).astype(np.float32)
        meta = {
            "diffusion_steps": str(steps),
            "noise_schedule": schedule,
            "timestep_respacing": respacing,
            "rescale_timesteps": str(rescale).lower(),
        }
        save_file(tensors, os.path.join(OUT, f"tables_{name}.safetensors"), metadata=meta)


class FixedModel:
    """Returns a fixed output whatever it is given, like a network frozen at one call."""

    def __init__(self, out):
        self.out = out

    def __call__(self, x, ts, **kwargs):
        return self.out


def run_with_noise(fn, noise):
    """Calls fn with th.randn_like returning `noise`, the way the reference draws it."""
    original = th.randn_like
    th.randn_like = lambda x, *a, **k: noise.clone()
    try:
        return fn()
    finally:
        th.randn_like = original


def write_steps():
    rng = np.random.default_rng(20240611)
    shape = (2, 3, 4, 4)

    def randn(scale=1.0):
        return th.from_numpy((rng.standard_normal(shape) * scale).astype(np.float32))

    settings = [
        # name, diffusion kwargs
        ("eps_large", dict(steps=1000, schedule="linear", respacing="50")),
        ("eps_small", dict(steps=1000, schedule="linear", respacing="ddim25", sigma_small=True)),
        ("eps_learned", dict(steps=1000, schedule="linear", respacing="25", learn_sigma=True)),
        ("x0_learned", dict(steps=1000, schedule="cosine", respacing="ddim10", learn_sigma=True,
                            predict_xstart=True)),
        ("x0_large", dict(steps=100, schedule="cosine", respacing="10,10,5", predict_xstart=True)),
    ]
    tensors = {}
    cases = []
    for setting, kw in settings:
        d = make(kw["steps"], kw["schedule"], kw["respacing"],
                 learn_sigma=kw.get("learn_sigma", False),
                 sigma_small=kw.get("sigma_small", False),
                 predict_xstart=kw.get("predict_xstart", False))
        n = d.num_timesteps
        config = {
            "diffusion_steps": kw["steps"],
            "noise_schedule": kw["schedule"],
            "timestep_respacing": kw["respacing"],
            "learn_sigma": kw.get("learn_sigma", False),
            "sigma_small": kw.get("sigma_small", False),
            "predict_xstart": kw.get("predict_xstart", False),
        }
        for i in sorted({0, 1, n // 2, n - 1}):
            kinds = [("ddpm", None)]
            # DDIM with a learned variance ignores it; still exercise the predict_xstart path.
            kinds += [("ddim", 0.0), ("ddim", 0.5)]
            for kind, eta in kinds:
                for clip in (False, True):
                    name = f"{setting}_{kind}_{i}_{'clip' if clip else 'noclip'}"
                    if eta is not None:
                        name += f"_eta{eta}"
                    # Images near the data range at low t, larger at high t, so clipping bites.
                    x = randn(1.0 + 2.0 * i / n)
                    eps = randn()
                    noise = randn()
                    v = th.from_numpy(rng.uniform(-1.2, 1.2, shape).astype(np.float32))
                    out = th.cat([eps, v], dim=1) if config["learn_sigma"] else eps
                    t = th.tensor([i] * shape[0])
                    model = FixedModel(out)
                    if kind == "ddpm":
                        res = run_with_noise(
                            lambda: d.p_sample(model, x, t, clip_denoised=clip), noise)
                    else:
                        res = run_with_noise(
                            lambda: d.ddim_sample(model, x, t, clip_denoised=clip, eta=eta), noise)
                    tensors[f"{name}.x"] = x.numpy()
                    tensors[f"{name}.model_out"] = eps.numpy()
                    if config["learn_sigma"] and kind == "ddpm":
                        tensors[f"{name}.v"] = v.numpy()
                    tensors[f"{name}.noise"] = noise.numpy()
                    tensors[f"{name}.sample"] = res["sample"].numpy()
                    tensors[f"{name}.pred_xstart"] = res["pred_xstart"].numpy()
                    cases.append({
                        "name": name,
                        "kind": kind,
                        "index": i,
                        "eta": eta,
                        "clip_denoised": clip,
                        "config": config,
                    })
    # pred_xstart may be a strided view of the model output; safetensors needs C order.
    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    save_file(tensors, os.path.join(OUT, "steps.safetensors"),
              metadata={"cases": json.dumps(cases), "shape": json.dumps(list(shape))})


def write_respacing():
    specs = {
        1000: ["", "1000", "250", "100", "50", "25", "10", "7", "1", "ddim10", "ddim25", "ddim50",
               "ddim100", "ddim250", "ddim7", "ddim3", "ddim1000", "ddim999", "ddim1", "ddim0",
               "ddim", "ddimx", "ddim-5", "ddim1001", "10,10,5", "100,50,10,5", "3,3,3,3,3,3,3",
               "500,500", "501,499", "333,334,333", "334,333,333", "abc", "0", "1001", "10,,5",
               " 10", "10 ", "+10", "-5", "10,0", "0,0", "1_0", "1__0", "_10", "10_", "2.5",
               "ddim 10", "1e2", "999,1"],
        100: ["", "10,10,5", "ddim10", "ddim33", "ddim34", "ddim51", "ddim50", "100", "101",
              "33,33,34", "34,33,33", "7,7,7,7,7,7,7"],
        300: ["ddim30", "ddim7", "40", "17,19,23", "299"],
        7: ["3,3", "1,1,1,1,1,1,1", "ddim3", "ddim4", "ddim2", "ddim7", "2,2,2,2,2,2,2,2", "7"],
    }
    out = []
    for steps, spec_list in specs.items():
        for spec in spec_list:
            entry = {"num_timesteps": steps, "spec": spec}
            try:
                # create_gaussian_diffusion turns "" into all steps before calling space_timesteps.
                kept = space_timesteps(steps, spec if spec else [steps])
                entry["space"] = sorted(int(s) for s in kept)
            except Exception as e:  # noqa: BLE001 - the reference raises ValueError
                entry["space_error"] = f"{type(e).__name__}: {e}"
            # The linear schedule's betas exceed 1 below 20 steps; cosine fits any length.
            entry["noise_schedule"] = "cosine" if steps < 20 else "linear"
            try:
                d = make(steps, entry["noise_schedule"], spec)
                entry["timestep_map"] = [int(s) for s in d.timestep_map]
            except Exception as e:  # noqa: BLE001 - IndexError/AssertionError for < 2 steps
                entry["create_error"] = f"{type(e).__name__}: {e}"
            out.append(entry)
    # One case per line keeps the file small and diffable.
    with open(os.path.join(OUT, "respacing.json"), "w") as f:
        f.write("[\n" + ",\n".join(json.dumps(e) for e in out) + "\n]\n")


def main():
    os.makedirs(OUT, exist_ok=True)
    write_tables()
    write_steps()
    write_respacing()


if __name__ == "__main__":
    main()
