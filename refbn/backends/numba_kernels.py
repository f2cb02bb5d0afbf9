"""The numba backend: parallel, cache-aware kernels, float64 accumulation.

Whole ops on canonical views, as every backend (see :mod:`refbn.backends`).  The maths
between and inside the passes is compiled from its one home, :mod:`refbn.reference`
(``inv_std``, ``y_coefficient``, ``backward_coefficients``, and the elementwise
``batch_norm`` and ``batch_norm_backward``), and numba's on-disk cache is keyed on that
module's source, so an edit there reaches the compiled kernels.  Only the reductions and
the walk over memory are written here.

Layouts.  Every layout arrives as the canonical (outer, C, inner) view:

* inner == 1 (NC, NWC, NHWC, NDHWC): a (rows, C) matrix, cut into blocks of
  rows; the loop over C is the vectorised one.  Few channels (C < 64) would
  leave that loop short, so the matrix is viewed as (rows/k, k*C) with the
  per-channel vectors tiled k times ("virtual channels"), and the k partial
  sums of each channel are added afterwards.
* inner > 1 (NCW, NCHW, NCDHW): each (n, c) plane is a contiguous run; a
  work item is a few planes of one n (~16K values), and the loop along a
  plane is the vectorised one (reductions sum it in chunks of 64K values).

Either way no transpose is made, and a half-precision x is read as its
uint16 bits and converted inside the loops (see ``_numba_support``).

Accuracy.  Every value is widened to float64 before it is used.  The
moments take one pass over x, summing d = x - K and d*d per channel, where
the shift K is the channel's first value; partial sums are kept per block
(64K values) and added in float64 at the end.  For float32 and narrower
data d is exact in float64 and d*d is rounded once; the mean and biased
variance follow from ``_shifted_moments`` below, whose
cancellation is bounded by (n - 1) because K is one of the values; in
practice the relative error of the variance is ~1e-15 even on N(1e6, 1)
data.  Channels whose statistics are not finite (NaN/Inf in x) are
recomputed in the same call with two plain passes, as the reference
computes them, so NaN/Inf land exactly where the reference puts them.

Speed.  Training forward = one reading pass (moments) plus one read-and-
write pass (y), the memory floor; inference = one read-and-write pass;
backward = one pass over dy and x for the sums plus one for dx (5/3 of
its floor: the sums are needed before any dx).  Channels-last loops carry
their running sums in memory (C is not known when compiling).  On narrow
rows (up to 128 values) the reductions prefetch 16 KB ahead, and the
moments take four rows per step so the sums are loaded and stored once per
four values; wide rows go one row at a time without prefetching, and so
does the two-array gradient sum at every width: each measured fastest (four
rows at a time on wide rows makes four streams per array; the elementwise
passes measured fastest without prefetching).  (Walking the second pass backwards, to start on
the data still in the last-level cache, measured no faster and slowed the
channels-first layouts, so the passes run forwards.)  Inputs under 2^17
values run a serial build of the same kernels: waking threads costs more.

Threads.  Each op makes two parallel launches.  numba's OpenMP layer
launches in ~4 us (~50 us with cold caches), its ``workqueue`` layer in
~130 us (~200 us): OpenMP is the fast choice and the one ``refbn bench``
uses.  On a machine whose cores are busy with other work (TensorFlow's
thread pool under load included) OpenMP's spinning barrier degrades by
2-4x; set ``NUMBA_THREADING_LAYER=workqueue`` there.  Results do not
depend on the layer or the thread count: blocks, not threads, own the
partial sums.
"""
import types

import numpy as np
from numba import njit, prange

from .. import reference as ref
from . import _numba_support
from ._numba_support import decode, encode, folds, prefetch, storage

# numba checks a cached function against its own file only: make every cache entry of this file
# depend on the source of the modules it compiles from too (before any function is decorated)
_numba_support.install_cache_locator(__file__, _numba_support.maths_stamp((ref, _numba_support)))

_BLOCK_VALUES = 1 << 16      # values per block / chunk: 256 KB of float32, ~100 blocks per
#                              ResNet-50 tensor for the threads to share
_PREFETCH_BYTES = 1 << 14    # channels-last reductions ask for the data 16 KB ahead
_MIN_VIRTUAL_CHANNELS = 64   # channels-last with fewer channels is viewed as k*C virtual channels
_NARROW_WIDTH = 128          # channels-last rows up to this width: prefetch, four rows per step
_RUN = 64                    # rows one at a time: per-channel sums of 64 rows, then added to the block's
                             # (the longest chain of float64 additions is then ~64 + blocks, as with four rows per step)

