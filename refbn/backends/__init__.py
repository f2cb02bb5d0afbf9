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
way whether or not a trace is recorded.  Backends are imported on first use, so
``import refbn`` never loads numba.
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
