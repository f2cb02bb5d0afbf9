"""Shared hypothesis strategies and judges for tests/test_fuzz.py and tests/test_layer_state.py.

Hypothesis draws the structure of a case (layout, shape, dtype, memory view, value kind,
out= buffer); the values themselves come from a numpy generator seeded by a drawn integer
(drawing 10^4 floats one by one would cost more than the call under test).  Every value kind
keeps the float64 truth the mathematical truth: nothing drawn overflows float64 in
refbn.reference (the widest "huge" float64 data are ~1e150, whose squares still fit).
"""
import copy
from math import prod

import ml_dtypes
import numpy as np
from hypothesis import strategies as st

from refbn import dtypes
from refbn.testing import assert_close

DTYPES = (dtypes.float16, dtypes.bfloat16, dtypes.float32, dtypes.float64)
#: data_format -> (rank, channel axis), as refbn.layout.DATA_FORMATS (kept here so that a change
#: there cannot silently change what the fuzz test draws)
FORMATS = {"NC": (2, 1), "NWC": (3, 2), "NCW": (3, 1), "NHWC": (4, 3), "NCHW": (4, 1), "NDHWC": (5, 4),
           "NCDHW": (5, 1)}
MAX_VALUES = 2048      # values of x, except for the wide-channel shapes (C * 1 or C * 2)
WIDE = (1000, 4099, 10_000)
VALUE_KINDS = ("normal", "offset", "near_max", "subnormal", "integers", "constant", "mixed_scale")
X_VIEWS = ("c", "fortran", "strided", "negative", "readonly", "broadcast")
VEC_VIEWS = ("array", "list", "tuple", "readonly", "strided", "negative", "float64")
SENTINEL = 1234.5      # what the gaps of a strided view hold: reading one gives a visibly wrong result


def finfo(dt):
    return ml_dtypes.finfo(dt) if np.dtype(dt).name == "bfloat16" else np.finfo(dt)


def short(dt):
    return dtypes.short_name(dt)


