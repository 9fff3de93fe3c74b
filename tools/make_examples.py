"""Writes examples/: per-image conditions of held-back SynthFaces and an mcdm job file.

    python tools/make_examples.py                 # examples/ for faces 1000000..1000007
    cargo run --release -- sample --job examples/default.json --out out/default

Files (N faces; tensors are per-image, item k belongs to face start + k):
  sketch.safetensors     `cond` [N, 1, 32, 32] f32: edge +1, no edge -1 (synthfaces.edges)
  segment.safetensors    `cond` [N, 6, 32, 32] f32: parts background, skin, hair, eyes, mouth,
                         glasses; +1 where the pixel is that part, -1 where not, all 0 for a hidden
                         part (each part hidden with probability 0.5, seeded by the face index,
                         at least one part visible)
  captions.txt           one caption per line
  text.safetensors       `embedding` [N, 384] f32, all-MiniLM-L6-v2 (L2-normalised)
  faces.png, sketches.png, segments.png   previews (ground truth; hidden parts grey)
  conditions.json        indices, attributes, visible parts, captions
  default.json           the mcdm job composing the three experts with the unconditional model
"""

import argparse
import json
import os
import sys

import numpy as np
import torch as th

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gd_model  # noqa: E402
import synthfaces  # noqa: E402

HIDE_PROB = 0.5


def visible_parts(index):
    """Which of the 6 parts the partial segmentation of face `index` shows (deterministic)."""
    rng = np.random.default_rng([int(index), 0x5E6])
    vis = rng.random(len(synthfaces.PARTS)) >= HIDE_PROB
    if not vis.any():
        vis[int(rng.integers(len(vis)))] = True
    return vis


def write_conditions(out_dir, indices, embed=True, previews=True):
    """Writes the condition tensors of faces `indices` into out_dir; returns the face batch."""
    import train  # lazy: sentence-transformers is only needed for the text embeddings

    os.makedirs(out_dir, exist_ok=True)
    b = synthfaces.batch(indices)
    vis = np.stack([visible_parts(i) for i in indices])
    b["visible"] = vis
    sk = synthfaces.sketch_cond(b["sketch"])
    sg = synthfaces.segment_cond(b["seg"], vis)
    gd_model.save_safetensors({"cond": th.from_numpy(sk)}, os.path.join(out_dir, "sketch.safetensors"))
    gd_model.save_safetensors({"cond": th.from_numpy(sg)}, os.path.join(out_dir, "segment.safetensors"))
    caps = [str(c) for c in b["caption"]]
    with open(os.path.join(out_dir, "captions.txt"), "w") as f:
        f.write("\n".join(caps) + "\n")
    if embed:
        e = train.embed_texts(caps)
        gd_model.save_safetensors({"embedding": th.from_numpy(e)}, os.path.join(out_dir, "text.safetensors"))
    meta = []
    for k, i in enumerate(indices):
        meta.append({
            "index": int(i),
            "caption": caps[k],
            "visible_parts": [p for p, v in zip(synthfaces.PARTS, vis[k]) if v],
            "attrs": {
                "hair_color": synthfaces.HAIR_COLORS[int(b["hair_color"][k])],
                "hair_long": bool(b["hair_long"][k]),
                "glasses": bool(b["glasses"][k]),
                "smile": bool(b["smile"][k]),
            },
        })
    with open(os.path.join(out_dir, "conditions.json"), "w") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")
    if previews:
        cols = min(len(indices), 8)
        synthfaces.write_png(os.path.join(out_dir, "faces.png"), synthfaces.grid(b["image"], cols, scale=2))
        synthfaces.write_png(os.path.join(out_dir, "sketches.png"),
                             synthfaces.grid((b["sketch"] * 255).astype(np.uint8), cols, scale=2))
        synthfaces.write_png(os.path.join(out_dir, "segments.png"),
                             synthfaces.grid(synthfaces.seg_colors(b["seg"], vis), cols, scale=2))
    return b


def job(n, models_rel, experts, uncond="uncond", sampler="ddpm", respacing="50", seed=0, weights=None):
    """An mcdm job dict. experts: list of names among sketch, segment, text (weight 1 unless
    `weights` maps a name to another weight)."""
    spec = {
        "sketch": {"model": "sketch", "image": "sketch.safetensors", "weight": 1.0},
        "segment": {"model": "segment", "image": "segment.safetensors", "weight": 1.0},
        "text": {"model": "text", "embedding": "text.safetensors", "weight": 1.0},
    }
    names = ["uncond"] + list(experts)
    return {
        "models": {m: f"{models_rel}/{m}.safetensors" for m in names},
        "uncond": {"model": uncond},
        "experts": [dict(spec[e], weight=float((weights or {}).get(e, 1.0))) for e in experts],
        "sampler": sampler,
        "timestep_respacing": respacing,
        "num_samples": n,
        "seed": seed,
        "clip_denoised": True,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="examples")
    ap.add_argument("--start", type=int, default=synthfaces.EVAL_BASE)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--sampler", default="ddpm", help="ddpm (the paper's eq. 13 update) or ddim")
    ap.add_argument("--respacing", default="50",
                    help="50 DDPM steps: these short-trained models give clean samples with DDPM; "
                         "DDIM (eta 0) leaves visible grain and colour casts")
    args = ap.parse_args()
    idx = list(range(args.start, args.start + args.n))
    write_conditions(args.out, idx)
    rel = os.path.relpath("weights", args.out)
    j = job(args.n, rel, ["sketch", "segment", "text"], sampler=args.sampler, respacing=args.respacing)
    with open(os.path.join(args.out, "default.json"), "w") as f:
        json.dump(j, f, indent=2)
        f.write("\n")
    print(f"wrote {args.out}/ for faces {idx[0]}..{idx[-1]}")


if __name__ == "__main__":
    main()
