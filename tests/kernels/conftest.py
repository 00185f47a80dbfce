"""Kernel tests run single-threaded: their tensors are small, and on a shared 2-core machine one thread
avoids OpenMP spin contention with other jobs (which made these tests several times slower)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
