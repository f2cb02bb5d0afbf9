"""Argument validation, shared by every backend and entry point.

Every check runs before any state changes, and every message names the
argument and what was expected.
"""
import math
import numbers
import sys

import numpy as np

from . import dtypes


def _not_masked(v, name):
    """A masked array's mask would be dropped by np.asarray: refuse it rather than
    normalise the masked-out values silently."""
    ma = sys.modules.get("numpy.ma")   # not loaded: no masked array can exist (and no import cost)
    if ma is not None and type(v) is not np.ndarray and isinstance(v, ma.MaskedArray):
        raise TypeError(f"{name}: expected a plain array, got a numpy masked array (its mask would be "
                        f"ignored); pass {name}.compressed() or {name}.filled(value) instead")


#: dtypes accepted without looking further (bfloat16 goes the long way: it needs ml_dtypes' check)
_PLAIN_FLOATS = (np.dtype(np.float32), np.dtype(np.float64), np.dtype(np.float16))


def as_x(x, name="x"):
    """x as an ndarray of a supported floating dtype (never copied here)."""
    if type(x) is np.ndarray and x.dtype in _PLAIN_FLOATS:   # the common case: the same answer, cheaply
        return x
    if isinstance(x, (bool, numbers.Number)) and not isinstance(x, np.ndarray):
        raise TypeError(f"{name}: expected an array, got the scalar {x!r}")
    _not_masked(x, name)
    try:
        a = np.asarray(x)
    except Exception as e:  # ragged lists and such
        raise TypeError(f"{name}: expected an array of floats, got {type(x).__name__} ({e})") from None
    if not dtypes.is_supported(a.dtype):
        kind = {"i": "integer", "u": "unsigned integer", "b": "boolean", "c": "complex",
                "O": "object", "U": "string", "S": "bytes"}.get(a.dtype.kind, a.dtype.name)
        raise TypeError(
            f"{name}: expected dtype {dtypes.SUPPORTED_NAMES}, got {a.dtype.name} ({kind}); "
            f"cast it first, e.g. {name}.astype(np.float32)")
    return a


_F64_MAX = float(np.finfo(np.float64).max)


def representable(a, count, name="x"):
    """float64 x (or dy) small enough that the float64 sums of (x - mean)**2 over ``count``
    values cannot overflow.  float16/bfloat16/float32 values always are (3.4e38 squared, times
    any n, is far below float64's 1.8e308); for float64 it costs a min and a max pass, and
    only finite values beyond the bound are refused (NaN and Inf propagate, as in TF)."""
    if a.dtype != np.float64 or a.size == 0:
        return a
    bound = math.sqrt(_F64_MAX / (16.0 * max(count, 1)))
    with np.errstate(invalid="ignore"):
        lo, hi = a.min(), a.max()
    if (hi > bound or lo < -bound) and np.any(np.isfinite(a) & (np.abs(a) > bound)):
        raise ValueError(f"{name}: expected float64 values within +-{bound:.3g} (larger ones would overflow "
                         f"the float64 sum of squares over {count} values per channel), got values up to "
                         f"{max(abs(float(lo)), abs(float(hi))):.3g}; rescale {name}")
    return a


def channel_vector(v, name, channels, dtype, allow_empty=False, finite=True):
    """A per-channel parameter as a 1-D array of ``channels`` values of ``dtype`` (a new array).

    With ``finite`` (the default) every value must be finite *after* the cast to ``dtype``,
    so a float64 value that overflows float32 is refused too."""
    if type(v) is np.ndarray and v.dtype == dtype and v.ndim == 1 and v.shape[0] == channels and channels:
        b = v.copy()   # the common case (a plain vector of the right dtype and length): no cast to check
        if finite and not np.isfinite(b).all():
            all_finite(b, name)
        return b
    if v is None:
        if allow_empty:
            return np.zeros(0, dtype)
        raise ValueError(f"{name}: expected a 1-D array of {channels} values, got None")
    _not_masked(v, name)
    try:
        a = np.asarray(v)
    except Exception as e:
        raise TypeError(f"{name}: expected a 1-D float array, got {type(v).__name__} ({e})") from None
    if a.dtype.kind in "cOUSb" or (a.dtype.kind not in "fiu" and not dtypes.is_supported(a.dtype)):
        raise TypeError(f"{name}: expected a real float array, got dtype {a.dtype.name}")
    if a.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D array of {channels} values (one per channel), "
                         f"got shape {a.shape}")
    if allow_empty and a.size == 0:
        return a.astype(dtype)
    if a.shape[0] != channels:
        raise ValueError(f"{name}: expected {channels} values (one per channel of x), "
                         f"got {a.shape[0]}")
    with np.errstate(over="ignore", invalid="ignore"):
        b = a.astype(dtype)
    if finite:
        all_finite(b, name, original=a)
    return b


