"""The numpy reference backend: float64 accumulation, two passes, readable.

Each pass works on blocks of the outer axis, so temporaries stay small and
a 6-million-value batch does not allocate several float64 copies of itself.
Results are the float64 truth used by every test (TF's kernels and the
numba kernels are judged against them).
"""
import functools

import numpy as np

from .. import dtypes, equations as eq


def _quiet(fn):
    """NaN/Inf propagate per channel by design (as in TF), and a float16 y may overflow to
    Inf on its final cast as TF's does: neither is worth a numpy RuntimeWarning."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with np.errstate(invalid="ignore", over="ignore"):
            return fn(*args, **kwargs)
    return wrapper

_BLOCK_VALUES = 1 << 16  # values per block: float64 work buffers of 512 KB, allocated once per call
#                         and reused (fresh temporaries of this size measured up to 6x slower: malloc
#                         maps and unmaps them every time)


def _view(a3):
    """The array the passes work on: channels last ((outer, C, 1)) drops its unit axis, so
    numpy's inner loops run along the C contiguous channels instead of over 1 value."""
    return a3[:, :, 0] if a3.shape[2] == 1 else a3


def _per_channel(v, ndim):
    """A per-channel vector shaped to broadcast against a block of a _view."""
    return v[None, :] if ndim == 2 else v[None, :, None]


def _axes(a):
    """Every axis of a _view except the channel axis (1)."""
    return (0,) if a.ndim == 2 else (0, 2)


def _dot(a, b):
    """sum(a * b) per channel, without a temporary for the product."""
    return np.einsum("oc,oc->c" if a.ndim == 2 else "ocj,ocj->c", a, b)


def _step(a):
    return max(1, _BLOCK_VALUES // max(1, int(np.prod(a.shape[1:]))))  # a may have 0 rows (N == 0)


def _blocks(a):
    step = _step(a)
    for start in range(0, a.shape[0], step):
        yield slice(start, min(a.shape[0], start + step))


def _buffer(a):
    """A float64 work buffer for one block of a."""
    return np.empty((min(_step(a), a.shape[0]),) + a.shape[1:])


def _as_f64(buf, a):
    """a, widened to float64 in (the first rows of) the work buffer."""
    out = buf[:a.shape[0]]
    np.copyto(out, a)
    return out


def _centered(buf, x, m):
    """x - m in float64, written into (the first rows of) the work buffer."""
    return np.subtract(x, m, out=buf[:x.shape[0]])


@_quiet
def moments(x3):
    """Per-channel mean, then the biased variance sum((x - mean)^2) / n (two passes)."""
    x = _view(x3)
    n = x.size // x.shape[1]
    total = np.zeros(x.shape[1])
    for b in _blocks(x):
        total += x[b].sum(axis=_axes(x), dtype=np.float64)
    mean = total / n
    m = _per_channel(mean, x.ndim)
    sq = np.zeros(x.shape[1])
    buf = _buffer(x)
    for b in _blocks(x):
        xc = _centered(buf, x[b], m)
        sq += _dot(xc, xc)
    return mean, sq / n


@_quiet
def scale_shift(x3, mean, y_coef, offset, out3=None):
    y3 = np.empty(x3.shape, x3.dtype) if out3 is None else out3
    x, y = _view(x3), _view(y3)
    m, k, o = (_per_channel(v, x.ndim) for v in (mean, y_coef, offset))
    buf = _buffer(x)
    for b in _blocks(x):
        dtypes.store(y[b], eq.batch_norm_(_centered(buf, x[b], m), k, o))
    return y3


@_quiet
def grad_sums(dy3, x3, mean):
    """sum(dy) and sum(dy * (x - mean)) per channel."""
    x, dy = _view(x3), _view(dy3)
    m = _per_channel(mean, x.ndim)
    sum_dy = np.zeros(x.shape[1])
    sum_dy_xc = np.zeros(x.shape[1])
    buf_dy, buf_xc = _buffer(x), _buffer(x)
    for b in _blocks(x):
        g = _as_f64(buf_dy, dy[b])
        sum_dy += g.sum(axis=_axes(x))
        sum_dy_xc += _dot(g, _centered(buf_xc, x[b], m))
    return sum_dy, sum_dy_xc


@_quiet
def grad_apply(dy3, x3, mean, coefs, out3=None):
    dx3 = np.empty(x3.shape, x3.dtype) if out3 is None else out3
    x, dy, dx = _view(x3), _view(dy3), _view(dx3)
    c = eq.BackwardCoefficients(*(_per_channel(v, x.ndim) for v in coefs))
    m = _per_channel(mean, x.ndim)
    buf_dy, buf_xc = _buffer(x), _buffer(x)
    for b in _blocks(x):
        dtypes.store(dx[b], eq.batch_norm_backward_(_as_f64(buf_dy, dy[b]), _centered(buf_xc, x[b], m), c))
    return dx3
