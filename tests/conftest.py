"""Shared fixtures: each real model is fetched once per test session (into $ROCMFORGE_HOME) and shared."""
from __future__ import annotations

import importlib.util
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


@pytest.fixture(scope="session")
def local_postgres():
    """A throwaway PostgreSQL + pgvector (the pgserver wheel's binaries) for the whole session."""
    from context_store.local_postgres import LocalPostgres, LocalPostgresError

    require_distributed("psycopg", "pgvector", "pgserver")
    try:
        server = LocalPostgres()
    except LocalPostgresError as exc:
        pytest.fail(f"the throwaway PostgreSQL did not start: {exc}")
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_location(request, tmp_path: Path) -> str | Path:
    """Where a ContextStore lives, once per backend: a SQLite file, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return tmp_path / "ctx.db"
    return request.getfixturevalue("local_postgres").new_database()


def require_distributed(*modules: str) -> None:
    """Skip (fail on CI, which installs the distributed extra) when one of these modules is missing."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        reason = f"needs {', '.join(missing)}: pip install -e '.[distributed]'"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray cluster of 2 CPUs for the whole session (no dashboard: heavy and unused here)."""
    require_distributed("ray")
    import ray

    from rocmforge.ray_start import start_ray

    start_ray(num_cpus=2, log_to_driver=False, configure_logging=False,
              _node_ip_address="127.0.0.1")  # Ray's processes talk over loopback only
    yield ray
    ray.shutdown()
