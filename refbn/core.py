"""Orchestration shared by every entry point and backend.

validate -> canonical 3-D view -> backend reductions -> equations ->
backend elementwise pass -> outputs, recording the trace on the way.
The per-channel quantities are float64 here; outputs are cast once.
"""
import numpy as np

from . import backends, dtypes, equations as eq, validate
from .layout import Layout
from .trace import Trace

TRAIN_STEP = "_fused_batch_norm_training"
INFER_STEP = "_fused_batch_norm_inference"
GRAD_STEP = "_fused_batch_norm_grad"


def _f64(a):
    return np.asarray(a, dtype=np.float64)


def _out3(out, layout, dtype, name="out"):
    out = validate.out_array(out, layout.shape, dtype, name)
    return None if out is None else out.reshape(layout.shape3)


def _xc(x3, mean, layout):
    return layout.from3(_f64(x3) - mean[None, :, None])


def _one_call(kernel, op, trace, *args):
    """The backend's one-call form of ``op`` (see refbn.backends), when it has one and no trace
    is recorded; None means: compose the four functions here."""
    fn = getattr(kernel, op, None)
    return None if fn is None or trace is not None else fn(*args)


def forward_training(x, layout, scale, offset, epsilon, kernel, out=None, trace=None):
    """Batch statistics and y; returns (y, mean, biased_variance) with float64 statistics."""
    x3 = layout.to3(x)
    out3 = _out3(out, layout, x.dtype)
    done = _one_call(kernel, "forward_training", trace, x3, scale, offset, epsilon, out3)
    if done is not None:
        y3, mean, var = done
    else:
        mean, var = kernel.moments(x3)
        istd = eq.inv_std(var, epsilon)
        y3 = kernel.scale_shift(x3, mean, eq.y_coefficient(scale, istd), offset, out3)
    y = layout.from3(y3)
    if trace is not None:
        n = layout.count
        xc = _xc(x3, mean, layout)
        bessel = eq.bessel_factor(n)
        t, s = trace.record, TRAIN_STEP
        t("x", x, s, "the input batch")
        t("reduction_axes", layout.reduction_axes, s, "every axis except the channel axis")
        t("n", n, s, "values per channel = product of the reduced dimensions")
        t("batch_mean", mean, s, "mean[c] = sum(x[..., c]) / n")
        t("x_centered", xc, s, "x - mean")
        t("biased_variance", var, s, "var[c] = sum((x - mean)^2) / n   (y uses this one)")
        t("bessel_factor", bessel, s, "n / max(n - 1, 1)")
        t("unbiased_variance", var * bessel, s, "var * bessel_factor   (TF's batch_variance output)")
        t("epsilon", epsilon, s, "added to the variance before the square root")
        t("inv_std", istd, s, "1 / sqrt(var + epsilon)")
        t("x_hat", eq.normalize(xc, layout.broadcastable(istd)), s, "(x - mean) * inv_std")
        t("scale", scale, s, "gamma")
        t("offset", offset, s, "beta")
        t("y", y, s, "x_hat * scale + offset")
    return y, mean, var


def forward_inference(x, layout, scale, offset, mean, variance, epsilon, kernel, out=None, trace=None):
    """y from given (moving) statistics; mean and variance are float64 vectors."""
    x3 = layout.to3(x)
    out3 = _out3(out, layout, x.dtype)
    y3 = _one_call(kernel, "forward_inference", trace, x3, scale, offset, mean, variance, epsilon, out3)
    if y3 is None:
        istd = eq.inv_std(variance, epsilon)
        y3 = kernel.scale_shift(x3, mean, eq.y_coefficient(scale, istd), offset, out3)
    y = layout.from3(y3)
    if trace is not None:
        xc = _xc(x3, mean, layout)
        t, s = trace.record, INFER_STEP
        t("x", x, s, "the input batch")
        t("moving_mean", mean, s, "the mean used (not computed from x)")
        t("moving_variance", variance, s, "the variance used (not computed from x)")
        t("epsilon", epsilon, s, "added to the variance before the square root")
        t("x_centered", xc, s, "x - moving_mean")
        t("inv_std", istd, s, "1 / sqrt(moving_variance + epsilon)")
        t("x_hat", eq.normalize(xc, layout.broadcastable(istd)), s, "(x - moving_mean) * inv_std")
        t("scale", scale, s, "gamma")
        t("offset", offset, s, "beta")
        t("y", y, s, "x_hat * scale + offset")
    return y