def channel_vectors(channels, dtype, items):
    """Several per-channel parameters at once: ``items`` = ((value, name, allow_empty), ...).

    Returns (vectors, wide): each value as a new 1-D array of ``dtype`` (as channel_vector
    returns it; an allowed empty one as a 0-length array), and a float64 array with one row
    per non-empty vector, in order.  Every check and message is channel_vector's.  The common
    case (plain vectors of the right dtype and length) is copied into one buffer and checked
    in one pass, so that a call on a small batch does not pay ~3 us per vector."""
    want, nd = (channels,), np.ndarray
    buf = np.empty((len(items), channels), dtype)
    rows, used = [], 0          # per item: its row of buf, or -1 for an allowed empty vector
    for v, _, empty_ok in items:
        if type(v) is nd and v.shape == want and v.dtype == dtype and channels:
            buf[used] = v
            rows.append(used)
            used += 1
        elif empty_ok and type(v) is nd and v.shape == (0,):
            rows.append(-1)
        else:
            break               # not the common case: the general path below
    else:
        full = buf if used == len(items) else buf[:used]
        if not np.isfinite(full).all():
            for r, (_, name, _) in zip(rows, items):
                if r >= 0:
                    all_finite(full[r], name)
        return [full[r] if r >= 0 else np.zeros(0, dtype) for r in rows], full.astype(np.float64)
    vectors = [channel_vector(v, name, channels, dtype, allow_empty) for v, name, allow_empty in items]
    full = [v for v in vectors if v.size]
    wide = np.array(full, np.float64) if full else np.zeros((0, channels))
    return vectors, wide


def all_finite(a, name, original=None):
    """Every value finite (NaN and +-Inf refused), naming the first offenders."""
    if a.size and not np.isfinite(a).all():
        src = a if original is None else original
        idx = np.flatnonzero(~np.isfinite(a))
        shown = ", ".join(f"[{i}]={_show(src[i])}" for i in idx[:5])
        overflow = " (overflows " + np.dtype(a.dtype).name + ")" if original is not None and np.isfinite(
            np.asarray(original[idx], np.float64)).any() else ""
        raise ValueError(f"{name}: expected finite values, got {shown}{overflow}"
                         + (f" and {idx.size - 5} more" if idx.size > 5 else ""))
    return a


def _show(v):
    try:
        return repr(float(v))
    except (TypeError, ValueError):
        return repr(v)


def _real_scalar(value, name):
    if type(value) is float:   # the common case, without the abstract-base-class checks below
        return value
    if isinstance(value, np.ndarray):
        if value.size != 1:
            raise TypeError(f"{name}: expected a real number, got an array of shape {value.shape}")
        value = value.reshape(()).item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a real number, got {type(value).__name__} {value!r}")
    return float(value)


def epsilon(value, name="epsilon"):
    """epsilon must be finite and > 0 (TF 2.21 accepts 0 and negatives; refbn does not)."""
    v = _real_scalar(value, name)
    if not math.isfinite(v) or v <= 0.0:
        raise ValueError(f"{name}: expected a finite number > 0, got {value!r}")
    return v


def unit_interval(value, name):
    """A weight in [0, 1] (exponential_avg_factor, momentum); NaN is refused."""
    v = _real_scalar(value, name)
    if not 0.0 <= v <= 1.0:
        raise ValueError(f"{name}: expected a number in [0, 1], got {value!r}")
    return v


def nonnegative(v, name):
    """A variance must be >= 0 everywhere (NaN is refused too)."""
    a = v if type(v) is np.ndarray and v.dtype.kind == "f" else np.asarray(v, dtype=np.float64)
    if a.size and not a.min() >= 0.0:   # one reduction on the common path; NaN fails it too
        bad = ~(a >= 0.0)
        idx = np.flatnonzero(bad)
        shown = ", ".join(f"[{i}]={_show(v[i])}" for i in idx[:5])
        raise ValueError(f"{name}: expected every value >= 0, got {shown}"
                         + (f" and {idx.size - 5} more" if idx.size > 5 else ""))
    return v


def nonempty_batch(count, shape, name="x", minimum=1):
    if count < minimum:
        if minimum == 1:
            raise ValueError(f"{name}: training needs at least 1 value per channel to compute "
                             f"batch statistics, got shape {shape} (0 values per channel)")
        raise ValueError(f"{name}: training needs at least {minimum} values per channel, got "
                         f"{count} (shape {shape}); the variance of fewer values is undefined")


def same_shape(a, b, name_a, name_b):
    if a.shape != b.shape:
        raise ValueError(f"{name_a}: expected the shape of {name_b} {b.shape}, got {a.shape}")


def boolean(value, name):
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name}: expected True or False, got {value!r}")
    return bool(value)


def choice(value, name, options):
    if value not in options:
        raise ValueError(f"{name}: expected one of {', '.join(map(repr, options))}, got {value!r}")
    return value


def out_array(out, shape, dtype, name="out"):
    """A caller-provided output buffer: C-contiguous, right shape and dtype."""
    if out is None:
        return None
    if not isinstance(out, np.ndarray):
        raise TypeError(f"{name}: expected a numpy array, got {type(out).__name__}")
    if out.shape != tuple(shape) or out.dtype != dtype:
        raise ValueError(f"{name}: expected shape {tuple(shape)} and dtype {np.dtype(dtype).name}, "
                         f"got shape {out.shape} and dtype {out.dtype.name}")
    if not out.flags.c_contiguous or not out.flags.writeable:
        raise ValueError(f"{name}: expected a writeable C-contiguous array")
    return out
