"""Judges how well mcdm's composed samples satisfy their conditions (SynthFaces, the paper's four
experiments: sketch+segment, text+segment, text+sketch, all three).

Judge (trained on SynthFaces training indices, accuracy measured on held-back faces
>= 2_000_000, which neither training nor the condition sets use):
  - attribute classifier: small CNN with heads hair colour (5), hair length, glasses, smile
  - part segmenter: small fully-convolutional net, 6 parts per pixel
  - edges: `synthfaces.edges`, the extractor that made the sketch conditions
Both networks are trained with noise / blur / colour jitter so they tolerate sample artefacts.

Scores per sample (then averaged over the condition sets):
  sketch   F1 of the sample's edges vs the given sketch, 1-pixel tolerance (a predicted edge
           pixel counts as correct when a given edge lies in its 3x3 neighbourhood, and vice versa)
  segment  accuracy of the segmenter on the pixels whose given label is a visible part
  text     fraction of the attributes the caption states that the classifier finds in the sample

Steps (all CPU; mcdm does the sampling):
  python tools/score.py judge                        # trains the judge -> weights/judge.pt
  python tools/score.py conds --n 256                # conditions + 8 job files -> /tmp/mcdm-score
  python tools/score.py sample                       # runs `mcdm sample --job ...` for each job
  python tools/score.py eval                         # table + grid

Image quality, with no condition: the Frechet distance between the judge classifier's 128-wide
penultimate features of samples and of held-back real faces (indices >= 2_100_000; the same
FID formula, on features of a network trained on SynthFaces, not Inception). It is biased
upwards for small sets, so compare sets of equal size:
  python tools/score.py fd A.safetensors B.safetensors ...   # `mcdm sample --save-tensor` files
"""

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import time

import numpy as np
import torch as th
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import synthfaces  # noqa: E402

JUDGE_PATH = "weights/judge.pt"
HELD_OUT = 2_000_000
# Real faces for the Frechet distance: held back, and apart from the judge's test faces.
FD_REAL_START = 2_100_000
COND_START = 1_100_000
ATTRS = [("hair_color", 5), ("hair_long", 2), ("glasses", 2), ("smile", 2)]

CONFIGS = [
    # name, experts composed with the unconditional model
    ("uncond", []),
    ("sketch", ["sketch"]),
    ("segment", ["segment"]),
    ("text", ["text"]),
    ("sketch+segment", ["sketch", "segment"]),
    ("text+segment", ["text", "segment"]),
    ("text+sketch", ["text", "sketch"]),
    ("all", ["sketch", "segment", "text"]),
]
# Extra rows (not part of the four experiments): the text expert with weight 3 (classifier-free
# guidance style), alone and in the three-expert composition.
EXTRA_CONFIGS = [
    ("text-w3", ["text"], {"text": 3.0}),
    ("all-text-w3", ["sketch", "segment", "text"], {"text": 3.0}),
]
ALL_CONFIGS = [(n, e, {}) for n, e in CONFIGS] + EXTRA_CONFIGS
LABELS = {
    "uncond": "unconditional only",
    "all": "sketch+segment+text",
    "text-w3": "text expert alone, weight 3",
    "all-text-w3": "sketch+segment+text, text weight 3",
}


# ---------------------------------------------------------------------------------------------
# judge networks


class Classifier(nn.Module):
    """Attribute heads on a 128-wide feature (`features`), also the Frechet distance's."""

    def __init__(self):
        super().__init__()

        def blk(i, o):
            return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(),
                                 nn.Conv2d(o, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(), nn.MaxPool2d(2))

        self.body = nn.Sequential(blk(3, 16), blk(16, 32), blk(32, 64))  # -> 64 x 4 x 4
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(64 * 16, 128), nn.ReLU())
        self.heads = nn.ModuleList([nn.Linear(128, k) for _, k in ATTRS])

    def features(self, x):
        return self.fc(self.body(x))

    def forward(self, x):
        h = self.features(x)
        return [hd(h) for hd in self.heads]


