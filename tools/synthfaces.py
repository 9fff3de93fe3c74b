"""SynthFaces: a procedural 32x32 face domain for training and judging mcdm's diffusion experts.

numpy only. Every face is a deterministic function of its index (`face(i)`): the random
generator is seeded with the index, faces are drawn at 4x resolution (128x128) and box-filtered
down to 32x32 (anti-aliased).

Attributes (ground truth, `face(i)["attrs"]`):
  hair_color   0 black, 1 brown, 2 blond, 3 red, 4 grey        (HAIR_COLORS)
  hair_long    0 short, 1 long (falls past the chin)
  glasses      0/1
  smile        0 neutral closed mouth, 1 open smile with teeth
  skin         0..1 (light .. dark), face_x / face_y / face_w / face_h (jitter), background RGB

Outputs of `face(i)`:
  image    uint8 [32, 32, 3]
  seg      uint8 [32, 32]  part labels PARTS: 0 background, 1 skin, 2 hair, 3 eyes, 4 mouth,
                             5 glasses (frames). Each 4x4 block of the 128 drawing takes the part
                             with the largest weighted area (eyes, mouth, glasses weigh more so the
                             small parts survive the downsampling).
  sketch   uint8 [32, 32]  0/1 edge map = `edges(image)` (the same extractor the judge applies to
                             generated images)
  caption  str             one of many wordings, from the attributes (seeded by the index), and
  mentions dict            which attributes the caption states ({"hair_color": 3, "smile": 1, ...})

Condition encodings used by the experts (tools/train.py, tools/make_examples.py, tools/score.py):
  sketch   1 channel, edge +1, no edge -1                     (`sketch_cond`)
  segment  6 channels, one per part: +1 where the pixel is that part, -1 where it is not, and
           0 everywhere for a hidden part (`segment_cond`); all 6 hidden = no condition.
  image    [-1, 1] RGB, CHW (guided-diffusion convention).

Index ranges: training uses indices < 1_000_000; held-back evaluation/examples use >= EVAL_BASE.

    python tools/synthfaces.py --out /tmp/synthfaces/train.npz --start 0 --count 50000
    python tools/synthfaces.py --preview /tmp/preview.png --start 1000000 --count 64
"""

import argparse
import os

import numpy as np

SIZE = 32
SS = 4  # supersampling factor
EVAL_BASE = 1_000_000

PARTS = ["background", "skin", "hair", "eyes", "mouth", "glasses"]
HAIR_COLORS = ["black", "brown", "blond", "red", "grey"]
HAIR_RGB = np.array(
    [
        [0.09, 0.08, 0.08],
        [0.42, 0.25, 0.12],
        [0.92, 0.80, 0.47],
        [0.80, 0.30, 0.10],
        [0.70, 0.70, 0.71],
    ]
)
SKIN_LIGHT = np.array([0.98, 0.85, 0.74])
SKIN_DARK = np.array([0.40, 0.26, 0.17])
# Colour map for segmentation previews.
PART_RGB = np.array(
    [
        [0.0, 0.0, 0.0],
        [0.95, 0.75, 0.6],
        [0.55, 0.3, 0.1],
        [0.2, 0.6, 1.0],
        [0.9, 0.1, 0.2],
        [0.2, 1.0, 0.3],
    ]
)
# Area weights when a 4x4 block is reduced to one label.
PART_WEIGHT = np.array([1.0, 1.0, 1.0, 2.5, 2.0, 2.0])


def _grid():
    c = (np.arange(SIZE * SS) + 0.5) / SS
    return np.meshgrid(c, c)  # x, y in 32-pixel units


_X, _Y = _grid()


