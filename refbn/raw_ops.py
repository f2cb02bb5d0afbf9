"""Drop-in twins of ``tf.raw_ops.FusedBatchNormV3`` and ``FusedBatchNormGradV3``.

Same keyword names, defaults, outputs and CPU semantics, so a test can swap
``tf.raw_ops`` for ``refbn.raw_ops``.  Extra keywords (after ``name``):
``backend`` ("numpy" reference or "numba"), ``out`` (a buffer for y / dx)
and ``trace`` (append a :class:`refbn.Trace` as a last output).

Deliberate differences from TF, all raising before anything is computed:
epsilon must be finite and > 0; exponential_avg_factor must lie in [0, 1];
scale, offset, mean and variance must be finite (after the cast to float32)
and variance >= 0 wherever it is used; training needs a non-empty batch;
x needs at least one channel; masked arrays are refused; an ``out`` that
overlaps an input gets the correct result (computed aside, then copied);
float64 x is accepted (statistics then stay float64); rank-2 ("NC") and
rank-3 ("NWC"/"NCW") inputs are accepted; NCHW gradients work in inference
mode too.  reserve_space_3/4/5 are empty float32 arrays (TF CPU: dummies).
"""
from collections import namedtuple

import numpy as np

from . import core, dtypes, reference as ref, validate
from .layout import Layout

_FWD_FIELDS = ("y", "batch_mean", "batch_variance", "reserve_space_1", "reserve_space_2", "reserve_space_3")
_GRAD_FIELDS = ("x_backprop", "scale_backprop", "offset_backprop", "reserve_space_4", "reserve_space_5")
FusedBatchNormV3Output = namedtuple("FusedBatchNormV3", _FWD_FIELDS)
FusedBatchNormV3Traced = namedtuple("FusedBatchNormV3", _FWD_FIELDS + ("trace",))
FusedBatchNormGradV3Output = namedtuple("FusedBatchNormGradV3", _GRAD_FIELDS)
FusedBatchNormGradV3Traced = namedtuple("FusedBatchNormGradV3", _GRAD_FIELDS + ("trace",))


def _stats(sdt, *vectors):
    """Float64 statistics in their output dtype (one new array each); one beyond float32's range
    rounds to Inf (IEEE, as TF's float32 arithmetic gives), without a numpy warning."""
    buf = np.empty((len(vectors), vectors[0].shape[0]), sdt)
    with np.errstate(over="ignore"):
        for i, v in enumerate(vectors):
            buf[i] = v
    return list(buf)


def FusedBatchNormV3(x, scale, offset, mean, variance, epsilon=0.0001, exponential_avg_factor=1.0,
                     data_format="NHWC", is_training=True, name=None, *, backend="numpy", out=None,
                     trace=False):
    """Batch normalization, as ``tf.raw_ops.FusedBatchNormV3`` on CPU.

    Returns (y, batch_mean, batch_variance, reserve_space_1, reserve_space_2,
    reserve_space_3).  Training: batch_variance is Bessel-corrected
    (n / max(n-1, 1)); when exponential_avg_factor f != 1, batch_mean and
    batch_variance are (1-f)*old + f*batch instead; reserve_space_1/2 hold
    the batch mean and the biased variance (the ones y used).  Inference:
    y uses the given mean/variance, which are passed through.
    """
    x = validate.as_x(x)
    layout = Layout.from_data_format(x.shape, data_format)
    is_training = validate.boolean(is_training, "is_training")
    epsilon = validate.epsilon(epsilon)
    factor = validate.unit_interval(exponential_avg_factor, "exponential_avg_factor")
    kernel, want_trace = core.check_backend_and_trace(backend, trace)
    C, sdt = layout.channels, dtypes.stats_dtype(x.dtype)
    ignore_stats = is_training and factor == 1.0
    (scale, offset, mean, variance), wide = core.stats_vectors(
        C, x.dtype, (scale, "scale", False), (offset, "offset", False), (mean, "mean", ignore_stats),
        (variance, "variance", ignore_stats))
    s64, o64 = wide[0], wide[1]
    if not ignore_stats:   # inference, or old statistics fed to the moving average
        validate.nonnegative(variance, "variance")
    if is_training:
        validate.nonempty_batch(layout.count, x.shape)
    tr = core.new_trace("FusedBatchNormV3", want_trace, layout, data_format=data_format,
                        is_training=is_training, x=f"{x.dtype.name}{list(x.shape)}",
                        backend=backend) if want_trace else None
    if is_training:
        y, bmean, bvar = core.forward_training(x, layout, s64, o64, epsilon, kernel, out, tr)
        unbiased = bvar * ref.bessel_factor(layout.count)
        if ignore_stats:
            out_mean, out_var = bmean, unbiased
        else:
            step = "exponential_avg_factor"
            out_mean = core.moving_update("moving_mean", wide[2], bmean, factor, tr, step)
            out_var = core.moving_update("moving_variance", wide[3], unbiased, factor, tr, step)
        running = vars(kernel).get("running_statistics")   # a backend's own float32 arithmetic
        if running is not None:                                   # for outputs 1-2 (tf_eigen: TF's)
            out_mean, out_var = running(bmean, bvar, layout.count, factor, None if ignore_stats else mean,
                                        None if ignore_stats else variance)
        result = (y, *_stats(sdt, out_mean, out_var, bmean, bvar), np.zeros(0, sdt))
    else:
        y = core.forward_inference(x, layout, s64, o64, wide[2], wide[3], epsilon, kernel, out, tr)
        result = (y, mean.copy(), variance.copy(), mean.copy(), variance.copy(), np.zeros(0, sdt))
    if want_trace:
        return FusedBatchNormV3Traced(*result, tr)
    return FusedBatchNormV3Output(*result)


