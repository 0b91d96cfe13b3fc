"""Checking the kernels for AMD GPUs on a machine without one (CI): every ``kernels/<op>.hip`` compiled for
gfx90a (CDNA2, wave 64), gfx940 (CDNA3, wave 64) and gfx1030 (RDNA2, wave 32).

Both compilers come from Debian 12's ROCm 5.2 (``apt-get install hipcc libamdhip64-dev``):

- hiprtc, through ``HipRuntime.for_compiling(arch)``: the options, defines and disk cache the runtime uses on a
  real device (gfx90a and gfx1030: this hiprtc crashes on gfx940, see ``HIPRTC_ARCHS``). ROCm 5.2 keeps hiprtc inside ``libamdhip64.so.5`` while hip-python opens ``libhiprtc.so``;
  ``enable_hiprtc`` points ``ROCM_PATH`` at a folder where that name links to it.
- hipcc with ``-Rpass-analysis=kernel-resource-usage``, given the same options: VGPRs, scratch bytes per lane
  and occupancy of each kernel. Scratch is per-lane memory in VRAM, slow on AMD: decode kernels must use none.

``python -m rocmforge.backends.hip_offline docs/amd-kernels.md`` rewrites the table in the docs.

>>> from rocmforge.backends.hip_offline import is_decode_kernel
>>> is_decode_kernel("matvec_glu_q4_k"), is_decode_kernel("attn_prefill_d64")
(True, False)
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

from kernels import kernel_source
from rocmforge.backends.hip import HipRuntime

ARCHS = ("gfx90a", "gfx940", "gfx1030")
# ROCm 5.2's hiprtc aborts the process compiling for gfx940 ("munmap_chunk(): invalid pointer", even for a
# one-line kernel); its hipcc compiles gfx940 fine, so gfx940 is checked by hipcc only.
HIPRTC_ARCHS = ("gfx90a", "gfx1030")
NO_SCRATCH_ARCHS = ("gfx90a", "gfx1030")  # decode kernels may not spill there
# kernels that run over many tokens at once (prefill, the BERT encoder); every other kernel counts as decode
NOT_DECODE = re.compile(r"^(matmul_|mma_|quantize_q8|attn_prefill_|round_activations$|encoder_attention_|layer_norm$"
                        r"|gelu$)")
_LIB_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib64", "/usr/lib", "/opt/rocm/lib")


def kernel_ops() -> list[str]:
    """Every op with a kernel source, ``kernels/<op>.hip``."""
    return sorted(p.name[:-4] for p in files("kernels").iterdir() if p.name.endswith(".hip"))


def is_decode_kernel(name: str) -> bool:
    """True for kernels a decode step runs, or may (all but the prefill and encoder kernels in ``NOT_DECODE``)."""
    return not NOT_DECODE.match(name)


def enable_hiprtc() -> tuple[bool, str]:
    """Make hip-python's hiprtc loadable; (False, what is missing) when it cannot be. Call before hiprtc is used."""
    try:
        from hip import hiprtc
    except ImportError:
        return False, "hip-python is not installed (pip install rocmforge[gpu-amd])"
    rocm = Path(os.environ.get("ROCM_PATH") or os.environ.get("ROCM_HOME") or "/opt/rocm")
    if ctypes.util.find_library("hiprtc") or (rocm / "lib" / "libhiprtc.so").exists():
        return True, "libhiprtc.so"
    bundled = next((Path(d) / "libamdhip64.so.5" for d in _LIB_DIRS if (Path(d) / "libamdhip64.so.5").exists()), None)
    if bundled is None:
        return False, "neither libhiprtc.so nor ROCm 5's libamdhip64.so.5 is installed (apt-get install libamdhip64-dev)"
    if not hasattr(ctypes.CDLL(str(bundled)), "hiprtcCreateProgram"):
        return False, f"{bundled} has no hiprtc inside and libhiprtc.so is missing"
    folder = Path(tempfile.gettempdir()) / f"rocmforge-hiprtc-{os.getuid()}" / "lib"
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("libhiprtc.so", "libamdhip64.so"):
        link = folder / name
        if not link.exists():
            link.symlink_to(bundled)
    # hip-python resolves the library on its first call, through ROCM_PATH; hipcc reads ROCM_PATH too, so it
    # is set only for that first call
    before = os.environ.get("ROCM_PATH")
    os.environ["ROCM_PATH"] = str(folder.parent)
    try:
        err, *_ = hiprtc.hiprtcVersion()
    finally:
        if before is None:
            del os.environ["ROCM_PATH"]
        else:
            os.environ["ROCM_PATH"] = before
    if int(err) != 0:
        return False, f"hiprtc inside {bundled} did not answer: {err}"
    return True, f"hiprtc inside {bundled}"


def compile_with_hiprtc(arch: str, op: str) -> bytes:
    """``kernels/<op>.hip`` compiled for ``arch`` exactly as ``HipRuntime`` compiles it (disk cache included)."""
    return HipRuntime.for_compiling(arch).compile(kernel_source(op), op)


