"""Type stubs of mcdm's native module (python/src/lib.rs)."""

import os
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import numpy as np
import numpy.typing as npt

__version__: str

PathLike = Union[str, os.PathLike]
ArrayLike = npt.ArrayLike
Term = Union[str, Mapping[str, Any]]
"""A term: ``"NAME[,class=K][,image=PATH][,embedding=PATH][,weight=W][,text=PROMPT]"`` or a dict
with ``model`` and any of ``class``, ``image``, ``embedding``, ``text``, ``weight``."""

class Model:
    """A diffusion model on a device (``load_model``)."""

    @property
    def config(self) -> dict:
        """The resolved config: guided-diffusion's flags plus mcdm's extensions."""
    @property
    def device(self) -> str:
        """``cpu`` or ``cuda:N (name)``."""
    @property
    def dtype(self) -> str:
        """The storage type on a GPU (``f32`` on the CPU)."""
    @property
    def path(self) -> str:
        """The file (or folder) the weights came from."""
    @property
    def parameters(self) -> int:
        """Number of parameters."""
    def forward(
        self,
        x: ArrayLike,
        t: ArrayLike,
        y: Optional[ArrayLike] = None,
        emb: Optional[ArrayLike] = None,
    ) -> npt.NDArray[np.float32]:
        """The UNet's output for ``x`` [N, C, H, W] at timesteps ``t`` [N] (the values the network
        sees), with class labels ``y`` [N] or vector conditions ``emb`` [N, D] for models that take
        them: float32 [N, out_channels, H, W]."""

class Job:
    """A job file (``load_job``)."""

    @property
    def path(self) -> str: ...
    @property
    def models(self) -> list[tuple[str, str]]:
        """Model names and paths."""
    @property
    def settings(self) -> dict:
        """The sampling settings the file gives (the others are absent)."""

def load_model(
    path: PathLike,
    config: Optional[PathLike] = None,
    device: str = "auto",
    dtype: str = "bf16",
) -> Model:
    """Loads a model (safetensors, PyTorch ``.pt``, or a diffusers UNet2DModel folder) with its
    config (``config``, else ``<stem>.json``, the file's metadata, inference from the weights)
    onto ``device`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``), stored as ``dtype`` (``bf16``,
    ``f16``, ``f32``) on a GPU."""

def load_job(path: PathLike) -> Job:
    """Reads a job file (``examples/default.json``, a run's ``record.json``, ...)."""

def sample(
    models: Optional[Mapping[str, PathLike]] = None,
    experts: Optional[Sequence[Term]] = None,
    uncond: Optional[Term] = None,
    *,
    job: Optional[Union[Job, PathLike]] = None,
    sampler: Optional[str] = None,
    steps: Optional[int] = None,
    timestep_respacing: Optional[str] = None,
    eta: Optional[float] = None,
    karras: Optional[bool] = None,
    clip_denoised: Optional[bool] = None,
    num_samples: Optional[int] = None,
    batch_size: Optional[int] = None,
    seed: Optional[int] = None,
    init_noise: Optional[Union[ArrayLike, PathLike]] = None,
    device: str = "auto",
    dtype: str = "bf16",
    text_model: Optional[PathLike] = None,
    progress: Optional[Callable[[int, int, int, int], Any]] = None,
) -> npt.NDArray[np.float32]:
    """Samples a composition as ``mcdm sample`` does and returns float32 [N, 3, H, W] in [-1, 1].

    Defaults as the CLI's: sampler ``ddim``, the unconditional model's steps (else 50), clip on,
    seed 0, 4 images in batches of up to 16 (CPU) or 64 (GPU). ``sampler``: ddpm, ddim,
    dpmpp-2m, dpmpp-3m, unipc. ``init_noise``: x_T as an array [N, 3, H, W] or a safetensors file
    holding ``x_T``. ``progress(first, batch, step, steps)`` is called after every step of every
    batch (images ``first .. first + batch``, ``step`` of ``steps`` done); an exception it
    raises stops the run and propagates."""

def encode_text(texts: Sequence[str], text_model: Optional[PathLike] = None) -> npt.NDArray[np.float32]:
    """Sentence embeddings [len(texts), D] of the text expert's encoder (MiniLM), on the CPU."""

def save_grid(images: ArrayLike, path: PathLike, columns: Optional[int] = None) -> None:
    """Writes ``images`` [N, 3, H, W] in [-1, 1] as one PNG grid (default: as square as it gets),
    quantised as the reference scripts do; the file appears whole or not at all."""
