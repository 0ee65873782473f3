"""CPU memory for the quantize engine: outputs advised to use huge pages, reusable chunk buffers.

Internal to ``ops``/``_engine``; nothing here changes a result, only how fast memory is obtained.
"""

from __future__ import annotations

import ctypes
import functools
import sys
import threading

import torch

_HUGE_PAGE = 1 << 21
HUGE_PAGE_MIN_BYTES = 1 << 23
"""CPU outputs at least this large are advised to use transparent huge pages (Linux; a hint)."""


@functools.cache
def _madvise():
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    function.restype = ctypes.c_int
    return function


def empty(shape: torch.Size | tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A fresh tensor; large CPU ones get MADV_HUGEPAGE before their first touch.

    A fresh 64 MB output costs 16k page faults (tens of ms, more than the arithmetic); with huge
    pages it costs 32. Memory use is unchanged: the tensor fills whole pages either way.
    """
    out = torch.empty(shape, dtype=dtype, device=device)
    nbytes = out.numel() * out.element_size()
    if out.device.type == "cpu" and nbytes >= HUGE_PAGE_MIN_BYTES:
        madvise = _madvise()
        if madvise is not None:
            start = -(-out.data_ptr() // _HUGE_PAGE) * _HUGE_PAGE
            stop = (out.data_ptr() + nbytes) // _HUGE_PAGE * _HUGE_PAGE
            if stop > start:
                madvise(start, stop - start, 14)  # MADV_HUGEPAGE; failure only costs speed
    return out


_LOCAL = threading.local()


def chunk_buffer(
    slot: str, n: int, dtype: torch.dtype, device: torch.device, chunk_bytes: int
) -> torch.Tensor:
    """Per-thread reusable CPU chunk buffers (fresh ones would page-fault on every call); ``n`` elements
    of ``dtype``, at least ``2 * chunk_bytes`` bytes of backing store."""
    if device.type != "cpu" or n * dtype.itemsize > chunk_bytes * 2:
        return torch.empty(n, dtype=dtype, device=device)
    cache = getattr(_LOCAL, "buffers", None)
    if cache is None:
        cache = _LOCAL.buffers = {}
    buffer = cache.get(slot)
    if buffer is None or buffer.numel() * buffer.element_size() < n * dtype.itemsize:
        buffer = cache[slot] = torch.empty(max(n * dtype.itemsize, chunk_bytes * 2), dtype=torch.uint8)
    return buffer[: n * dtype.itemsize].view(dtype)
