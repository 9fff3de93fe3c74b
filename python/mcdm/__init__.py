"""mcdm: multi-modal composition of diffusion models, from Python.

Several diffusion experts, each conditioned on its own modality, are combined at every sampling
step into one product of experts, ``eps = eps_u + sum_i w_i (eps_i - eps_u)``, then the sampler's
update. This package is mcdm's Rust engine (CPU, and CUDA on a GPU) as a native module: numpy
arrays in and out, the GIL released while networks run.

    import mcdm
    images = mcdm.sample(num_samples=8, seed=1)          # the default job: SynthFaces experts
    mcdm.save_grid(images, "grid.png")

    images = mcdm.sample(
        models={"u": "weights/uncond.safetensors", "c": "weights/text.safetensors"},
        uncond="u",
        experts=[{"model": "c", "text": "a smiling woman with red hair", "weight": 1.5}],
        sampler="dpmpp-2m", steps=15, num_samples=4, seed=0,
    )                                                    # float32 [4, 3, 32, 32] in [-1, 1]

    model = mcdm.load_model("weights/uncond.safetensors", device="cpu")
    eps = model.forward(x, t)                            # [N, 3, H, W] -> [N, out_channels, H, W]

``sample`` follows ``mcdm sample``: the same settings give the same images, bit for bit on the
CPU. Terms are the CLI's specs (``"sketch,image=s.png,weight=1.5"``) or dicts with the keys of a
job file's terms. A job (``load_job(path)`` or a path) gives models, terms and settings; keywords
override them as the CLI's flags do (``experts`` replaces all of the job's, a ``sampler`` drops
the job's DDIM ``eta``). Without a job, models or terms, the default job
(``examples/default.json``) runs; without a job, the shipped models answer to their names
(``uncond``, ``sketch``, ``segment``, ``text``).

Errors raise ValueError for bad input (with the library's message), FileNotFoundError / OSError
for files, MemoryError when a device runs out of memory and RuntimeError for GPU failures;
warnings (defaulted config fields, unused models, ...) are ``UserWarning``. Ctrl-C stops a run
between steps with KeyboardInterrupt.
"""

from ._mcdm import (
    Job,
    Model,
    __version__,
    encode_text,
    load_job,
    load_model,
    sample,
    save_grid,
)

__all__ = [
    "Job",
    "Model",
    "__version__",
    "encode_text",
    "load_job",
    "load_model",
    "sample",
    "save_grid",
]