_PARALLEL_MIN_VALUES = 1 << 17   # smaller inputs run on one thread: waking threads costs more

# the maths, compiled from its one home (refbn.reference); the cache follows its source (below)
_batch_norm = njit(ref.batch_norm)
_batch_norm_backward = njit(ref.batch_norm_backward)
_inv_std = njit(ref.inv_std)
_y_coefficient = njit(ref.y_coefficient)
_backward_coefficients = njit(ref.backward_coefficients)
_batch_norm_folded = njit(ref.batch_norm_folded)
_batch_norm_backward_folded = njit(ref.batch_norm_backward_folded)
_folded_shift = njit(ref.folded_shift)
_folded_backward_shift = njit(ref.folded_backward_shift)
_REDUCE = {"reassoc", "contract"}   # reductions may be reordered (vectorised), nothing else
_FMA = {"contract"}               # elementwise: a*b + c may become one fused multiply-add


class _Kernel:
    """A kernel compiled twice (lazily, cached on disk): with ``prange`` run in parallel, and
    as a plain loop for small inputs.  The serial build is a copy of the function under another
    name, because numba's on-disk cache tells builds apart by name, not by compile options."""

    def __init__(self, fn, fastmath):
        serial = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__ + "_serial",
                                    fn.__defaults__, fn.__closure__)
        serial.__qualname__ = fn.__qualname__ + "_serial"
        self.parallel = njit(parallel=True, cache=True, fastmath=fastmath)(fn)
        self.serial = njit(cache=True, fastmath=fastmath)(serial)
        self.__doc__ = fn.__doc__

    def __call__(self, size, *args):
        return (self.parallel if size >= _PARALLEL_MIN_VALUES else self.serial)(*args)


def _kernel(fastmath):
    return lambda fn: _Kernel(fn, fastmath)


# ----------------------------------------------------------------------------------------------
# kernels on (rows, width) matrices: channels last, width = copies * C virtual channels
# ----------------------------------------------------------------------------------------------
@njit(inline="always")
def _zeros_aligned(n):
    """n float64 zeros starting on a 64-byte boundary (whole-vector loads and stores)."""
    buf = np.zeros(n + 8)
    start = ((64 - buf.ctypes.data % 64) % 64) // 8
    return buf[start:start + n]


_FOLD_SPREAD = 2.0 ** 20   # fold only where |mean| <= 2^20 * std in every channel


@njit(inline="always")
def _foldable(mean, variance):
    """Whether the elementwise passes may evaluate refbn.reference's folded forms: the fold adds an
    absolute error of ~eps64 * |mean| * y_coef, against y's spread of std * y_coef, so every
    channel needs |mean| <= 2^20 * std (then the extra error stays below 2^-32 relative, 2^-9 ulp
    of float32).  A constant channel (variance 0) with a non-zero mean refuses it: there the
    exact answer is y = offset, which only the plain form gives."""
    for c in range(mean.shape[0]):
        if not abs(mean[c]) <= _FOLD_SPREAD * np.sqrt(variance[c]):
            return False
    return True


@njit(inline="always")
def _finite(v):
    """Every value of a per-channel vector finite.  The elementwise passes evaluate refbn.reference's
    folded forms only then (and only on narrow storage, see ``folds``): with a NaN or Inf
    coefficient the folded and the plain form can put NaN and Inf in different places."""
    for i in range(v.shape[0]):
        if not np.isfinite(v[i]):
            return False
    return True


@njit(inline="always")
def _tiled(v, width):
    """v (one value per channel) repeated along ``width`` virtual channels."""
    out = np.empty(width)
    for j in range(width):
        out[j] = v[j % v.shape[0]]
    return out


