"""refbn: a float64 Batch Normalization reference that matches TF's fused kernels.

    import refbn
    y, mean, var, r1, r2, r3 = refbn.raw_ops.FusedBatchNormV3(x, scale, offset, mean, var)
    bn = refbn.BatchNorm(); y = bn(x, training=True)
    print(refbn.trace(refbn.raw_ops.FusedBatchNormV3, x, scale, offset, [], []))

TensorFlow is never imported here (only in refbn.compare and the Keras tools).
"""
from . import layout, raw_ops, reference
from .layer import BatchNorm, check_finite
from .nn import fused_batch_norm
from .trace import Trace

__version__ = "0.1.0"


def trace(fn, *args, **kwargs):
    """Call a refbn op (or a BatchNorm layer / its backward) with trace=True; return the Trace."""
    result = fn(*args, trace=True, **kwargs)
    return result[-1]


__all__ = ["raw_ops", "fused_batch_norm", "BatchNorm", "Trace", "trace", "check_finite", "reference",
           "layout"]
