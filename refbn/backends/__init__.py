"""Backends: how the reductions and the elementwise passes are done.

A backend is a module with four functions on canonical (outer, C, inner)
arrays (see :mod:`refbn.layout`).  Per-channel inputs and outputs are
float64 vectors; the maths between the passes lives in :mod:`refbn.equations`.

    moments(x3) -> (mean, biased_variance)
    scale_shift(x3, mean, y_coef, offset, out3) -> y3       y = (x-mean)*y_coef + offset
    grad_sums(dy3, x3, mean) -> (sum_dy, sum_dy_xc)
    grad_apply(dy3, x3, mean, coefs, out3) -> dx3          dx = a*dy + b*(x-mean) + c

``out3`` is None or a C-contiguous array of x's dtype and shape to write into.

A backend may also run a whole op in one call (the numba backend does, so that a call pays for
one dispatch instead of the Python glue between four); refbn.core then uses it whenever no trace
is recorded.  Each takes the canonical arrays and float64 vectors and follows the same steps as
refbn.core's composition, with the equations of refbn.equations; None means "compose instead":

    forward_training(x3, scale, offset, epsilon, out3) -> (y3, mean, biased_variance) or None
    forward_inference(x3, scale, offset, mean, variance, epsilon, out3) -> y3
    backward(dy3, x3, scale, mean, variance, epsilon, is_training, out3) -> (dx3, dgamma, dbeta) or None
Backends are imported on first use, so ``import refbn`` never loads numba.
"""
import importlib

_MODULES = {"numpy": "refbn.backends.numpy_ref", "numba": "refbn.backends.numba_kernels"}
NAMES = tuple(_MODULES)


_LOADED = {}


def get(name):
    module = _LOADED.get(name) if isinstance(name, str) else None
    if module is not None:
        return module
    if not isinstance(name, str) or name not in _MODULES:
        raise ValueError(f"backend: expected one of {', '.join(map(repr, _MODULES))}, got {name!r}")
    module = _LOADED[name] = importlib.import_module(_MODULES[name])
    return module


def available():
    """Backends that import on this machine."""
    ok = []
    for name in _MODULES:
        try:
            get(name)
        except ImportError:
            continue
        ok.append(name)
    return ok