@njit(inline="always")
def _fold(partial, channels):
    """Per-channel totals of per-block partial sums over ``copies * channels`` virtual channels."""
    total = np.zeros(channels)
    for b in range(partial.shape[0]):
        for copy in range(partial.shape[1] // channels):
            for c in range(channels):
                total[c] += partial[b, copy * channels + c]
    return total


@njit(inline="always")
def _close_run(s1, s2, t1, t2):
    """Add a run's per-channel sums (t1, t2) to the block's (s1, s2); the next run starts at 0."""
    for c in range(s1.shape[0]):
        s1[c] += t1[c]
        s2[c] += t2[c]
        t1[c] = 0.0
        t2[c] = 0.0


@_kernel(_REDUCE)
def _moments_last(x, kind, shift, rows, ahead_bytes, four_rows):
    """(sum(d), sum(d * d)) per channel, d = x - shift, with float64 partial sums per block.

    Narrow rows (``four_rows``) take four rows per step, so that the running sums (in memory:
    C is not known when compiling) are loaded and stored once per four values; wide rows go
    one row at a time, which measured faster there (one stream per array, not four)."""
    total, width = x.shape
    sh = _tiled(shift, width)
    blocks = (total + rows - 1) // rows
    p1 = np.empty((blocks, width))
    p2 = np.empty((blocks, width))
    ahead = ahead_bytes // x.itemsize
    line = 64 // x.itemsize
    for b in prange(blocks):
        s1 = _zeros_aligned(width)
        s2 = _zeros_aligned(width)
        end = min(total, (b + 1) * rows)
        r = b * rows
        while four_rows and r + 4 <= end:
            for i in range(0, 4 * width if ahead else 0, line):
                prefetch(x, r * width + ahead + i)
            for c in range(width):
                k = sh[c]
                d0 = decode(x[r, c], kind) - k
                d1 = decode(x[r + 1, c], kind) - k
                d2 = decode(x[r + 2, c], kind) - k
                d3 = decode(x[r + 3, c], kind) - k
                s1[c] += (d0 + d1) + (d2 + d3)
                s2[c] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)
            r += 4
        t1 = _zeros_aligned(width)    # sums of up to _RUN rows, added to s1/s2 after each run,
        t2 = _zeros_aligned(width)    # so no float64 sum grows by more than ~_RUN + rows/_RUN terms
        for r0 in range(r, end, _RUN):
            for rr in range(r0, min(end, r0 + _RUN)):
                for i in range(0, width if ahead else 0, line):
                    prefetch(x, rr * width + ahead + i)
                for c in range(width):
                    d = decode(x[rr, c], kind) - sh[c]
                    t1[c] += d
                    t2[c] += d * d
            _close_run(s1, s2, t1, t2)
        p1[b, :] = s1
        p2[b, :] = s2
    return _fold(p1, shift.shape[0]), _fold(p2, shift.shape[0])


@_kernel(_REDUCE)
def _grad_sums_last(dy, x, kind, mean, rows, ahead_bytes):
    """(sum(dy), sum(dy * (x - mean))) per channel, with float64 partial sums per block.

    One row per step at every width (four rows per step, as in _moments_last, measured
    slower here: two arrays make eight streams)."""
    total, width = x.shape
    mt = _tiled(mean, width)
    blocks = (total + rows - 1) // rows
    p1 = np.empty((blocks, width))
    p2 = np.empty((blocks, width))
    ahead = ahead_bytes // x.itemsize
    line = 64 // x.itemsize
    for b in prange(blocks):
        s1 = _zeros_aligned(width)
        s2 = _zeros_aligned(width)
        t1 = _zeros_aligned(width)    # runs of _RUN rows, as in _moments_last
        t2 = _zeros_aligned(width)
        end = min(total, (b + 1) * rows)
        for r0 in range(b * rows, end, _RUN):
            for r in range(r0, min(end, r0 + _RUN)):
                for i in range(0, width if ahead else 0, line):
                    prefetch(dy, r * width + ahead + i)
                    prefetch(x, r * width + ahead + i)
                for c in range(width):
                    g = decode(dy[r, c], kind)
                    t1[c] += g
                    t2[c] += g * (decode(x[r, c], kind) - mt[c])
            _close_run(s1, s2, t1, t2)
        p1[b, :] = s1
        p2[b, :] = s2
    return _fold(p1, mean.shape[0]), _fold(p2, mean.shape[0])


@_kernel(_FMA)
def _scale_shift_last(x, kind, mean, y_coef, offset, fold, rows, y):
    total, width = x.shape
    m, k, o = _tiled(mean, width), _tiled(y_coef, width), _tiled(offset, width)
    f = _tiled(_folded_shift(mean, y_coef, offset), width)
    fold = fold and folds(x) and _finite(m) and _finite(k) and _finite(o) and _finite(f)
    blocks = (total + rows - 1) // rows
    for b in prange(blocks):
        for r in range(b * rows, min(total, (b + 1) * rows)):
            if fold:          # refbn.reference's folded form (see _finite)
                for c in range(width):
                    y[r, c] = encode(_batch_norm_folded(decode(x[r, c], kind), k[c], f[c]), y, kind)
            else:
                for c in range(width):
                    y[r, c] = encode(_batch_norm(decode(x[r, c], kind), m[c], k[c], o[c]), y, kind)


