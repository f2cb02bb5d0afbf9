"""Backends: who runs the whole ops.

A backend is a module with four functions on canonical (outer, C, inner) arrays (see
:mod:`refbn.layout`).  Per-channel inputs and outputs are float64 vectors; ``out3`` is None or
a C-contiguous array of x's dtype and shape to write into.  Every formula a backend applies is
:mod:`refbn.reference`'s; backends differ only in how they reduce and walk memory.

    moments(x3) -> (mean, biased_variance)
    forward_training(x3, scale, offset, epsilon, out3) -> (y3, mean, biased_variance)
    forward_inference(x3, scale, offset, mean, variance, epsilon, out3) -> y3
    backward(dy3, x3, scale, mean, variance, epsilon, is_training, out3) -> (dx3, dscale, doffset)

``"numpy"`` is refbn.reference itself, in float64 on whole arrays; ``"numba"`` compiles the
reference's formulas into parallel one-pass kernels.  :mod:`refbn.core` calls them the same
way whether or not a trace is recorded.  ``"tf_eigen"`` is not a reference: it repeats the
float32 operations of TF's Eigen CPU kernel to reproduce its bits (refbn/backends/tf_eigen.py).
A backend may also define ``running_statistics(mean, variance, n, factor, old_mean,
old_variance)``, its own arithmetic for the Bessel correction and the moving average (outputs
1-2 of FusedBatchNormV3), and ``check_backward(layout, is_training)``, which may refuse a
gradient call (ValueError) before anything is computed; raw_ops uses them when present.  Backends are imported on first use, so
``import refbn`` never loads numba.
"""
import importlib

_MODULES = {"numpy": "refbn.backends.numpy_ref", "numba": "refbn.backends.numba_kernels",
            "tf_eigen": "refbn.backends.tf_eigen"}   # TF's Eigen CPU kernel, bit for bit (not a reference)
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


#: backends that reproduce another kernel's bits rather than the truth: not in available(), so
#: the tests and ``refbn verify --backend all`` (which judge backends by refbn.reference) skip them
EMULATIONS = ("tf_eigen",)


def available():
    """Backends that import on this machine (the emulations left out: see EMULATIONS)."""
    ok = []
    for name in (n for n in _MODULES if n not in EMULATIONS):
        try:
            get(name)
        except ImportError:
            continue
        ok.append(name)
    return ok
