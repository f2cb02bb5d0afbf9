"""Batch Normalization, the textbook way: plain numpy in float64, one short function per step.

This module is the truth.  Every test, ``refbn verify`` and ``refbn bench`` judge the
backends (and TensorFlow) by it, and it is the one home of the maths: the numba backend
compiles its per-channel and elementwise formulas from the functions below, so an edit
here reaches every backend (its compiled cache included).  It has no blocking, no work
buffers and no tricks; read it top to bottom.

Conventions: ``x`` has any shape, ``axis`` is its channel axis, and the statistics reduce
over every other axis: n = x.size / C values per channel.  Per-channel vectors (mean,
variance, scale, offset) have C values.  Every function computes in float64; the caller
rounds the results to the output dtype once.

    y      = (x - mean) * scale / sqrt(var + epsilon) + offset           (forward)
    dx     = scale / sqrt(var + epsilon) * (dy - mean(dy) - x_hat * mean(dy * x_hat))
                                                                         (backward, training)

References: Ioffe & Szegedy (2015); TF's FusedBatchNormV3 CPU kernel
(``fused_batch_norm_op.cc``), Keras 3's and tf-keras' BatchNormalization.
"""
import numpy as np


# -- per-channel formulas -------------------------------------------------------------------
def bessel_factor(n):
    """n / max(n - 1, 1): turns the biased variance into the unbiased one.  TF takes
    max(n - 1, 1) so that one value per channel gives an unbiased variance of 0, not NaN."""
    return n / max(n - 1, 1)


def inv_std(variance, epsilon):
    """1 / sqrt(variance + epsilon) (TF: ``rsqrt``)."""
    return 1.0 / np.sqrt(variance + epsilon)


def y_coefficient(scale, inv_std_):
    """What multiplies (x - mean) in y: scale * inv_std."""
    return scale * inv_std_


def batch_norm(x, mean, y_coef, offset):
    """y = (x - mean) * y_coef + offset, elementwise (y_coef = scale * inv_std)."""
    return (x - mean) * y_coef + offset


def backward_coefficients(sum_dy, sum_dy_xc, n, scale, inv_std_, is_training):
    """dx = a*dy + b*(x - mean) + c per channel, and (dscale, doffset).

    sum_dy = sum(dy) and sum_dy_xc = sum(dy * (x - mean)) over the channel's n values.
    Training (the statistics depend on x), with x_hat = (x - mean) * inv_std:

        dx = scale * inv_std * (dy - mean(dy) - x_hat * mean(dy * x_hat))

    so a = scale * inv_std, b = -a * inv_std**2 * sum_dy_xc / n and c = -a * sum_dy / n.
    Inference (the statistics are constants): dx = scale * inv_std * dy, so b = c = 0.
    In both modes dscale = sum(dy * x_hat) and doffset = sum(dy).
    Returns (a, b, c, dscale, doffset).
    """
    a = scale * inv_std_
    dscale = sum_dy_xc * inv_std_
    doffset = sum_dy
    if is_training:
        b = -a * inv_std_ * inv_std_ * sum_dy_xc / n
        c = -a * sum_dy / n
    else:
        b = np.zeros_like(a)
        c = np.zeros_like(a)
    return a, b, c, dscale, doffset


def batch_norm_backward(dy, x, mean, a, b, c):
    """dx = a*dy + b*(x - mean) + c, elementwise."""
    return a * dy + b * (x - mean) + c


# -- the same elementwise formulas, folded (what a kernel with float64 headroom may evaluate) --
# y = (x - mean) * k + offset  ==  x * k + (offset - mean * k), and
# dx = a*dy + b*(x - mean) + c  ==  a*dy + b*x + (c - b * mean): one operation fewer per value.
# In float64 the folded form's extra error is ~eps64 * |mean| / std (relative to y's scale):
# below 2^-6 ulp of float32 for any float32 data whose spread is representable at all
# (|mean| / std < 2^24; beyond that neighbouring float32 values are further apart than the
# spread), so float32 and narrower outputs still round the exact value.  The numba kernels
# fold only when every channel has |mean| <= 2^20 * std and finite coefficients (a constant
# channel's exact y = offset needs the plain form); float64 outputs have no such headroom and
# keep the forms above.
def folded_shift(mean, y_coef, offset):
    """offset - mean * y_coef: y = x * y_coef + folded_shift (per channel)."""
    return offset - mean * y_coef


