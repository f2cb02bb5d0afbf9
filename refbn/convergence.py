"""How moving statistics converge, and how to undo their initial values.

Not Batch Normalization itself (that is :mod:`refbn.reference`): these are the questions
the 100%-train / 33%-predict failure raises, used by ``refbn.BatchNorm(debias=True)``,
``refbn.keras`` (diagnose, debias, demo) and ``refbn trace``.  After t updates
``moving = (1 - f) * moving + f * value``, the initial value still weighs prod(1 - f_t)
(momentum**t in Keras' convention).
"""
import numpy as np

from . import reference as ref


def initial_weight_after(decays):
    """How much of a moving statistic is still its initial value after updates with the given
    decays (weights of the new value): prod(1 - decay_t), momentum**t in Keras."""
    w = 1.0
    for d in decays:
        w *= 1.0 - d
    return w


def debias(moving, initial, initial_weight):
    """Remove the initial value's remaining weight w, as Adam does: (moving - w * initial) / (1 - w).
    With w == 1 (no step yet) there is no information about the data: moving is returned."""
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


def steps_to_within(momentum, initial, target, tolerance):
    """Steps until a moving statistic fed a constant ``target`` is within ``tolerance`` of it:
    after t updates it is target + m**t * (initial - target), so t is the smallest integer with
    m**t * |initial - target| <= tolerance (0 when it already is; elementwise)."""
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
    x_hat(used) - x_hat(true), where x_hat(s) = (x - s.mean) * inv_std(s.variance, epsilon): how
    far inference with (used_mean, used_variance) puts the normalised output, in units of the
    channel's standard deviation.  With a = inv_std the difference is
    (a_used - a_true) * (x - mean) + a_used * (mean - used_mean), so its mean square is
    (a_used - a_true)**2 * variance + a_used**2 * (mean - used_mean)**2 (the cross term has zero
    mean).  Multiply by scale**2 for the error of y."""
    a_true = ref.inv_std(variance, epsilon)
    a_used = ref.inv_std(used_variance, epsilon)
    return (a_used - a_true) ** 2 * variance + a_used ** 2 * (mean - used_mean) ** 2
