"""How a process that moves large tensors keeps its freed buffers. No sockets, no state.

glibc gives a freed buffer over its mmap threshold (128 KB to start with) back to the kernel at
once, and trims the heap's top past 128 KB: a process that receives, decodes or encodes a 602 KB
image per request then gets fresh pages for each copy, and pays a page fault per 4 KB, far more
than the copy itself (issue #27; `examples/image_classifier/bench.py hops` shows each copy's time
in each process, and `bench.py codec` the worker's decode with and without this). It raises both
thresholds, so that such buffers stay in the heap for the next request to reuse. The worker's
compute threads call it, and so does each gateway process, once, before serving.
"""

from __future__ import annotations

import ctypes

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt() parameters
TRIM_THRESHOLD_BYTES = 256 << 20  # free memory at the heap's top kept, not given back to the kernel
MMAP_THRESHOLD_BYTES = 64 << 20  # allocations from the heap up to this size (glibc's own cap is 32 MB on 64-bit)


def keep_freed_buffers() -> None:
    """Let this process reuse the memory of freed tensors instead of faulting in fresh pages.
    Nothing on a libc other than glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
        libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
    except (OSError, AttributeError):
        pass
