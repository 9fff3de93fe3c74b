"""Compose the shipped SynthFaces experts from Python and save the samples as grids.

    pip install .                      # in the mcdm checkout: builds the `mcdm` package
    python examples/python/compose.py  # -> out/python/default.png, out/python/text-only.png, ...

Each section is one notebook cell's worth: the default job, one expert with a prompt and a
negative weight, and your own initial noise with a progress callback.
"""

import argparse
from pathlib import Path

import numpy as np

import mcdm

ROOT = Path(__file__).resolve().parents[2]

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--out", type=Path, default=Path("out/python"))
parser.add_argument("--steps", type=int, default=None, help="default: the job's (DDPM 50)")
parser.add_argument("--num-samples", type=int, default=8)
parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
args = parser.parse_args()
args.out.mkdir(parents=True, exist_ok=True)
run = dict(steps=args.steps, num_samples=args.num_samples, device=args.device)

# 1. The default job: sketch + segmentation + text experts with the unconditional model, on
#    held-back conditions (examples/default.json), as `mcdm sample` runs it.
images = mcdm.sample(**run)
print(f"default job: {images.shape} {images.dtype}, values in [{images.min():.2f}, {images.max():.2f}]")
mcdm.save_grid(images, args.out / "default.png")

# 2. The text expert on prompts encoded here, the sketch expert's condition negated: eq. 12 with
#    w = (1.5, -0.5). The shipped models answer to their names without a job.
prompts = ["a smiling woman with long red hair", "an old man with a grey beard"]
embeddings = mcdm.encode_text(prompts)
print(f"prompt embeddings: {embeddings.shape}")
images = mcdm.sample(
    uncond="uncond",
    experts=[
        {"model": "text", "text": prompts[0], "weight": 1.5},
        {"model": "sketch", "image": ROOT / "examples" / "sketch.safetensors", "weight": -0.5},
    ],
    sampler="dpmpp-2m",
    steps=args.steps or 20,
    num_samples=args.num_samples,
    seed=3,
    device=args.device,
)
mcdm.save_grid(images, args.out / "text-not-sketch.png")

# 3. Your own x_T (one noise for every image: the composition alone varies) and a progress bar.
noise = np.repeat(np.random.default_rng(0).standard_normal((1, 3, 32, 32)), args.num_samples, axis=0)


def progress(first, batch, step, steps):
    print(f"\rimages {first}..{first + batch - 1}: step {step}/{steps}", end="", flush=True)


images = mcdm.sample(init_noise=noise, progress=progress, **run)
print()
mcdm.save_grid(images, args.out / "shared-noise.png")
print(f"grids in {args.out}/")
