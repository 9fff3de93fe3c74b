"""Converts a guided-diffusion `.pt` state_dict into mcdm's safetensors + `<stem>.json`.

Usage:
    /opt/gdenv/bin/python tools/convert_pt.py MODEL.pt OUT.safetensors [--dtype f32|f16|bf16]
        [--config cfg.json] [--image_size 256 --num_channels 256 ... (reference script flags)]

Examples (the flags of guided-diffusion's README):
    python tools/convert_pt.py 64x64_diffusion.pt imagenet64.safetensors --dtype f16 \\
        --attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 --dropout 0.1 \\
        --image_size 64 --learn_sigma True --noise_schedule cosine --num_channels 192 \\
        --num_head_channels 64 --num_res_blocks 3 --resblock_updown True \\
        --use_new_attention_order True --use_fp16 True --use_scale_shift_norm True
    python tools/convert_pt.py face_sketch.pt sketch.safetensors --config sketch.json --in_channels 6

The config: reference script defaults (`model_and_diffusion_defaults()`, e.g. num_channels 128,
num_heads 4, attention_resolutions "16,8", use_scale_shift_norm True) < `--config` JSON < flags
given on the command line. mcdm's extensions: --in_channels, --num_classes, --embed_dim.

The state_dict is loaded with torch.load(map_location='cpu', weights_only=True). A dict holding
the weights under "state_dict", "model" or "ema" is unwrapped, and a common "module." prefix is
dropped. The state_dict must then load strictly (same keys, same shapes) into the reference
model built from the config, so a wrong config is caught here; the error lists the
missing/unexpected keys and shape mismatches. The output (weights, then `<stem>.json`) is written
atomically (temp file + rename); the config JSON is also stored in the safetensors metadata key
`config`. Float tensors are stored as --dtype (default f32; f16 halves the size).
"""

import argparse
import os
import sys

import torch as th

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gd_model  # noqa: E402


def extract_state_dict(obj):
    """The tensor dict inside a loaded checkpoint (unwraps common containers and 'module.')."""
    for key in ("state_dict", "model", "ema"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj:
        raise SystemExit("error: the checkpoint is not a state_dict (a dict of tensors)")
    bad = [k for k, v in obj.items() if not isinstance(v, th.Tensor)]
    if bad:
        raise SystemExit(f"error: non-tensor entries in the state_dict: {bad[:5]}")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def check_strict(state_dict, cfg):
    """Loads `state_dict` strictly into the reference model for `cfg`; returns the model."""
    model = gd_model.build_model(cfg)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    shapes = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs config {tuple(expected[k].shape)}"
        for k in expected
        if k in state_dict and tuple(state_dict[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or shapes:
        lines = ["the state_dict does not match the config:"]
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected),
                             ("shape mismatches", shapes)):
            if items:
                more = f" ... and {len(items) - 10} more" if len(items) > 10 else ""
                lines.append(f"  {title} ({len(items)}): " + ", ".join(items[:10]) + more)
        hints = []
        if "label_emb.weight" in state_dict and "label_emb.weight" not in missing:
            n = state_dict["label_emb.weight"].shape[0]
            hints.append(f"label_emb has {n} rows: --class_cond True --num_classes {n}")
        if any(k.startswith("label_emb") for k in missing):
            hints.append("no label_emb: --class_cond False")
        if any(k.startswith("vector_emb") for k in unexpected):
            hints.append(f"vector_emb present: --embed_dim {state_dict['vector_emb.weight'].shape[1]}")
        if "input_blocks.0.0.weight" in state_dict:
            w = state_dict["input_blocks.0.0.weight"]
            hints.append(f"input_blocks.0.0.weight is {tuple(w.shape)}: "
                         f"in_channels {w.shape[1]}, first level {w.shape[0]} channels")
        if "out.2.weight" in state_dict:
            hints.append(f"out.2.weight has {state_dict['out.2.weight'].shape[0]} outputs "
                         f"(6 = learn_sigma True)")
        if hints:
            lines.append("  hints: " + "; ".join(hints))
        raise SystemExit("error: " + "\n".join(lines))
    model.load_state_dict({k: v.float() for k, v in state_dict.items()}, strict=True)
    # Head count and attention order change no shape: a wrong num_heads / num_head_channels /
    # use_new_attention_order is not caught here.
    return model


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="guided-diffusion .pt state_dict")
    ap.add_argument("output", help="output .safetensors path (<stem>.json is written beside it)")
    ap.add_argument("--dtype", choices=sorted(gd_model.DTYPES), default="f32",
                    help="storage dtype of the weights (default f32)")
    gd_model.add_config_flags(ap)
    args = ap.parse_args(argv)
    if not args.output.endswith(".safetensors"):
        ap.error("the output path must end with .safetensors")
    cfg = gd_model.config_from_args(args)
    obj = th.load(args.checkpoint, map_location="cpu", weights_only=True)
    sd = extract_state_dict(obj)
    check_strict(sd, cfg)
    non_float = [k for k, v in sd.items() if not v.is_floating_point()]
    if non_float:
        raise SystemExit(f"error: non-float tensors in the state_dict: {non_float[:5]}")
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    size = gd_model.save_state_dict(sd, cfg, args.output, args.dtype)
    n = sum(v.numel() for v in sd.values())
    print(f"wrote {args.output} ({len(sd)} tensors, {n} parameters, {args.dtype}, {size} bytes) "
          f"and {gd_model.json_path_for(args.output)}")


if __name__ == "__main__":
    main()