def sample_attrs(i):
    """Attributes of face `i` (deterministic)."""
    rng = np.random.default_rng([int(i), 0x5EED])
    a = {}
    a["hair_color"] = int(rng.integers(5))
    a["hair_long"] = int(rng.integers(2))
    a["glasses"] = int(rng.random() < 0.4)
    a["smile"] = int(rng.integers(2))
    a["skin"] = float(rng.random())
    a["face_x"] = float(16 + rng.uniform(-2.0, 2.0))
    a["face_y"] = float(15.0 + rng.uniform(-1.5, 1.5))
    a["face_w"] = float(rng.uniform(7.0, 8.6))
    a["face_h"] = float(a["face_w"] * rng.uniform(1.15, 1.32))
    a["jaw"] = float(rng.uniform(0.0, 0.3))
    hue = rng.random(3)
    a["background"] = [float(v) for v in 0.15 + 0.8 * (0.5 * hue + 0.5 * rng.random(3))]
    a["hair_jitter"] = [float(v) for v in rng.normal(0, 0.035, 3)]
    a["hair_len"] = float(rng.uniform(0.9, 1.7))
    a["fringe"] = float(rng.uniform(0.25, 0.55))
    a["fringe_side"] = float(rng.uniform(-0.6, 0.6))
    a["iris"] = [float(v) for v in [[0.25, 0.15, 0.08], [0.15, 0.3, 0.55], [0.2, 0.35, 0.2]][int(rng.integers(3))]]
    a["frame"] = [float(v) for v in [[0.05, 0.05, 0.05], [0.3, 0.15, 0.05], [0.1, 0.1, 0.4]][int(rng.integers(3))]]
    a["mouth_w"] = float(rng.uniform(0.38, 0.5))
    return a


