"""The Batch Normalization equations: the one home for the maths.

Every backend (the numpy reference and the numba kernels) reduces x and dy to
per-channel sums in its own way, then calls these functions on the
per-channel vectors.  Elementwise, every backend applies the two linear forms

    y  = (x - mean) * y_coef + offset                         (forward)
    dx = dx_coef_dy * dy + dx_coef_xc * (x - mean) + dx_coef_0 (backward)

whose per-channel coefficients come from here.  Nothing else in refbn
writes these formulas.

References: TF's ``FusedBatchNormV3`` CPU kernel (fused_batch_norm_op.cc),
tf-keras' ``BatchNormalization._assign_moving_average`` and Keras 3's
``BatchNormalization``.  All functions accept numpy arrays or scalars.
"""
from collections import namedtuple

import numpy as np


def bessel_factor(n):
    """n / max(n - 1, 1): turns the biased variance into the unbiased one.

    TF uses max(n - 1, 1) so that a single value per channel gives an
    unbiased variance of 0 rather than NaN.
    """
    return n / max(n - 1, 1)


def inv_std(variance, epsilon):
    """rsqrt(variance + epsilon), the ``inv_std`` (TF: ``rsqrt``)."""
    return 1.0 / np.sqrt(variance + epsilon)


def y_coefficient(scale, inv_std_):
    """Per-channel multiplier of (x - mean): y = (x - mean) * scale * inv_std + offset."""
    return scale * inv_std_


def normalize(x_centered, inv_std_):
    """x_hat = (x - mean) * inv_std (shown in traces)."""
    return x_centered * inv_std_


def batch_norm(x_centered, y_coef, offset):
    """y = (x - mean) * y_coef + offset, the elementwise forward form."""
    return x_centered * y_coef + offset


def update_delta(variable, value, decay):
    """(variable - value) * decay: what ``_assign_moving_average`` subtracts."""
    return (variable - value) * decay


def moving_average(variable, value, decay):
    """variable - (variable - value) * decay.

    This is Keras' ``variable -= (variable - value) * (1 - momentum)`` with
    decay = 1 - momentum; TF's raw op writes the same update as
    (1 - f) * old + f * new with f = exponential_avg_factor = decay, and
    PyTorch as (1 - m) * old + m * new with decay = m.  refbn evaluates it in
    float64 and rounds once.
    """
    return variable - update_delta(variable, value, decay)


def initial_weight_after(decays):
    """How much of a moving statistic is still its initial value after
    updates with the given decays: prod(1 - decay_t) (momentum**t in Keras)."""
    w = 1.0
    for d in decays:
        w *= 1.0 - d
    return w


def debias(moving, initial, initial_weight):
    """Remove the initial value's remaining weight w, as Adam does:
    (moving - w * initial) / (1 - w).  With w == 1 (no step yet) there is
    no information about the data and the moving value is returned."""
    if initial_weight >= 1.0:
        return np.asarray(moving, dtype=np.float64)
    return (moving - initial_weight * initial) / (1.0 - initial_weight)


def steps_to_converge(momentum, tolerance):
    """Smallest t with momentum**t <= tolerance (Keras momentum convention)."""
    if momentum <= 0.0:
        return 1
    if momentum >= 1.0:
        return float("inf")
    return int(np.ceil(np.log(tolerance) / np.log(momentum)))


BackwardCoefficients = namedtuple(
    "BackwardCoefficients", "dx_coef_dy dx_coef_xc dx_coef_0 dgamma dbeta")


