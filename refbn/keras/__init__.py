"""refbn.keras: diagnose and fix BatchNormalization statistics in Keras models.

Keras (and TensorFlow) are imported on first use of one of the names below
(or of a submodule that needs them), not by ``import refbn.keras`` itself, so
the ``refbn demo`` and ``refbn diagnose`` commands (refbn.keras.demo,
refbn.keras.diagnose_cli) can answer ``--help`` and argument errors without
them.  ``import refbn`` never imports Keras.

    import refbn.keras
    report = refbn.keras.diagnose(model, x, y)   # which layers are wrong, why, what to do
    report.print()
    refbn.keras.recalibrate(model, x)            # exact statistics, layer by layer ("precise BN")
    refbn.keras.debias(model, steps=5)           # or: remove the initial values' weight

CLI: ``refbn diagnose MODEL.keras DATA.npz`` and ``refbn demo``.
"""
import importlib
import sys
import types

_EXPORTS = {
    "bn_layers": "capture", "preserved_statistics": "capture",
    "Diagnosis": "diagnose", "LayerReport": "diagnose", "accuracy": "diagnose", "diagnose": "diagnose",
    "Moments": "recalibrate", "batches": "recalibrate", "debias": "recalibrate",
    "initial_values": "recalibrate", "recalibrate": "recalibrate", "training_steps": "recalibrate",
}

__all__ = ["diagnose", "Diagnosis", "LayerReport", "recalibrate", "debias", "Moments", "batches",
           "bn_layers", "preserved_statistics", "initial_values", "training_steps", "accuracy"]


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
        setattr(sys.modules[__name__], name, value)
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """``refbn.keras.diagnose`` and ``refbn.keras.recalibrate`` are functions and submodules.

    Importing a submodule binds it on its package; as with the former eager
    ``from .diagnose import diagnose``, the package keeps the function instead.
    """

    def __setattr__(self, name, value):
        if isinstance(value, types.ModuleType) and _EXPORTS.get(name) == name \
                and value.__name__ == f"{__name__}.{name}" and hasattr(value, name):
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