def render(a):
    """Draws attributes `a` at 128x128; returns (rgb float [128,128,3], labels int [128,128])."""
    X, Y = _X, _Y
    H = SIZE * SS
    rgb = np.empty((H, H, 3))
    rgb[:] = np.array(a["background"])
    # background: gentle vertical gradient
    rgb *= (1.05 - 0.1 * Y / SIZE)[..., None]
    lab = np.zeros((H, H), np.int64)

    def paint(mask, color, label):
        rgb[mask] = color if np.ndim(color) == 1 else color[mask]
        lab[mask] = label

    cx, cy, fa, fb = a["face_x"], a["face_y"], a["face_w"], a["face_h"]
    skin = SKIN_LIGHT + (SKIN_DARK - SKIN_LIGHT) * a["skin"]
    hair = np.clip(HAIR_RGB[a["hair_color"]] + np.array(a["hair_jitter"]), 0, 1)
    dx, dy = X - cx, Y - cy
    # strand texture for hair
    strands = 1.0 + 0.10 * np.sin(dx * 2.3 + 0.6 * np.sin(dy * 0.7)) - 0.08 * (dy / fb)
    hair_tex = np.clip(hair[None, None, :] * strands[..., None], 0, 1)

    # long hair behind the head
    if a["hair_long"]:
        bottom = cy + fb * a["hair_len"]
        wide = fa * 1.32
        back = (np.abs(dx) < wide * (1 - 0.15 * np.clip((Y - cy) / fb, 0, 2))) & (Y > cy - 0.2 * fb) & (Y < bottom)
        back |= (dx / wide) ** 2 + ((Y - cy + 0.1 * fb) / (fb * 1.15)) ** 2 < 1
        paint(back, hair_tex * 0.85, 2)

    # neck
    neck = (np.abs(dx) < fa * 0.42) & (Y > cy + 0.4 * fb)
    paint(neck, skin * 0.85, 1)

    # face (ellipse with a narrower jaw)
    t = np.clip(dy / fb, 0, 1)
    fa_y = fa * (1 - a["jaw"] * t**2)
    face = (dx / fa_y) ** 2 + (dy / fb) ** 2 < 1
    shade = (1.04 - 0.14 * (dx / fa) ** 2 - 0.06 * (dy / fb))[..., None]
    paint(face, np.clip(skin[None, None, :] * shade, 0, 1), 1)
    # ears
    for s in (-1, 1):
        ear = ((X - (cx + s * fa * 0.98)) / 1.1) ** 2 + ((Y - (cy + 0.05 * fb)) / 1.7) ** 2 < 1
        paint(ear & ~face, skin * 0.9, 1)

    # hair on top: a cap slightly bigger than the face, above a (tilted, curved) fringe line
    ca, cb = fa * 1.12, fb * 1.06
    cap = (dx / ca) ** 2 + ((dy + 0.08 * fb) / cb) ** 2 < 1
    hairline = cy - fb * a["fringe"] + fb * 0.35 * (dx / fa) ** 2 + a["fringe_side"] * dx * 0.15
    top = cap & ((Y < hairline) | (~face & (Y < cy - 0.05 * fb)))
    if a["hair_long"]:
        sides = cap & ~face & (Y < cy + 0.5 * fb)
        top |= sides
    paint(top, hair_tex, 2)

    # eyes, eyebrows
    ey = cy - 0.08 * fb
    for s in (-1, 1):
        ex = cx + s * fa * 0.4
        sclera = ((X - ex) / 1.5) ** 2 + ((Y - ey) / 0.95) ** 2 < 1
        paint(sclera, np.array([0.97, 0.97, 0.97]), 3)
        iris = ((X - ex) ** 2 + (Y - ey) ** 2 < 0.8**2) & sclera
        paint(iris, np.array(a["iris"]), 3)
        pupil = ((X - ex) ** 2 + (Y - ey) ** 2 < 0.35**2) & sclera
        paint(pupil, np.array([0.02, 0.02, 0.02]), 3)
        brow = (np.abs(X - ex) < 1.7) & (np.abs(Y - (ey - 2.0 + 0.15 * (X - ex) * s * -0.3)) < 0.35)
        paint(brow & face, hair * 0.8, 2)

    # nose
    nose = ((dx / 0.7) ** 2 + ((Y - (cy + 0.28 * fb)) / 1.4) ** 2 < 1) & (dx > 0)
    paint(nose, skin * 0.82, 1)

    # mouth
    my = cy + 0.56 * fb
    mw = fa * a["mouth_w"]
    u = (X - cx) / mw
    if a["smile"]:
        ytop = my - 1.0 * u**2
        ybot = my + 1.7 * (1 - u**2) - 1.0 * u**2
        m = (np.abs(u) < 1) & (Y > ytop) & (Y < ybot)
        paint(m, np.array([0.45, 0.05, 0.08]), 4)
        teeth = m & (Y < ytop + 0.55 * (ybot - ytop))
        paint(teeth, np.array([0.97, 0.96, 0.92]), 4)
        lips = (np.abs(u) < 1.08) & ~m & (Y > ytop - 0.35) & (Y < ybot + 0.45)
        paint(lips, np.array([0.75, 0.3, 0.3]) * (0.6 + 0.4 * skin), 4)
    else:
        u2 = (X - cx) / (mw * 0.75)
        m = (np.abs(u2) < 1) & (np.abs(Y - my - 0.3 + 0.25 * u2**2) < 0.55)
        paint(m, np.array([0.7, 0.25, 0.25]) * (0.6 + 0.4 * skin), 4)

    # glasses: two round frames, a bridge and the arms (frames only are the glasses part)
    if a["glasses"]:
        frame = np.array(a["frame"])
        r = 2.35
        g = np.zeros_like(face)
        for s in (-1, 1):
            ex = cx + s * fa * 0.4
            d = np.sqrt((X - ex) ** 2 + (Y - ey) ** 2)
            lens = d < r - 0.4
            rgb[lens] = 0.8 * rgb[lens] + 0.2 * np.array([0.8, 0.9, 1.0])
            g |= np.abs(d - r) < 0.45
            arm = (np.abs(Y - ey + 0.3) < 0.35) & (s * (X - ex) > r) & (s * (X - cx) < fa * 1.0)
            g |= arm
        bridge = (np.abs(dx) < fa * 0.4 - r + 0.2) & (np.abs(Y - ey + 0.4) < 0.35)
        g |= bridge
        paint(g, frame, 5)
    return np.clip(rgb, 0, 1), lab


