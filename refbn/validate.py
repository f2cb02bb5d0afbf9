"""Argument validation, shared by every backend and entry point.

Every check runs before any state changes, and every message names the
argument and what was expected.
"""
import math
import numbers

import numpy as np

from . import dtypes


def as_x(x, name="x"):
    """x as an ndarray of a supported floating dtype (never copied here)."""
    if isinstance(x, (bool, numbers.Number)) and not isinstance(x, np.ndarray):
        raise TypeError(f"{name}: expected an array, got the scalar {x!r}")
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


def channel_vector(v, name, channels, dtype, allow_empty=False):
    """A per-channel parameter as a 1-D array of ``channels`` values of ``dtype``."""
    if v is None:
        if allow_empty:
            return np.zeros(0, dtype)
        raise ValueError(f"{name}: expected a 1-D array of {channels} values, got None")
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
    return a.astype(dtype)


def _real_scalar(value, name):
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
    a = np.asarray(v, dtype=np.float64)
    if a.size and not a.min() >= 0.0:   # one reduction on the common path; NaN fails it too
        bad = ~(a >= 0.0)
        idx = np.flatnonzero(bad)
        shown = ", ".join(f"[{i}]={float(v[i])!r}" for i in idx[:5])
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
