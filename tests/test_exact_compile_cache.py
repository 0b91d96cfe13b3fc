"""The cpu-exact kernels compile once, up front, into a cache a non-editable install can write
(``rocmforge.exact.compile_cache``): run in fresh processes, as a new user would."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numba
import pytest

from rocmforge.exact import compile_cache

ROOT = Path(__file__).parent.parent

# A process where the package directory reads as not writable (as for a root-owned site-packages install), with
# the compile log on stderr; it loads the model and prints where numba caches and a greedy continuation.
READ_ONLY_INSTALL = """
import logging, os, sys
real_access = os.access
os.access = lambda path, mode, *a, **k: False if "rocmforge/exact" in str(path) else real_access(path, mode, *a, **k)
logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
import numba, rocmforge
from rocmforge.exact.compile_cache import compiler_resident_kib
model = rocmforge.load(sys.argv[1], device="cpu-exact")
llvm_kib = compiler_resident_kib()
print(numba.config.CACHE_DIR)
print(repr(model.generate("The capital of France is", max_new_tokens=4, temperature=0)))
print(llvm_kib)  # right after the load
"""


def _run(model_path: Path, home: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
    env.update(ROCMFORGE_HOME=str(home), PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-c", READ_ONLY_INSTALL, str(model_path)], env=env, capture_output=True,
                          text=True, timeout=600, check=True)


@pytest.mark.slow
def test_read_only_install_compiles_once_into_rocmforge_home(smollm2_path, tmp_path):
    first = _run(smollm2_path, tmp_path)
    cache_dir, text, _ = first.stdout.splitlines()[-3:]
    assert cache_dir == str(tmp_path / "numba")
    assert "rocmforge.exact: compiled" in first.stderr, first.stderr
    assert list((tmp_path / "numba").rglob("*.nbi")) and list((tmp_path / "numba").glob("rocmforge-warm-*"))
    second = _run(smollm2_path, tmp_path)
    assert "compiled" not in second.stderr, second.stderr  # nothing compiled: loaded from the cache
    assert second.stdout.splitlines()[-2] == text
    if Path("/proc/self/smaps").exists():  # Linux: LLVM's code went back at the end of the load
        assert int(second.stdout.splitlines()[-1]) < 8 * 1024  # (a kernel loaded later brings some back)


def test_compiler_pages_go_back_and_numba_still_compiles():
    """``release_compiler_pages`` drops LLVM's resident code; the next compile faults back what it needs."""
    if not Path("/proc/self/smaps").exists():
        pytest.skip("no /proc/self/smaps (not Linux): nothing to release")
    numba.njit(lambda x: x + 1)(1)
    before = compile_cache.compiler_resident_kib()
    assert compile_cache.release_compiler_pages() > 0
    assert before > 16 * 1024 and compile_cache.compiler_resident_kib() < before // 4
    assert numba.njit(lambda x: x * 3)(7) == 21
    assert compile_cache.compiler_resident_kib() > 1024


def test_compile_message_on_a_terminal(tmp_path, monkeypatch, capsys):
    """The one line a new user sees (``show``: stderr is a terminal) -- and a second call with the same key
    shows nothing."""
    monkeypatch.setattr(compile_cache, "cache_dir", lambda: tmp_path)
    monkeypatch.setattr(compile_cache.numba.config, "CACHE_DIR", "")
    calls = []
    assert compile_cache.compile_once(["test", "Q8_0"], lambda: calls.append(1), show=True) == 0
    assert compile_cache.MESSAGE.format(tmp_path) in capsys.readouterr().err
    assert compile_cache.compile_once(["test", "Q8_0"], lambda: calls.append(1), show=True) == 0
    assert calls == [1, 1] and capsys.readouterr().err == ""  # run again (it loads the kernels), quietly
