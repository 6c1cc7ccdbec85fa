"""Keep large freed allocations in the process (glibc malloc tuning for block transfers).

With glibc's defaults every ~1 MiB gRPC message of a restore landed in fresh mmap()ed pages,
and page faults took about half of a stream's CPU (docs/architecture.md). Raising the mmap
threshold to its maximum (32 MiB) and the trim threshold to 64 MiB keeps freed buffers for
reuse, at the cost of up to that much idle memory after a burst.

Process-wide, so it is applied once by the block store server and by ``BlockStoreClient``
(both opt-out through their configs). A no-op where the C library is not glibc.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import threading

log = logging.getLogger(__name__)

MMAP_THRESHOLD = 32 << 20  # glibc's upper limit for M_MMAP_THRESHOLD on 64-bit
TRIM_THRESHOLD = 64 << 20
_M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
_M_MMAP_THRESHOLD = -3

_lock = threading.Lock()
_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Apply the tuning once per process; True if glibc accepted it."""
    global _applied
    with _lock:
        if _applied is None:
            _applied = _mallopt()
        return _applied


def _mallopt() -> bool:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # only glibc has mallopt with these meanings  # noqa: B018
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    ok = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    if not ok:
        log.warning("glibc refused the malloc tuning; large transfers will page-fault more")
    return ok
