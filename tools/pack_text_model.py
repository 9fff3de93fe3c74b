#!/usr/bin/env python3
"""A small copy of the text model for carrying to the GPU machine (standard library only).

The GPU text-encoder test compares the GPU encoder with the CPU one on the fixture sentences, both
reading the same weights, so those weights need not be the original f32 ones: this writes every
tensor as f16 and zeroes the rows of the word-embedding table that no fixture sentence uses (the
fixture stores each sentence's token ids). The 88 MB model becomes ~45 MB that compress to ~20 MB,
which fits in a device run's carry next to the test executables.

    python3 tools/pack_text_model.py MODEL_DIR FIXTURE_JSON OUT_DIR
"""

import json
import shutil
import struct
import sys
from array import array
from pathlib import Path

SMALL_FILES = [
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "modules.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
    "1_Pooling/config.json",
]
WORD_EMBEDDINGS = "embeddings.word_embeddings.weight"


def read_safetensors(path):
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    header.pop("__metadata__", None)
    return header, memoryview(data)[8 + n :]


def to_f16(raw, dtype):
    if dtype == "F16":
        return bytes(raw)
    if dtype != "F32":
        raise SystemExit(f"unsupported tensor dtype {dtype}")
    values = array("f")
    values.frombytes(raw)
    if sys.byteorder != "little":
        values.byteswap()
    return struct.pack(f"<{len(values)}e", *values)


def main():
    if len(sys.argv) != 4:
        raise SystemExit(__doc__)
    model, fixture, out = (Path(a) for a in sys.argv[1:])
    used = {i for s in json.loads(fixture.read_text())["sentences"] for i in s["ids"]}
    header, body = read_safetensors(model / "model.safetensors")

    tensors, offset = {}, 0
    chunks = []
    for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        start, end = info["data_offsets"]
        raw = body[start:end]
        if info["dtype"] == "I64":  # position_ids: kept as they are
            blob = bytes(raw)
            dtype = "I64"
        elif name == WORD_EMBEDDINGS:
            rows, width = info["shape"]
            row_bytes = (end - start) // rows
            blob = bytearray(rows * width * 2)
            for i in sorted(used):
                blob[i * width * 2 : (i + 1) * width * 2] = to_f16(
                    raw[i * row_bytes : (i + 1) * row_bytes], info["dtype"]
                )
            blob = bytes(blob)
            dtype = "F16"
        else:
            blob = to_f16(raw, info["dtype"])
            dtype = "F16"
        tensors[name] = {
            "dtype": dtype,
            "shape": info["shape"],
            "data_offsets": [offset, offset + len(blob)],
        }
        chunks.append(blob)
        offset += len(blob)

    tensors["__metadata__"] = {
        "note": f"f16 copy for the GPU test; word-embedding rows outside {len(used)} fixture ids are zero"
    }
    head = json.dumps(tensors, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    out.mkdir(parents=True, exist_ok=True)
    (out / "1_Pooling").mkdir(exist_ok=True)
    tmp = out / "model.safetensors.tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for blob in chunks:
            f.write(blob)
    tmp.replace(out / "model.safetensors")
    for name in SMALL_FILES:
        if (model / name).is_file():
            shutil.copyfile(model / name, out / name)
    print(f"{out}: {offset / 1e6:.1f} MB of tensors, {len(used)} word-embedding rows kept")


if __name__ == "__main__":
    main()
