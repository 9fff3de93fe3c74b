"""Shared helpers for mcdm's reference tools: build, randomise, save and load guided-diffusion UNets.

Usage (as a library, from the other scripts in tools/):

    import gd_model
    cfg = gd_model.full_config({"image_size": 16, "num_channels": 32, "channel_mult": "1,2"})
    model = gd_model.build_model(cfg)            # reference UNetModel (+ mcdm extensions), eval mode
    gd_model.randomize(model, seed=0)            # every parameter gets fresh random values
    gd_model.save_weights(model, cfg, "m.safetensors", "f16")  # rounds the model's weights in place
    out = gd_model.forward(model, x, t, y=None, emb=None)      # float32 reference forward

    python tools/gd_model.py --help              # self-check: builds one model per option and runs it

Config: a flat JSON object in guided-diffusion's script flag names (`model_and_diffusion_defaults()`
plus `sigma_small`, `use_checkpoint`) and mcdm's extensions:
  in_channels  (default 3; extra channels are image conditions concatenated after x_t),
  num_classes  (default 1000 when class_cond; only allowed with class_cond),
  embed_dim    (a vector condition: Linear `vector_emb` [4*num_channels, embed_dim] whose output is
                added to the time embedding exactly like `label_emb`).
`channel_mult` "" means the reference default for the image size; `attention_resolutions` ""
means no attention in the input/output blocks (an mcdm extension: the reference would fail on
int(""); the middle block always has attention in the reference UNetModel).

The model is built exactly like `script_util.create_model` does, with `UNetModel` from the
installed guided_diffusion package; only `vector_emb` and the `emb=` forward argument are added
(by the subclass `MCDMUNetModel`). Without `embed_dim` its forward is the reference forward.

Weights files: safetensors with the reference state_dict key names, stored as f32/f16/bf16, with
the config JSON string in metadata key `config` and the same JSON in `<stem>.json` beside it.
"""

import argparse
import json
import math
import os
import tempfile
import warnings

# guided_diffusion.nn uses the deprecated torch.cuda.amp.custom_fwd/bwd decorators.
warnings.filterwarnings("ignore", message=r"`torch\.cuda\.amp\.custom_(fwd|bwd)")

import torch as th
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from guided_diffusion.nn import timestep_embedding
from guided_diffusion.script_util import model_and_diffusion_defaults
from guided_diffusion.unet import UNetModel

DTYPES = {
    "f32": th.float32,
    "f16": th.float16,
    "bf16": th.bfloat16,
}

# Keys of a config, in the order they are written. Reference defaults from
# `model_and_diffusion_defaults()` (script flags), plus `sigma_small` (create_gaussian_diffusion)
# and mcdm's `in_channels`. `num_classes` and `embed_dim` have no default: absent = not used.
EXTRA_DEFAULTS = {"sigma_small": False, "in_channels": 3}
OPTIONAL_KEYS = ("num_classes", "embed_dim")


def default_config():
    """The reference script defaults (model_and_diffusion_defaults) + sigma_small + in_channels."""
    cfg = dict(model_and_diffusion_defaults())
    cfg.update(EXTRA_DEFAULTS)
    return cfg


def full_config(cfg):
    """Fills `cfg` (a dict of flags) with the reference defaults and checks its keys.

    Returns a new dict with every known key (num_classes only when class_cond, embed_dim only
    when given and > 0). Unknown keys raise ValueError, so a typo is not silently ignored.
    """
    known = set(default_config()) | set(OPTIONAL_KEYS)
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise ValueError(f"unknown config key(s): {', '.join(unknown)}")
    out = default_config()
    out.update({k: v for k, v in cfg.items() if k not in OPTIONAL_KEYS})
    for k in ("channel_mult", "attention_resolutions", "timestep_respacing"):
        out[k] = str(out[k])
    if out["class_cond"]:
        out["num_classes"] = int(cfg.get("num_classes", 1000))
    elif cfg.get("num_classes") is not None:
        raise ValueError("num_classes is given but class_cond is false")
    if cfg.get("embed_dim"):
        out["embed_dim"] = int(cfg["embed_dim"])
    return out


def channel_mult_of(cfg):
    """`channel_mult` as a tuple, with the reference per-size default for ""."""
    cm = str(cfg["channel_mult"])
    if cm == "":
        size = cfg["image_size"]
        defaults = {
            512: (0.5, 1, 1, 2, 2, 4, 4),
            256: (1, 1, 2, 2, 4, 4),
            128: (1, 1, 2, 3, 4),
            64: (1, 2, 3, 4),
        }
        if size not in defaults:
            raise ValueError(f"unsupported image size: {size} (give channel_mult explicitly)")
        return defaults[size]
    return tuple(int(m) for m in cm.split(","))


