"""The memory floors: the cheapest passes that move the bytes an op must move.

Each floor is timed several ways, all over every core but the first:
numpy on one thread (``np.copyto`` uses the C library's memcpy), numpy on
one slice per thread at once, two parallel numba loops, and torch's own
passes when torch is loaded; the fastest counts (and is reported), so the
floor is never an easy target:

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


def _sum(a):
    """numpy's read pass; a float16 sum of a large x overflows (harmlessly: only the reading counts)."""
    with np.errstate(over="ignore"):
        return a.sum()


@njit(parallel=True, cache=True)
def _copy(a, b):
    for i in prange(a.size):
        b[i] = a[i]


@njit(parallel=True, cache=True)
def _add(a, b, c):
    for i in prange(a.size):
        c[i] = a[i] + b[i]


@njit(parallel=True, cache=True, fastmath={"reassoc"})
def _read_chunks(a, chunk):
    """The read pass as explicit chunks per work item (a serial, vectorised sum inside each)."""
    chunks = (a.size + chunk - 1) // chunk
    part = np.zeros(chunks)
    for j in prange(chunks):
        s = 0.0
        for i in range(j * chunk, min(a.size, (j + 1) * chunk)):
            s += a[i]
        part[j] = s
    return part.sum()


@njit(parallel=True, cache=True)
def _copy_chunks(a, b, chunk):
    chunks = (a.size + chunk - 1) // chunk
    for j in prange(chunks):
        b[j * chunk:min(a.size, (j + 1) * chunk)] = a[j * chunk:min(a.size, (j + 1) * chunk)]


_POOL = {}


def _pool(threads):
    """A thread pool of ``threads`` workers (numpy releases the GIL in its copy/add/sum loops)."""
    if threads not in _POOL:
        from concurrent.futures import ThreadPoolExecutor
        _POOL[threads] = ThreadPoolExecutor(threads, thread_name_prefix="refbn-floor")
    return _POOL[threads]


def _split(n, threads, itemsize):
    """``threads`` contiguous index ranges covering n, cut on 4 KB boundaries."""
    step = -(-n // threads)
    step = -(-step * itemsize // 4096) * 4096 // itemsize
    return [(i, min(n, i + step)) for i in range(0, n, step)]


def _threaded(fn, parts, threads):
    pool = _pool(threads)
    return [f.result() for f in [pool.submit(fn, lo, hi) for lo, hi in parts]]


def _numba_view(a):
    """numba has no float16/bfloat16 arrays: 16-bit data is read as its uint16 bits."""
    return a.view(np.uint16) if a.dtype.itemsize == 2 else a


def floor_callables(x, dy, out, threads=None, extra=None):
    """name -> (pass kind, callable) on flat views of contiguous arrays.

    Methods: ``numpy`` (one thread; ``np.copyto`` is the C library's memcpy), ``numpy-threads``
    (the same numpy loop on ``threads`` slices at once, in a thread pool), ``numba`` (a parallel
    loop over the elements), ``numba-chunks`` (a parallel loop over 64K-value chunks, each a
    serial loop or slice copy), and any ``extra`` ones (torch's ``sum``/``copy_``/``add``)."""
    xf, dyf, of = x.reshape(-1), dy.reshape(-1), out.reshape(-1)
    xn, dyn, on = _numba_view(xf), _numba_view(dyf), _numba_view(of)
    chunk = 1 << 16
    fns = {
        "read:numpy": ("read", lambda: _sum(xf)),
        "read:numba": ("read", lambda: _read(xn)),
        "read:numba-chunks": ("read", lambda: _read_chunks(xn, chunk)),
        "copy:numpy": ("copy", lambda: np.copyto(of, xf)),
        "copy:numba": ("copy", lambda: _copy(xn, on)),
        "copy:numba-chunks": ("copy", lambda: _copy_chunks(xn, on, chunk)),
        "add:numpy": ("add", lambda: np.add(xf, dyf, out=of)),
        "add:numba": ("add", lambda: _add(xn, dyn, on)),
    }
    if threads and threads > 1:
        parts = _split(xf.size, threads, xf.itemsize)
        fns["read:numpy-threads"] = ("read", lambda: _threaded(lambda lo, hi: _sum(xf[lo:hi]), parts, threads))
        fns["copy:numpy-threads"] = ("copy", lambda: _threaded(lambda lo, hi: np.copyto(of[lo:hi], xf[lo:hi]),
                                                              parts, threads))
        fns["add:numpy-threads"] = ("add", lambda: _threaded(
            lambda lo, hi: np.add(xf[lo:hi], dyf[lo:hi], out=of[lo:hi]), parts, threads))
    fns.update(extra or {})
    return {k: v for k, v in fns.items() if v is not None}


#: floor methods, for the caption: name -> what it is
METHODS = {"numpy": "numpy, one thread (np.copyto = memcpy)", "numpy-threads": "numpy on one slice per thread",
           "numba": "numba prange over values", "numba-chunks": "numba prange over 64K-value chunks",
           "torch": "torch sum / copy_ / add(out=) on its threads"}


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