def downsample(rgb, lab):
    """128 -> 32: box filter for the colours, weighted block majority for the labels."""
    H = SIZE
    img = rgb.reshape(H, SS, H, SS, 3).mean(axis=(1, 3))
    onehot = np.eye(len(PARTS))[lab]  # [128,128,6]
    frac = onehot.reshape(H, SS, H, SS, len(PARTS)).mean(axis=(1, 3)) * PART_WEIGHT
    seg = frac.argmax(-1).astype(np.uint8)
    return img, seg


def edges(img):
    """Edge sketch of images: float [..., 32, 32, 3] in [0, 1] (or uint8) -> uint8 0/1 [..., 32, 32].

    Colour Sobel gradient magnitude (sqrt of the sum over RGB of gx^2 + gy^2, replicate padding)
    thresholded at EDGE_THRESHOLD, after non-maximum suppression along the gradient direction
    (a pixel is kept when its magnitude is >= both neighbours across the edge), so the lines are
    thin. Applied to ground-truth faces (the sketch condition) and to generated samples (judge).
    """
    x = np.asarray(img)
    if x.dtype == np.uint8:
        x = x.astype(np.float32) / 255.0
    x = x.astype(np.float32)
    p = np.pad(x, [(0, 0)] * (x.ndim - 3) + [(1, 1), (1, 1), (0, 0)], mode="edge")

    def sh(dy, dx):
        return p[..., 1 + dy : 1 + dy + SIZE, 1 + dx : 1 + dx + SIZE, :]

    gx = (sh(-1, 1) + 2 * sh(0, 1) + sh(1, 1)) - (sh(-1, -1) + 2 * sh(0, -1) + sh(1, -1))
    gy = (sh(1, -1) + 2 * sh(1, 0) + sh(1, 1)) - (sh(-1, -1) + 2 * sh(-1, 0) + sh(-1, 1))
    mag = np.sqrt((gx**2 + gy**2).sum(-1))
    # dominant direction: sign-consistent gradient summed over channels weighted by channel
    sx = (gx * np.sign(gx + 1e-9)).sum(-1)
    sy = (gy * np.sign(gy + 1e-9)).sum(-1)
    m = np.pad(mag, [(0, 0)] * (mag.ndim - 2) + [(1, 1), (1, 1)], mode="edge")

    def msh(dy, dx):
        return m[..., 1 + dy : 1 + dy + SIZE, 1 + dx : 1 + dx + SIZE]

    horiz = sx >= sy  # gradient mostly horizontal -> compare left/right
    keep_h = (mag >= msh(0, -1)) & (mag >= msh(0, 1))
    keep_v = (mag >= msh(-1, 0)) & (mag >= msh(1, 0))
    keep = np.where(horiz, keep_h, keep_v)
    return ((mag > EDGE_THRESHOLD) & keep).astype(np.uint8)


EDGE_THRESHOLD = 0.9


# ---------------------------------------------------------------------------------------------
# captions

_NOUNS = ["person", "face", "man", "woman", "individual", "someone", "portrait", "guy", "lady", "head"]
_NOUNS_PLAIN = ["person", "man", "woman", "individual", "guy", "lady"]


