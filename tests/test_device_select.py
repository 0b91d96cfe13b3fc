"""Device selection on a machine without a GPU (CI): auto falls back to numpy with one log line; forcing a GPU
that is not there is a DeviceError naming what is missing."""
from __future__ import annotations

import logging

import pytest

from rocmforge.backends import cuda, hip
from rocmforge.backends.select import backend_for_model, choose_device, select_backend
from rocmforge.errors import DeviceError
from rocmforge.gguf_file import GGUFFile
from tiny_gguf import T, write_model

no_gpu = pytest.mark.skipif(hip.available()[0] or cuda.available()[0], reason="a GPU is present on this machine")


def _hip_runtime_loads() -> bool:
    try:
        from hip import hip as hip_api
    except ImportError:
        return False
    return bool(hip_api.has_symbol("hipMalloc"))


# Debian's libamdhip64 + hip-python on a machine with no AMD GPU (what .ci/run installs)
hip_runtime_without_device = pytest.mark.skipif(
    not _hip_runtime_loads() or hip.available()[0],
    reason=f"needs the HIP runtime loaded and no AMD device; here: {hip.available()[1]}")


@no_gpu
def test_auto_falls_back_to_cpu_and_logs_why(caplog, monkeypatch):
    monkeypatch.delenv("ROCMFORGE_DEVICE", raising=False)
    with caplog.at_level(logging.INFO, logger="rocmforge.device"):
        backend = select_backend("auto")
    assert backend.name == "cpu"
    lines = [r.getMessage() for r in caplog.records if r.name == "rocmforge.device"]
    assert len(lines) == 1
    assert lines[0].startswith("device: cpu (auto: no GPU")
    assert "hip:" in lines[0] and "cuda:" in lines[0]


@no_gpu
def test_forcing_hip_names_the_missing_piece():
    with pytest.raises(DeviceError) as err:
        select_backend("hip")
    message = str(err.value)
    assert message.startswith("device='hip' requested but ")
    assert "hip-python is not installed" in message or "libamdhip64.so" in message or "no device" in message


@no_gpu
def test_forcing_cuda_names_the_missing_piece():
    with pytest.raises(DeviceError) as err:
        select_backend("cuda")
    message = str(err.value)
    assert message.startswith("device='cuda' requested but ")
    assert "cuda-python is not installed" in message or "libcuda.so.1" in message or "no device" in message


@no_gpu
def test_environment_variable_forces_the_device(monkeypatch):
    monkeypatch.setenv("ROCMFORGE_DEVICE", "cuda")
    with pytest.raises(DeviceError, match="device='cuda' requested"):
        choose_device(None)
    monkeypatch.setenv("ROCMFORGE_DEVICE", "cpu")
    assert choose_device(None)[0] == "cpu"


def test_unknown_device_is_rejected():
    with pytest.raises(DeviceError, match="unknown device 'tpu'"):
        choose_device("tpu")


def test_cpu_is_always_available():
    assert choose_device("cpu") == ("cpu", "device=cpu requested")
    assert select_backend("cpu").name == "cpu"


@no_gpu
@hip_runtime_without_device
def test_auto_with_a_hip_runtime_but_no_device_falls_back_with_one_line(caplog, monkeypatch):
    monkeypatch.delenv("ROCMFORGE_DEVICE", raising=False)
    with caplog.at_level(logging.INFO, logger="rocmforge.device"):
        backend = select_backend("auto")
    assert backend.name == "cpu"
    lines = [r.getMessage() for r in caplog.records if r.name == "rocmforge.device"]
    assert len(lines) == 1 and "hip: the HIP runtime found no device" in lines[0]


@hip_runtime_without_device
def test_forcing_hip_with_a_runtime_but_no_device_says_so():
    with pytest.raises(DeviceError) as err:
        select_backend("hip")
    assert str(err.value) == "device='hip' requested but the HIP runtime found no device"


@no_gpu
@pytest.mark.parametrize("weight_type, expected, why", [
    (T.Q8_0, "cpu-exact", "cpu-exact covers every weight type (Q8_0)"),
    (T.MXFP4, "cpu", "cpu-exact has no exact matmul for MXFP4"),
])
def test_auto_without_a_gpu_picks_cpu_exact_when_it_covers_the_file(weight_type, expected, why, tmp_path, caplog,
                                                                    monkeypatch):
    monkeypatch.delenv("ROCMFORGE_DEVICE", raising=False)
    gguf = GGUFFile(write_model(tmp_path / "tiny.gguf", weight_type=weight_type))
    with caplog.at_level(logging.INFO, logger="rocmforge.device"):
        backend = backend_for_model(None, gguf, 16)
    assert backend.name == expected
    lines = [r.getMessage() for r in caplog.records if r.name == "rocmforge.device"]
    assert len(lines) == 1
    assert lines[0].startswith(f"device: {expected} (auto: no GPU (") and lines[0].endswith(f"; {why})")


def test_a_forced_cpu_stays_numpy_whatever_the_file(tmp_path):
    gguf = GGUFFile(write_model(tmp_path / "tiny.gguf", weight_type=T.Q8_0))
    assert backend_for_model("cpu", gguf, 16).name == "cpu"