def batch_norm_folded(x, y_coef, shift):
    """y = x * y_coef + shift, elementwise (shift = folded_shift(mean, y_coef, offset))."""
    return x * y_coef + shift


def folded_backward_shift(mean, b, c):
    """c - b * mean: dx = a*dy + b*x + folded_backward_shift (per channel)."""
    return c - b * mean


def batch_norm_backward_folded(dy, x, a, b, shift):
    """dx = a*dy + b*x + shift, elementwise (shift = folded_backward_shift(mean, b, c))."""
    return a * dy + b * x + shift


def moving_average(old, new, factor):
    """(1 - factor) * old + factor * new: the moving statistics' update.

    factor is TF's exponential_avg_factor, Keras' 1 - momentum and PyTorch's momentum;
    Keras writes the same update as ``old -= (old - new) * factor``.  This form keeps an
    Inf old value Inf (not NaN) and a non-negative variance non-negative."""
    return (1.0 - factor) * old + factor * new


# -- whole operations -----------------------------------------------------------------------
def _per_channel(v, x, axis):
    """A per-channel vector shaped to broadcast against x."""
    shape = [1] * x.ndim
    shape[axis] = -1
    return np.asarray(v, np.float64).reshape(shape)


def channel_sum(a, axis):
    """sum(a) over every axis except the channel axis, per channel.  Each channel's values are
    laid out in one contiguous row first, because numpy sums a contiguous row pairwise (error
    ~log2(n) eps) but a strided axis one value at a time (~n eps): the truth must be accurate."""
    c = a.shape[axis]
    rows = np.ascontiguousarray(np.moveaxis(a, axis, 0)).reshape(c, a.size // c if c else 0)
    return np.sum(rows, axis=1)


def count(x, axis):
    """n: the number of values each channel's statistics reduce over."""
    return x.size // x.shape[axis] if x.shape[axis] else 0


def moments(x, axis):
    """Per-channel mean and biased variance, in two passes:
    mean = sum(x) / n, then var = sum((x - mean)**2) / n."""
    x = np.asarray(x, np.float64)
    n = count(x, axis)
    mean = channel_sum(x, axis) / n
    var = channel_sum((x - _per_channel(mean, x, axis)) ** 2, axis) / n
    return mean, var


def forward_training(x, scale, offset, epsilon, axis):
    """Training mode: normalise with the batch's own statistics.
    Returns (y, batch mean, biased variance); y uses the biased variance."""
    x = np.asarray(x, np.float64)
    mean, var = moments(x, axis)
    k = y_coefficient(np.asarray(scale, np.float64), inv_std(var, epsilon))
    y = batch_norm(x, _per_channel(mean, x, axis), _per_channel(k, x, axis), _per_channel(offset, x, axis))
    return y, mean, var


def forward_inference(x, scale, offset, mean, variance, epsilon, axis):
    """Inference mode: normalise with given (moving) statistics; returns y."""
    x = np.asarray(x, np.float64)
    k = y_coefficient(np.asarray(scale, np.float64), inv_std(np.asarray(variance, np.float64), epsilon))
    return batch_norm(x, _per_channel(mean, x, axis), _per_channel(k, x, axis), _per_channel(offset, x, axis))


def backward(dy, x, scale, mean, variance, epsilon, is_training, axis):
    """Gradient of y with respect to x, scale and offset; returns (dx, dscale, doffset).

    mean/variance are the statistics y used: the batch's (training) or the moving ones
    (inference, where no gradient flows through them)."""
    x, dy = np.asarray(x, np.float64), np.asarray(dy, np.float64)
    m = _per_channel(mean, x, axis)
    sum_dy = channel_sum(dy, axis)
    sum_dy_xc = channel_sum(dy * (x - m), axis)
    a, b, c, dscale, doffset = backward_coefficients(
        sum_dy, sum_dy_xc, count(x, axis), np.asarray(scale, np.float64),
        inv_std(np.asarray(variance, np.float64), epsilon), is_training)
    dx = batch_norm_backward(dy, x, m, *(_per_channel(v, x, axis) for v in (a, b, c)))
    return dx, dscale, doffset
