"""Choosing where a model runs: ``device="auto" | "hip" | "cuda" | "cpu" | "cpu-exact"`` (or ``$ROCMFORGE_DEVICE``;
"cpu-exact" is numpy with llama.cpp's exact CPU arithmetic, ``rocmforge.backends.exact``).

``auto`` takes AMD when hip-python finds ``libamdhip64.so`` and a device, else NVIDIA when cuda-python finds
the driver and a device, else numpy, and logs one line saying which and why. Forcing a device that is not
there raises ``DeviceError`` naming what is missing.

>>> from rocmforge.backends.select import choose_device
>>> choose_device("cpu")
('cpu', 'device=cpu requested')
"""
from __future__ import annotations

import logging
import os
from typing import Any

from rocmforge.backends import cuda, hip
from rocmforge.errors import DeviceError

log = logging.getLogger("rocmforge.device")

DEVICES = ("auto", "hip", "cuda", "cpu", "cpu-exact")


def choose_device(device: str | None = None) -> tuple[str, str]:
    """Resolve a device request to ``("hip" | "cuda" | "cpu", reason)``.

    ``None`` reads ``$ROCMFORGE_DEVICE`` (default ``auto``). Raises ``DeviceError`` for an unknown name or a
    forced device that is missing.
    """
    requested = (device or os.environ.get("ROCMFORGE_DEVICE") or "auto").lower()
    if requested not in DEVICES:
        raise DeviceError(f"unknown device {requested!r}; choose one of {', '.join(DEVICES)}")
    if requested in ("cpu", "cpu-exact"):
        return requested, f"device={requested} requested"
    probes = {"hip": hip.available, "cuda": cuda.available}
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
    name, reason = choose_device(device)
    log.info("device: %s (%s)", name, reason)
    if name == "cpu":
        from rocmforge.backends.cpu import CpuBackend
        return CpuBackend()
    if name == "cpu-exact":
        from rocmforge.backends.exact import ExactCpuBackend
        return ExactCpuBackend()
    from rocmforge.backends.gpu import GpuBackend
    runtime = hip.HipRuntime() if name == "hip" else cuda.CudaRuntime()
    return GpuBackend(runtime)


def backend_for_model(device: str | None, gguf: Any, n_slots: int):
    """``select_backend`` plus the memory check and arena allocation for a model with ``n_slots`` KV positions.

    A forced GPU without room raises ``DeviceError`` with the numbers; under ``auto`` the numpy backend takes
    over and the log line says why.
    """
    backend = select_backend(device)
    if backend.name in ("cpu", "cpu-exact"):
        return backend
    try:
        backend.prepare(gguf, n_slots)
    except DeviceError as exc:
        if (device or os.environ.get("ROCMFORGE_DEVICE") or "auto").lower() != "auto":
            raise
        log.info("device: cpu (auto: %s)", exc)
        from rocmforge.backends.cpu import CpuBackend
        return CpuBackend()
    return backend
