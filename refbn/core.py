"""The one orchestration every entry point goes through (raw_ops, nn, BatchNorm, stats).

    validated arguments -> canonical 3-D view (refbn.layout) -> the backend's whole op
    -> outputs;  with trace=True, refbn.reference's float64 intermediates are recorded
    beside the backend's outputs

A backend runs whole ops (see :mod:`refbn.backends`): the same code computes the outputs
whether or not a trace is recorded, so ``trace=True`` and ``trace=False`` give bit-identical
outputs on every backend.  The per-channel statistics are float64 here; outputs are cast once.
"""
import numpy as np

from . import backends, dtypes, reference as ref, validate
from .trace import Trace

TRAIN_STEP = "_fused_batch_norm_training"
INFER_STEP = "_fused_batch_norm_inference"
GRAD_STEP = "_fused_batch_norm_grad"


def _f64(a):
    return np.asarray(a, dtype=np.float64)


def _out3(out, layout, dtype, inputs, name="out"):
    """(buffer for the kernel, buffer to copy the result into afterwards).

    An ``out`` that shares memory with an input (x itself, or x shifted by a row in a larger
    buffer) would be read after it was written: the kernel then writes a fresh array, and
    the result is copied into ``out`` once it is complete, as numpy's ufuncs do."""
    out = validate.out_array(out, layout.shape, dtype, name)
    if out is None:
        return None, None
    if any(np.may_share_memory(out, a) for a in inputs):
        return None, out
    return out.reshape(layout.shape3), None


def _finish(result, copy_into):
    if copy_into is None:
        return result
    np.copyto(copy_into, result)
    return copy_into


def forward_training(x, layout, scale, offset, epsilon, kernel, out=None, trace=None):
    """Batch statistics and y; returns (y, mean, biased_variance) with float64 statistics."""
    validate.representable(x, layout.count)
    out3, copy_into = _out3(out, layout, x.dtype, (x,))
    y3, mean, var = kernel.forward_training(layout.to3(x), scale, offset, epsilon, out3)
    y = layout.from3(y3)
    if trace is not None:   # before the copy into an overlapping out changes x
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            _trace_training(trace, x, layout, scale, offset, epsilon, y)
    return _finish(y, copy_into), mean, var


def forward_inference(x, layout, scale, offset, mean, variance, epsilon, kernel, out=None, trace=None):
    """y from given (moving) statistics; mean and variance are float64 vectors."""
    validate.representable(x, layout.count)
    out3, copy_into = _out3(out, layout, x.dtype, (x,))
    y3 = kernel.forward_inference(layout.to3(x), scale, offset, mean, variance, epsilon, out3)
    y = layout.from3(y3)
    if trace is not None:
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            _trace_inference(trace, x, layout, scale, offset, mean, variance, epsilon, y)
    return _finish(y, copy_into)


def backward(dy, x, layout, scale, mean, variance, epsilon, is_training, kernel, out=None, trace=None,
             dy_name="y_backprop"):
    """dx, dscale, doffset (float64 vectors) for given statistics."""
    validate.representable(x, layout.count)
    validate.representable(dy, layout.count, dy_name)
    out3, copy_into = _out3(out, layout, x.dtype, (dy, x))
    dx3, dscale, doffset = kernel.backward(layout.to3(dy), layout.to3(x), scale, mean, variance, epsilon,
                                           is_training, out3)
    dx = layout.from3(dx3)
    if trace is not None:
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            _trace_backward(trace, dy, x, layout, scale, mean, variance, epsilon, is_training, dx, dscale, doffset)
    return _finish(dx, copy_into), dscale, doffset


def moving_update(name, variable, value, decay, trace=None, step=None):
    """The moving average (refbn.reference.moving_average), recorded as Keras'
    _assign_moving_average."""
    after = ref.moving_average(variable, value, decay)
    if trace is not None:
        s = step or name
        if "decay" not in trace:
            trace.record("decay", decay, s, "1 - momentum (TF: exponential_avg_factor)")
        trace.record(f"{name}_before", variable, s, f"{name} before the update")
        trace.record(f"{name}_value", value, s, "the batch statistic fed to the average")
        trace.record(f"{name}_update_delta", variable - after, s,
                     f"update_delta = ({name} - value) * decay (what Keras subtracts)")
        trace.record(f"{name}_after", after, s, f"(1 - decay) * {name} + decay * value")
    return after


