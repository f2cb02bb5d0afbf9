"""The memory floors: the cheapest passes that move the bytes an op must move.

Each floor is timed two ways, numpy (single-threaded C loops; ``np.copyto``
uses the C library's memcpy) and a parallel numba loop, and the faster one
counts, so the floor is never an easy target:

    read   one pass reading x            (a sum)
    copy   read x, write y               (training forward = read + copy,
                                          inference = copy)
    add    read x and dy, write dx       (backward)

``flush`` reads a buffer larger than the last-level cache, so that every
timed call starts with its data in main memory (``--cache cold``).
"""
import os

import numpy as np
from numba import njit, prange


@njit(parallel=True, cache=True, fastmath={"reassoc"})
def _read(a):
    s = 0.0
    for i in prange(a.size):
        s += a[i]
    return s


@njit(parallel=True, cache=True)
def _copy(a, b):
    for i in prange(a.size):
        b[i] = a[i]


@njit(parallel=True, cache=True)
def _add(a, b, c):
    for i in prange(a.size):
        c[i] = a[i] + b[i]


def floor_callables(x, dy, out):
    """name -> (pass kind, callable) on flat views of contiguous arrays."""
    xf, dyf, of = x.reshape(-1), dy.reshape(-1), out.reshape(-1)
    return {
        "read:numpy": ("read", lambda: xf.sum()),
        "read:numba": ("read", lambda: _read(xf)),
        "copy:numpy": ("copy", lambda: np.copyto(of, xf)),
        "copy:numba": ("copy", lambda: _copy(xf, of)),
        "add:numpy": ("add", lambda: np.add(xf, dyf, out=of)),
        "add:numba": ("add", lambda: _add(xf, dyf, of)),
    }


#: which floor passes each op needs, summed
PASSES = {"train": ("read", "copy"), "infer": ("copy",), "bwd": ("add",)}


def last_level_cache_bytes():
    """Size of the largest CPU cache (sysfs), or 32 MiB if it cannot be read."""
    best = 0
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for entry in os.listdir(base):
            try:
                with open(os.path.join(base, entry, "size")) as f:
                    text = f.read().strip().upper()
            except OSError:
                continue
            mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
            digits = text.rstrip("KMG")
            if digits.isdigit():
                best = max(best, int(digits) * mult)
    except OSError:
        pass
    return best or (32 << 20)


class Flusher:
    """Evicts the caches by reading (and so replacing) a buffer twice the last-level cache."""

    def __init__(self, enabled=True):
        self.enabled = enabled
        self.buffer = np.ones((2 * last_level_cache_bytes()) // 8) if enabled else None
        if enabled:
            _read(self.buffer)

    def __call__(self):
        if self.enabled:
            _read(self.buffer)