def attention_ds_of(cfg):
    """Downsample rates with attention: image_size // res for each listed resolution."""
    ar = str(cfg["attention_resolutions"]).strip()
    if ar == "":
        return ()
    return tuple(cfg["image_size"] // int(r) for r in ar.split(","))


def out_channels_of(cfg):
    return 6 if cfg["learn_sigma"] else 3


class MCDMUNetModel(UNetModel):
    """The reference UNetModel plus mcdm's vector condition `vector_emb` (when embed_dim is set).

    forward(x, timesteps, y=None, emb=None): emb [N, embed_dim] goes through `vector_emb`
    (Linear) and is added to the time embedding after the label embedding:
        e = time_embed(timestep_embedding(t)) (+ label_emb(y)) (+ vector_emb(emb)).
    Like `y`, `emb` must be given if and only if the model has `embed_dim`.
    """

    def __init__(self, *args, embed_dim=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.embed_dim = embed_dim
        if embed_dim:
            self.vector_emb = nn.Linear(embed_dim, self.model_channels * 4)

    def forward(self, x, timesteps, y=None, emb=None):
        if not self.embed_dim:
            assert emb is None, "this model has no embed_dim: emb must be None"
            return super().forward(x, timesteps, y=y)
        # Same body as UNetModel.forward, with the vector condition added.
        assert (y is not None) == (
            self.num_classes is not None
        ), "must specify y if and only if the model is class-conditional"
        assert emb is not None, "must specify emb for a model with embed_dim"
        assert emb.shape == (x.shape[0], self.embed_dim), (emb.shape, x.shape)
        hs = []
        e = self.time_embed(timestep_embedding(timesteps, self.model_channels))
        if self.num_classes is not None:
            assert y.shape == (x.shape[0],)
            e = e + self.label_emb(y)
        e = e + self.vector_emb(emb)
        h = x.type(self.dtype)
        for module in self.input_blocks:
            h = module(h, e)
            hs.append(h)
        h = self.middle_block(h, e)
        for module in self.output_blocks:
            h = th.cat([h, hs.pop()], dim=1)
            h = module(h, e)
        h = h.type(x.dtype)
        return self.out(h)


def build_model(cfg, fp16=False):
    """Builds the reference UNet for `cfg` (argument mapping of script_util.create_model).

    Honours in_channels, num_classes and embed_dim. The model is float32 and in eval mode.
    `use_fp16` in the config is ignored unless fp16=True, in which case the model is built with
    use_fp16 and `convert_to_fp16()` is called, like the reference sampling scripts do (the
    torso convs then run in float16).
    """
    cfg = full_config(cfg)
    use_fp16 = bool(fp16)
    model = MCDMUNetModel(
        image_size=cfg["image_size"],
        in_channels=int(cfg["in_channels"]),
        model_channels=cfg["num_channels"],
        out_channels=out_channels_of(cfg),
        num_res_blocks=cfg["num_res_blocks"],
        attention_resolutions=attention_ds_of(cfg),
        dropout=cfg["dropout"],
        channel_mult=channel_mult_of(cfg),
        num_classes=cfg.get("num_classes"),
        use_checkpoint=False,
        use_fp16=use_fp16,
        num_heads=cfg["num_heads"],
        num_head_channels=cfg["num_head_channels"],
        num_heads_upsample=cfg["num_heads_upsample"],
        use_scale_shift_norm=cfg["use_scale_shift_norm"],
        resblock_updown=cfg["resblock_updown"],
        use_new_attention_order=cfg["use_new_attention_order"],
        embed_dim=cfg.get("embed_dim"),
    )
    if use_fp16:
        model.convert_to_fp16()
    return model.eval()


def randomize(model, seed):
    """Gives every parameter of `model` fresh random values (deterministic for a seed).

    Conv/Linear weights: normal / sqrt(fan_in); biases: 0.1 * normal; GroupNorm weight:
    1 + 0.1 * normal, bias 0.1 * normal; Embedding: normal. Zero-initialised layers of the
    reference (out_layers.3, proj_out, out.2) are randomised too, so activations stay O(1) and
    every parameter matters to the output.
    """
    g = th.Generator().manual_seed(int(seed))

    def normal(p, std, mean=0.0):
        with th.no_grad():
            v = th.randn(p.shape, generator=g, dtype=th.float32) * std + mean
            p.copy_(v.to(p.dtype))

    done = set()
    for name, mod in model.named_modules():
        if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            fan_in = mod.weight[0].numel()
            normal(mod.weight, 1.0 / math.sqrt(fan_in))
            done.add(id(mod.weight))
            if mod.bias is not None:
                normal(mod.bias, 0.1)
                done.add(id(mod.bias))
        elif isinstance(mod, nn.GroupNorm):
            normal(mod.weight, 0.1, 1.0)
            normal(mod.bias, 0.1)
            done.update((id(mod.weight), id(mod.bias)))
        elif isinstance(mod, nn.Embedding):
            normal(mod.weight, 1.0)
            done.add(id(mod.weight))
    missed = [n for n, p in model.named_parameters() if id(p) not in done]
    if missed:
        raise RuntimeError(f"randomize: parameters not randomised: {missed}")
    return model


def round_weights(model, dtype):
    """Rounds every parameter and buffer of `model` to `dtype` and back (in place)."""
    dt = DTYPES[dtype] if isinstance(dtype, str) else dtype
    with th.no_grad():
        for p in list(model.parameters()) + list(model.buffers()):
            if p.is_floating_point():
                p.copy_(p.to(dt).to(p.dtype))
    return model


def _umask_mode():
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write_bytes(path, data):
    """Writes `data` to `path` through a temp file in the same folder and a rename."""
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=d)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_safetensors(tensors, path, metadata=None):
    """Atomic safetensors write (temp file + rename); tensors are made contiguous."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=d)
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def json_path_for(path):
    """`<stem>.json` beside a weights file `<stem>.safetensors`."""
    stem = path[: -len(".safetensors")] if path.endswith(".safetensors") else path
    return stem + ".json"


def config_json(cfg):
    return json.dumps(full_config(cfg), indent=2) + "\n"


def save_state_dict(state_dict, cfg, path, dtype):
    """Writes a state_dict as safetensors (dtype f32/f16/bf16) + `<stem>.json`; returns bytes."""
    dt = DTYPES[dtype]
    text = config_json(cfg)
    tensors = {k: v.detach().to("cpu", dt) for k, v in state_dict.items()}
    # One metadata key only: safetensors orders metadata through a Rust HashMap, so several keys
    # would make the file bytes vary from run to run.
    save_safetensors(tensors, path, metadata={"config": json.dumps(full_config(cfg))})
    atomic_write_bytes(json_path_for(path), text.encode())
    return os.path.getsize(path)


def save_weights(model, cfg, path, dtype="f32"):
    """Saves `model` to `path` (safetensors, storage dtype f32/f16/bf16) and `<stem>.json`.

    The model's parameters are first rounded to `dtype` in place, so a float32 forward of the
    model afterwards is the reference output for the stored weights. Returns the file size.
    """
    round_weights(model, dtype)
    return save_state_dict(model.state_dict(), cfg, path, dtype)


def load_weights(path, cfg=None):
    """Loads a weights file written by save_weights into a float32 reference model (strict)."""
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
        sd = {k: f.get_tensor(k).float() for k in f.keys()}
    if cfg is None:
        if "config" in meta:
            cfg = json.loads(meta["config"])
        else:
            with open(json_path_for(path)) as fh:
                cfg = json.load(fh)
    model = build_model(cfg)
    model.load_state_dict(sd, strict=True)
    return model, full_config(cfg)


def forward(model, x, t, y=None, emb=None):
    """The reference forward under no_grad (x float32; t fed to the network as it is)."""
    with th.no_grad():
        return model(x, t, y=y, emb=emb)


def count_params(model):
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# argparse helpers shared by convert_pt.py and bench_torch.py


def str2bool(v):
    if isinstance(v, bool):
        return v
    if v.lower() in ("yes", "true", "t", "y", "1"):
        return True
    if v.lower() in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError("boolean value expected")


def add_config_flags(parser):
    """Adds one flag per config key (reference script defaults; see default_config())."""
    for k, v in default_config().items():
        kind = str2bool if isinstance(v, bool) else type(v)
        parser.add_argument(f"--{k}", default=None, type=kind, help=f"(default {v!r})")
    parser.add_argument("--num_classes", default=None, type=int, help="(default 1000 with class_cond)")
    parser.add_argument("--embed_dim", default=None, type=int, help="vector condition width (mcdm)")
    parser.add_argument("--config", default=None, help="JSON file with a flat config; flags override it")


def config_from_args(args):
    """Config from `--config` (if any) overridden by the flags given explicitly."""
    cfg = {}
    if args.config:
        with open(args.config) as f:
            cfg.update(json.load(f))
    for k in list(default_config()) + list(OPTIONAL_KEYS):
        v = getattr(args, k, None)
        if v is not None:
            cfg[k] = v
    return full_config(cfg)


def _self_check():
    cases = [
        {"image_size": 16, "num_channels": 32, "num_res_blocks": 1, "channel_mult": "1,2",
         "attention_resolutions": "8", "num_heads": 2},
        {"image_size": 16, "num_channels": 32, "num_res_blocks": 1, "channel_mult": "1,2",
         "attention_resolutions": "", "class_cond": True, "num_classes": 4, "embed_dim": 8,
         "in_channels": 5, "learn_sigma": True, "resblock_updown": True,
         "use_new_attention_order": True, "num_head_channels": 16},
    ]
    for i, c in enumerate(cases):
        cfg = full_config(c)
        m = randomize(build_model(cfg), i)
        x = th.randn(2, cfg["in_channels"], 16, 16)
        t = th.tensor([3.5, 700.0])
        y = th.tensor([0, 3]) if cfg["class_cond"] else None
        e = th.randn(2, cfg["embed_dim"]) if cfg.get("embed_dim") else None
        out = forward(m, x, t, y, e)
        print(f"case {i}: params {count_params(m)}, out {tuple(out.shape)}, std {out.std():.3f}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.parse_args()
    th.set_num_threads(max(1, os.cpu_count() or 1))
    _self_check()
