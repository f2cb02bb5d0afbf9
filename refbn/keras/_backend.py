"""Import Keras with the TensorFlow backend unless the user chose another one.

refbn.keras needs eager execution and numpy conversion, which every Keras 3
backend offers; the tools are tested with TensorFlow.
"""
import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402

__all__ = ["keras"]