def caption(a, i, full=False):
    """A caption of attributes `a` with wording seeded by `i`; returns (text, mentions).

    Mentions a random non-empty subset of {hair_color, hair_long, glasses, smile} (all four with
    full=True); `mentions` maps each stated attribute to its value.
    """
    rng = np.random.default_rng([int(i), 0xCA7])
    keys = ["hair_color", "hair_long", "glasses", "smile"]
    if full:
        say = set(keys)
    else:
        say = {k for k in keys if rng.random() < 0.6}
        if not say:
            say = {keys[int(rng.integers(4))]}
    mentions = {k: a[k] for k in keys if k in say}
    color = HAIR_COLORS[a["hair_color"]]
    if color == "grey" and rng.random() < 0.4:
        color = "gray" if rng.random() < 0.5 else "silver"
    if color == "blond" and rng.random() < 0.3:
        color = "blonde"
    if color == "red" and rng.random() < 0.3:
        color = "ginger"
    length = ["short", "long"][a["hair_long"]]

    def hair_phrase():
        parts = []
        if "hair_long" in say:
            parts.append(length)
        if "hair_color" in say:
            parts.append(color)
        return " ".join(parts) + " hair" if parts else ""

    hp = hair_phrase()
    noun = _NOUNS[int(rng.integers(len(_NOUNS)))]
    style = int(rng.integers(4))
    if style == 0:
        # "This person has black hair." style: one sentence per fact
        s = []
        subj = rng.choice(["This person", "The person", "She", "He", "This " + noun if noun != "head" else "This person"])
        if hp:
            s.append(f"{subj} has {hp}.")
        if "glasses" in say:
            s.append(f"{subj} {'wears' if rng.random() < 0.5 else 'is wearing'} glasses." if a["glasses"]
                     else f"{subj} {'does not wear' if rng.random() < 0.5 else 'has no'} glasses.")
        if "smile" in say:
            s.append(f"{subj} is smiling." if a["smile"]
                     else f"{subj} {'is not smiling' if rng.random() < 0.5 else 'has a neutral expression'}.")
        text = " ".join(s)
    elif style == 1:
        # "a smiling woman with long red hair and glasses"
        n = _NOUNS_PLAIN[int(rng.integers(len(_NOUNS_PLAIN)))]
        pre = ""
        if "smile" in say:
            pre = "smiling " if a["smile"] else rng.choice(["serious ", "unsmiling ", "straight-faced "])
        withs = []
        if hp:
            withs.append(hp)
        if "glasses" in say:
            withs.append("glasses" if a["glasses"] else "no glasses")
        art = "an" if pre[:1] in ("u",) or (not pre and n[:1] in "aeiou") else "a"
        text = f"{art} {pre}{n}"
        if withs:
            text += " with " + " and ".join(withs)
    elif style == 2:
        # list style
        bits = []
        if hp:
            bits.append(hp)
        if "glasses" in say:
            bits.append("glasses" if a["glasses"] else "no glasses")
        if "smile" in say:
            bits.append("smiling" if a["smile"] else "not smiling")
        text = ", ".join(bits)
        if rng.random() < 0.5:
            text = f"{noun}: " + text
    else:
        # photo style
        bits = []
        if hp:
            bits.append(f"with {hp}")
        if "glasses" in say:
            bits.append("wearing glasses" if a["glasses"] else "without glasses")
        if "smile" in say:
            bits.append("who is smiling" if a["smile"] else "with a closed mouth")
        lead = rng.choice(["A photo of a", "Portrait of a", "A picture of a", "Close-up of a"])
        n = _NOUNS_PLAIN[int(rng.integers(len(_NOUNS_PLAIN)))]
        text = f"{lead} {n} " + ", ".join(bits[:-1]) + (" and " if len(bits) > 1 else "") + bits[-1] + "."
    if rng.random() < 0.3:
        text = text[:1].upper() + text[1:]
    return text, mentions


# ---------------------------------------------------------------------------------------------


def face(i, full_caption=False):
    a = sample_attrs(i)
    rgb, lab = render(a)
    img, seg = downsample(rgb, lab)
    img8 = np.clip(np.round(img * 255), 0, 255).astype(np.uint8)
    text, mentions = caption(a, i, full=full_caption)
    return {
        "index": int(i),
        "attrs": a,
        "image": img8,
        "seg": seg,
        "sketch": edges(img8),
        "caption": text,
        "mentions": mentions,
    }


def batch(indices, full_caption=False):
    """Arrays for many faces: image [N,32,32,3] u8, seg, sketch, attrs (columns), captions."""
    fs = [face(i, full_caption) for i in indices]
    out = {
        "index": np.array([f["index"] for f in fs], np.int64),
        "image": np.stack([f["image"] for f in fs]),
        "seg": np.stack([f["seg"] for f in fs]),
        "sketch": np.stack([f["sketch"] for f in fs]),
    }
    for k in ("hair_color", "hair_long", "glasses", "smile"):
        out[k] = np.array([f["attrs"][k] for f in fs], np.int64)
        # -1 = not mentioned in the caption
        out["says_" + k] = np.array([f["mentions"].get(k, -1) for f in fs], np.int64)
    out["caption"] = np.array([f["caption"] for f in fs])
    return out


