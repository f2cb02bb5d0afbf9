"""The TensorFlow / Keras side of every comparison.  Imports TensorFlow.

Only :mod:`refbn.compare.tf_worker` imports this module, inside a process
whose ``TF_ENABLE_ONEDNN_OPTS`` was set before TensorFlow loaded (TF reads
it once, at import), so one process runs one CPU kernel family.
"""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from . import cases as cases_mod  # noqa: E402

FWD_FIELDS = ("y", "batch_mean", "batch_variance", "reserve_space_1", "reserve_space_2", "reserve_space_3")
GRAD_FIELDS = ("x_backprop", "scale_backprop", "offset_backprop", "reserve_space_4", "reserve_space_5")


def onednn_enabled():
    """Whether this process runs oneDNN's kernels (TF_ENABLE_ONEDNN_OPTS, read at import)."""
    try:
        from tensorflow.python.util import _pywrap_util_port
        return bool(_pywrap_util_port.IsMklEnabled())
    except Exception:  # pragma: no cover - private API moved
        return os.environ.get("TF_ENABLE_ONEDNN_OPTS", "1") not in ("0", "false", "False")


def kernel_for(case):
    """Which CPU kernel family TF runs for a case in this process."""
    if case.dtype == "f16" or not onednn_enabled():
        return "eigen"   # float16 has no oneDNN kernel on CPU (FACTS.md)
    return "onednn"


def _err(e):
    first = str(getattr(e, "message", e)).strip().splitlines()
    return f"{type(e).__name__}: {first[-1] if first else ''}"[:400]


def run_op(case):
    """FusedBatchNormV3 then FusedBatchNormGradV3 on a train/infer case.

    Returns (arrays, info): arrays name -> numpy array ('fwd.y', 'grad.x_backprop', ...),
    info holds the kernel used and any error message per op.
    """
    inp = cases_mod.make_inputs(case)
    info = {"kernel": kernel_for(case), "tf_version": tf.__version__}
    arrays = {}
    try:
        r = tf.raw_ops.FusedBatchNormV3(
            x=inp.x, scale=inp.scale, offset=inp.offset, mean=inp.mean, variance=inp.variance,
            epsilon=case.eps, exponential_avg_factor=case.eaf, data_format=case.layout,
            is_training=case.is_training)
        for k, v in zip(FWD_FIELDS, r):
            arrays[f"fwd.{k}"] = v.numpy()
    except Exception as e:  # TF refused: reported, judged by the harness
        info["fwd_error"] = _err(e)
    try:
        g = tf.raw_ops.FusedBatchNormGradV3(
            y_backprop=inp.dy, x=inp.x, scale=inp.scale, reserve_space_1=inp.grad_mean,
            reserve_space_2=inp.grad_variance, reserve_space_3=np.zeros(0, np.float32),
            epsilon=case.eps, data_format=case.layout, is_training=case.is_training)
        for k, v in zip(GRAD_FIELDS, g):
            arrays[f"grad.{k}"] = v.numpy()
    except Exception as e:
        info["grad_error"] = _err(e)
    return arrays, info


# -- multi-step parity ------------------------------------------------------------------
def _keras3(case, batches, x_inf):
    import keras

    axis = case.channel_axis
    # half-precision x: Keras' mixed-precision policy (float32 variables, statistics in float32)
    policy = {"f32": "float32", "bf16": "mixed_bfloat16", "f16": "mixed_float16"}[case.dtype]
    layer = keras.layers.BatchNormalization(axis=axis, momentum=case.mom, epsilon=case.eps, dtype=policy)
    ys = []
    for xb in batches:
        ys.append(np.asarray(layer(tf.constant(xb), training=True)))
    y_inf = np.asarray(layer(tf.constant(x_inf), training=False))
    mm, mv = (np.asarray(w) for w in (layer.moving_mean, layer.moving_variance))
    return {"moving_mean": mm, "moving_variance": mv, "y_last_train": ys[-1], "y_infer": y_inf}, \
        f"keras {keras.__version__} layers.BatchNormalization"