class Segmenter(nn.Module):
    def __init__(self, c=16):
        super().__init__()

        def cbr(i, o):
            return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU())

        self.e1 = nn.Sequential(cbr(3, c), cbr(c, c))
        self.e2 = nn.Sequential(cbr(c, 2 * c), cbr(2 * c, 2 * c))
        self.e3 = nn.Sequential(cbr(2 * c, 4 * c), cbr(4 * c, 4 * c))
        self.d2 = nn.Sequential(cbr(6 * c, 2 * c), cbr(2 * c, 2 * c))
        self.d1 = nn.Sequential(cbr(3 * c, c), cbr(c, c))
        self.out = nn.Conv2d(c, len(synthfaces.PARTS), 1)

    def forward(self, x):
        a = self.e1(x)
        b = self.e2(F.max_pool2d(a, 2))
        c = self.e3(F.max_pool2d(b, 2))
        b = self.d2(th.cat([F.interpolate(c, scale_factor=2), b], 1))
        a = self.d1(th.cat([F.interpolate(b, scale_factor=2), a], 1))
        return self.out(a)


def augment(x, rng):
    """x [B,3,32,32] in [-1,1]: random noise, blur, brightness/contrast (robustness to samples)."""
    b = x.shape[0]
    g = th.Generator().manual_seed(int(rng.integers(1 << 31)))
    blur = th.tensor([[1, 2, 1], [2, 4, 2], [1, 2, 1]], dtype=th.float32) / 16
    xb = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), blur.expand(3, 1, 3, 3), groups=3)
    wb = th.from_numpy((rng.random(b) < 0.3).astype(np.float32) * rng.random(b).astype(np.float32))[:, None, None, None]
    x = x * (1 - wb) + xb * wb
    scale = th.from_numpy(rng.uniform(0.85, 1.15, (b, 1, 1, 1)).astype(np.float32))
    shift = th.from_numpy(rng.uniform(-0.1, 0.1, (b, 1, 1, 1)).astype(np.float32))
    sig = th.from_numpy(rng.uniform(0, 0.12, (b, 1, 1, 1)).astype(np.float32))
    x = x * scale + shift + sig * th.randn(x.shape, generator=g)
    return x.clamp(-1, 1)