def FusedBatchNormGradV3(y_backprop, x, scale, reserve_space_1, reserve_space_2, reserve_space_3,
                         epsilon=0.0001, data_format="NHWC", is_training=True, name=None, *,
                         backend="numpy", out=None, trace=False):
    """Gradient of FusedBatchNormV3, as ``tf.raw_ops.FusedBatchNormGradV3`` on CPU.

    reserve_space_1/2 are the mean and biased variance of the forward pass
    (training) or the population mean/variance (inference, where no
    gradient flows through them).  reserve_space_3 is ignored.
    Returns (x_backprop, scale_backprop, offset_backprop, reserve_space_4,
    reserve_space_5).
    """
    x = validate.as_x(x)
    dy = validate.as_x(y_backprop, "y_backprop")
    validate.same_shape(dy, x, "y_backprop", "x")
    if dy.dtype != x.dtype:
        raise TypeError(f"y_backprop: expected the dtype of x ({x.dtype.name}), got {dy.dtype.name}")
    layout = Layout.from_data_format(x.shape, data_format)
    is_training = validate.boolean(is_training, "is_training")
    epsilon = validate.epsilon(epsilon)
    kernel, want_trace = core.check_backend_and_trace(backend, trace)
    C, sdt = layout.channels, dtypes.stats_dtype(x.dtype)
    (scale, mean, variance), wide = core.stats_vectors(
        C, x.dtype, (scale, "scale", False), (reserve_space_1, "reserve_space_1", False),
        (reserve_space_2, "reserve_space_2", False))
    validate.nonnegative(variance, "reserve_space_2")
    if is_training:
        validate.nonempty_batch(layout.count, x.shape)
    check = vars(kernel).get("check_backward")   # what a backend's kernel refuses (tf_eigen:
    if check is not None:                              # TF's channels-first inference gradient)
        check(layout, is_training)
    tr = core.new_trace("FusedBatchNormGradV3", want_trace, layout, data_format=data_format,
                        is_training=is_training, x=f"{x.dtype.name}{list(x.shape)}",
                        backend=backend) if want_trace else None
    dx, dgamma, dbeta = core.backward(dy, x, layout, wide[0], wide[1], wide[2], epsilon, is_training, kernel,
                                      out, tr)
    result = (dx, *_stats(sdt, dgamma, dbeta), np.zeros(0, sdt), np.zeros(0, sdt))
    if want_trace:
        return FusedBatchNormGradV3Traced(*result, tr)
    return FusedBatchNormGradV3Output(*result)
