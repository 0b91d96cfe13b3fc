"""A readers–writer lock: many searches at once, or one index change alone.

hnswlib's ``knn_query`` may run in parallel with itself, but not with ``add_items``,
``mark_deleted`` or ``resize_index`` (measured here: errors and wrong results without a lock).
Writers are preferred so a stream of searches cannot starve ingestion.

>>> lock = RWLock()
>>> with lock.read():
...     pass
>>> with lock.write():
...     pass
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator


class RWLock:
    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer = False
        self._waiting_writers = 0

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._waiting_writers:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._waiting_writers += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._waiting_writers -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()
