"""`rocmforge bench`: decodes exactly the asked number of tokens (EOS banned) and reports both rates."""
from __future__ import annotations

import re

from click.testing import CliRunner

import rocmforge
from rocmforge.cli.bench import measure_speed
from rocmforge.cli.main import cli


def test_measure_speed_decodes_exactly_n_gen(smollm2_path):
    model = rocmforge.load(smollm2_path, device="cpu", n_ctx=64)
    speed = measure_speed(model, n_prompt=12, n_gen=5, reps=1)
    assert speed["decode_tokens"] == 5
    assert speed["prefill_tok_s"] > 0 and speed["decode_tok_s"] > 0
    assert model.kv.n_free_blocks == model.kv.n_blocks  # every generation was closed


def test_bench_command_prints_pp_and_tg(smollm2_path):
    out = CliRunner().invoke(cli, ["bench", "-m", str(smollm2_path), "--device", "cpu", "-p", "8", "-n", "3", "-r", "1"])
    assert out.exit_code == 0, out.output
    assert re.search(r"^pp8 +\d+\.\d tok/s$", out.output, re.M)
    assert re.search(r"^tg3 +\d+\.\d tok/s$", out.output, re.M)
