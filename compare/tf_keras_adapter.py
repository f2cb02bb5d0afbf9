"""tf-keras (Keras 2) ``BatchNormalization`` with ``fused=True`` and ``fused=False``.

Only :mod:`refbn.compare.fw_worker` imports this module, in its own process
(TensorFlow's default CPU kernel).  Mode ``tf_fused`` runs ``fused=True``
(FusedBatchNormV3: the moving variance averages Bessel-corrected variances),
mode ``keras`` runs ``fused=False`` (the biased variance, as Keras 3).
"""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf_keras  # noqa: E402

from . import cases as cases_mod  # noqa: E402
from . import probe  # noqa: E402


def hello():
    return {"framework": "tf_keras", "version": f"tf_keras {tf_keras.__version__} (TF {tf.__version__})"}


def _layer(case, fused):
    return tf_keras.layers.BatchNormalization(axis=case.channel_axis, momentum=case.mom, epsilon=case.eps,
                                              fused=fused)


def run(case):
    batches, x_inf = cases_mod.parity_batches(case)
    fused = case.mode == "tf_fused"
    layer = _layer(case, fused)
    ys = [np.asarray(layer(tf.constant(xb), training=True)) for xb in batches]
    y_inf = np.asarray(layer(tf.constant(x_inf), training=False))
    arrays = {"parity.moving_mean": np.asarray(layer.moving_mean),
              "parity.moving_variance": np.asarray(layer.moving_variance),
              "parity.y_last_train": ys[-1], "parity.y_infer": y_inf}
    name = f"fused={fused}"
    return {f"tf_keras {name}": (arrays, {"implementation": f"tf_keras {tf_keras.__version__} {name}"})}


def conventions():
    out = {}
    for fused in (True, False):
        def make(**kw):
            layer = tf_keras.layers.BatchNormalization(axis=1, fused=fused, **kw)
            layer.build((None, probe.CHANNELS, 2, 2))
            return layer

        def step(layer, x):
            return np.asarray(layer(tf.constant(x), training=True))

        def read(layer):
            return np.asarray(layer.moving_mean), np.asarray(layer.moving_variance)

        d = tf_keras.layers.BatchNormalization()
        out[f"tf_keras fused={fused}"] = probe.run_probe(make, step, read, d.momentum, d.epsilon, full_weight=0.0)
    return out
