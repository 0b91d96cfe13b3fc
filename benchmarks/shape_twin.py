"""A model's shape twin: the same GGUF header (metadata, tokenizer, tensor names, types and shapes) with random
weights, so a lent GPU machine (no network, 64 MiB per call) can benchmark a model whose file is larger.

Speed depends on shapes and types, not on the weights' values, so llama.cpp and rocmforge timed on the twin are
timed as on the real file; logits of the twin are only good for comparing two engines on the same twin.

    python benchmarks/shape_twin.py header smollm2-135m .device/twins/smollm2.header   # here: ~2 MB
    python benchmarks/shape_twin.py expand .device/twins/smollm2.header smollm2-twin.gguf --seed 0   # there

The header file is the real file's bytes up to its tensor data, so ``expand`` only appends the data.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from rocmforge.errors import ModelFileError
from rocmforge.gguf_file import FastGGUFReader as GGUFReader  # the plain reader takes ~9 s on Gemma's vocabulary

# Byte offsets of the float16 scale fields in each block type (the rest of a block is integer codes, any bytes do):
# (offsets of positive scales "d", offsets of the minimum/“dmin” fields).
_SCALE_FIELDS: dict[GGMLQuantizationType, tuple[tuple[int, ...], tuple[int, ...]]] = {
    GGMLQuantizationType.Q4_0: ((0,), ()),
    GGMLQuantizationType.Q4_1: ((0,), (2,)),
    GGMLQuantizationType.Q5_0: ((0,), ()),
    GGMLQuantizationType.Q5_1: ((0,), (2,)),
    GGMLQuantizationType.Q8_0: ((0,), ()),
    GGMLQuantizationType.Q2_K: ((80,), (82,)),
    GGMLQuantizationType.Q3_K: ((108,), ()),
    GGMLQuantizationType.Q4_K: ((0,), (2,)),
    GGMLQuantizationType.Q5_K: ((0,), (2,)),
    GGMLQuantizationType.Q6_K: ((208,), ()),
    GGMLQuantizationType.IQ4_NL: ((0,), ()),
}


def write_header(model: str, out: Path) -> None:
    """Copy the bytes of ``model`` (a registry name or a path) up to its tensor data into ``out``."""
    path = Path(model)
    if not path.exists():
        from rocmforge.registry import resolve
        path = resolve(model)
    reader = GGUFReader(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "rb") as src:
        out.write_bytes(src.read(reader.data_offset))
    print(f"{out}: {reader.data_offset / 1e6:.1f} MB header of {path.name} ({len(reader.tensors)} tensors)")


def _random_tensor(ggml_type: GGMLQuantizationType, n_elements: int, is_vector: bool,
                   rng: np.random.Generator) -> bytes:
    if ggml_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16):
        values = (1.0 + 0.1 * rng.standard_normal(n_elements)) if is_vector else 0.02 * rng.standard_normal(n_elements)
        if ggml_type == GGMLQuantizationType.F32:
            return values.astype(np.float32).tobytes()
        if ggml_type == GGMLQuantizationType.F16:
            return values.astype(np.float16).tobytes()
        return (values.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16).tobytes()
    if ggml_type not in _SCALE_FIELDS:
        raise SystemExit(f"shape_twin: no scale layout for {ggml_type.name}")
    block_elements, block_bytes = GGML_QUANT_SIZES[ggml_type]
    n_blocks = n_elements // block_elements
    blocks = rng.integers(0, 256, size=(n_blocks, block_bytes), dtype=np.uint8)
    positive, minimum = _SCALE_FIELDS[ggml_type]
    # Scales small enough that activations stay finite through every layer of a random model.
    for offset in positive:
        d = rng.uniform(0.0005, 0.002, n_blocks).astype(np.float16)
        blocks[:, offset:offset + 2] = d.view(np.uint8).reshape(n_blocks, 2)
    for offset in minimum:
        m = rng.uniform(0.0005, 0.002, n_blocks).astype(np.float16)
        blocks[:, offset:offset + 2] = m.view(np.uint8).reshape(n_blocks, 2)
    if ggml_type == GGMLQuantizationType.Q4_1 or ggml_type == GGMLQuantizationType.Q5_1:
        # q4_1/q5_1 store the block minimum itself: centre the codes around zero.
        levels = 16 if ggml_type == GGMLQuantizationType.Q4_1 else 32
        d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)[:, 0]
        blocks[:, 2:4] = (-d * (levels / 2)).astype(np.float16).view(np.uint8).reshape(n_blocks, 2)
    return blocks.tobytes()


def expand(header: Path, out: Path, seed: int = 0) -> None:
    """Append random weights of the right types and sizes to a header written by ``write_header``."""
    data = header.read_bytes()
    tmp = out.with_suffix(".tmp")
    tmp.write_bytes(data)
    # Parse the header by giving the reader a file of the full size (zeros), then fill the tensors in place.
    reader_probe = GGUFReader(_padded(tmp, data))
    rng = np.random.default_rng(seed)
    with open(tmp, "r+b") as f:
        for t in reader_probe.tensors:
            f.seek(int(t.data_offset))
            f.write(_random_tensor(GGMLQuantizationType(t.tensor_type), int(t.n_elements),
                                   len(t.shape) == 1 or int(min(t.shape)) == 1, rng))
    tmp.replace(out)
    print(f"{out}: {out.stat().st_size / 1e6:.1f} MB, {len(reader_probe.tensors)} random tensors (seed {seed})")


def _padded(tmp: Path, header: bytes) -> Path:
    """Grow ``tmp`` to the size its tensor table implies, so that GGUFReader can map every tensor."""
    import struct
    end = len(header)
    # The reader wants the tensors present; find their extent by parsing with a generous zero tail first.
    with open(tmp, "r+b") as f:
        f.truncate(end + (1 << 20))
    while True:
        try:
            reader = GGUFReader(tmp)
            break
        except (ModelFileError, ValueError, IndexError, struct.error):
            with open(tmp, "r+b") as f:
                f.seek(0, 2)
                f.truncate(f.tell() * 2)
    size = max(int(t.data_offset) + int(t.n_bytes) for t in reader.tensors)
    with open(tmp, "r+b") as f:
        f.truncate(size)
    return tmp


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    h = sub.add_parser("header", help="write the header of a model (registry name or path)")
    h.add_argument("model")
    h.add_argument("out", type=Path)
    e = sub.add_parser("expand", help="write a twin GGUF from a header")
    e.add_argument("header", type=Path)
    e.add_argument("out", type=Path)
    e.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "header":
        write_header(args.model, args.out)
    else:
        expand(args.header, args.out, args.seed)


if __name__ == "__main__":
    main(sys.argv[1:])
