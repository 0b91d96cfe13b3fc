"""Open a GGUF file: memory-mapped tensors, decoded metadata and the typed model config.

Built on ``gguf.GGUFReader`` with one change: the reader walks every element of every
metadata array (SmolLM2's 49k-entry token lists cost ~1.6-3.6 s, Gemma's 262k ~9 s).
``FastGGUFReader`` only measures array extents while parsing — numpy views for numeric
arrays, a byte range for string arrays — and ``GGUFFile.metadata`` decodes strings when
asked. Tensor data is never copied: ``TensorRef.raw`` is a view into the memory map.

>>> from rocmforge.gguf_file import GGUFFile
>>> from rocmforge.registry import resolve
>>> f = GGUFFile(resolve("smollm2-135m"))  # doctest: +SKIP
>>> f.config.n_layers, f.tensors["token_embd.weight"].ggml_type.name  # doctest: +SKIP
(30, 'Q8_0')
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType, ReaderField
from gguf.quants import dequantize

from rocmforge.errors import ModelFileError, UnsupportedError

_STRING_ARRAY = "string-array"  # marker stored in ReaderField.types for lazily decoded string arrays


class FastGGUFReader(GGUFReader):
    """A ``GGUFReader`` that does not build one numpy view per array element."""

    def _get_field_parts(self, orig_offs: int, raw_type: int):
        if GGUFValueType(raw_type) != GGUFValueType.ARRAY:
            return super()._get_field_parts(orig_offs, raw_type)
        item_type = self._get(orig_offs, np.uint32)
        count = self._get(orig_offs + 4, np.uint64)
        start = orig_offs + 12
        n, gtype = int(count[0]), GGUFValueType(int(item_type[0]))
        if gtype == GGUFValueType.STRING:
            # Strings are length-prefixed, so the extent is found by hopping over the lengths.
            end, data = start, self.data
            for _ in range(n):
                end += 8 + int.from_bytes(data[end:end + 8], "little")
            blob = self.data[start:end]
            return end - orig_offs, [item_type, count, blob], [2], [GGUFValueType.ARRAY, _STRING_ARRAY]
        if gtype == GGUFValueType.ARRAY:
            raise UnsupportedError("nested metadata arrays are not supported")
        values = self._get(start, self.gguf_scalar_to_np[gtype], n)
        return 12 + int(values.nbytes), [item_type, count, values], [2], [GGUFValueType.ARRAY, gtype]

    def _build_tensors(self, start_offs: int, fields: list[ReaderField]) -> None:
        # gguf would fail on the first short tensor with a bare reshape error; name the tensor instead.
        for field in fields:
            _, name, _, dims, raw_type, offset = field.parts
            tensor = bytes(name).decode("utf-8", errors="replace")
            try:
                ggml_type = GGMLQuantizationType(int(raw_type[0]))
            except ValueError:
                raise UnsupportedError(f"tensor {tensor}: unknown quantization type id {int(raw_type[0])}") from None
            block, block_bytes = GGML_QUANT_SIZES[ggml_type]
            end = start_offs + int(offset[0]) + int(np.prod(dims)) * block_bytes // block
            if end > len(self.data):
                raise ModelFileError(f"truncated file: tensor {tensor} needs bytes up to {end:,} "
                                     f"but the file has {len(self.data):,}")
        super()._build_tensors(start_offs, fields)


def _decode_strings(blob: np.ndarray, count: int) -> list[str]:
    raw, out, pos = blob.tobytes(), [], 0
    for _ in range(count):
        length = int.from_bytes(raw[pos:pos + 8], "little")
        out.append(raw[pos + 8:pos + 8 + length].decode("utf-8", errors="replace"))
        pos += 8 + length
    return out


def _field_value(field: ReaderField) -> Any:
    if field.types[0] != GGUFValueType.ARRAY:
        return field.contents()
    _, count, payload = field.parts[-3:]
    if field.types[1] == _STRING_ARRAY:
        return _decode_strings(payload, int(count[0]))
    return payload


class LazyMetadata(dict):
    """Metadata dict whose values are decoded on first access (string arrays are the slow part) and kept, except
    ``READ_ONCE`` keys, decoded on every access: the token texts and BPE merges are read once, by the tokenizer,
    which keeps its own form of them (SmolLM2's 49,152 texts and 48,900 merges as lists: 9 MiB for the life of
    the model)."""

    READ_ONCE = frozenset({"tokenizer.ggml.tokens", "tokenizer.ggml.merges"})

    def __init__(self, fields: dict[str, ReaderField]):
        super().__init__()
        self._fields = fields

    def __getitem__(self, key: str) -> Any:
        if key in self.READ_ONCE:
            return _field_value(self._fields[key])
        if not dict.__contains__(self, key):
            dict.__setitem__(self, key, _field_value(self._fields[key]))
        return dict.__getitem__(self, key)

    def __contains__(self, key: object) -> bool:
        return key in self._fields

    def get(self, key: str, default: Any = None) -> Any:
        return self[key] if key in self._fields else default

    def keys(self):
        return self._fields.keys()

    def __iter__(self):
        return iter(self._fields)

    def __len__(self) -> int:
        return len(self._fields)

    def items(self):
        return ((k, self[k]) for k in self._fields)


@dataclass(frozen=True)
class TensorRef:
    """One tensor as stored: its GGML type, logical shape (numpy order, rows first) and raw memory-mapped data."""

    name: str
    ggml_type: GGMLQuantizationType
    shape: tuple[int, ...]
    raw: np.ndarray
    n_bytes: int

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape))


class GGUFFile:
    """A GGUF model file opened read-only; nothing but the header is read until asked for."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelFileError(f"{self.path}: no such file")
        with open(self.path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise ModelFileError(f"{self.path}: not a GGUF file (bad magic)")
        try:
            reader = FastGGUFReader(self.path)
        except (ModelFileError, UnsupportedError) as exc:
            raise type(exc)(f"{self.path}: {exc}") from None
        except (ValueError, IndexError, KeyError, OverflowError) as exc:
            raise ModelFileError(f"{self.path}: corrupt or truncated GGUF header: {exc}") from None
        self.reader = reader
        self.metadata: dict[str, Any] = LazyMetadata(reader.fields)
        self.tensors: dict[str, TensorRef] = {}
        for t in reader.tensors:
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))
            self.tensors[t.name] = TensorRef(t.name, t.tensor_type, shape, t.data, int(t.n_bytes))

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", "unknown"))

    @cached_property
    def config(self):
        from rocmforge.config import ModelConfig

        return ModelConfig.from_gguf(self)

    def array_length(self, key: str) -> int:
        """Element count of a metadata array without decoding it (fast even for 262k-entry token lists)."""
        field = self.reader.fields[key]
        if field.types[0] != GGUFValueType.ARRAY:
            raise ModelFileError(f"{self.path.name}: metadata {key!r} is not an array")
        return int(field.parts[-2][0])

    def tensor(self, name: str) -> TensorRef:
        if name not in self.tensors:
            raise ModelFileError(f"{self.path.name}: missing tensor {name!r}")
        return self.tensors[name]

    def dequantize(self, name: str) -> np.ndarray:
        """The tensor as float32 in its logical shape, via ``gguf.quants.dequantize`` (bit-exact by definition)."""
        ref = self.tensor(name)
        try:
            values = dequantize(ref.raw, ref.ggml_type)
        except NotImplementedError:
            raise UnsupportedError(
                f"tensor {name}: quantization type {ref.ggml_type.name} cannot be dequantized by gguf") from None
        return np.asarray(values, dtype=np.float32).reshape(ref.shape)

    def bytes_by_type(self) -> dict[str, tuple[int, int]]:
        """GGML type name -> (tensor count, bytes as stored)."""
        out: dict[str, tuple[int, int]] = {}
        for ref in self.tensors.values():
            count, nbytes = out.get(ref.ggml_type.name, (0, 0))
            out[ref.ggml_type.name] = (count + 1, nbytes + ref.n_bytes)
        return out