def image_cond(img8):
    """uint8 [..., 32, 32, 3] -> float32 [..., 3, 32, 32] in [-1, 1]."""
    x = np.asarray(img8).astype(np.float32) / 127.5 - 1.0
    return np.moveaxis(x, -1, -3)


def sketch_cond(sk):
    """0/1 [..., 32, 32] -> float32 [..., 1, 32, 32]: edge +1, else -1."""
    return (np.asarray(sk).astype(np.float32) * 2 - 1)[..., None, :, :]


def segment_cond(seg, visible):
    """Labels [..., 32, 32] and visible [..., 6] (bool) -> float32 [..., 6, 32, 32].

    Channel k is +1 where seg == k and -1 elsewhere if part k is visible, else all 0.
    """
    seg = np.asarray(seg)
    oh = (seg[..., None, :, :] == np.arange(len(PARTS))[:, None, None]).astype(np.float32) * 2 - 1
    vis = np.asarray(visible).astype(np.float32)[..., :, None, None]
    return oh * vis


def seg_colors(seg, visible=None):
    """Colour map uint8 [..., 32, 32, 3]; pixels of hidden parts are drawn mid-grey."""
    c = PART_RGB[np.asarray(seg)]
    if visible is not None:
        vis = np.take_along_axis(np.asarray(visible)[..., None, None, :].repeat(SIZE, -3).repeat(SIZE, -2),
                                 np.asarray(seg)[..., None].astype(np.int64), -1)[..., 0]
        c = np.where(vis[..., None], c, 0.5)
    return np.clip(np.round(c * 255), 0, 255).astype(np.uint8)


def grid(images, cols, pad=1, scale=1):
    """uint8 [N,H,W,3] (or [N,H,W]) -> one uint8 grid image."""
    ims = np.asarray(images)
    if ims.ndim == 3:
        ims = np.repeat(ims[..., None], 3, -1)
    n, h, w, _ = ims.shape
    rows = (n + cols - 1) // cols
    g = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, np.uint8)
    for k in range(n):
        r, c = divmod(k, cols)
        g[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w] = ims[k]
    if scale > 1:
        g = g.repeat(scale, 0).repeat(scale, 1)
    return g


def write_png(path, img):
    """Minimal PNG writer (numpy + zlib): uint8 [H,W,3] or [H,W]."""
    import struct
    import zlib

    img = np.asarray(img, np.uint8)
    if img.ndim == 2:
        ctype, ch = 0, 1
        img = img[..., None]
    else:
        ctype, ch = 2, 3
    h, w = img.shape[:2]
    raw = b"".join(b"\x00" + img[y].tobytes() for y in range(h))

    def chunk(t, d):
        c = struct.pack(">I", len(d)) + t + d
        return c + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)

    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, ctype, 0, 0, 0))
    data += chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--count", type=int, default=64)
    ap.add_argument("--out", help="write an .npz dataset (image, seg, sketch, attributes, captions)")
    ap.add_argument("--full-captions", action="store_true", help="captions state all four attributes")
    ap.add_argument("--preview", help="write a PNG preview: faces, segmentations, sketches")
    args = ap.parse_args()
    idx = range(args.start, args.start + args.count)
    b = batch(idx, args.full_captions)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        np.savez(args.out, **b)
        print(f"wrote {args.out}: {len(b['index'])} faces")
    if args.preview:
        cols = 16
        n = len(b["index"])
        rows = []
        for s in range(0, n, cols):
            sl = slice(s, s + cols)
            rows += [b["image"][sl], seg_colors(b["seg"][sl]), np.repeat(b["sketch"][sl, ..., None] * 255, 3, -1)]
        write_png(args.preview, grid(np.concatenate(rows), cols, scale=3))
        for k in range(min(n, 8)):
            print(b["index"][k], b["caption"][k])


if __name__ == "__main__":
    main()
