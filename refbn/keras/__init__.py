"""refbn.keras: diagnose and fix BatchNormalization statistics in Keras models.

Imports Keras (and TensorFlow) only when this subpackage is imported;
``import refbn`` never does.

    import refbn.keras
    report = refbn.keras.diagnose(model, x, y)   # which layers are wrong, why, what to do
    report.print()
    refbn.keras.recalibrate(model, x)            # exact statistics, layer by layer ("precise BN")
    refbn.keras.debias(model, steps=5)           # or: remove the initial values' weight

CLI: ``refbn diagnose MODEL.keras DATA.npz`` and ``refbn demo``.
"""
from .capture import bn_layers, preserved_statistics
from .diagnose import Diagnosis, LayerReport, accuracy, diagnose
from .recalibrate import Moments, batches, debias, initial_values, recalibrate, training_steps

__all__ = ["diagnose", "Diagnosis", "LayerReport", "recalibrate", "debias", "Moments", "batches",
           "bn_layers", "preserved_statistics", "initial_values", "training_steps", "accuracy"]
