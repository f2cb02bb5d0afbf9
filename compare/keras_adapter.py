"""Keras 3 on its jax or torch backend (``refbn verify --framework keras_jax,keras_torch``).

Only :mod:`refbn.compare.fw_worker` imports this module, in a process whose
``KERAS_BACKEND`` was set before Keras loaded (Keras reads it once, at
import).  Parity cases (mode ``keras``) run ``keras.layers.BatchNormalization``
for K training steps, then one inference step.
"""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from . import cases as cases_mod  # noqa: E402
from . import probe  # noqa: E402

BACKEND = keras.backend.backend()
if BACKEND == "torch":  # pragma: no branch
    import torch
    torch.set_num_threads(1)


def hello():
    return {"framework": f"keras_{BACKEND}", "version": f"keras {keras.__version__} ({BACKEND} backend)"}


def _np(t):
    return np.asarray(keras.ops.convert_to_numpy(t))


def run(case):
    batches, x_inf = cases_mod.parity_batches(case)
    layer = keras.layers.BatchNormalization(axis=case.channel_axis, momentum=case.mom, epsilon=case.eps)
    ys = [_np(layer(keras.ops.convert_to_tensor(xb), training=True)) for xb in batches]
    y_inf = _np(layer(keras.ops.convert_to_tensor(x_inf), training=False))
    arrays = {"parity.moving_mean": _np(layer.moving_mean), "parity.moving_variance": _np(layer.moving_variance),
              "parity.y_last_train": ys[-1], "parity.y_infer": y_inf}
    impl = f"keras {keras.__version__} layers.BatchNormalization ({BACKEND} backend)"
    return {f"keras.{BACKEND}": (arrays, {"implementation": impl})}


def conventions():
    def make(**kw):
        layer = keras.layers.BatchNormalization(axis=1, **kw)
        layer.build((None, probe.CHANNELS, 2, 2))
        return layer

    def step(layer, x):
        return _np(layer(keras.ops.convert_to_tensor(x), training=True))

    def read(layer):
        return _np(layer.moving_mean), _np(layer.moving_variance)

    d = keras.layers.BatchNormalization()
    return {f"keras.{BACKEND}": probe.run_probe(make, step, read, d.momentum, d.epsilon, full_weight=0.0)}