def backward_coefficients(sum_dy, sum_dy_xc, n, scale, inv_std_, is_training):
    """Per-channel coefficients of dx = a*dy + b*(x - mean) + c, plus dgamma, dbeta.

    sum_dy = sum(dy) and sum_dy_xc = sum(dy * (x - mean)) over the channel.

    Training (statistics depend on x):
        dx = scale*inv_std * (dy - mean(dy) - x_hat * mean(dy * x_hat))
    so a = scale*inv_std, b = -a * inv_std**2 * sum_dy_xc / n, c = -a * sum_dy / n.
    Inference (statistics are constants): dx = scale*inv_std*dy, b = c = 0.
    In both modes dgamma = sum(dy * x_hat) and dbeta = sum(dy).
    """
    a = scale * inv_std_
    dgamma = sum_dy_xc * inv_std_
    dbeta = sum_dy
    if is_training:
        b = -a * inv_std_ * inv_std_ * sum_dy_xc / n
        c = -a * sum_dy / n
    else:
        b = np.zeros_like(a)
        c = np.zeros_like(a)
    return BackwardCoefficients(a, b, c, dgamma, dbeta)


def backward_terms(dy, x_centered, coefs):
    """The three terms of dx (shown in traces): a*dy, c (= -a*mean(dy)) and b*(x - mean)
    (= -a*x_hat*mean(dy*x_hat))."""
    return coefs.dx_coef_dy * dy, coefs.dx_coef_0 + 0.0 * dy, coefs.dx_coef_xc * x_centered


def batch_norm_backward(dy, x_centered, coefs):
    """dx = a*dy + b*(x - mean) + c, the elementwise backward form."""
    return coefs.dx_coef_dy * dy + coefs.dx_coef_xc * x_centered + coefs.dx_coef_0


