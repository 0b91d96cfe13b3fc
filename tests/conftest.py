"""Shared fixtures: each real model is fetched once per test session (into $ROCMFORGE_HOME) and shared."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from rocmforge import registry


def _fetch(name: str) -> Path:
    try:
        return registry.pull(name, progress=False)
    except Exception as exc:  # no network and nothing cached: say which model is missing
        if os.environ.get("CI"):  # CI installs from the registry, so a failed fetch is a failure there
            pytest.fail(f"model {name} could not be fetched: {exc}")
        pytest.skip(f"model {name} is not cached and could not be fetched: {exc}")


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    return _fetch("smollm2-135m")


@pytest.fixture(scope="session")
def gemma3_path() -> Path:
    return _fetch("gemma3-270m")


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    return _fetch("minilm-l6").parent
