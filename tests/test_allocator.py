"""kvstore.allocator: the glibc tuning applies once and freed large buffers are reused."""
from __future__ import annotations

import platform
import resource

import pytest

from kvstore.allocator import keep_freed_memory

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc malloc tuning")


def _burst() -> None:
    """What a restore does: a burst of 1 MiB messages, all freed together."""
    buffers = [bytearray(1 << 20) for _ in range(16)]  # zero-filled: every page is touched
    del buffers


@glibc
def test_applies_once_and_bursts_of_large_buffers_reuse_memory_without_page_faults():
    assert keep_freed_memory() is True
    assert keep_freed_memory() is True  # idempotent
    _burst()  # the first burst may fault its pages in
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(30):
        _burst()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    # glibc's defaults return each burst to the kernel: ~120k faults here (30 * 16 * 256 pages).
    assert faults < 5_000, faults