def hipcc_available() -> tuple[bool, str]:
    """(True, path) when hipcc is on PATH; else (False, how to get it)."""
    path = shutil.which("hipcc")
    return (True, path) if path else (False, "hipcc is not installed (apt-get install hipcc libamdhip64-dev)")


@dataclass(frozen=True)
class KernelResources:
    """What the AMD compiler reports for one kernel on one arch."""

    kernel: str
    arch: str
    vgprs: int
    scratch_bytes: int        # per lane
    occupancy: int            # waves per SIMD
    vgpr_spill: int


def resource_usage(op: str, arch: str) -> list[KernelResources]:
    """Compile ``kernels/<op>.hip`` with hipcc for ``arch`` (the runtime's options) and parse the resource report.

    Raises ``RuntimeError`` with the compiler's message if the source does not compile.
    """
    options = HipRuntime.for_compiling(arch).compile_options()
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / f"{op}.hip"
        source.write_text(kernel_source(op), encoding="utf-8")
        # hiprtc pre-includes the runtime header; hipcc needs it named. HIP_PLATFORM=amd: hipcc would pick nvcc
        # when it finds one.
        cmd = ["hipcc", "-x", "hip", "-include", "hip/hip_runtime.h", "--cuda-device-only", "-c", *options,
               "-Rpass-analysis=kernel-resource-usage", str(source), "-o", os.devnull]
        done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HIP_PLATFORM": "amd"})
    if done.returncode != 0:
        raise RuntimeError(f"hipcc could not compile kernels/{op}.hip for {arch}:\n{done.stderr[-4000:]}")
    rows, fields = [], {}
    for key, value in re.findall(r"remark:\s+(.+?): (\S+) \[-Rpass-analysis", done.stderr):
        if key == "Function Name" and fields:
            rows.append(fields)
            fields = {}
        fields[key] = value
    rows.append(fields)
    return [KernelResources(kernel=f["Function Name"], arch=arch, vgprs=int(f["VGPRs"]),
                            scratch_bytes=int(f["ScratchSize [bytes/lane]"]),
                            occupancy=int(f["Occupancy [waves/SIMD]"]), vgpr_spill=int(f["VGPRs Spill"]))
            for f in rows if f]


def resource_table(archs: tuple[str, ...] = ARCHS, jobs: int = 2) -> dict[tuple[str, str], list[KernelResources]]:
    """``resource_usage`` for every (arch, op), ``jobs`` compilers at a time."""
    pairs = [(arch, op) for arch in archs for op in kernel_ops()]
    with ThreadPoolExecutor(jobs) as pool:
        return dict(zip(pairs, pool.map(lambda pair: resource_usage(pair[1], pair[0]), pairs)))


def markdown(rows: list[KernelResources], archs: tuple[str, ...] = ARCHS) -> str:
    """One line per kernel: VGPRs / scratch bytes per lane / waves per SIMD on each arch."""
    by_kernel: dict[str, dict[str, KernelResources]] = {}
    for r in rows:
        by_kernel.setdefault(r.kernel, {})[r.arch] = r
    head = ["| kernel | decode |", *[f" {a} |" for a in archs]]
    lines = ["".join(head), "|---|---|" + "---|" * len(archs)]
    for kernel in sorted(by_kernel):
        cells = [f" {by_kernel[kernel][a].vgprs} / {by_kernel[kernel][a].scratch_bytes} / "
                 f"{by_kernel[kernel][a].occupancy} |" if a in by_kernel[kernel] else " – |" for a in archs]
        lines.append(f"| `{kernel}` | {'yes' if is_decode_kernel(kernel) else ''} |" + "".join(cells))
    return "\n".join(lines)


_TABLE = re.compile(r"(<!-- resource-table -->\n).*?(<!-- /resource-table -->)", re.S)


def write_docs(path: Path) -> None:
    """Replace the table between the ``resource-table`` markers of ``path`` with a fresh one."""
    text = path.read_text(encoding="utf-8")
    if not _TABLE.search(text):
        raise ValueError(f"{path} has no <!-- resource-table --> ... <!-- /resource-table --> markers")
    compiler = subprocess.run(["hipcc", "--version"], capture_output=True, text=True,
                              env={**os.environ, "HIP_PLATFORM": "amd"}).stdout
    version = next((line.strip() for line in compiler.splitlines() if "clang version" in line), "hipcc")
    rows = [r for kernels in resource_table().values() for r in kernels]
    table = f"Compiler: {version}. Cells: VGPRs / scratch bytes per lane / waves per SIMD.\n\n{markdown(rows)}\n"
    path.write_text(_TABLE.sub(lambda m: m[1] + table + m[2], text), encoding="utf-8")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m rocmforge.backends.hip_offline docs/amd-kernels.md")
    ok, why = hipcc_available()
    if not ok:
        sys.exit(why)
    write_docs(Path(sys.argv[1]))
