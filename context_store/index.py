"""The HNSW index (hnswlib, cosine): derived from SQLite, guarded by a readers–writer lock.

Labels are chunk ids. The index remembers how far into SQLite it has read: ``last_add_seq`` (the
largest chunk id added) and ``last_delete_seq`` (the last row of the ``deleted_chunks`` log applied).
Catching up is therefore two range queries, and it is done whenever SQLite's ``generation`` moved,
so a process sees other processes' committed writes without reopening anything.

On disk the index is two files beside the database: ``<db>.hnsw.<token>.bin`` (hnswlib's format) and
``<db>.hnsw.json`` (which .bin file, its sha256, and the sequence numbers it covers). The json is
replaced atomically, so it always names a complete file. Anything missing, corrupt, or out of step
with SQLite (after catching up, the live count and largest id must equal SQLite's) is rebuilt from
the embeddings in SQLite, which is the source of truth.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
from pathlib import Path
from typing import Callable

import hnswlib
import numpy as np

from context_store.db import StoreDB
from context_store.rwlock import RWLock

log = logging.getLogger(__name__)


class VectorIndex:
    def __init__(self, db: StoreDB, dim: int, M: int = 32, ef_construction: int = 200, ef: int = 128):
        self.db = db
        self.dim = dim
        self.M = M
        self.ef_construction = ef_construction
        self._ef = ef
        self.lock = RWLock()
        self.meta_path = Path(str(db.path) + ".hnsw.json")
        self._reset()

    # -- state -------------------------------------------------------------------------------------
    def _reset(self, capacity: int = 1024) -> None:
        self.hnsw = hnswlib.Index(space="cosine", dim=self.dim)
        self.hnsw.init_index(max_elements=capacity, ef_construction=self.ef_construction, M=self.M)
        self.hnsw.set_ef(self._ef)
        self.live: set[int] = set()       # labels that are in the index and not marked deleted
        self.deleted: set[int] = set()    # labels marked deleted (they still take space until compaction)
        self.last_add_seq = 0
        self.last_delete_seq = 0
        self.generation = -1
        self.epoch = -1
        self.dirty = True

    @property
    def ef(self) -> int:
        return self._ef

    @ef.setter
    def ef(self, value: int) -> None:
        with self.lock.write():
            self._ef = value
            self.hnsw.set_ef(value)

    # -- keeping up with SQLite ---------------------------------------------------------------------
    def sync(self) -> None:
        """Apply other writers' commits (cheap when nothing changed: one small query)."""
        generation, epoch = self.db.versions()
        if generation == self.generation and epoch == self.epoch:
            return
        with self.lock.write(), self.db.snapshot():
            generation, epoch = self.db.versions()
            if epoch != self.epoch:
                # Compaction elsewhere cut the deletion log: take its saved index or rebuild.
                if not self._load(epoch):
                    self._rebuild(epoch)
            self._catch_up_or_rebuild(epoch, "HNSW index (after catching up)")
            self.generation = generation

    def rebuild(self) -> None:
        """Rebuild from every embedding in SQLite (drops marked-deleted entries: compaction)."""
        with self.lock.write(), self.db.snapshot():
            generation, epoch = self.db.versions()
            self._rebuild(epoch)
            self.generation = generation

    def _catch_up(self) -> None:
        for ids, vectors in self.db.chunks_after(self.last_add_seq):
            self._add(ids, vectors)
        for seq, chunk_id in self.db.deleted_after(self.last_delete_seq):
            if chunk_id in self.live:
                self.hnsw.mark_deleted(chunk_id)
                self.live.discard(chunk_id)
                self.deleted.add(chunk_id)
            self.last_delete_seq = seq
            self.dirty = True

    def _add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        needed = self.hnsw.get_current_count() + len(ids)
        if needed > self.hnsw.get_max_elements():
            self.hnsw.resize_index(max(needed, 2 * self.hnsw.get_max_elements()))
        self.hnsw.add_items(vectors, ids)
        self.live.update(int(i) for i in ids)
        self.last_add_seq = max(self.last_add_seq, int(ids[-1]))
        self.dirty = True

    def _agrees_with_sqlite(self) -> bool:
        count, last_id, _ = self.db.chunk_summary()
        return count == len(self.live) and last_id == max(self.live, default=0)

    def _rebuild(self, epoch: int) -> None:
        count, _, last_deleted = self.db.chunk_summary()
        self._reset(capacity=max(1024, int(count * 1.25)))
        self.last_delete_seq = last_deleted  # nothing to delete in a fresh index
        self._catch_up()
        self.epoch = epoch

    # -- files -------------------------------------------------------------------------------------
    def open(self) -> None:
        """Load the saved index if it is intact and current, then catch up or rebuild (reconcile)."""
        with self.lock.write(), self.db.snapshot():
            generation, epoch = self.db.versions()
            if not self._load(epoch):
                self._rebuild(epoch)
            self._catch_up_or_rebuild(epoch, "saved HNSW index")
            self.generation = generation

    def _catch_up_or_rebuild(self, epoch: int, what: str) -> None:
        """Add what SQLite has that the index lacks; if they still disagree, rebuild from SQLite."""
        self._catch_up()
        if not self._agrees_with_sqlite():
            log.warning("%s disagrees with SQLite; rebuilding it", what)
            self._rebuild(epoch)

    def _load(self, epoch: int) -> bool:
        try:
            saved = json.loads(self.meta_path.read_text())
            data_path = self.meta_path.parent / saved["file"]
            if saved["dim"] != self.dim or saved["epoch"] != epoch:
                return False
            if _sha256(data_path) != saved["sha256"]:  # never hand hnswlib a damaged file: it may crash
                log.warning("HNSW index file %s is damaged; rebuilding from SQLite", data_path)
                return False
            hnsw = hnswlib.Index(space="cosine", dim=self.dim)
            hnsw.load_index(str(data_path), max_elements=saved["capacity"])
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            log.debug("no usable saved HNSW index (%s); rebuilding from SQLite", exc)
            return False
        hnsw.set_ef(self._ef)  # load_index resets ef to 10
        self.hnsw = hnsw
        self.deleted = set(saved["deleted"])
        self.live = set(int(i) for i in hnsw.get_ids_list()) - self.deleted
        self.last_add_seq, self.last_delete_seq = saved["last_add_seq"], saved["last_delete_seq"]
        self.epoch = epoch
        self.dirty = False
        return True

    def save(self) -> None:
        """Write the index to a new file and point the json at it atomically (caller holds the writer lock)."""
        with self.lock.read():
            if not self.dirty:
                return
            data_path = self.meta_path.parent / f"{self.meta_path.stem}.{secrets.token_hex(4)}.bin"
            self.hnsw.save_index(str(data_path))
            _fsync(data_path)
            state = {"file": data_path.name, "sha256": _sha256(data_path), "dim": self.dim,
                     "capacity": self.hnsw.get_max_elements(), "epoch": self.epoch,
                     "last_add_seq": self.last_add_seq, "last_delete_seq": self.last_delete_seq,
                     "deleted": sorted(self.deleted)}
            tmp = self.meta_path.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(state))
            _fsync(tmp)
            os.replace(tmp, self.meta_path)
            self.dirty = False
        # Older files, and any a crash left half-written, are no longer named by the json.
        for stale in self.meta_path.parent.glob(f"{self.meta_path.stem}.*.bin"):
            if stale.name != data_path.name:
                stale.unlink(missing_ok=True)

    def _saved_file(self) -> Path | None:
        try:
            return self.meta_path.parent / json.loads(self.meta_path.read_text())["file"]
        except (OSError, ValueError, KeyError):
            return None

    def files(self) -> list[Path]:
        saved = self._saved_file()
        return [p for p in (self.meta_path, saved) if p is not None and p.exists()]

    # -- queries -----------------------------------------------------------------------------------
    def query(self, vector: np.ndarray, k: int,
              allowed: Callable[[int], bool] | None = None) -> list[tuple[int, float]]:
        """(chunk id, cosine similarity) of the k nearest chunks. Raises RuntimeError if hnswlib finds fewer."""
        with self.lock.read():
            k = min(k, len(self.live))
            if k == 0:
                return []
            labels, distances = self.hnsw.knn_query(vector.reshape(1, -1), k=k, filter=allowed)
        return [(int(label), 1.0 - float(d)) for label, d in zip(labels[0], distances[0])]

    def __len__(self) -> int:
        return len(self.live)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())