# -- shapes ---------------------------------------------------------------------------------------
@st.composite
def shape_with_axis(draw, rank, axis, min_count=1):
    """A shape of ``rank`` with its channel axis ``axis``: C from 1 to 10^4, the other dimensions
    often 1, the total kept small (<= MAX_VALUES, or C * 2 for the wide shapes)."""
    c = draw(st.one_of(st.integers(1, 8), st.integers(9, 300), st.sampled_from(WIDE)))
    budget = max(MAX_VALUES // c, 1) if c < 1000 else draw(st.sampled_from([1, 2]))
    budget = max(budget, min_count)
    dims = [draw(st.one_of(st.just(1), st.integers(1, 12))) for _ in range(rank - 1)]
    while prod(dims) > budget:
        i = int(np.argmax(dims))
        dims[i] = max(1, dims[i] // 2)
    while prod(dims) < min_count:
        dims[0] += 1
    return tuple(dims[:axis]) + (c,) + tuple(dims[axis:])


@st.composite
def data_format_shapes(draw, min_count=1):
    fmt = draw(st.sampled_from(sorted(FORMATS)))
    rank, axis = FORMATS[fmt]
    return fmt, axis, draw(shape_with_axis(rank, axis, min_count))


@st.composite
def axis_shapes(draw, min_count=1, max_rank=5):
    """(axis as the user writes it, maybe negative; the axis in range; shape) for BatchNorm."""
    rank = draw(st.integers(1, max_rank))
    axis = draw(st.integers(0, rank - 1))
    if rank == 1 and min_count > 1:
        rank, axis = 2, draw(st.integers(0, 1))
    shape = draw(shape_with_axis(rank, axis, min_count))
    user_axis = axis - rank if draw(st.booleans()) else axis
    return user_axis, axis, shape


# -- values ---------------------------------------------------------------------------------------
def make_values(kind, shape, dtype, axis, rng):
    """float64 values of a kind, exactly representable in dtype (they are rounded to it here)."""
    dt = np.dtype(dtype)
    fi = finfo(dt)
    cshape = [1] * len(shape)
    cshape[axis] = shape[axis]
    if kind == "normal":
        v = rng.choice([0.0, 1.5, -3.0]) + rng.choice([1.0, 2.0, 0.1]) * rng.standard_normal(shape)
    elif kind == "offset":      # |mean| / std = 1e6 (1e3 in 16 bits): a float32 sum of x would lose it
        loc, std = (1e4, 1e-2) if dt.itemsize >= 4 else (1e3, 1.0)
        v = loc + std * rng.standard_normal(shape)
    elif kind == "near_max":    # float16 near 65504; wider dtypes at their huge values (float64 ~1e150)
        top = min(float(fi.max), 1e150)
        v = top * rng.uniform(0.5, 1.0, shape) * rng.choice([-1.0, 1.0], size=cshape)
    elif kind == "subnormal":
        v = float(fi.tiny) * rng.uniform(-1.0, 1.0, shape)
    elif kind == "integers":
        v = rng.integers(-3, 4, shape).astype(np.float64)
    elif kind == "constant":
        v = np.broadcast_to(rng.normal(0, 3, cshape), shape).copy()
    elif kind == "mixed_scale":  # channels on very different scales
        v = rng.standard_normal(shape) * 10.0 ** rng.integers(-3, 4, cshape)
    else:
        raise AssertionError(kind)
    with np.errstate(over="ignore"):
        v = np.asarray(v, np.float64).astype(dt)
    v[~np.isfinite(v.astype(np.float64))] = fi.max   # near_max rounding up to Inf: keep it finite
    return v


def inject_nonfinite(v, axis, rng, what):
    """Put one NaN / Inf / -Inf into a random channel (a copy)."""
    v = v.copy()
    idx = tuple(int(rng.integers(0, s)) for s in v.shape)
    v[idx] = {"nan": np.nan, "inf": np.inf, "-inf": -np.inf}[what]
    return v


def vector_values(kind, c, stats_dt, rng):
    """Per-channel values (exact in the statistics dtype) of a role: scale, offset, mean, variance."""
    if kind == "scale":
        v = rng.uniform(0.5, 2.0, c) * rng.choice([-1.0, 1.0], c)
        v[rng.random(c) < 0.1] = 0.0
    elif kind == "big_scale":
        v = rng.uniform(50, 200, c)
    elif kind == "offset":
        v = rng.normal(0, 1, c)
    elif kind == "big_offset":     # near the top of float16 (y overflows to Inf for some values)
        v = rng.choice([-1.0, 1.0], c) * rng.uniform(6.4e4, 6.55e4, c)
    elif kind == "mean":
        v = rng.normal(0, 3, c)
    elif kind == "variance":
        v = rng.uniform(0.0, 3.0, c)
        v[rng.random(c) < 0.15] = 0.0
    else:
        raise AssertionError(kind)
    return v.astype(stats_dt)


def as_x_view(v, kind, axis, rng):
    """An array with v's values (v: a C-contiguous array) in a memory layout of ``kind``.
    Returns the view; the values a caller sees are np.array(view) (for "broadcast" they are
    constant along one non-channel axis, so they differ from v)."""
    if kind == "c":
        return v.copy()
    if kind == "fortran":
        return np.asfortranarray(v)
    if kind == "readonly":
        a = v.copy()
        a.flags.writeable = False
        return a
    k = int(rng.integers(0, v.ndim))
    if kind == "strided":
        big_shape = list(v.shape)
        big_shape[k] *= 2
        big = np.full(big_shape, SENTINEL, v.dtype)
        sl = [slice(None)] * v.ndim
        sl[k] = slice(None, None, 2)
        big[tuple(sl)] = v
        return big[tuple(sl)]
    if kind == "negative":
        return np.flip(np.flip(v, k).copy(), k)
    if kind == "broadcast":
        ks = [i for i in range(v.ndim) if i != axis and v.shape[i] > 1]
        if not ks:
            return v.copy()
        k = ks[int(rng.integers(0, len(ks)))]
        return np.broadcast_to(np.take(v, [0], axis=k), v.shape)
    raise AssertionError(kind)


def as_vector(v, kind, rng):
    """A per-channel vector (v: exact in its dtype) passed in a container of ``kind``."""
    if kind == "array":
        return v.copy()
    if kind == "list":
        return [float(t) for t in v]
    if kind == "tuple":
        return tuple(float(t) for t in v)
    if kind == "readonly":
        a = v.copy()
        a.flags.writeable = False
        return a
    if kind == "strided":
        big = np.full(2 * v.size, SENTINEL, v.dtype)
        big[::2] = v
        return big[::2]
    if kind == "negative":
        return v[::-1].copy()[::-1]
    if kind == "float64":
        return v.astype(np.float64)
    raise AssertionError(kind)


# -- inputs never change ----------------------------------------------------------------------------
def _root(a):
    while isinstance(a.base, np.ndarray):
        a = a.base
    return a


def _address(a):
    return a.__array_interface__["data"][0]


class Snapshot:
    """Bytes of every array passed (its whole buffer, gaps of a view included) and deep copies of
    every list, taken before a call.  ``check`` asserts they are unchanged afterwards, except for
    the region of ``out`` (when out shares a buffer with an input, only out's own bytes may change)."""

    def __init__(self, **inputs):
        self.items = []
        for name, a in inputs.items():
            if isinstance(a, np.ndarray):
                r = _root(a)
                self.items.append((name, r, r.tobytes() if r.flags.c_contiguous else r.copy(order="K").tobytes()))
            else:
                self.items.append((name, a, copy.deepcopy(a)))

    def check(self, out=None, what=""):
        for name, a, before in self.items:
            if not isinstance(a, np.ndarray):
                if not _same_py(a, before):
                    raise AssertionError(f"{what}: input {name} was modified")
                continue
            after = a.tobytes() if a.flags.c_contiguous else a.copy(order="K").tobytes()
            if out is not None and isinstance(out, np.ndarray) and np.shares_memory(a, out):
                lo = _address(out) - _address(a)
                hi = lo + out.nbytes
                if not (before[:lo] == after[:lo] and before[hi:] == after[hi:]):
                    raise AssertionError(f"{what}: input {name}'s buffer was modified outside out=")
            elif after != before:
                raise AssertionError(f"{what}: input {name} was modified (its bytes differ after the call)")


def _same_py(a, b):
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same_py(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (a != a and b != b)
    return a is b or a == b


# -- the judge ----------------------------------------------------------------------------------------
def rounded_truth(truth, dt):
    """The float64 truth, with the values whose correct rounding to dt overflows replaced by
    +-Inf (IEEE rounding: refbn's contract for outputs that overflow their dtype)."""
    e = np.asarray(truth, np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        r = e.astype(dt).astype(np.float64)
    return np.where(np.isfinite(e) & np.isinf(r), r, e)


def rms_of(a):
    """Root-mean-square of finite values, without overflowing for values near the float64 maximum."""
    a = np.asarray(a, np.float64)
    top = float(np.max(np.abs(a))) if a.size else 0.0
    return top * float(np.sqrt(np.mean((a / top) ** 2))) if top > 0 else 0.0


EPS64 = float(np.finfo(np.float64).eps)


def f64_noise(n):
    """Relative error bound of a float64 pairwise sum of n values (~log2(n) eps64): how well the
    float64 truth itself knows a channel's mean, in units of the values' magnitude."""
    return EPS64 * max(1.0, float(np.log2(max(n, 1))))


def variance_noise(x64, n):
    """Absolute float64 noise of a variance: the mean is known to f64_noise(n) * |x|, so a
    (near-)constant channel's two-pass variance is ~(f64_noise * |x|)^2, not 0 (a shifted
    one-pass sum gives exactly 0).  Second order: negligible unless the variance vanishes."""
    return (f64_noise(n) * rms_of(x64[np.isfinite(x64)])) ** 2


def judge(actual, truth, output, dt, backend, what="", noise=0.0):
    """actual (in dtype dt) against refbn.reference's float64 truth, under the declared tolerance
    of the backend's context.  The scale is floored at the dtype's smallest normal number: below
    it the dtype's spacing is constant (eps * tiny), so 1 eps of that scale is one subnormal step.
    ``noise``: the float64 truth's own absolute uncertainty on ill-conditioned data (f64_noise
    times the size of the terms that cancel); the scale is at least noise / eps(dt), so the
    allowance is never below the declared ulps times that noise.  On well-conditioned data it is
    ~1 float64 ulp of the result, far below every declared tolerance."""
    dt = np.dtype(dt)
    if not isinstance(actual, np.ndarray) or actual.dtype != dt:
        raise AssertionError(f"{what}: {output} should be an ndarray of dtype {dt.name}, got "
                             f"{type(actual).__name__} {getattr(actual, 'dtype', '')}")
    e = rounded_truth(truth, dt)
    fin = np.isfinite(e)
    rms = rms_of(e[fin])
    scale = max(rms, float(finfo(dt).tiny), noise / dtypes.machine_epsilon(dt))
    ctx = "reference" if backend == "numpy" else "numba"
    return assert_close(actual, e, output, dt, ctx, scale=scale, what=what)


def names_argument(message, names):
    """Whether an error message names one of the arguments: it starts with 'name' or holds it as a word."""
    import re
    return any(message.startswith(n) or re.search(rf"(?<![\w.]){re.escape(n)}(?!\w)", message)
               for n in names)


def grad_noise(dy64, x64, scale, mean, variance, epsilon, training, axis):
    """float64 noise of the backward's outputs (see judge): dx = a*dy + b*(x - mean) + c, where
    x - mean carries f64_noise * |x| (a batch mean, or the evaluation), and the sums
    sum(dy) and sum(dy * (x - mean)) carry f64_noise times the sums of the terms' magnitudes."""
    from refbn import reference
    fin = np.isfinite(x64) & np.isfinite(dy64)
    x0, dy0 = np.where(fin, x64, 0.0), np.where(fin, dy64, 0.0)
    n = reference.count(x64, axis)
    shape = [1] * x64.ndim
    shape[axis] = -1
    m = np.asarray(mean, np.float64)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        xc = np.abs(x0 - np.where(np.isfinite(m), m, 0.0).reshape(shape)) + np.abs(x0)
        istd = reference.inv_std(np.asarray(variance, np.float64), epsilon)
        a, b, c, _, _ = reference.backward_coefficients(
            reference.channel_sum(dy0, axis), reference.channel_sum(dy0 * (x0 - m.reshape(shape)), axis), n,
            np.asarray(scale, np.float64), istd, training)
        big = lambda v: float(np.max(np.where(np.isfinite(v), np.abs(v), 0.0))) if np.size(v) else 0.0
        e = f64_noise(n)
        # the sums' own noise reaches dx through b and c: db = |a| istd^2 d(sum_dy_xc) / n, dc = |a| d(sum_dy) / n
        d_sum_dy_xc = e * reference.channel_sum(np.abs(dy0) * xc, axis)
        d_b = np.abs(a) * istd * istd * d_sum_dy_xc / n
        d_c = np.abs(a) * e * reference.channel_sum(np.abs(dy0), axis) / n
        return {"x_backprop": e * (big(a) * rms_of(dy0) + big(b) * rms_of(xc) + big(c)) + big(d_b) * rms_of(xc)
                              + big(d_c),
                "scale_backprop": e * big(reference.channel_sum(np.abs(dy0) * xc, axis) * istd),
                "offset_backprop": e * big(reference.channel_sum(np.abs(dy0), axis))}


def state_close(actual, expected, name, dt, what=""):
    """A BatchNorm state array (dtype dt) against its float64 model: context "refbn_layer" for
    float32 state (one rounding per step), "layer" for float64; the scale floored at the dtype's
    smallest normal number (one subnormal step), as in judge."""
    dt = np.dtype(dt)
    if not isinstance(actual, np.ndarray) or actual.dtype != dt:
        raise AssertionError(f"{what}: {name} should be an ndarray of dtype {dt.name}, got {actual!r}")
    e = np.asarray(expected, np.float64)
    ctx = "layer" if dt == np.float64 else "refbn_layer"
    scale = max(rms_of(e[np.isfinite(e)]), float(finfo(dt).tiny))
    return assert_close(actual, e, name, dt, ctx, scale=scale, what=what)