def _tf_keras_fused(case, batches, x_inf):
    import tf_keras

    layer = tf_keras.layers.BatchNormalization(axis=case.channel_axis, momentum=case.mom,
                                               epsilon=case.eps, fused=True)
    ys = [np.asarray(layer(tf.constant(xb), training=True)) for xb in batches]
    y_inf = np.asarray(layer(tf.constant(x_inf), training=False))
    return {"moving_mean": np.asarray(layer.moving_mean), "moving_variance": np.asarray(layer.moving_variance),
            "y_last_train": ys[-1], "y_infer": y_inf}, f"tf_keras {tf_keras.__version__} fused=True"


def _raw_fused_loop(case, batches, x_inf):
    """tf-keras' fused path, spelled out: FusedBatchNormV3 with exponential_avg_factor = 1 - momentum."""
    C = case.channels
    gamma, beta = np.ones(C, np.float32), np.zeros(C, np.float32)
    mm, mv = np.zeros(C, np.float32), np.ones(C, np.float32)
    ys = []
    for xb in batches:
        r = tf.raw_ops.FusedBatchNormV3(x=xb, scale=gamma, offset=beta, mean=mm, variance=mv,
                                        epsilon=case.eps, exponential_avg_factor=1.0 - case.mom,
                                        data_format=case.layout, is_training=True)
        ys.append(r.y.numpy())
        mm, mv = r.batch_mean.numpy(), r.batch_variance.numpy()
    r = tf.raw_ops.FusedBatchNormV3(x=x_inf, scale=gamma, offset=beta, mean=mm, variance=mv,
                                    epsilon=case.eps, data_format=case.layout, is_training=False)
    return {"moving_mean": mm, "moving_variance": mv, "y_last_train": ys[-1], "y_infer": r.y.numpy()}, \
        "tf.raw_ops.FusedBatchNormV3 with exponential_avg_factor = 1 - momentum (tf-keras' fused path)"


def _torch(case, batches, x_inf):
    import torch

    if case.layout not in ("NCHW", "NCDHW"):
        raise ValueError("torch parity needs a channels-first layout (NCHW or NCDHW)")
    cls = torch.nn.BatchNorm2d if case.layout == "NCHW" else torch.nn.BatchNorm3d
    layer = cls(case.channels, eps=case.eps, momentum=case.mom, dtype=torch.float32)
    layer.train()
    with torch.no_grad():
        ys = [layer(torch.from_numpy(np.asarray(xb, np.float32))).numpy() for xb in batches]
        layer.eval()
        y_inf = layer(torch.from_numpy(np.asarray(x_inf, np.float32))).numpy()
    return {"moving_mean": layer.running_mean.numpy().copy(), "moving_variance": layer.running_var.numpy().copy(),
            "y_last_train": ys[-1], "y_infer": y_inf}, f"torch {torch.__version__} nn.{cls.__name__}"


def have(module):
    import importlib.util
    return importlib.util.find_spec(module) is not None


def run_parity(case):
    """K training steps then one inference call, in the framework the convention names."""
    batches, x_inf = cases_mod.parity_batches(case)
    info = {"kernel": kernel_for(case), "tf_version": tf.__version__}
    try:
        if case.mode == "keras":
            arrays, impl = _keras3(case, batches, x_inf)
        elif case.mode == "tf_fused":
            arrays, impl = (_tf_keras_fused if have("tf_keras") else _raw_fused_loop)(case, batches, x_inf)
        else:
            if not have("torch"):
                info["unsupported"] = "torch is not installed"
                return {}, info
            arrays, impl = _torch(case, batches, x_inf)
        info["implementation"] = impl
        extra = {}
        if case.mode == "tf_fused":
            # the convention gap as a fact: Keras 3 on the same batches averages biased variances
            extra = {f"keras3.{k}": v for k, v in _keras3(case, batches, x_inf)[0].items()}
        arrays = {f"parity.{k}": np.asarray(v) for k, v in arrays.items()}
        arrays.update(extra)
        return arrays, info
    except Exception as e:
        info["parity_error"] = _err(e)
        return {}, info


def run(case):
    return run_op(case) if case.kind == "op" else run_parity(case)
