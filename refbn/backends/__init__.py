"""Backends: how the reductions and the elementwise passes are done.

A backend is a module with four functions on canonical (outer, C, inner)
arrays (see :mod:`refbn.layout`).  Per-channel inputs and outputs are
float64 vectors; the maths between the passes lives in :mod:`refbn.equations`.

    moments(x3) -> (mean, biased_variance)
    scale_shift(x3, mean, y_coef, offset, out3) -> y3       y = (x-mean)*y_coef + offset
    grad_sums(dy3, x3, mean) -> (sum_dy, sum_dy_xc)
    grad_apply(dy3, x3, mean, coefs, out3) -> dx3          dx = a*dy + b*(x-mean) + c

``out3`` is None or a C-contiguous array of x's dtype and shape to write into.
Backends are imported on first use, so ``import refbn`` never loads numba.
"""
import importlib

_MODULES = {"numpy": "refbn.backends.numpy_ref", "numba": "refbn.backends.numba_kernels"}
NAMES = tuple(_MODULES)


def get(name):
    if not isinstance(name, str) or name not in _MODULES:
        raise ValueError(f"backend: expected one of {', '.join(map(repr, _MODULES))}, got {name!r}")
    return importlib.import_module(_MODULES[name])


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