# -- the trace: refbn.reference's intermediates, beside the backend's outputs ------------------
def _trace_training(tr, x, layout, scale, offset, epsilon, y):
    axis, n = layout.axis, layout.count
    mean, var = ref.moments(x, axis)
    xc = _f64(x) - layout.broadcastable(mean)
    istd = ref.inv_std(var, epsilon)
    bessel = ref.bessel_factor(n)
    t, s = tr.record, TRAIN_STEP
    t("x", x, s, "the input batch")
    t("reduction_axes", layout.reduction_axes, s, "every axis except the channel axis")
    t("n", n, s, "values per channel = product of the reduced dimensions")
    t("batch_mean", mean, s, "mean[c] = sum(x[..., c]) / n")
    t("x_centered", xc, s, "x - mean")
    t("biased_variance", var, s, "var[c] = sum((x - mean)^2) / n   (y uses this one)")
    t("bessel_factor", bessel, s, "n / max(n - 1, 1)")
    t("unbiased_variance", var * bessel, s, "var * bessel_factor   (TF's batch_variance output)")
    t("epsilon", epsilon, s, "added to the variance before the square root")
    _trace_normalised(t, s, layout, xc, istd, scale, offset, y, "mean", "var")


def _trace_normalised(t, s, layout, xc, istd, scale, offset, y, mean_name, var_name):
    """The steps both forward modes share, from inv_std to y."""
    t("inv_std", istd, s, f"1 / sqrt({var_name} + epsilon)")
    t("x_hat", xc * layout.broadcastable(istd), s, f"(x - {mean_name}) * inv_std")
    t("scale", scale, s, "gamma")
    t("offset", offset, s, "beta")
    t("y", y, s, "x_hat * scale + offset   (the backend's output)")


def _trace_inference(tr, x, layout, scale, offset, mean, variance, epsilon, y):
    xc = _f64(x) - layout.broadcastable(mean)
    istd = ref.inv_std(variance, epsilon)
    t, s = tr.record, INFER_STEP
    t("x", x, s, "the input batch")
    t("moving_mean", mean, s, "the mean used (not computed from x)")
    t("moving_variance", variance, s, "the variance used (not computed from x)")
    t("epsilon", epsilon, s, "added to the variance before the square root")
    t("x_centered", xc, s, "x - moving_mean")
    _trace_normalised(t, s, layout, xc, istd, scale, offset, y, "moving_mean", "moving_variance")


def _trace_backward(tr, dy, x, layout, scale, mean, variance, epsilon, is_training, dx, dscale, doffset):
    xc = _f64(x) - layout.broadcastable(mean)
    dy64 = _f64(dy)
    istd = ref.inv_std(variance, epsilon)
    sum_dy, sum_dy_xc = ref.channel_sum(dy64, layout.axis), ref.channel_sum(dy64 * xc, layout.axis)
    a, b, c, _, _ = ref.backward_coefficients(sum_dy, sum_dy_xc, layout.count, scale, istd, is_training)
    t, s = tr.record, GRAD_STEP
    mode = "training: statistics depend on x" if is_training else "inference: statistics are constants"
    t("dy", dy, s, f"upstream gradient ({mode})")
    t("inv_std", istd, s, "1 / sqrt(var + epsilon)")
    t("sum_dy", sum_dy, s, "sum(dy) per channel")
    t("sum_dy_x_hat", sum_dy_xc * istd, s, "sum(dy * x_hat) per channel")
    t("dx_term_dy", layout.broadcastable(a) * dy64, s, "scale * inv_std * dy")
    t("dx_term_mean_dy", layout.broadcastable(c) + 0.0 * dy64, s,
      "-scale * inv_std * mean(dy)" if is_training else "0 (no gradient through the mean)")
    t("dx_term_x_hat", layout.broadcastable(b) * xc, s, "-scale * inv_std * x_hat * mean(dy * x_hat)"
      if is_training else "0 (no gradient through the variance)")
    t("dx", dx, s, "sum of the three terms   (the backend's output)")
    t("dgamma", dscale, s, "sum(dy * x_hat)   (the backend's output)")
    t("dbeta", doffset, s, "sum(dy)   (the backend's output)")


def new_trace(title, want, layout=None, **context):
    return Trace(title, context, None if layout is None else layout.axis) if want else None


def check_backend_and_trace(backend, trace):
    kernel = backends.get(backend)
    return kernel, validate.boolean(trace, "trace")


def stats_vectors(channels, x_dtype, *items):
    """Several validated per-channel vectors: items are (value, name, allow_empty).
    Returns (vectors in TF's statistics dtype, float64 rows of the non-empty ones)."""
    return validate.channel_vectors(channels, dtypes.stats_dtype(x_dtype), items)
