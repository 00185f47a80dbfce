"""Writing a file so that readers see the old contents or the new, never half of it: a temp file beside the
target, fsynced, then renamed over it (rename is atomic on POSIX within one file system)."""

from __future__ import annotations

import os
from pathlib import Path


def atomic_write(path: str | Path, data: bytes | str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data.encode() if isinstance(data, str) else data)
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(path)
    return path
