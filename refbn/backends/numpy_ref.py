"""The numpy backend: :mod:`refbn.reference` itself, on the canonical (outer, C, inner) view.

Whole arrays in float64, rounded once to x's dtype (:func:`refbn.dtypes.store`).  This is
the truth every other backend, and TensorFlow, is judged by.
"""
import functools

import numpy as np

from .. import dtypes, reference as ref

_AXIS = 1   # the channel axis of the canonical view


def _quiet(fn):
    """NaN/Inf propagate per channel by design (as in TF), and a float16 y may overflow to
    Inf on its final cast as TF's does: neither is worth a numpy RuntimeWarning."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            return fn(*args, **kwargs)
    return wrapper


def _store(a64, like, out3):
    out = np.empty(like.shape, like.dtype) if out3 is None else out3
    return dtypes.store(out, a64)


@_quiet
def moments(x3):
    return ref.moments(x3, _AXIS)


@_quiet
def forward_training(x3, scale, offset, epsilon, out3=None):
    y, mean, var = ref.forward_training(x3, scale, offset, epsilon, _AXIS)
    return _store(y, x3, out3), mean, var


@_quiet
def forward_inference(x3, scale, offset, mean, variance, epsilon, out3=None):
    return _store(ref.forward_inference(x3, scale, offset, mean, variance, epsilon, _AXIS), x3, out3)


@_quiet
def backward(dy3, x3, scale, mean, variance, epsilon, is_training, out3=None):
    dx, dscale, doffset = ref.backward(dy3, x3, scale, mean, variance, epsilon, is_training, _AXIS)
    return _store(dx, x3, out3), dscale, doffset
