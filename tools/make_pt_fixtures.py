"""Makes the PyTorch checkpoint fixtures (tests/fixtures/pt/) with torch.save itself, for mcdm's
reader of `.pt` files (src/weights/pt.rs), which must find in them the same numbers as in the
safetensors file they were made from.

  uncond_f16.pt      the state_dict of guided-diffusion's UNetModel holding the weights of
                     tests/fixtures/sample/models/uncond.safetensors (f16), as
                     `model.half().state_dict()` saves it (with its `_metadata`)
  uncond_wrapped.pt  the same tensors as {"model": {"module.<name>": ...}, "step": 1200,
                     "args": {...}}, as training scripts save them
  small.pt           f32, bf16 and i64 tensors, one a view at an offset of a larger storage,
                     and small.safetensors with the same tensors (safetensors' own writer)
  short.pt           small.pt with the storage of `a` cut to 16 bytes: refused
  transposed.pt      a non-contiguous (transposed) tensor: refused
  evil.pt            a checkpoint whose pickle calls os.system: refused, nothing runs

    python tools/make_pt_fixtures.py
"""

import collections
import os
import sys
import zipfile

import torch as th
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gd_model  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "pt")


class Evil:
    def __reduce__(self):
        return (os.system, ("echo this must never run",))


def main():
    os.makedirs(OUT, exist_ok=True)
    src = os.path.join(ROOT, "tests", "fixtures", "sample", "models", "uncond.safetensors")
    model, _ = gd_model.load_weights(src)
    sd = model.half().state_dict()
    stored = load_file(src)
    assert all(th.equal(sd[k], stored[k]) for k in stored), "f16 round trip"
    assert hasattr(sd, "_metadata")
    th.save(sd, os.path.join(OUT, "uncond_f16.pt"))
    th.save({"model": collections.OrderedDict(("module." + k, v) for k, v in sd.items()),
             "step": 1200, "args": {"lr": 1e-4, "ema": True}},
            os.path.join(OUT, "uncond_wrapped.pt"))
    g = th.Generator().manual_seed(0)
    big = th.randn(40, generator=g)
    small = {"a": big[8:20].view(3, 4), "b": th.randn(5, generator=g).bfloat16(),
             "steps": th.arange(4, dtype=th.int64) * 7, "scalar": th.tensor(2.5)}
    th.save(small, os.path.join(OUT, "small.pt"))
    save_file({k: v.contiguous() for k, v in small.items()}, os.path.join(OUT, "small.safetensors"))
    with zipfile.ZipFile(os.path.join(OUT, "small.pt")) as src_zip, \
            zipfile.ZipFile(os.path.join(OUT, "short.pt"), "w", zipfile.ZIP_STORED) as short:
        for info in src_zip.infolist():
            data = src_zip.read(info)
            short.writestr(info.filename.replace("small/", "short/", 1),
                           data[:16] if info.filename.endswith("/data/0") else data)
    th.save({"t": th.randn(3, 2, generator=g).t()}, os.path.join(OUT, "transposed.pt"))
    th.save({"w": Evil()}, os.path.join(OUT, "evil.pt"))
    for name in sorted(os.listdir(OUT)):
        print(f"{name:20} {os.path.getsize(os.path.join(OUT, name)):8d} bytes")


if __name__ == "__main__":
    main()