@_kernel(_FMA)
def _grad_apply_last(dy, x, kind, mean, a, b_, c_, fold, rows, dx):
    total, width = x.shape
    m, ta, tb, tc = _tiled(mean, width), _tiled(a, width), _tiled(b_, width), _tiled(c_, width)
    tf = _tiled(_folded_backward_shift(mean, b_, c_), width)
    fold = fold and folds(x) and _finite(m) and _finite(ta) and _finite(tb) and _finite(tc) and _finite(tf)
    blocks = (total + rows - 1) // rows
    for b in prange(blocks):
        for r in range(b * rows, min(total, (b + 1) * rows)):
            if fold:          # refbn.reference's folded form (see _finite)
                for c in range(width):
                    v = _batch_norm_backward_folded(decode(dy[r, c], kind), decode(x[r, c], kind), ta[c], tb[c], tf[c])
                    dx[r, c] = encode(v, dx, kind)
            else:
                for c in range(width):
                    v = _batch_norm_backward(decode(dy[r, c], kind), decode(x[r, c], kind), m[c], ta[c], tb[c],
                                             tc[c])
                    dx[r, c] = encode(v, dx, kind)


# ----------------------------------------------------------------------------------------------
# kernels on (N, C, inner) arrays: channels first; work item = (n, c, chunk of the plane)
# ----------------------------------------------------------------------------------------------
@njit(inline="always")
def _fold_planes(partial):
    """Per-channel totals of (outer, C, chunks) partial sums."""
    outer, channels, chunks = partial.shape
    total = np.zeros(channels)
    for n in range(outer):
        for c in range(channels):
            for j in range(chunks):
                total[c] += partial[n, c, j]
    return total


@_kernel(_REDUCE)
def _moments_first(x, kind, shift, group, chunk):
    """(sum(d), sum(d * d)) per channel, d = x - shift[c], float64 sums per chunk of each plane.
    A work item is ``group`` consecutive planes of one n (see _channel_group)."""
    outer, channels, inner = x.shape
    chunks = (inner + chunk - 1) // chunk
    groups = (channels + group - 1) // group
    p1 = np.empty((outer, channels, chunks))
    p2 = np.empty((outer, channels, chunks))
    for t in prange(outer * groups):
        n = t // groups
        g = t - n * groups
        for c in range(g * group, min(channels, (g + 1) * group)):
            k = shift[c]
            if chunks == 1:           # the common case, without a slice per plane
                s1 = 0.0
                s2 = 0.0
                for i in range(inner):
                    d = decode(x[n, c, i], kind) - k
                    s1 += d
                    s2 += d * d
                p1[n, c, 0] = s1
                p2[n, c, 0] = s2
                continue
            for j in range(chunks):
                # a slice, so that indices start at 0: numba's negative-index check then folds away
                xx = x[n, c, j * chunk:(j + 1) * chunk]
                s1 = 0.0
                s2 = 0.0
                for i in range(xx.shape[0]):
                    d = decode(xx[i], kind) - k
                    s1 += d
                    s2 += d * d
                p1[n, c, j] = s1
                p2[n, c, j] = s2
    return _fold_planes(p1), _fold_planes(p2)


@_kernel(_REDUCE)
def _grad_sums_first(dy, x, kind, mean, group, chunk):
    """(sum(dy), sum(dy * (x - mean[c]))) per channel, float64 sums per chunk of each plane."""
    outer, channels, inner = x.shape
    chunks = (inner + chunk - 1) // chunk
    groups = (channels + group - 1) // group
    p1 = np.empty((outer, channels, chunks))
    p2 = np.empty((outer, channels, chunks))
    for t in prange(outer * groups):
        n = t // groups
        g = t - n * groups
        for c in range(g * group, min(channels, (g + 1) * group)):
            m = mean[c]
            if chunks == 1:
                s1 = 0.0
                s2 = 0.0
                for i in range(inner):
                    v = decode(dy[n, c, i], kind)
                    s1 += v
                    s2 += v * (decode(x[n, c, i], kind) - m)
                p1[n, c, 0] = s1
                p2[n, c, 0] = s2
                continue
            for j in range(chunks):
                gg = dy[n, c, j * chunk:(j + 1) * chunk]
                xx = x[n, c, j * chunk:(j + 1) * chunk]
                s1 = 0.0
                s2 = 0.0
                for i in range(xx.shape[0]):
                    v = decode(gg[i], kind)
                    s1 += v
                    s2 += v * (decode(xx[i], kind) - m)
                p1[n, c, j] = s1
                p2[n, c, j] = s2
    return _fold_planes(p1), _fold_planes(p2)


