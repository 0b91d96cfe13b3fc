"""One connection per thread for a store backend (SQLite and PostgreSQL connections are not shared between
threads), opened on first use, and ``close()`` closing every thread's connection at once.

>>> import sqlite3
>>> connections = ThreadConnections(lambda: sqlite3.connect(":memory:"))
>>> connections.get() is connections.get()  # the same one within a thread
True
>>> connections.close()
"""
from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Generic, TypeVar

Connection = TypeVar("Connection")


class ThreadConnections(Generic[Connection]):
    """This thread's connection from ``open_connection()``; a new one replaces one that was closed (``.closed``).

    ``local`` is the thread's namespace for settings of its connection; it starts empty with each new connection.
    """

    def __init__(self, open_connection: Callable[[], Connection]) -> None:
        self._open = open_connection
        self.local: Any = threading.local()
        self._all: list[Connection] = []
        self._all_lock = threading.Lock()

    def get(self) -> Connection:
        conn = getattr(self.local, "connection", None)
        if conn is None or getattr(conn, "closed", False):
            conn = self._open()
            self.local.__dict__.clear()
            self.local.connection = conn
            with self._all_lock:
                self._all.append(conn)
        return conn

    def close(self) -> None:
        """Close every thread's connection; a thread's next ``get()`` opens a new one."""
        with self._all_lock:
            for conn in self._all:
                conn.close()  # type: ignore[attr-defined]
            self._all.clear()
        self.local = threading.local()
