"""The runtime the GPU tests run on: a HIP device, else a CUDA device, else the GPU backend's kernels on the CPU
through HIP-CPU (``rocmforge.backends.hip_cpu``: wave 64, AMD's side of every kernel) when
``$ROCMFORGE_TEST_EMULATED_GPU`` is 1; otherwise the test is skipped, naming what is missing."""
from __future__ import annotations

import os

import pytest

from rocmforge.backends.runtime import Runtime


def gpu_runtime() -> Runtime:
    from rocmforge.backends import cuda, hip, hip_cpu
    return {"hip": hip.HipRuntime, "cuda": cuda.CudaRuntime, "hip-cpu": hip_cpu.HipCpuRuntime}[gpu_device()]()


def gpu_device() -> str:
    """The device name for ``rocmforge.load`` under the same rule as ``gpu_runtime``."""
    from rocmforge.backends import cuda, hip, hip_cpu
    for name, module in (("hip", hip), ("cuda", cuda)):
        if module.available()[0]:
            return name
    missing = f"no GPU: {hip.available()[1]}; {cuda.available()[1]}"
    if os.environ.get("ROCMFORGE_TEST_EMULATED_GPU") != "1":
        pytest.skip(f"{missing}; ROCMFORGE_TEST_EMULATED_GPU=1 runs these on HIP-CPU")
    ok, why = hip_cpu.available()
    if not ok:
        pytest.skip(f"{missing}; and {why}")
    return "hip-cpu"