@_kernel(_FMA)
def _scale_shift_first(x, kind, mean, y_coef, offset, fold, group, y):
    outer, channels, inner = x.shape
    groups = (channels + group - 1) // group
    for t in prange(outer * groups):
        n = t // groups
        g = t - n * groups
        for c in range(g * group, min(channels, (g + 1) * group)):
            m = mean[c]
            k = y_coef[c]
            o = offset[c]
            f = _folded_shift(m, k, o)
            if fold and folds(x) and np.isfinite(m) and np.isfinite(k) and np.isfinite(o) and np.isfinite(f):
                for i in range(inner):
                    y[n, c, i] = encode(_batch_norm_folded(decode(x[n, c, i], kind), k, f), y, kind)
            else:
                for i in range(inner):
                    y[n, c, i] = encode(_batch_norm(decode(x[n, c, i], kind), m, k, o), y, kind)


@_kernel(_FMA)
def _grad_apply_first(dy, x, kind, mean, a, b_, c_, fold, group, dx):
    outer, channels, inner = x.shape
    groups = (channels + group - 1) // group
    for t in prange(outer * groups):
        n = t // groups
        g = t - n * groups
        for c in range(g * group, min(channels, (g + 1) * group)):
            m, ac, bc, cc = mean[c], a[c], b_[c], c_[c]
            fc = _folded_backward_shift(m, bc, cc)
            if fold and folds(x) and np.isfinite(m) and np.isfinite(ac) and np.isfinite(bc) and np.isfinite(cc) \
                    and np.isfinite(fc):
                for i in range(inner):
                    dx[n, c, i] = encode(_batch_norm_backward_folded(decode(dy[n, c, i], kind), decode(x[n, c, i], kind),
                                                                     ac, bc, fc), dx, kind)
            else:
                for i in range(inner):
                    dx[n, c, i] = encode(_batch_norm_backward(decode(dy[n, c, i], kind), decode(x[n, c, i], kind), m,
                                                              ac, bc, cc), dx, kind)