def chan_merge(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Merge two (count, mean, M2) summaries exactly (Chan, Golub & LeVeque)."""
    n = n_a + n_b
    with np.errstate(invalid="ignore", divide="ignore"):
        delta = mean_b - mean_a
        w_b = np.where(n > 0, n_b / np.where(n > 0, n, 1), 0.0)
        mean = mean_a + delta * w_b
        m2 = m2_a + m2_b + delta * delta * n_a * w_b
    return n, mean, m2


# --- Statistics merged across shards (refbn.stats) ------------------------------------
# Each function evaluates in the dtype of its inputs (float32 inputs: float32 arithmetic),
# so that refbn.stats can reproduce a framework's float32 merge step by step.

def sums_from_moments(n, mean, m2):
    """(sum(x), sum(x^2)) of a (count, mean, M2) summary: n*mean and M2 + n*mean^2."""
    return n * mean, m2 + n * mean * mean


def mean_and_mean_square(n, sum_x, sum_x2):
    """E[x] = sum(x)/n and E[x^2] = sum(x^2)/n (Keras' synchronized moments divide so)."""
    return sum_x / n, sum_x2 / n


def variance_from_mean_square(mean, mean_square):
    """Biased variance as E[x^2] - E[x]^2, clamped at 0.

    Keras' synchronized moments and Flax's fast variance compute it so.  In
    float32 it cancels: the error is ~eps * E[x^2], i.e. relative to the variance
    eps * (1 + mean^2/var), which is total loss when |mean| >> std.
    """
    d = mean_square - mean * mean
    return np.maximum(d, np.zeros_like(d))


def variance_from_inv_std(inv_std_, epsilon):
    """Undo inv_std: (1/inv_std)^2 - epsilon (PyTorch's gather recovers each replica's
    variance from the inv_std it was sent).  Loses the variance when var << epsilon."""
    s = 1 / inv_std_
    return s * s - epsilon


def chan_merge_weighted(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Chan's merge arranged as PyTorch's batch_norm_reduce_statistics_kernel:
    f = 1/(n_a+n_b), M2 = M2_a + (M2_b + (mean_a-mean_b)^2*n_a*n_b*f),
    mean = n_a*f*mean_a + n_b*f*mean_b (same result as chan_merge in exact arithmetic)."""
    f = 1 / (n_a + n_b)
    d = mean_a - mean_b
    m2 = m2_a + (m2_b + d * d * n_a * n_b * f)
    mean = n_a * f * mean_a + n_b * f * mean_b
    return n_a + n_b, mean, m2


def shifted_moments(shift, sum_d, sum_d2, n):
    """Mean and biased variance from one pass of sums of d = x - shift (per channel):

        mean = shift + sum(d) / n,   var = sum(d^2) / n - (sum(d) / n)^2   (clipped at 0).

    Exact for any shift in real arithmetic.  In floating point the
    subtraction cancels by a factor 1 + (mean - shift)^2 / var, which is at
    most n when the shift is one of the values (e.g. the channel's first
    value), and ~2 for a typical value; with float64 sums of float32 data
    (d and d^2 exact) the variance keeps ~1e-15 relative accuracy even on
    N(1e6, 1) data, where the textbook sum(x^2)/n - mean^2 loses everything.
    """
    m1 = sum_d / n
    return shift + m1, np.maximum(sum_d2 / n - m1 * m1, 0.0)


def steps_to_within(momentum, initial, target, tolerance):
    """Steps until a moving statistic fed a constant ``target`` is within ``tolerance`` of it.

    After t updates with momentum m (Keras convention) the moving value is
    target + m**t * (initial - target), so t is the smallest integer with
    m**t * |initial - target| <= tolerance (0 when it already is; elementwise).
    """
    gap = np.abs(np.asarray(initial, dtype=np.float64) - np.asarray(target, dtype=np.float64))
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(gap > 0, tolerance / np.where(gap > 0, gap, 1.0), np.inf)
        if momentum <= 0.0:
            t = np.where(ratio >= 1.0, 0.0, 1.0)
        elif momentum >= 1.0:
            t = np.where(ratio >= 1.0, 0.0, np.inf)
        else:
            t = np.where(ratio >= 1.0, 0.0, np.ceil(np.log(np.minimum(ratio, 1.0)) / np.log(momentum)))
    return t


def implied_initial_weight(moving, initial, target):
    """The weight w the initial value still holds in a moving statistic whose target is known:
    moving = w * initial + (1 - w) * target, so w = (moving - target) / (initial - target)
    (momentum**t after t steps on constant data; NaN where initial == target)."""
    moving, target = np.asarray(moving, dtype=np.float64), np.asarray(target, dtype=np.float64)
    den = initial - target
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den != 0, (moving - target) / np.where(den != 0, den, 1.0), np.nan)


def normalized_error_ms(mean, variance, used_mean, used_variance, epsilon):
    """Mean square, over a population with this ``mean`` and biased ``variance``, of
    x_hat(used) - x_hat(true), where x_hat(s) = (x - s.mean) * inv_std(s.variance, epsilon):
    how far inference with (used_mean, used_variance) puts the normalised output, in units
    of the channel's standard deviation.  With a = inv_std, the difference is
    (a_used - a_true) * (x - mean) + a_used * (mean - used_mean), so its mean square is
    (a_used - a_true)**2 * variance + a_used**2 * (mean - used_mean)**2 (the cross term has
    zero mean).  Multiply by scale**2 for the error of y."""
    a_true = inv_std(variance, epsilon)
    a_used = inv_std(used_variance, epsilon)
    return (a_used - a_true) ** 2 * variance + a_used ** 2 * (mean - used_mean) ** 2


def batch_norm_(x_centered, y_coef, offset):
    """In-place twin of :func:`batch_norm` for float64 work buffers: overwrites x_centered
    with x_centered * y_coef + offset (the same operations in the same order, so the same
    bits) and returns it."""
    x_centered *= y_coef
    x_centered += offset
    return x_centered


def batch_norm_backward_(dy, x_centered, coefs):
    """In-place twin of :func:`batch_norm_backward` for float64 work buffers: overwrites dy
    with a*dy + b*(x - mean) + c (the same operations in the same order, so the same bits;
    x_centered is overwritten with b*(x - mean)) and returns it."""
    dy *= coefs.dx_coef_dy
    x_centered *= coefs.dx_coef_xc
    dy += x_centered
    dy += coefs.dx_coef_0
    return dy
