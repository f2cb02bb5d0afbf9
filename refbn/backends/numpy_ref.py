"""The numpy reference backend: float64 accumulation, two passes, readable.

Each pass works on blocks of the outer axis, so temporaries stay small and
a 6-million-value batch does not allocate several float64 copies of itself.
Results are the float64 truth used by every test (TF's kernels and the
numba kernels are judged against them).
"""
import functools

import numpy as np

from .. import equations as eq


def _quiet(fn):
    """NaN/Inf propagate per channel by design (as in TF), and a float16 y may overflow to
    Inf on its final cast as TF's does: neither is worth a numpy RuntimeWarning."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with np.errstate(invalid="ignore", over="ignore"):
            return fn(*args, **kwargs)
    return wrapper

_BLOCK_VALUES = 1 << 16  # values per block: large enough for numpy, small enough for cache


def _blocks(x3):
    outer, channels, inner = x3.shape
    step = max(1, _BLOCK_VALUES // max(1, channels * inner))
    for start in range(0, outer, step):
        yield slice(start, min(outer, start + step))


def _f64(a):
    return np.asarray(a, dtype=np.float64)


@_quiet
def moments(x3):
    """Per-channel mean, then the biased variance sum((x - mean)^2) / n (two passes)."""
    outer, channels, inner = x3.shape
    n = outer * inner
    total = np.zeros(channels)
    for b in _blocks(x3):
        total += _f64(x3[b]).sum(axis=(0, 2))
    mean = total / n
    sq = np.zeros(channels)
    for b in _blocks(x3):
        xc = _f64(x3[b]) - mean[None, :, None]
        sq += np.einsum("ocj,ocj->c", xc, xc)
    return mean, sq / n


@_quiet
def scale_shift(x3, mean, y_coef, offset, out3=None):
    y3 = np.empty(x3.shape, x3.dtype) if out3 is None else out3
    m, k, o = mean[None, :, None], y_coef[None, :, None], offset[None, :, None]
    for b in _blocks(x3):
        y3[b] = eq.batch_norm(_f64(x3[b]) - m, k, o)
    return y3


@_quiet
def grad_sums(dy3, x3, mean):
    """sum(dy) and sum(dy * (x - mean)) per channel."""
    channels = x3.shape[1]
    sum_dy = np.zeros(channels)
    sum_dy_xc = np.zeros(channels)
    for b in _blocks(x3):
        dy = _f64(dy3[b])
        sum_dy += dy.sum(axis=(0, 2))
        sum_dy_xc += np.einsum("ocj,ocj->c", dy, _f64(x3[b]) - mean[None, :, None])
    return sum_dy, sum_dy_xc


@_quiet
def grad_apply(dy3, x3, mean, coefs, out3=None):
    dx3 = np.empty(x3.shape, x3.dtype) if out3 is None else out3
    c = eq.BackwardCoefficients(*(v[None, :, None] for v in coefs))
    m = mean[None, :, None]
    for b in _blocks(x3):
        dx3[b] = eq.batch_norm_backward(_f64(dy3[b]), _f64(x3[b]) - m, c)
    return dx3