# ----------------------------------------------------------------------------------------------
# the passes over a canonical (outer, C, inner) storage view, written once as templates.  Each
# template names the kernel builds it calls by placeholder globals (MAIN, TAIL, ...); _variant
# binds them, so that a channels-last call never compiles a channels-first kernel, and a small
# (serial) call never compiles a parallel one.  Compiled (not Python) so that a whole op is one
# call: the Python glue it replaces cost ~0.15-0.25 ms per call with cold caches.
# ----------------------------------------------------------------------------------------------
@njit(inline="always")
def _virtual(rows, channels):
    """k such that a (rows, C) matrix is processed as (rows/k, k*C); 1 when C is wide enough."""
    if channels >= _MIN_VIRTUAL_CHANNELS:
        return 1
    return max(1, min(rows, -(-_MIN_VIRTUAL_CHANNELS // channels)))


@njit(inline="always")
def _parts(a3, k):
    """A channels-last (rows, C, 1) array as its first rows - rows % k rows viewed as
    (rows/k, k*C), and the remaining rows as (rows % k, C); either may have no rows."""
    rows, channels = a3.shape[0], a3.shape[1]
    a2 = a3.reshape(rows, channels)
    main = rows - rows % k
    return a2[:main].reshape(main // k, k * channels), a2[main:]


@njit(inline="always")
def _channel_group(channels, inner):
    """Planes per channels-first work item: ~16K values, so that short planes (7x7) do not
    pay a work item's fixed cost each."""
    return min(channels, max(1, (1 << 14) // inner))


@njit(inline="always")
def _rows_per_block(width):
    """Rows per block: _BLOCK_VALUES values, and at least 256 rows, so that a block's fixed costs
    (its running sums, of one value per virtual channel) stay small next to its work."""
    return max(256, _BLOCK_VALUES // max(1, width))


@njit(inline="always")
def _row_walk(width):
    """(prefetch distance in bytes, four rows per step?) for channels-last reductions: narrow
    rows prefetch and take four rows per step, wide rows (> _NARROW_WIDTH) neither, as measured
    fastest (bench/RESULTS.md, "What was tried")."""
    narrow = width <= _NARROW_WIDTH
    return (_PREFETCH_BYTES if narrow else 0), narrow


@njit(inline="always")
def _first_values(xs, kind):
    """x[0, c, 0] per channel, as float64: the shift of the one-pass moments."""
    shift = np.empty(xs.shape[1])
    for c in range(xs.shape[1]):
        shift[c] = decode(xs[0, c, 0], kind)
    return shift


@njit(inline="always")
def _shifted_moments(shift, sum_d, sum_d2, n):
    """Mean and biased variance from one pass of sums of d = x - shift (per channel):
    mean = shift + sum(d)/n, var = sum(d^2)/n - (sum(d)/n)^2 (clipped at 0).  With the shift one
    of the channel's values the cancellation is bounded by n, and with float64 sums of float32
    data the variance keeps ~1e-15 relative accuracy even on N(1e6, 1) data."""
    m1 = sum_d / n
    return shift + m1, np.maximum(sum_d2 / n - m1 * m1, 0.0)


@njit(inline="always")
def _two_pass_channel(xs, kind, c):
    """Channel c's mean and biased variance in two plain passes: what the reference computes,
    for a channel whose one-pass statistics are not finite (NaN/Inf in x), so that NaN and Inf
    land where the reference puts them (a first value of Inf would make every d NaN)."""
    outer, channels, inner = xs.shape
    s = 0.0
    for o in range(outer):
        for i in range(inner):
            s += decode(xs[o, c, i], kind)
    mean = s / (outer * inner)
    q = 0.0
    for o in range(outer):
        for i in range(inner):
            d = decode(xs[o, c, i], kind) - mean
            q += d * d
    return mean, q / (outer * inner)


def _sums_last_t(xs, kind, shift):
    """Per-channel (sum(d), sum(d * d)), d = x - shift, channels last."""
    outer, channels, inner = xs.shape
    s1 = np.zeros(channels)
    s2 = np.zeros(channels)
    parts = _parts(xs, _virtual(outer, channels))
    for i in range(2):
        part = parts[i]
        if part.shape[0] == 0:
            continue
        width = part.shape[1]
        ahead, four = _row_walk(width)
        if i == 0:
            a, b = MAIN(part, kind, shift, _rows_per_block(width), ahead, four)
        else:
            a, b = TAIL(part, kind, shift, _rows_per_block(width), ahead, four)
        s1 += a
        s2 += b
    return s1, s2


def _sums_first_t(xs, kind, shift):
    """Per-channel (sum(d), sum(d * d)), d = x - shift, channels first."""
    outer, channels, inner = xs.shape
    return MAIN(xs, kind, shift, _channel_group(channels, inner), _BLOCK_VALUES)


def _grad_sums_last_t(dys, xs, kind, mean):
    """Per-channel (sum(dy), sum(dy * (x - mean))), channels last."""
    outer, channels, inner = xs.shape
    k = _virtual(outer, channels)
    dparts, xparts = _parts(dys, k), _parts(xs, k)
    s1 = np.zeros(channels)
    s2 = np.zeros(channels)
    for i in range(2):
        d, x = dparts[i], xparts[i]
        if x.shape[0] == 0:
            continue
        width = x.shape[1]
        ahead = _row_walk(width)[0]
        if i == 0:
            a, b = MAIN(d, x, kind, mean, _rows_per_block(width), ahead)
        else:
            a, b = TAIL(d, x, kind, mean, _rows_per_block(width), ahead)
        s1 += a
        s2 += b
    return s1, s2


def _grad_sums_first_t(dys, xs, kind, mean):
    """Per-channel (sum(dy), sum(dy * (x - mean))), channels first."""
    outer, channels, inner = xs.shape
    return MAIN(dys, xs, kind, mean, _channel_group(channels, inner), _BLOCK_VALUES)


def _scale_shift_last_t(xs, kind, mean, y_coef, offset, fold, ys):
    """ys = (x - mean) * y_coef + offset, channels last."""
    outer, channels, inner = xs.shape
    k = _virtual(outer, channels)
    xparts, yparts = _parts(xs, k), _parts(ys, k)
    for i in range(2):
        x, y = xparts[i], yparts[i]
        if x.shape[0] == 0:
            continue
        if i == 0:
            MAIN(x, kind, mean, y_coef, offset, fold, _rows_per_block(x.shape[1]), y)
        else:
            TAIL(x, kind, mean, y_coef, offset, fold, _rows_per_block(x.shape[1]), y)


def _scale_shift_first_t(xs, kind, mean, y_coef, offset, fold, ys):
    """ys = (x - mean) * y_coef + offset, channels first."""
    outer, channels, inner = xs.shape
    MAIN(xs, kind, mean, y_coef, offset, fold, _channel_group(channels, inner), ys)


def _grad_apply_last_t(dys, xs, kind, mean, a, b, c, fold, dxs):
    """dxs = a*dy + b*(x - mean) + c, channels last."""
    outer, channels, inner = xs.shape
    k = _virtual(outer, channels)
    dparts, xparts, oparts = _parts(dys, k), _parts(xs, k), _parts(dxs, k)
    for i in range(2):
        d, x, o = dparts[i], xparts[i], oparts[i]
        if x.shape[0] == 0:
            continue
        if i == 0:
            MAIN(d, x, kind, mean, a, b, c, fold, _rows_per_block(x.shape[1]), o)
        else:
            TAIL(d, x, kind, mean, a, b, c, fold, _rows_per_block(x.shape[1]), o)


def _grad_apply_first_t(dys, xs, kind, mean, a, b, c, fold, dxs):
    """dxs = a*dy + b*(x - mean) + c, channels first."""
    outer, channels, inner = xs.shape
    MAIN(dys, xs, kind, mean, a, b, c, fold, _channel_group(channels, inner), dxs)


# -- the ops, one compiled call each; the maths between the passes is refbn.reference's ---------
def _moments_t(xs, kind):
    """Per-channel mean and biased variance: one shifted pass, two plain passes for any channel
    whose statistics come out non-finite."""
    outer, channels, inner = xs.shape
    shift = _first_values(xs, kind)
    s1, s2 = SUMS(xs, kind, shift)
    mean, var = _shifted_moments(shift, s1, s2, outer * inner)
    for c in range(channels):
        if not np.isfinite(mean[c] + var[c]):
            m, v = _two_pass_channel(xs, kind, c)
            mean[c] = m
            var[c] = v
    return mean, var


def _training_t(xs, kind, scale, offset, epsilon, ys):
    """The training forward pass: the moments, then y; returns (mean, biased variance)."""
    mean, var = MOMENTS(xs, kind)
    SCALE_SHIFT(xs, kind, mean, _y_coefficient(scale, _inv_std(var, epsilon)), offset, _foldable(mean, var), ys)
    return mean, var


def _inference_t(xs, kind, scale, offset, mean, variance, epsilon, ys):
    """The inference forward pass: y from the given statistics."""
    SCALE_SHIFT(xs, kind, mean, _y_coefficient(scale, _inv_std(variance, epsilon)), offset, _foldable(mean, variance),
                ys)


def _gradient_t(dys, xs, kind, scale, mean, variance, epsilon, is_training, dxs):
    """The backward pass: the sums, the coefficients, then dx; returns (dscale, doffset)."""
    outer, channels, inner = xs.shape
    sum_dy, sum_dy_xc = GRAD_SUMS(dys, xs, kind, mean)
    a, b, c, dscale, doffset = _backward_coefficients(sum_dy, sum_dy_xc, outer * inner, scale,
                                                      _inv_std(variance, epsilon), is_training)
    GRAD_APPLY(dys, xs, kind, mean, a, b, c, _foldable(mean, variance), dxs)
    return dscale, doffset


def _variant(template, suffix, inline=False, **bindings):
    """``template`` compiled (lazily, cached on disk) with its placeholder globals bound.  A copy
    under its own name: numba's cache tells functions apart by qualified name.  ``inline``: the
    pass helpers are inlined into the op drivers (numba re-optimises every callee's code at each
    level of calls, so a flat driver compiles several times faster)."""
    glb = dict(globals(), **bindings)
    fn = types.FunctionType(template.__code__, glb, template.__name__[:-2] + "_" + suffix,
                            template.__defaults__, template.__closure__)
    fn.__qualname__ = template.__qualname__[:-2] + "_" + suffix
    fn.__doc__ = template.__doc__
    return njit(inline="always")(fn) if inline else njit(cache=True)(fn)


def _build_ops():
    """The dispatch table: (op, family, build) -> compiled driver.  family: 'last' (inner == 1)
    or 'first'; build: 'p' (parallel main pass) or 's' (serial).  A channels-last remainder of
    fewer than k rows (see _parts) always takes the serial build."""
    table = {}
    for b in ("p", "s"):
        pick = (lambda k: k.parallel) if b == "p" else (lambda k: k.serial)
        for fam, (sums, gsums, shift, gapply) in {
                "last": (_sums_last_t, _grad_sums_last_t, _scale_shift_last_t, _grad_apply_last_t),
                "first": (_sums_first_t, _grad_sums_first_t, _scale_shift_first_t, _grad_apply_first_t)}.items():
            k = {"sums": _moments_last, "gsums": _grad_sums_last, "shift": _scale_shift_last,
                 "gapply": _grad_apply_last} if fam == "last" else \
                {"sums": _moments_first, "gsums": _grad_sums_first, "shift": _scale_shift_first,
                 "gapply": _grad_apply_first}
            tag = f"{fam}_{b}"
            s = _variant(sums, tag, True, MAIN=pick(k["sums"]), TAIL=k["sums"].serial)
            g = _variant(gsums, tag, True, MAIN=pick(k["gsums"]), TAIL=k["gsums"].serial)
            y = _variant(shift, tag, True, MAIN=pick(k["shift"]), TAIL=k["shift"].serial)
            d = _variant(gapply, tag, True, MAIN=pick(k["gapply"]), TAIL=k["gapply"].serial)
            table["moments", fam, b] = _variant(_moments_t, tag, SUMS=s)
            m = _variant(_moments_t, tag + "_inl", True, SUMS=s)
            table["training", fam, b] = _variant(_training_t, tag, MOMENTS=m, SCALE_SHIFT=y)
            table["inference", fam, b] = _variant(_inference_t, tag, SCALE_SHIFT=y)
            table["backward", fam, b] = _variant(_gradient_t, tag, GRAD_SUMS=g, GRAD_APPLY=d)
    return table


OPS = _build_ops()


def driver(op, x3):
    """The compiled driver of ``op`` for this array's layout family and size."""
    return OPS[op, "first" if x3.shape[2] > 1 else "last", "p" if x3.size >= _PARALLEL_MIN_VALUES else "s"]


# ----------------------------------------------------------------------------------------------
# the backend interface (see refbn.backends): whole ops on canonical views
# ----------------------------------------------------------------------------------------------
def _f64c(v):
    return np.ascontiguousarray(v, dtype=np.float64)


def _output(x3, out3):
    return np.empty(x3.shape, x3.dtype) if out3 is None else out3


def moments(x3):
    """Per-channel mean and biased variance (NaN for an empty x)."""
    if x3.size == 0:
        nan = np.full(x3.shape[1], np.nan)
        return nan, nan.copy()
    xs, kind = storage(x3)
    return driver("moments", x3)(xs, kind)


def forward_training(x3, scale, offset, epsilon, out3=None):
    """(y3, mean, biased variance) of the training forward pass (x3 has at least one value per
    channel: the validation refuses an empty training batch)."""
    y3 = _output(x3, out3)
    if x3.shape[1] == 0:
        return y3, np.zeros(0), np.zeros(0)
    xs, kind = storage(x3)
    mean, var = driver("training", x3)(xs, kind, _f64c(scale), _f64c(offset), float(epsilon), storage(y3)[0])
    return y3, mean, var


def forward_inference(x3, scale, offset, mean, variance, epsilon, out3=None):
    """y3 of the inference forward pass."""
    y3 = _output(x3, out3)
    if x3.size:
        xs, kind = storage(x3)
        driver("inference", x3)(xs, kind, _f64c(scale), _f64c(offset), _f64c(mean), _f64c(variance),
                                float(epsilon), storage(y3)[0])
    return y3


def backward(dy3, x3, scale, mean, variance, epsilon, is_training, out3=None):
    """(dx3, dscale, doffset) of the backward pass."""
    dx3 = _output(x3, out3)
    if x3.size == 0:
        return dx3, np.zeros(x3.shape[1]), np.zeros(x3.shape[1])
    xs, kind = storage(x3)
    dscale, doffset = driver("backward", x3)(storage(dy3)[0], xs, kind, _f64c(scale), _f64c(mean),
                                             _f64c(variance), float(epsilon), bool(is_training), storage(dx3)[0])
    return dx3, dscale, doffset
