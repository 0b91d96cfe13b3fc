"""Bad option values of ``rocmforge generate`` / ``chat`` / ``serve`` are refused by click's own types and ranges
before any model loads: one line on stderr, exit code 2, nothing on stdout."""
from __future__ import annotations

import subprocess
import sys

import pytest

from rocmforge.backends.select import DEVICES


@pytest.mark.parametrize("args, option", [
    (["--temp", "-1"], "--temp"), (["--top-p", "7"], "--top-p"), (["--top-p", "0"], "--top-p"),
    (["-n", "-5"], "--max-tokens"), (["--top-k", "-2"], "--top-k"), (["--min-p", "1.5"], "--min-p"),
    (["--repeat-penalty", "0"], "--repeat-penalty"), (["--seed", "-1"], "--seed"), (["-k", "0"], "-k"),
    (["--temp", "warm"], "--temp"), (["--device", "gpu"], "--device"),
])
@pytest.mark.parametrize("command", ["generate", "chat"])
def test_a_bad_value_is_one_line_and_exit_code_2(command, args, option):
    argv = [sys.executable, "-m", "rocmforge.cli.main", command, *args] + (["hi"] if command == "generate" else [])
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert done.returncode == 2, done
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: Invalid value for") and option in lines[0], done.stderr


def test_a_bad_schema_or_grammar_is_one_line_too(tmp_path):
    done = subprocess.run([sys.executable, "-m", "rocmforge.cli.main", "generate", "--json-schema", "{bad", "hi"],
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1
    assert "Invalid value for '--json-schema': not a JSON schema" in done.stderr
    grammar = tmp_path / "bad.gbnf"
    grammar.write_text("root ::= (")
    done = subprocess.run([sys.executable, "-m", "rocmforge.cli.main", "generate", "--grammar", str(grammar), "hi"],
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        "error: invalid grammar: Expected ')' at line 1, 'root ::= (' ^ '' (see 'rocmforge generate --help')"]


@pytest.mark.parametrize("args, message", [
    (["--port", "99999"], "Invalid value for '--port': 99999 is not in the range 0<=x<=65535."),
    (["--port", "http"], "Invalid value for '--port': 'http' is not a valid integer range."),
    (["--host", "my host"], "Invalid value for '--host': 'my host' is not an IP address or a host name."),
    (["--host", "-bad.example"], "Invalid value for '--host': '-bad.example' is not an IP address or a host name."),
    (["--n-ctx", "8"], "Invalid value for '--n-ctx': 8 is not in the range x>=16."),
    (["--max-batch", "0"], "Invalid value for '--max-batch': 0 is not in the range 1<=x<=256."),
    (["--max-queue", "-1"], "Invalid value for '--max-queue': -1 is not in the range x>=0."),
    (["--replicas", "0"], "Invalid value for '--replicas': 0 is not in the range x>=1."),
    (["--threads", "0"], "Invalid value for '--threads': 0 is not in the range x>=1."),
    (["--blas-threads", "0"], "Invalid value for '--blas-threads': 0 is not in the range x>=1."),
    (["--device", "gpu"], f"Invalid value for '--device': 'gpu' is not one of {', '.join(map(repr, DEVICES))}."),
    (["--api-key", " "], "Invalid value for '--api-key': must not be empty"),
    (["--ray-address", "auto"], "--ray-address needs --replicas N"),
])
def test_serve_refuses_a_bad_value_in_one_line_with_exit_code_2(args, message, monkeypatch, capsys):
    """In process (the checks run before the server or a model is imported): one line naming the option."""
    from rocmforge.cli.main import main

    monkeypatch.setattr(sys, "argv", ["rocmforge", "serve", "-m", "no-such-model", *args])
    with pytest.raises(SystemExit) as exit_:
        main()
    out, err = capsys.readouterr()
    assert exit_.value.code == 2 and out == ""
    assert err.splitlines() == [f"error: {message} (see 'rocmforge serve --help')"]
