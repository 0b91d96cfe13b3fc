"""Choosing where a model runs: ``device="auto" | "hip" | "cuda" | "cpu" | "cpu-exact"`` (or ``$ROCMFORGE_DEVICE``;
"cpu-exact" is numpy with llama.cpp's exact CPU arithmetic, ``rocmforge.backends.exact``; "hip-cpu" is the GPU
backend with its kernels run on the CPU by HIP-CPU, ``rocmforge.backends.hip_cpu``: slow, for checking kernels
without a GPU, never chosen by ``auto``).

``auto`` takes AMD when hip-python finds ``libamdhip64.so`` and a device, else NVIDIA when cuda-python finds
the driver and a device, else the CPU, and logs one line saying which and why. On the CPU a model whose every
weight type has an exact kernel runs on cpu-exact (llama.cpp's arithmetic, the same text on every x86 CPU: the
numpy path's sums follow the BLAS kernel the CPU gets), any other on numpy. Forcing a device that is not there
raises ``DeviceError`` naming what is missing.

>>> from rocmforge.backends.select import choose_device
>>> choose_device("cpu")
('cpu', 'device=cpu requested')
"""
from __future__ import annotations

import logging
import os
from typing import Any

from rocmforge.backends import cuda, hip, hip_cpu
from rocmforge.errors import DeviceError

log = logging.getLogger("rocmforge.device")

DEVICES = ("auto", "hip", "cuda", "cpu", "cpu-exact", "hip-cpu")


def choose_device(device: str | None = None) -> tuple[str, str]:
    """Resolve a device request to ``("hip" | "cuda" | "cpu" | "hip-cpu", reason)``.

    ``None`` reads ``$ROCMFORGE_DEVICE`` (default ``auto``). Raises ``DeviceError`` for an unknown name or a
    forced device that is missing.
    """
    requested = (device or os.environ.get("ROCMFORGE_DEVICE") or "auto").lower()
    if requested not in DEVICES:
        raise DeviceError(f"unknown device {requested!r}; choose one of {', '.join(DEVICES)}")
    if requested in ("cpu", "cpu-exact"):
        return requested, f"device={requested} requested"
    probes = {"hip": hip.available, "cuda": cuda.available, "hip-cpu": hip_cpu.available}
    if requested != "auto":
        ok, why = probes[requested]()
        if not ok:
            raise DeviceError(f"device={requested!r} requested but {why}")
        return requested, f"device={requested} requested ({why})"
    missing = []
    for name in ("hip", "cuda"):
        ok, why = probes[name]()
        if ok:
            return name, f"auto: {why}"
        missing.append(f"{name}: {why}")
    return "cpu", "auto: no GPU (" + "; ".join(missing) + ")"


def select_backend(device: str | None = None):
    """The backend for ``device`` (see ``choose_device``), logging one line with the choice and the reason.

    >>> select_backend("cpu").name
    'cpu'
    """
    return _backend(*choose_device(device))


def _cpu_for(gguf: Any, reason: str) -> tuple[str, str]:
    """cpu-exact when it covers the whole file, else numpy; the reason gains why."""
    from rocmforge.backends.exact import coverage
    exact, why = coverage(gguf)
    return ("cpu-exact" if exact else "cpu"), f"{reason}; {why}"


def _backend(name: str, reason: str):
    log.info("device: %s (%s)", name, reason)
    if name == "cpu":
        from rocmforge.backends.cpu import CpuBackend
        return CpuBackend()
    if name == "cpu-exact":
        from rocmforge.backends.exact import ExactCpuBackend
        return ExactCpuBackend()
    from rocmforge.backends.gpu import GpuBackend
    runtime = {"hip": hip.HipRuntime, "cuda": cuda.CudaRuntime, "hip-cpu": hip_cpu.HipCpuRuntime}[name]()
    return GpuBackend(runtime)


def backend_for_model(device: str | None, gguf: Any, n_slots: int):
    """``select_backend`` plus the memory check and arena allocation for a model with ``n_slots`` KV positions.

    Under ``auto`` without a GPU, cpu-exact runs the file when it covers every weight type, else numpy. A forced
    GPU without room raises ``DeviceError`` with the numbers; under ``auto`` the CPU takes over (the same choice)
    and a second log line says why.
    """
    auto = (device or os.environ.get("ROCMFORGE_DEVICE") or "auto").lower() == "auto"
    name, reason = choose_device(device)
    if auto and name == "cpu":
        name, reason = _cpu_for(gguf, reason)
    backend = _backend(name, reason)
    if backend.name in ("cpu", "cpu-exact"):
        return backend
    try:
        backend.prepare(gguf, n_slots)
    except DeviceError as exc:
        if not auto:
            raise
        return _backend(*_cpu_for(gguf, f"auto: {exc}"))
    return backend
