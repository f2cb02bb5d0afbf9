"""TensorFlow contenders for ``refbn bench`` (imports TensorFlow).

Kept in refbn.compare because TensorFlow is imported only here and in
refbn.keras; refbn.bench imports this module only when TF contenders run.
The kernel family (oneDNN or Eigen) is fixed by ``TF_ENABLE_ONEDNN_OPTS``
when TensorFlow is imported, so the Eigen timings come from a separate
process (refbn.bench.eigen_worker).

Ops run eagerly (Grappler cannot rewrite them), on tensors made once, and
return tensors: the timed call does no numpy conversion.  TF's fused kernels
take 4-D/5-D input only, so a 2-D (N, C) batch runs as (N, 1, 1, C) NHWC, the
same memory.
"""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

_CONFIGURED = []


def configure_threads(threads):
    """Intra-op threads for this process (must run before TF executes its first op)."""
    if threads and not _CONFIGURED:
        try:
            tf.config.threading.set_intra_op_parallelism_threads(int(threads))
            tf.config.threading.set_inter_op_parallelism_threads(1)
        except RuntimeError:   # TF already initialised: keep its setting
            pass
    _CONFIGURED.append(threads)


def info():
    from .tf_adapter import onednn_enabled
    return {"tf_version": tf.__version__, "kernel": "onednn" if onednn_enabled() else "eigen",
            "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads()}


def _tf_format(shape, data_format):
    if len(shape) == 2:          # (N, C) -> (N, 1, 1, C)
        return (shape[0], 1, 1, shape[1]), "NHWC"
    if len(shape) == 3:          # (N, W, C) / (N, C, W) -> add a unit H
        return ((shape[0], 1, shape[1], shape[2]), "NHWC") if data_format == "NWC" else \
            ((shape[0], shape[1], 1, shape[2]), "NCHW")
    return tuple(shape), data_format


def ops(inp, epsilon, which):
    """op -> (run, outputs): ``run()`` is the timed call, ``outputs()`` -> {name: numpy array}."""
    shape4, fmt = _tf_format(inp.x.shape, inp.spec.data_format)
    x = tf.constant(inp.x.reshape(shape4))
    dy = tf.constant(inp.dy.reshape(shape4))
    scale, offset = tf.constant(inp.scale), tf.constant(inp.offset)
    empty = tf.constant(np.zeros(0, np.float32))
    pm, pv = tf.constant(inp.pop_mean), tf.constant(inp.pop_var)
    r1, r2 = tf.constant(inp.r1), tf.constant(inp.r2)
    shape = inp.x.shape
    result = {}
    if "train" in which:
        def train():
            return tf.raw_ops.FusedBatchNormV3(x=x, scale=scale, offset=offset, mean=empty, variance=empty,
                                               epsilon=epsilon, exponential_avg_factor=1.0, data_format=fmt,
                                               is_training=True)

        def train_out():
            r = train()
            return {"y": r[0].numpy().reshape(shape), "batch_mean": r[1].numpy(), "batch_variance": r[2].numpy(),
                    "reserve_space_1": r[3].numpy(), "reserve_space_2": r[4].numpy()}
        result["train"] = (train, train_out)
    if "infer" in which:
        def infer():
            return tf.raw_ops.FusedBatchNormV3(x=x, scale=scale, offset=offset, mean=pm, variance=pv,
                                               epsilon=epsilon, data_format=fmt, is_training=False)

        def infer_out():
            return {"y": infer()[0].numpy().reshape(shape)}
        result["infer"] = (infer, infer_out)
    if "bwd" in which:
        def bwd():
            return tf.raw_ops.FusedBatchNormGradV3(y_backprop=dy, x=x, scale=scale, reserve_space_1=r1,
                                                   reserve_space_2=r2, reserve_space_3=empty, epsilon=epsilon,
                                                   data_format=fmt, is_training=True)

        def bwd_out():
            g = bwd()
            return {"x_backprop": g[0].numpy().reshape(shape), "scale_backprop": g[1].numpy(),
                    "offset_backprop": g[2].numpy()}
        result["bwd"] = (bwd, bwd_out)
    return result