def train_judge(args):
    import train as trainmod

    th.set_num_threads(args.threads)
    th.manual_seed(0)
    rng = np.random.default_rng(0)
    data = trainmod.load_data(args.data)
    n = min(args.n_train, len(data["image"]))
    x = th.from_numpy(synthfaces.image_cond(data["image"][:n]))
    ys = [th.from_numpy(data[k][:n]) for k, _ in ATTRS]
    seg = th.from_numpy(data["seg"][:n].astype(np.int64))
    held = synthfaces.batch(range(HELD_OUT, HELD_OUT + args.n_test))
    xt = th.from_numpy(synthfaces.image_cond(held["image"]))

    clf, sgm = Classifier(), Segmenter()
    t0 = time.time()
    for name, net in (("classifier", clf), ("segmenter", sgm)):
        opt = th.optim.Adam(net.parameters(), lr=2e-3)
        steps = args.epochs * n // args.batch
        sched = th.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
        net.train()
        for s in range(steps):
            idx = th.from_numpy(rng.integers(n, size=args.batch))
            xb = augment(x[idx], rng)
            if name == "classifier":
                out = net(xb)
                loss = sum(F.cross_entropy(o, y[idx]) for o, y in zip(out, ys))
            else:
                loss = F.cross_entropy(net(xb), seg[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            if (s + 1) % 200 == 0:
                print(f"{name} step {s + 1}/{steps} loss {loss.item():.4f} ({time.time() - t0:.0f} s)", flush=True)
        net.eval()
    acc = judge_accuracy(clf, sgm, xt, held)
    th.save({"classifier": clf.state_dict(), "segmenter": sgm.state_dict(), "accuracy": acc,
             "n_train": n, "epochs": args.epochs}, args.judge)
    write_judge_card(args.judge, th.load(args.judge, weights_only=False))
    print(json.dumps(acc, indent=1))
    return acc


def judge_accuracy(clf, sgm, xt, held):
    with th.no_grad():
        out = clf(xt)
        pred = sgm(xt).argmax(1).numpy()
    acc = {}
    for (k, _), o in zip(ATTRS, out):
        acc[k] = float((o.argmax(1).numpy() == held[k]).mean())
    acc["seg_pixel_acc"] = float((pred == held["seg"]).mean())
    ious = []
    for p in range(len(synthfaces.PARTS)):
        inter = ((pred == p) & (held["seg"] == p)).sum()
        union = ((pred == p) | (held["seg"] == p)).sum()
        ious.append(float(inter / max(union, 1)))
    acc["seg_iou"] = dict(zip(synthfaces.PARTS, ious))
    acc["seg_miou"] = float(np.mean(ious))
    acc["n_test"] = int(len(xt))
    return acc


def write_judge_card(path, st):
    acc = st["accuracy"]
    text = f"""# judge: SynthFaces attribute classifier + part segmenter (for tools/score.py)

- `Classifier`: 3 conv blocks (16/32/64 channels, BatchNorm, ReLU, max-pool) + MLP, heads hair colour
  (black, brown, blond, red, grey), hair length, glasses, smile. `Segmenter`: small U-Net (16/32/64
  channels), 6 parts per pixel (background, skin, hair, eyes, mouth, glasses).
- Trained on the first {st['n_train']} SynthFaces training faces, {st['epochs']} epochs each, Adam one-cycle lr 2e-3,
  batch 64, with augmentation (Gaussian noise sigma <= 0.12, random blur, brightness/contrast) so that
  diffusion samples' artefacts do not throw it off.
- Held-out accuracy ({acc['n_test']} faces, indices {HELD_OUT}..): hair colour {acc['hair_color']:.3f}, hair length
  {acc['hair_long']:.3f}, glasses {acc['glasses']:.3f}, smile {acc['smile']:.3f}; segmentation pixel accuracy
  {acc['seg_pixel_acc']:.3f}, mean IoU {acc['seg_miou']:.3f} ({', '.join(f'{k} {v:.2f}' for k, v in acc['seg_iou'].items())}).
- File: `judge.pt` (torch state dicts + these numbers). Command: `python tools/score.py judge`
  (needs the training data of tools/train.py in /tmp/synthfaces).
"""
    with open(os.path.splitext(path)[0] + ".md", "w") as f:
        f.write(text)


def load_judge(path):
    st = th.load(path, weights_only=False)
    clf, sgm = Classifier(), Segmenter()
    clf.load_state_dict(st["classifier"])
    sgm.load_state_dict(st["segmenter"])
    return clf.eval(), sgm.eval(), st


# ---------------------------------------------------------------------------------------------
# scores


def dilate(e):
    p = np.pad(e, [(0, 0), (1, 1), (1, 1)])
    out = np.zeros_like(e)
    for dy in range(3):
        for dx in range(3):
            out |= p[:, dy:dy + 32, dx:dx + 32]
    return out


def edge_f1(pred, gt, tol=1):
    """Per-image F1 with `tol` (0 or 1) pixel tolerance; pred, gt uint8 0/1 [N,32,32]."""
    pred, gt = pred.astype(bool), gt.astype(bool)
    grow = dilate if tol else (lambda e: e)
    tp_p = (pred & grow(gt)).sum((1, 2))
    tp_r = (gt & grow(pred)).sum((1, 2))
    prec = tp_p / np.maximum(pred.sum((1, 2)), 1)
    rec = tp_r / np.maximum(gt.sum((1, 2)), 1)
    return np.where(prec + rec > 0, 2 * prec * rec / np.maximum(prec + rec, 1e-9), 0.0)


def score_samples(samples, conds, clf, sgm):
    """samples float [N,3,32,32] in [-1,1]; returns per-image scores (dict of arrays)."""
    x = th.from_numpy(np.clip(samples, -1, 1).astype(np.float32))
    img8 = np.clip(np.round((samples + 1) * 127.5), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
    with th.no_grad():
        logits = clf(x)
        seg = sgm(x).argmax(1).numpy()
    preds = {k: o.argmax(1).numpy() for (k, _), o in zip(ATTRS, logits)}
    s = {}
    e = synthfaces.edges(img8)
    s["sketch"] = edge_f1(e, conds["sketch"])
    s["sketch0"] = edge_f1(e, conds["sketch"], tol=0)
    vis = conds["visible"]  # [N,6]
    gt = conds["seg"]
    vis_pix = np.take_along_axis(vis[:, None, None, :].repeat(32, 1).repeat(32, 2), gt[..., None].astype(np.int64), -1)[..., 0]
    correct = (seg == gt) & vis_pix
    s["segment"] = correct.sum((1, 2)) / np.maximum(vis_pix.sum((1, 2)), 1)
    hits = np.zeros(len(x))
    count = np.zeros(len(x))
    for k, _ in ATTRS:
        said = conds["says_" + k]
        m = said >= 0
        hits += m * (preds[k] == said)
        count += m
    s["text"] = hits / np.maximum(count, 1)
    s["_mentions"] = count
    s["_preds"] = preds
    return s


def feature_stats(clf, images):
    """Mean and covariance of the judge features of `images` (float [N,3,32,32] in [-1, 1])."""
    x = th.from_numpy(np.clip(images, -1, 1).astype(np.float32))
    with th.no_grad():
        f = th.cat([clf.features(b) for b in x.split(256)]).double().numpy()
    return f.mean(0), np.cov(f, rowvar=False)


def frechet_distance(a, b):
    """|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)) of two (mean, covariance) pairs.
    tr (S_a S_b)^(1/2) is the sum of the square roots of the eigenvalues of the symmetric
    S_a^(1/2) S_b S_a^(1/2), which has the same spectrum."""
    (mu_a, s_a), (mu_b, s_b) = a, b
    w, v = np.linalg.eigh(s_a)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    cross = np.linalg.eigvalsh(root_a @ s_b @ root_a)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b)
                 - 2 * np.sqrt(np.clip(cross, 0, None)).sum())


def real_stats(clf, n):
    faces = synthfaces.batch(range(FD_REAL_START, FD_REAL_START + n))
    return feature_stats(clf, synthfaces.image_cond(faces["image"]))


def cmd_fd(args):
    th.set_num_threads(args.threads)
    clf, _, _ = load_judge(args.judge)
    real = real_stats(clf, args.n_real)
    # The floor: real faces against other real faces, at the sample sets' size.
    sizes = {}
    print(f"| samples | images | Frechet distance to {args.n_real} real faces |")
    print("|---|---:|---:|")
    for path in args.samples:
        x = load_samples(path)
        if len(x) not in sizes:
            other = synthfaces.batch(range(FD_REAL_START + args.n_real,
                                           FD_REAL_START + args.n_real + len(x)))
            sizes[len(x)] = frechet_distance(
                feature_stats(clf, synthfaces.image_cond(other["image"])), real)
        print(f"| {path} | {len(x)} | {frechet_distance(feature_stats(clf, x), real):.2f} |",
              flush=True)
    for n, d in sorted(sizes.items()):
        print(f"| (other real faces) | {n} | {d:.2f} |")


# ---------------------------------------------------------------------------------------------
# conditions, jobs, sampling


def cmd_conds(args):
    import make_examples

    idx = list(range(COND_START, COND_START + args.n))
    if args.jobs_only:
        print("--jobs-only: keeping the condition files in", args.dir)
    else:
        b = make_examples.write_conditions(args.dir, idx, previews=False)
        np.savez(os.path.join(args.dir, "faces.npz"), **{k: v for k, v in b.items()})
    rel = os.path.relpath(os.path.abspath("weights"), os.path.abspath(args.dir))
    for name, experts, weights in ALL_CONFIGS:
        j = make_examples.job(args.n, rel, experts, sampler=args.sampler, respacing=args.respacing,
                              weights=weights)
        j["batch_size"] = args.batch_size
        with open(os.path.join(args.dir, f"job-{name}.json"), "w") as f:
            json.dump(j, f, indent=2)
            f.write("\n")
    print(f"wrote conditions of faces {idx[0]}..{idx[-1]} and {len(ALL_CONFIGS)} jobs to {args.dir}")


def sample_cmd(args, name):
    out = os.path.join(args.dir, "out", name)
    return [args.bin, "sample", "--job", os.path.join(args.dir, f"job-{name}.json"), "--out", out,
            "--save-tensor", os.path.join(out, "samples.safetensors"), "--device", "cpu"]


def cmd_sample(args):
    times = {}
    tpath = os.path.join(args.dir, "times.json")
    if os.path.exists(tpath):
        times = json.load(open(tpath))
    for name, _, _ in ALL_CONFIGS:
        if args.only and name not in args.only.split(","):
            continue
        c = sample_cmd(args, name)
        if os.path.exists(c[-3]) and not args.force:
            print(f"{name}: exists, skipped")
            continue
        print("+", " ".join(shlex.quote(a) for a in c), flush=True)
        t0 = time.time()
        subprocess.run(c, check=True)
        times[name] = time.time() - t0
        print(f"{name}: {times[name]:.0f} s", flush=True)
        # one file per configuration: several `score.py sample --only ...` may run at once
        with open(os.path.join(os.path.dirname(c[-3]), "time.json"), "w") as f:
            json.dump({"wall_s": times[name]}, f)


def load_samples(path):
    from safetensors.numpy import load_file

    return load_file(path)["samples"]


# ---------------------------------------------------------------------------------------------
# table and grid

_DIGITS = {
    "0": "111101101101111", "1": "010110010010111", "2": "111001111100111", "3": "111001111001111",
    "4": "101101111001001", "5": "111100111001111", "6": "111100111101111", "7": "111001010010010",
    "8": "111101111101111", "9": "111101111001111",
}


def number_tile(k, size=32):
    """A 32x32 white tile with the number k in a 3x5 pixel font (scaled 2x)."""
    t = np.full((size, size, 3), 255, np.uint8)
    s = str(k)
    w = len(s) * 8 - 2
    x0, y0 = (size - w) // 2, (size - 10) // 2
    for n, ch in enumerate(s):
        g = np.array([int(c) for c in _DIGITS[ch]]).reshape(5, 3).repeat(2, 0).repeat(2, 1)
        x = x0 + n * 8
        t[y0:y0 + 10, x:x + 6][g > 0] = 0
    return t


def cmd_eval(args):
    th.set_num_threads(args.threads)
    clf, sgm, st = load_judge(args.judge)
    acc = st["accuracy"]
    write_judge_card(args.judge, st)
    faces = dict(np.load(os.path.join(args.dir, "faces.npz")))
    conds = {"sketch": faces["sketch"], "seg": faces["seg"], "visible": faces["visible"]}
    for k, _ in ATTRS:
        conds["says_" + k] = faces["says_" + k]
    n = len(faces["index"])
    res = {}
    samples = {}
    for name, _, _ in ALL_CONFIGS:
        p = os.path.join(args.dir, "out", name, "samples.safetensors")
        if not os.path.exists(p):
            print(f"missing {p}")
            continue
        samples[name] = load_samples(p)
        res[name] = score_samples(samples[name], conds, clf, sgm)
    gt = score_samples(synthfaces.image_cond(faces["image"]), conds, clf, sgm)
    times = {}
    tpath = os.path.join(args.dir, "times.json")
    if os.path.exists(tpath):
        times = json.load(open(tpath))
    for name, _, _ in ALL_CONFIGS:
        p = os.path.join(args.dir, "out", name, "time.json")
        if os.path.exists(p):
            times[name] = json.load(open(p))["wall_s"]

    def fmt(a):
        a = np.asarray(a, float)
        return f"{a.mean():.3f} ± {a.std(ddof=1) / np.sqrt(len(a)):.3f}"

    job0 = json.load(open(os.path.join(args.dir, "job-all.json")))
    lines = []
    lines.append("# SynthFaces composition table (mcdm, the paper's four experiments)\n")
    lines.append(f"- Date: {datetime.date.today().isoformat()}; machine: {platform.machine()}, "
                 f"{os.cpu_count()} CPU cores, no GPU ({platform.platform()}); mcdm `--device cpu`.")
    lines.append(f"- Models: `weights/{{uncond,sketch,segment,text}}.safetensors` (see their `.md` cards). "
                 f"Sampler {job0['sampler']} `{job0['timestep_respacing']}`, clip_denoised, seed {job0['seed']} "
                 f"(the same noise for every row), all expert weights 1 except in the two \"weight 3\" rows.")
    lines.append(f"- Condition sets: {n} held-back SynthFaces, indices {int(faces['index'][0])}.."
                 f"{int(faces['index'][-1])}; all conditions of a set come from the same face. Sketch: "
                 "`synthfaces.edges` of the face. Segment: partial, each part hidden with probability 0.5 "
                 f"(mean {faces['visible'].sum(1).mean():.2f} of 6 parts visible). Text: the face's caption "
                 f"(states a random subset of the 4 attributes, mean {gt['_mentions'].mean():.2f} per caption), "
                 "all-MiniLM-L6-v2 embedding.")
    lines.append("- Scores (mean ± standard error over the condition sets): **sketch** = F1 of the sample's "
                 "edges (same extractor) vs the given sketch, 1-pixel tolerance; **segment** = segmenter "
                 "accuracy on the pixels whose given label is a visible part; **text** = fraction of the "
                 "caption's stated attributes that the classifier finds in the sample.")
    lines.append(f"- Judge (`weights/judge.pt`, trained on {st['n_train']} training faces) accuracy on "
                 f"{acc['n_test']} held-out faces (indices >= {HELD_OUT}): hair colour {acc['hair_color']:.3f}, "
                 f"hair length {acc['hair_long']:.3f}, glasses {acc['glasses']:.3f}, smile {acc['smile']:.3f}; "
                 f"segmenter pixel accuracy {acc['seg_pixel_acc']:.3f}, mean IoU {acc['seg_miou']:.3f} "
                 f"({', '.join(f'{k} {v:.2f}' for k, v in acc['seg_iou'].items())}).")
    lines.append("")
    lines.append("## All configurations\n")
    lines.append("Each expert alone is composed with the unconditional model as eps_u + (eps_i - eps_u); "
                 "compositions use eps_u + sum_i (eps_i - eps_u) (paper eq. 12). Bold: the conditions the "
                 "row is given.\n")
    lines.append("| configuration | sketch F1 (1 px) | sketch F1 (exact) | segment acc | text attr acc |")
    lines.append("|---|---|---|---|---|")
    lines.append(f"| ground-truth faces (upper bound) | {fmt(gt['sketch'])} | {fmt(gt['sketch0'])} | "
                 f"{fmt(gt['segment'])} | {fmt(gt['text'])} |")
    for name, experts, _ in ALL_CONFIGS:
        if name not in res:
            continue
        r = res[name]
        cells = []
        for c in ("sketch", "sketch0", "segment", "text"):
            v = fmt(r[c])
            cells.append(f"**{v}**" if c.rstrip("0") in experts else v)
        label = LABELS.get(name, name)
        if len(experts) == 1 and name not in LABELS:
            label += " expert alone"
        lines.append(f"| {label} | {' | '.join(cells)} |")
    if times:
        lines.append("")
        lines.append("mcdm wall time per configuration (256 images, `--device cpu`; runs shared the 2 cores with "
                     "each other and with other jobs, so these are indicative only): "
                     + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()) + ".")
    if args.note:
        lines.append("")
        lines.append(args.note)
    lines.append("")
    lines.append("## Text conditions per attribute\n")
    lines.append("Fraction of the captions stating an attribute whose samples show it (judge classifier); "
                 "chance is about 0.2 for hair colour and 0.5 for the others.\n")
    lines.append("| configuration | " + " | ".join(f"{k} (n={int((conds['says_' + k] >= 0).sum())})" for k, _ in ATTRS) + " |")
    lines.append("|---|" + "---|" * len(ATTRS))
    for name, experts, _ in [("gt", [], {})] + ALL_CONFIGS:
        r = gt if name == "gt" else res.get(name)
        if r is None:
            continue
        cells = []
        for k, _ in ATTRS:
            m = conds["says_" + k] >= 0
            cells.append(f"{np.mean(r['_preds'][k][m] == conds['says_' + k][m]):.2f}")
        label = "ground-truth faces" if name == "gt" else LABELS.get(name, name + (" alone" if len(experts) == 1 else ""))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("## The four experiments\n")
    exps = [("sketch+segment", ["sketch", "segment"]), ("text+segment", ["text", "segment"]),
            ("text+sketch", ["text", "sketch"]), ("all", ["sketch", "segment", "text"])]
    for name, experts in exps:
        if name not in res:
            continue
        lines.append(f"### {name.replace('all', 'sketch+segment+text')}\n")
        lines.append("| samples from | " + " | ".join(experts) + " |")
        lines.append("|---|" + "---|" * len(experts))
        for row in ["uncond"] + experts + [name]:
            if row not in res:
                continue
            label = {"uncond": "unconditional"}.get(row, row if row == name else f"{row} alone")
            if row == name:
                label = "**composition**"
            lines.append(f"| {label} | " + " | ".join(fmt(res[row][c]) for c in experts) + " |")
        lines.append("")
    lines.append("## Commands\n")
    lines.append("Models and training data: `benches/results/training-synthfaces.md` and the `weights/*.md` cards. "
                 "Then (python = /opt/gdenv/bin/python; the reading paragraph above is passed to `eval` as `--note`):\n")
    lines.append("```")
    lines.append("cargo build --release")
    lines.append("python tools/score.py judge")
    lines.append(f"python tools/score.py conds --n {n} --dir {args.dir}")
    for name, _, _ in ALL_CONFIGS:
        lines.append(" ".join(shlex.quote(a) for a in sample_cmd(args, name)))
    lines.append(f"python tools/score.py eval --dir {args.dir}")
    lines.append("```")
    lines.append("(`python tools/score.py sample --dir DIR` runs these `mcdm sample` commands.)")
    if args.grid:
        rows = make_grid(faces, samples, args.grid_rows)
        lines.append("")
        lines.append(f"Grid `{args.grid}`: rows = condition sets 0..{args.grid_rows - 1}; columns = ground truth, "
                     "sketch, segmentation (hidden parts grey), caption index, then samples: unconditional, "
                     "sketch alone, segment alone, text alone, sketch+segment, text+segment, text+sketch, all "
                     "three. Captions:\n")
        for k in range(args.grid_rows):
            lines.append(f"{k}. {faces['caption'][k]}")
        synthfaces.write_png(args.grid, rows)
    text = "\n".join(lines) + "\n"
    os.makedirs(os.path.dirname(os.path.abspath(args.table)), exist_ok=True)
    with open(args.table, "w") as f:
        f.write(text)
    print(text)


