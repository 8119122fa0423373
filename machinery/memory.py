"""A C allocator that keeps the memory it frees. torch-free: fineweb.py's workers use it too.

glibc hands a large freed buffer back to the system, and the next one is faulted in again as fresh
pages the kernel zeroes one at a time: system time for fineweb.py's pieces (megabytes each) and a
CPU step's logits and gradients (a third of the tiny CPU run's CPU time: docs/performance.md)."""

import ctypes

# mallopt's parameters, from glibc's malloc.h
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4


def keep_freed_memory(every_size=False):
    """Let glibc keep freed memory: buffers under 32 MB come from the process's heap, given back to
    the system past 256 MB. every_size: buffers of any size, given back past 1 GiB; it costs peak
    memory (the tiny CPU run: about 1.35x), since freed buffers are not returned at once."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except AttributeError:  # a C library without mallopt (macOS): nothing changes
        return
    if every_size:
        # no buffer gets a mapping of its own, returned to the system when freed
        mallopt(M_MMAP_MAX, 0)
        mallopt(M_TRIM_THRESHOLD, 1 << 30)
    else:
        mallopt(M_MMAP_THRESHOLD, 32 << 20)
        mallopt(M_TRIM_THRESHOLD, 256 << 20)
