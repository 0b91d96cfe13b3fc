"""A throwaway PostgreSQL with pgvector, from the ``pgserver`` wheel's binaries: for tests, benchmarks and trying
the PostgreSQL store without a server of your own (point ``--db`` at a real server for anything that matters).

The server listens on a Unix socket in its own temporary folder only (no TCP port). PostgreSQL refuses to run as
root, so under root the binaries run as an unprivileged system user (``rocmforge-pg``, created if missing).

>>> with LocalPostgres() as pg:  # doctest: +SKIP
...     store = ContextStore(pg.url, embed=HashedNgramEmbedder())
"""
from __future__ import annotations

import importlib.util
import itertools
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

SYSTEM_USER = "rocmforge-pg"


class LocalPostgresError(RuntimeError):
    """The throwaway server could not start (pgserver missing, no unprivileged user, initdb failed)."""


def _binaries() -> Path:
    spec = importlib.util.find_spec("pgserver")  # only its files are needed, not its Python side
    if spec is None or spec.origin is None:
        raise LocalPostgresError("the pgserver wheel is not installed: pip install 'rocmforge[distributed]'")
    return Path(spec.origin).parent / "pginstall" / "bin"


def _run_as() -> list[str]:
    """The command prefix that runs PostgreSQL's binaries as a user it accepts."""
    if os.geteuid() != 0:
        return []
    try:
        pwd.getpwnam(SYSTEM_USER)
    except KeyError:
        done = subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", SYSTEM_USER],
                              capture_output=True, text=True)
        if done.returncode != 0 and "already exists" not in done.stderr:
            raise LocalPostgresError(f"PostgreSQL refuses root and useradd {SYSTEM_USER} failed: {done.stderr.strip()}")
    return ["runuser", "-u", SYSTEM_USER, "--"]


class LocalPostgres:
    """initdb + pg_ctl start in a temporary folder; ``url`` connects over the socket; ``stop()`` removes it all.

    ``kill()`` sends SIGKILL to the postmaster (crash tests); ``start()`` again recovers from the WAL.
    """

    def __init__(self, database: str = "rocmforge") -> None:
        self._names = itertools.count(1)
        self.bin = _binaries()
        self.prefix = _run_as()
        self.folder = Path(tempfile.mkdtemp(prefix="rocmforge-pg-"))
        self.data, self.socket = self.folder / "data", self.folder / "socket"
        self.socket.mkdir()
        os.chmod(self.folder, 0o755)
        if self.prefix:
            shutil.chown(self.folder, SYSTEM_USER)
            shutil.chown(self.socket, SYSTEM_USER)
        self.database = database
        self._pg(["initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "--encoding=UTF8",
                  "--no-sync"])
        self.start()
        self.url = self.new_database(database)

    def new_database(self, name: str | None = None) -> str:
        """Create an empty database with pgvector (a fresh name unless given); returns its URL."""
        name = name or f"{self.database}_{next(self._names)}"
        self._pg(["createdb", "-h", str(self.socket), "-U", "postgres", name])
        self._pg(["psql", "-h", str(self.socket), "-U", "postgres", "-d", name, "-q", "-c",
                  "CREATE EXTENSION IF NOT EXISTS vector"])
        return f"postgresql://postgres@/{name}?host={self.socket}"

    def _pg(self, argv: list[str]) -> str:
        done = subprocess.run([*self.prefix, str(self.bin / argv[0]), *argv[1:]], capture_output=True, text=True,
                              timeout=120)
        if done.returncode != 0:
            raise LocalPostgresError(f"{argv[0]} failed: {(done.stderr or done.stdout).strip()[-500:]}")
        return done.stdout

    def start(self) -> None:
        # small: one test server among other work on a small machine
        options = f"-k {self.socket} -c listen_addresses='' -c shared_buffers=64MB -c max_connections=60"
        self._pg(["pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.folder / "log"), "-w", "start"])

    def pid(self) -> int:
        return int((self.data / "postmaster.pid").read_text().split()[0])

    def kill(self) -> None:
        """SIGKILL the postmaster and wait until its children, which notice and exit, are gone too."""
        pid = self.pid()
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while self._server_processes() and time.monotonic() < deadline:
            time.sleep(0.1)
        # In a container nobody may reap the killed postmaster: a zombie still "exists" for PostgreSQL's lock-file
        # checks, so the lock files of a server that is certainly dead go by hand.
        (self.data / "postmaster.pid").unlink(missing_ok=True)
        for lock in self.socket.glob(".s.PGSQL.*.lock"):
            lock.unlink()

    def _server_processes(self) -> list[int]:
        """The server's processes: every one of them runs with the data folder as its working directory."""
        found = []
        for entry in Path("/proc").iterdir():
            try:
                if entry.name.isdigit() and os.readlink(entry / "cwd") == str(self.data):
                    found.append(int(entry.name))
            except OSError:
                continue
        return found

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            subprocess.run([*self.prefix, str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w",
                            "stop"], capture_output=True, timeout=60)
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> "LocalPostgres":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
