"""The AMD lane without an AMD GPU: every kernel compiled through ``HipRuntime``'s own compile path (hiprtc,
its options, its disk cache) for gfx90a and gfx1030, by hipcc with the same options for gfx90a, gfx940 and
gfx1030, and hipcc's resource report showing no scratch in decode kernels on gfx90a and gfx1030. Needs Debian's ``hipcc libamdhip64-dev`` and hip-python
(``.ci/run`` installs them); skips naming what is missing."""
from __future__ import annotations

import re

import pytest

from kernels import kernel_source
from rocmforge.backends import hip_offline
from rocmforge.backends.hip import HipRuntime
from rocmforge.backends.hip_offline import ARCHS, HIPRTC_ARCHS, NO_SCRATCH_ARCHS
from rocmforge.backends.runtime import cache_dir
from rocmforge.errors import DeviceError

OPS = hip_offline.kernel_ops()


@pytest.fixture(scope="module")
def hiprtc():
    ok, why = hip_offline.enable_hiprtc()
    if not ok:
        pytest.skip(f"hiprtc unavailable: {why}")


@pytest.fixture(scope="module")
def hipcc():
    ok, why = hip_offline.hipcc_available()
    if not ok:
        pytest.skip(why)


def extern_kernels(op: str) -> set[str]:
    """Kernel names written out in the source; declarations inside a macro body (``matvec_##name``, a macro's
    parameter) are left out: the names they make are only known to the compiler."""
    names = set()
    for declaration in re.findall(r'extern "C" __global__ void (.*)', kernel_source(op)):
        if declaration.rstrip().endswith("\\"):
            continue
        declaration = re.sub(r"^\w+\(\d+\)\s*", "", declaration)  # launch bounds
        names.update(re.findall(r"^(\w+)\(", declaration))
    return names


@pytest.mark.parametrize("arch", HIPRTC_ARCHS)
def test_every_kernel_compiles_with_hiprtc_into_the_arch_cache(arch, hiprtc, tmp_path, monkeypatch):
    monkeypatch.setenv("ROCMFORGE_HOME", str(tmp_path))
    runtime = HipRuntime.for_compiling(arch)
    assert f"--offload-arch={arch}" in runtime.compile_options()
    assert f"-DRF_WARP={32 if arch == 'gfx1030' else 64}" in runtime.compile_options()
    for op in OPS:
        code = runtime.compile(kernel_source(op), op)
        assert code[:4] == b"\x7fELF", op  # an AMDGPU code object
    cached = sorted(p.name.split("-")[0] for p in (cache_dir() / "hip" / arch).iterdir())
    assert cached == OPS

    def must_not_compile(*args):
        raise AssertionError("compiled again instead of reading the disk cache")

    monkeypatch.setattr(runtime, "_compile", must_not_compile)
    assert runtime.compile(kernel_source("add"), "add")[:4] == b"\x7fELF"


def test_hiprtc_errors_name_the_kernel_file_and_the_compiler_message(hiprtc, tmp_path, monkeypatch):
    monkeypatch.setenv("ROCMFORGE_HOME", str(tmp_path))
    runtime = HipRuntime.for_compiling("gfx90a")
    with pytest.raises(DeviceError, match=r"hiprtc could not compile kernels/broken\.hip:(.|\n)*undeclared"):
        runtime.compile('extern "C" __global__ void k(float* x) { x[0] = missing; }', "broken")


@pytest.fixture(scope="module")
def resources(hipcc):
    table = hip_offline.resource_table()
    return {arch: {op: table[arch, op] for op in OPS} for arch in ARCHS}


@pytest.mark.parametrize("arch", ARCHS)
def test_hipcc_compiles_and_reports_every_kernel(arch, resources):
    for op, rows in resources[arch].items():
        names = {r.kernel for r in rows}
        assert rows and extern_kernels(op) <= names, op
        assert all(r.occupancy > 0 for r in rows), op  # spin needs no VGPR on gfx1030


@pytest.mark.parametrize("arch", NO_SCRATCH_ARCHS)
def test_decode_kernels_use_no_scratch(arch, resources):
    decode = [r for rows in resources[arch].values() for r in rows if hip_offline.is_decode_kernel(r.kernel)]
    assert {"matvec_q4_1", "matvec_glu_q4_k", "attn_decode_d128", "rms_norm"} <= {r.kernel for r in decode}
    spilling = [f"{r.kernel}: {r.scratch_bytes} bytes/lane, {r.vgpr_spill} VGPRs spilled" for r in decode
                if r.scratch_bytes or r.vgpr_spill]
    assert not spilling, f"decode kernels using scratch on {arch}: {spilling}"