def make_grid(faces, samples, nrows):
    tiles = []
    for k in range(nrows):
        row = [faces["image"][k], np.repeat(faces["sketch"][k][..., None] * 255, 3, -1).astype(np.uint8),
               synthfaces.seg_colors(faces["seg"][k], faces["visible"][k]), number_tile(k)]
        for name, _ in CONFIGS:
            s = samples.get(name)
            if s is None:
                row.append(np.full((32, 32, 3), 128, np.uint8))
            else:
                row.append(np.clip(np.round((s[k] + 1) * 127.5), 0, 255).astype(np.uint8).transpose(1, 2, 0))
        tiles += row
    return synthfaces.grid(np.stack(tiles), 4 + len(CONFIGS), scale=2)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    j = sub.add_parser("judge", help="train the attribute classifier and the part segmenter")
    j.add_argument("--data", default="/tmp/synthfaces/train-*.npz")
    j.add_argument("--n-train", type=int, default=20000)
    j.add_argument("--n-test", type=int, default=2000)
    j.add_argument("--epochs", type=int, default=3)
    j.add_argument("--batch", type=int, default=64)
    c = sub.add_parser("conds", help="write condition tensors and job files")
    c.add_argument("--n", type=int, default=256)
    c.add_argument("--sampler", default="ddpm")
    c.add_argument("--respacing", default="50")
    c.add_argument("--batch-size", type=int, default=16)
    c.add_argument("--jobs-only", action="store_true", help="only (re)write the job files")
    s = sub.add_parser("sample", help="run mcdm for every configuration")
    s.add_argument("--bin", default="target/release/mcdm")
    s.add_argument("--only", help="comma-separated configuration names")
    s.add_argument("--force", action="store_true")
    e = sub.add_parser("eval", help="score the samples, write the table and the grid")
    e.add_argument("--table", default="benches/results/composition-table.md")
    e.add_argument("--grid", default="examples/composition-grid.png")
    e.add_argument("--grid-rows", type=int, default=6)
    e.add_argument("--note", default="", help="a paragraph added after the main table")
    e.add_argument("--bin", default="target/release/mcdm")
    f = sub.add_parser("fd", help="Frechet distance of sample sets to held-back real faces")
    f.add_argument("samples", nargs="+", help="safetensors files with `samples` [N,3,32,32]")
    f.add_argument("--n-real", type=int, default=2048)
    for p in (j, c, s, e, f):
        p.add_argument("--dir", default="/tmp/mcdm-score")
        p.add_argument("--judge", default=JUDGE_PATH)
        p.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    {"judge": train_judge, "conds": cmd_conds, "sample": cmd_sample, "eval": cmd_eval,
     "fd": cmd_fd}[args.cmd](args)


if __name__ == "__main__":
    main()
