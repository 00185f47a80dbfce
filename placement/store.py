"""The results database: one SQLite file, one row per (checkpoint hash, placement, metric, data hash).

Why SQLite: every result is written in its own transaction (WAL journal, fsync'd on commit), so a search
killed at any point loses at most the evaluation in flight; a rerun reads every finished result back instead
of recomputing it, and different runs (eval, search, other budgets) share results whenever checkpoint,
placement, metric and data all match. Each actual computation is also logged in ``computations`` (with the
process id), which is how tests prove that a resumed search did not recompute anything.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from supernet.teacher import cache_dir

SCHEMA = """
CREATE TABLE IF NOT EXISTS results (
    checkpoint TEXT NOT NULL, placement TEXT NOT NULL, metric TEXT NOT NULL, data TEXT NOT NULL,
    value REAL NOT NULL, detail TEXT, seconds REAL, created REAL,
    PRIMARY KEY (checkpoint, placement, metric, data)
);
CREATE TABLE IF NOT EXISTS computations (
    id INTEGER PRIMARY KEY AUTOINCREMENT, checkpoint TEXT, placement TEXT, metric TEXT, data TEXT,
    pid INTEGER, created REAL
);
CREATE TABLE IF NOT EXISTS blobs (namespace TEXT NOT NULL, key TEXT NOT NULL, value TEXT NOT NULL,
    PRIMARY KEY (namespace, key));
"""


def default_db_path() -> Path:
    return cache_dir() / "placement" / "results.sqlite"


def checkpoint_hash(directory: str | Path) -> str:
    """Content hash of a checkpoint directory (config + weights); a delta checkpoint's config names its
    base."""
    directory = Path(directory)
    h = hashlib.sha256()
    for name in ("config.json", "model.safetensors"):
        path = directory / name
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing (not a supernet checkpoint directory)")
        h.update(name.encode())
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class Key:
    checkpoint: str
    placement: str
    metric: str
    data: str


class ResultStore:
    """Thin transactional wrapper; safe to open from several processes (SQLite file locking, WAL)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.conn = sqlite3.connect(str(self.path), timeout=60, isolation_level=None)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=FULL")
        self.conn.executescript(SCHEMA)

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> ResultStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    def get(self, key: Key) -> tuple[float, dict[str, Any]] | None:
        row = self.conn.execute(
            "SELECT value, detail FROM results WHERE checkpoint=? AND placement=? AND metric=? AND data=?",
            (key.checkpoint, key.placement, key.metric, key.data),
        ).fetchone()
        if row is None:
            return None
        return float(row[0]), json.loads(row[1]) if row[1] else {}

    def put(self, key: Key, value: float, detail: dict[str, Any] | None = None, seconds: float = 0.0) -> None:
        """Result and computation log in one transaction: either both are there after a kill or neither."""
        now = time.time()
        with self.transaction() as c:
            c.execute(
                "INSERT OR REPLACE INTO results VALUES (?,?,?,?,?,?,?,?)",
                (
                    key.checkpoint,
                    key.placement,
                    key.metric,
                    key.data,
                    float(value),
                    json.dumps(detail or {}),
                    seconds,
                    now,
                ),
            )
            c.execute(
                "INSERT INTO computations (checkpoint, placement, metric, data, pid, created) VALUES (?,?,?,?,?,?)",
                (key.checkpoint, key.placement, key.metric, key.data, os.getpid(), now),
            )

    def computations(self) -> list[tuple[str, str, str, str, int]]:
        return self.conn.execute(
            "SELECT checkpoint, placement, metric, data, pid FROM computations ORDER BY id"
        ).fetchall()

    def results(self, checkpoint: str | None = None) -> list[tuple[str, str, str, float]]:
        """(placement, metric, data, value) rows, optionally of one checkpoint."""
        if checkpoint is None:
            return self.conn.execute("SELECT placement, metric, data, value FROM results").fetchall()
        return self.conn.execute(
            "SELECT placement, metric, data, value FROM results WHERE checkpoint=?", (checkpoint,)
        ).fetchall()

    def get_blob(self, namespace: str, key: str) -> Any | None:
        row = self.conn.execute("SELECT value FROM blobs WHERE namespace=? AND key=?", (namespace, key)).fetchone()
        return None if row is None else json.loads(row[0])

    def put_blob(self, namespace: str, key: str, value: Any) -> None:
        with self.transaction() as c:
            c.execute("INSERT OR REPLACE INTO blobs VALUES (?,?,?)", (namespace, key, json.dumps(value)))
