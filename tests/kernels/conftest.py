"""Kernel tests run single-threaded: their tensors are small, and on a shared 2-core machine one thread
avoids OpenMP spin contention with other jobs (which made these tests several times slower)."""

from __future__ import annotations

import pytest

from tests.threads import torch_threads


@pytest.fixture(autouse=True)
def _one_thread():
    with torch_threads(1):
        yield
