"""Activation harvesting on SmolLM2 (CPU): shards equal the activations of solo runs, and a kill -9 in the middle
leaves only whole shards and resumes to the same files as an uninterrupted run."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

NAMES = ["blocks.1.hook_resid_post", "blocks.0.attn.hook_z"]
TEXTS = [f"Document {i}: the quick brown fox number {i} jumps over {i % 7} lazy dogs." for i in range(60)]


@pytest.fixture(scope="module")
def model(smollm2_path):
    import rocmforge
    return rocmforge.load(smollm2_path, device="cpu", n_ctx=64, n_parallel=4)


def _rows(out: Path, name: str) -> np.ndarray:
    index = json.loads((out / "index.json").read_text())
    return np.concatenate([load_file(str(out / s["files"][0]))[name] for s in index["shards"]])


def test_shards_hold_each_documents_solo_activations(model, tmp_path):
    docs = [model.tokenize(t) for t in TEXTS[:12]] + [list(range(100, 230))]  # the last one is cut into pieces
    index = model.harvest(docs, NAMES, tmp_path, batch_tokens=128, shard_tokens=100, progress=False)
    assert index["pieces_done"] == 12 + 3 and all(s["rows"] >= 100 for s in index["shards"][:-1])
    resid, z = _rows(tmp_path, NAMES[0]), _rows(tmp_path, NAMES[1])
    pieces = [p for s in index["shards"] for p in s["pieces"]]
    start = 0
    for doc, first, n, _ in pieces:
        _, cache = model.run_with_cache(docs[doc][first:first + n], names_filter=NAMES, stop_at_layer=2)
        assert np.array_equal(resid[start:start + n], cache[NAMES[0]])
        assert np.array_equal(z[start:start + n], cache[NAMES[1]])
        start += n
    assert start == len(resid) == sum(len(d) for d in docs)
    npy = model.harvest(docs[:3], NAMES, tmp_path / "npy", format="npy", progress=False)
    assert np.array_equal(np.load(tmp_path / "npy" / npy["shards"][0]["files"][0]), resid[:sum(map(len, docs[:3]))])
    with pytest.raises(ValueError, match="format"):
        model.harvest(docs, NAMES, tmp_path, format="npy", progress=False)


def _cli(smollm2_path: Path, text: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "rocmforge.cli.main", "harvest", str(text), "-n", NAMES[0], "-o", str(out),
            "-m", str(smollm2_path), "--device", "cpu", "--batch-tokens", "64", "--shard-tokens", "64", "--n-ctx", "64"]


@pytest.mark.slow
def test_kill_9_leaves_whole_shards_and_resumes_to_the_same_files(smollm2_path, tmp_path):
    text = tmp_path / "docs.txt"
    # ~110 shards of 64 rows: a fast machine cannot finish them between two looks at the index
    text.write_text("\n".join(TEXTS * 6) + "\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    whole = tmp_path / "whole"
    subprocess.run(_cli(smollm2_path, text, whole), env=env, check=True, capture_output=True)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_cli(smollm2_path, text, killed), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:  # kill once a few shards are finished, mid-run
        index = killed / "index.json"
        if index.exists() and len(json.loads(index.read_text())["shards"]) >= 3:
            break
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    shards_then = json.loads((killed / "index.json").read_text())["shards"]
    total = len(json.loads((whole / "index.json").read_text())["shards"])
    assert 3 <= len(shards_then) < total  # it really stopped in the middle
    for path in killed.glob("shard-*.safetensors"):  # every shard file there is whole (a partial would not load)
        load_file(str(path))
    subprocess.run(_cli(smollm2_path, text, killed), env=env, check=True, capture_output=True)
    assert not list(killed.glob("*.partial"))
    assert json.loads((killed / "index.json").read_text()) == json.loads((whole / "index.json").read_text())
    for shard in json.loads((whole / "index.json").read_text())["shards"]:
        name = shard["files"][0]
        assert (killed / name).read_bytes() == (whole / name).read_bytes()


def test_the_cli_names_a_misspelt_hook_point_in_one_line(smollm2_path, tmp_path):
    text = tmp_path / "docs.txt"
    text.write_text("one document\n")
    command = _cli(smollm2_path, text, tmp_path / "out")
    command[command.index(NAMES[0])] = "blocks.99.hook_resid_post"
    result = subprocess.run(command, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "no hook point named ['blocks.99.hook_resid_post']" in result.stderr


def _same_files(a: Path, b: Path) -> None:
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
    for path in a.iterdir():
        assert path.read_bytes() == (b / path.name).read_bytes(), path.name


def test_ray_data_with_two_actors_writes_the_same_shards_and_resumes(ray_cluster, model, smollm2_path, tmp_path):
    from rocmforge.harvest import harvest_on_ray

    docs = TEXTS[:16] + [" ".join(TEXTS[16:22])]  # the last one is cut into pieces
    options = {"batch_tokens": 128, "shard_tokens": 100, "progress": False}
    whole = tmp_path / "whole"
    index = model.harvest(docs, NAMES, whole, **options)
    assert len(index["shards"]) >= 4 and any(p[1] > 0 for s in index["shards"] for p in s["pieces"])
    on_ray = tmp_path / "ray"
    harvest_on_ray(str(smollm2_path), docs, NAMES, on_ray, 2, device="cpu", n_ctx=64, n_parallel=4, **options)
    _same_files(whole, on_ray)
    # a run killed after its second shard (a half-written file left behind) resumes on Ray to the same files
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    first_two = {**index, "shards": index["shards"][:2],
                 "pieces_done": sum(len(s["pieces"]) for s in index["shards"][:2])}
    (resumed / "index.json").write_text(json.dumps(first_two, indent=1))
    for shard in first_two["shards"]:
        (resumed / shard["files"][0]).write_bytes((whole / shard["files"][0]).read_bytes())
    (resumed / "shard-00002.safetensors.partial").write_bytes(b"half a shard")
    harvest_on_ray(str(smollm2_path), docs, NAMES, resumed, 2, device="cpu", n_ctx=64, n_parallel=4, **options)
    _same_files(whole, resumed)


def test_the_cli_with_workers_writes_the_same_npy_shards(ray_cluster, smollm2_path, tmp_path):
    from click.testing import CliRunner

    from rocmforge.cli.main import cli

    text = tmp_path / "docs.txt"
    text.write_text("\n".join(TEXTS[:10]) + "\n")
    for out, extra in (("one", []), ("ray", ["--workers", "2"])):
        command = _cli(smollm2_path, text, tmp_path / out)[3:] + ["--format", "npy", *extra]
        result = CliRunner().invoke(cli, command)
        assert result.exit_code == 0, result.output
    _same_files(tmp_path / "one", tmp_path / "ray")
