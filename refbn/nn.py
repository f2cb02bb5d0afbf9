"""``refbn.fused_batch_norm``: the ``tf.compat.v1.nn.fused_batch_norm`` signature."""
from . import raw_ops


def fused_batch_norm(x, scale, offset, mean=None, variance=None, epsilon=0.001, data_format="NHWC",
                     is_training=True, name=None, exponential_avg_factor=1.0, *, backend="numpy",
                     out=None, trace=False):
    """Returns (y, mean, variance) like ``tf.compat.v1.nn.fused_batch_norm``.

    In training the returned variance is Bessel-corrected (or the running
    average when exponential_avg_factor != 1); mean/variance may be None
    when exponential_avg_factor == 1.  In inference they are required.
    With ``trace=True`` a :class:`refbn.Trace` is appended.
    """
    if not is_training and (mean is None or variance is None):
        missing = "mean" if mean is None else "variance"
        raise ValueError(f"{missing}: expected a 1-D array (one value per channel) when "
                         f"is_training is False, got None")
    r = raw_ops.FusedBatchNormV3(x, scale, offset, mean, variance, epsilon=epsilon,
                                 exponential_avg_factor=exponential_avg_factor, data_format=data_format,
                                 is_training=is_training, backend=backend, out=out, trace=trace)
    return (r.y, r.batch_mean, r.batch_variance) + ((r.trace,) if trace else ())
