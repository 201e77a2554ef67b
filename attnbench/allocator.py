"""Keep freed memory in the process, so that training steps stop faulting their buffers back in.

A training step allocates and frees the same multi-megabyte tensors every step (Castling's
(N, N) branch buffers, the saved activations). glibc's malloc serves blocks above its mmap
threshold with ``mmap`` and trims the top of the heap when more than its trim threshold is
free, so each step gives those pages back to the OS and faults them in again, zero-filled. On
the 2-core EPYC this project is measured on, a Castling training step at 197 tokens took about
900 page faults and 1 ms of 7 ms that way; with the thresholds raised, 3 faults. PyTorch's CPU
tuning guide suggests preloading jemalloc or tcmalloc for this; :func:`tune_malloc` does the
in-process equivalent with glibc's ``mallopt``.

The command line (``attnbench ...``) and the benchmark scripts call it at start; the library
itself never changes the process's allocator, except in the processes ``bench`` starts to time,
which take the parent's setting (a row's ``allocator`` column is theirs). The child that
measures peak memory keeps glibc's defaults: memory kept from its untimed first forward would
hide the measured forward's peak. Set ``ATTNBENCH_MALLOC=system`` to keep glibc's
defaults. :func:`malloc_setting` says what is in force, for result rows.
"""
from __future__ import annotations

import ctypes
import os
import platform
import sys

__all__ = ["MMAP_THRESHOLD", "TRIM_THRESHOLD", "malloc_setting", "tune_malloc"]

#: glibc's largest mmap threshold on 64-bit (blocks above it are still mmapped).
MMAP_THRESHOLD = 32 * 1024 * 1024
#: free memory the heap keeps before it is returned to the OS.
TRIM_THRESHOLD = 1024 * 1024 * 1024

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3      # glibc's mallopt parameter numbers
_setting = "system"


def tune_malloc() -> str:
    """Raise glibc's mmap and trim thresholds for this process (once); return :func:`malloc_setting`.

    Does nothing where the C library is not glibc, or with ``ATTNBENCH_MALLOC=system``.
    """
    global _setting
    if _setting != "system" or os.environ.get("ATTNBENCH_MALLOC", "tuned") == "system":
        return _setting
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return _setting
    try:
        libc = ctypes.CDLL(None)
        ok = libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
        ok = libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1 and ok
    except (OSError, AttributeError):  # no mallopt in this process's C library
        return _setting
    if ok:
        _setting = f"glibc mmap {MMAP_THRESHOLD >> 20} MiB, trim {TRIM_THRESHOLD >> 20} MiB"
    return _setting


def malloc_setting() -> str:
    """``"system"`` (the C library's defaults), or the thresholds :func:`tune_malloc` set."""
    return _setting
