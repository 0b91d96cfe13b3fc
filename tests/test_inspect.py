"""`rocmforge inspect` and `rocmforge models`: values computed from the file, one-line errors."""
from __future__ import annotations

import json

from click.testing import CliRunner

from rocmforge.cli.main import cli
from rocmforge.gguf_file import GGUFFile


def test_inspect_json_reports_the_file(smollm2_path):
    result = CliRunner().invoke(cli, ["inspect", str(smollm2_path), "--json", "--ctx", "2048"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    f = GGUFFile(smollm2_path)
    assert info["architecture"] == "llama" and info["n_layers"] == 30 and info["context_length"] == 8192
    assert info["n_params"] == sum(r.n_elements for r in f.tensors.values())
    assert 134_000_000 < info["n_params"] < 135_000_000
    assert info["tensor_types"]["Q4_1"]["count"] == 210 and info["tensor_types"]["Q8_0"]["count"] == 1
    plan = info["memory"]["at_ctx_2048"]
    # 30 layers x 3 kv heads x (64 + 64) dims x 2048 positions x 4 bytes
    assert plan["kv_cache"] == 30 * 3 * 128 * 2048 * 4
    assert plan["weights_stored"] == sum(r.n_bytes for r in f.tensors.values())
    assert plan["margin"] == int(0.1 * (plan["weights_stored"] + plan["kv_cache"])) + 100 * 2**20
    assert plan["total_gpu"] == plan["weights_stored"] + plan["kv_cache"] + plan["margin"]


def test_inspect_text_and_models_list(smollm2_path):
    runner = CliRunner()
    text = runner.invoke(cli, ["inspect", str(smollm2_path)]).output
    assert "architecture  llama" in text and "Q4_1: 210" in text
    listing = runner.invoke(cli, ["models", "list"]).output
    assert "smollm2-135m" in listing and "(default)" in listing and "gemma3-270m" in listing
    assert runner.invoke(cli, ["models", "path", "smollm2-135m"]).output.strip() == str(smollm2_path)


def test_cli_errors_are_one_line(tmp_path):
    import subprocess
    import sys
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"nope")
    proc = subprocess.run([sys.executable, "-m", "rocmforge.cli.main", "inspect", str(bad)], capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"error: {bad}: not a GGUF file (bad magic)"
    assert "Traceback" not in proc.stderr