def moving_update(name, variable, value, decay, trace=None, step=None):
    """variable - (variable - value) * decay, recorded as Keras' _assign_moving_average."""
    delta = eq.update_delta(variable, value, decay)
    after = variable - delta
    if trace is not None:
        s = step or name
        if "decay" not in trace:
            trace.record("decay", decay, s, "1 - momentum (TF: exponential_avg_factor)")
        trace.record(f"{name}_before", variable, s, f"{name} before the update")
        trace.record(f"{name}_value", value, s, "the batch statistic fed to the average")
        trace.record(f"{name}_update_delta", delta, s, f"update_delta = ({name} - value) * decay")
        trace.record(f"{name}_after", after, s, f"{name} -= update_delta")
    return after


def backward(dy, x, layout, scale, mean, variance, epsilon, is_training, kernel, out=None, trace=None):
    """dx, dgamma, dbeta (float64 vectors) for given statistics."""
    x3, dy3 = layout.to3(x), layout.to3(dy)
    out3 = _out3(out, layout, x.dtype)
    done = _one_call(kernel, "backward", trace, dy3, x3, scale, mean, variance, epsilon, is_training, out3)
    if done is not None:
        dx3, dgamma, dbeta = done
        return layout.from3(dx3), dgamma, dbeta
    n = layout.count
    sum_dy, sum_dy_xc = kernel.grad_sums(dy3, x3, mean)
    istd = eq.inv_std(variance, epsilon)
    coefs = eq.backward_coefficients(sum_dy, sum_dy_xc, n, scale, istd, is_training)
    dx = layout.from3(kernel.grad_apply(dy3, x3, mean, coefs, out3))
    if trace is not None:
        xc = _xc(x3, mean, layout)
        bc = eq.BackwardCoefficients(*(layout.broadcastable(v) for v in coefs))
        t_dy, t_mean, t_xhat = eq.backward_terms(_f64(dy), xc, bc)
        t, s = trace.record, GRAD_STEP
        mode = "training: statistics depend on x" if is_training else "inference: statistics are constants"
        t("dy", dy, s, f"upstream gradient ({mode})")
        t("inv_std", istd, s, "1 / sqrt(var + epsilon)")
        t("sum_dy", sum_dy, s, "sum(dy) per channel")
        t("sum_dy_x_hat", coefs.dgamma, s, "sum(dy * x_hat) per channel")
        t("dx_term_dy", t_dy, s, "scale * inv_std * dy")
        t("dx_term_mean_dy", t_mean, s,
          "-scale * inv_std * mean(dy)" if is_training else "0 (no gradient through the mean)")
        t("dx_term_x_hat", t_xhat, s, "-scale * inv_std * x_hat * mean(dy * x_hat)"
          if is_training else "0 (no gradient through the variance)")
        t("dx", dx, s, "sum of the three terms")
        t("dgamma", coefs.dgamma, s, "sum(dy * x_hat)")
        t("dbeta", coefs.dbeta, s, "sum(dy)")
    return dx, coefs.dgamma, coefs.dbeta


def new_trace(title, want, layout=None, **context):
    return Trace(title, context, None if layout is None else layout.axis) if want else None


def check_backend_and_trace(backend, trace):
    kernel = backends.get(backend)
    return kernel, validate.boolean(trace, "trace")


def stats_vector(v, name, channels, x_dtype, allow_empty=False):
    """Validated per-channel vector, in TF's statistics dtype, then as float64."""
    return validate.channel_vector(v, name, channels, dtypes.stats_dtype(x_dtype), allow_empty)
