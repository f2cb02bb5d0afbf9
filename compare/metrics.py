"""What is compared, against which scale, and the three-way comparison.

Every output is compared three ways, with :func:`refbn.testing.compare`:

* refbn vs the float64 truth (refbn's own tolerance context),
* TF vs the float64 truth (reported: who is closer when they disagree),
* refbn vs TF (judged under the TF kernel's context in refbn/tolerances.py).

The truth is refbn's numpy reference run on float64 copies of the same
inputs.  Errors are normalised as ``|a - e| / (eps * max(|e|, scale))``;
the scales below say what each error is relative to:

=================== ==========================================================
y (train)           |scale * inv_std| * mean(|x|): y = (x - mean)*a + offset carries
                    the float32 mean's error (relative to mean(|x|)) times a, so
                    an offset |mean| >> std is judged against the size it has
y (inference)       y itself (rms as the floor)
batch_mean          mean(|x|) of the channel, as rms over channels: a sum's
(train)             rounding error is relative to the sum of |terms|, so a
                    mean near 0 is judged against the data's size
batch_variance      the variance itself (rms over channels as a floor): its
                    terms (x - mean)^2 are all positive
x_backprop          |scale * inv_std| * rms(dy): the size of the terms that
                    cancel in dx = a*(dy - mean(dy) - x_hat*mean(dy*x_hat))
scale_backprop      sum(|dy * x_hat|) per channel (rms over channels): the
offset_backprop     sum(|dy|)  sums' own condition
=================== ==========================================================
"""
from dataclasses import dataclass

import numpy as np

from refbn import dtypes, reference as ref
from refbn.layout import Layout
from refbn.testing import compare
from refbn.tolerances import TOLERANCES, tolerance

FWD_TRAIN = ("y", "batch_mean", "batch_variance", "reserve_space_1", "reserve_space_2")
FWD_INFER = ("y", "batch_mean", "batch_variance")
GRAD = ("x_backprop", "scale_backprop", "offset_backprop")
PARITY = ("moving_mean", "moving_variance", "y_last_train", "y_infer")
X_DTYPE_OUTPUTS = ("y", "x_backprop", "y_last_train", "y_infer")


def key(output):
    """The array name an output has in a TF worker's result."""
    if output in GRAD:
        return f"grad.{output}"
    if output in PARITY:
        return f"parity.{output}"
    return f"fwd.{output}"


def output_dtype(output, x_dtype):
    """Outputs y/dx take x's dtype; statistics and parameter gradients are float32."""
    return x_dtype if output in X_DTYPE_OUTPUTS else "f32"


def tf_context(kernel):
    return f"tf_{kernel}"


def refbn_context(backend):
    """refbn vs truth: 'reference' (rounded once) for numpy; a backend's own context if declared."""
    if backend != "numpy" and any(k[0] == backend for k in TOLERANCES):
        return backend
    return "reference"


def _rms(v):
    v = np.asarray(v, dtype=np.float64)
    v = v[np.isfinite(v)]
    return float(np.sqrt(np.mean(v * v))) if v.size else 0.0


def _per_channel(a, layout, fn):
    a3 = layout.to3(np.asarray(a, dtype=np.float64))
    if a3.size == 0:
        return np.zeros(layout.channels)
    return fn(a3)


def scales(case, x64, dy64, scale_param, grad_mean, grad_var, truth):
    """The error scale of every output of an op case (see the module docstring)."""
    layout = Layout.from_axis(x64.shape, case.channel_axis)
    out = {}
    inv_std = ref.inv_std(np.asarray(grad_var, np.float64), case.eps)
    a = np.abs(ref.y_coefficient(np.asarray(scale_param, np.float64), inv_std))
    if case.is_training:
        mean_abs = _per_channel(x64, layout, lambda a: np.abs(a).mean(axis=(0, 2)))
        out["batch_mean"] = out["reserve_space_1"] = _rms(mean_abs)
        # y = (x - mean) * a + offset: a float32 mean is off by ~eps * mean(|x|) (its sum's
        # condition), which y carries times a; judged against |a| * mean(|x|) (rms over channels)
        out["y"] = _rms(a * mean_abs)
    out["x_backprop"] = _rms(a) * _rms(dy64)
    xhat = (layout.to3(x64) - np.asarray(grad_mean, np.float64)[None, :, None]) * inv_std[None, :, None]
    dy3 = layout.to3(dy64)
    out["scale_backprop"] = _rms(np.abs(dy3 * xhat).sum(axis=(0, 2))) if dy3.size else 0.0
    out["offset_backprop"] = _rms(np.abs(dy3).sum(axis=(0, 2))) if dy3.size else 0.0
    return out


@dataclass
class OutputResult:
    """One output of one case under one TF kernel."""
    output: str
    dtype: str
    refbn_vs_truth: object   # refbn.testing.Comparison
    tf_vs_truth: object
    refbn_vs_tf: object
    closer: str              # "refbn", "tf" or "tie": who is closer to the truth (max abs error)

    @property
    def refbn_ok(self):
        return self.refbn_vs_truth.passed

    def as_dict(self):
        def c(cmp):
            return {"max_abs": cmp.max_abs, "max_rel": cmp.max_rel, "max_ulps": cmp.max_ulps,
                    "max_ulp_distance": cmp.max_ulp_distance, "allowed_ulps": cmp.allowed_ulps,
                    "passed": cmp.passed, "exact": cmp.exact, "scale": cmp.scale,
                    "context": cmp.context, "nonfinite_mismatches": cmp.mismatched_nonfinite}
        return {"output": self.output, "dtype": self.dtype, "refbn_vs_truth": c(self.refbn_vs_truth),
                "tf_vs_truth": c(self.tf_vs_truth), "refbn_vs_tf": c(self.refbn_vs_tf), "closer": self.closer}


def closer_to_truth(r_t, tf_t, dtype, magnitude):
    """Who is closer to the truth: compares max abs errors, with the declared slack for ties
    (relative to ``magnitude``, the largest of the truth's |values| and the error scale)."""
    slack = tolerance("*", dtype, "closer_than_tf").ulps * dtypes.machine_epsilon(dtypes.parse(dtype))
    slack *= magnitude if magnitude and np.isfinite(magnitude) else 0.0
    if r_t.mismatched_nonfinite and not tf_t.mismatched_nonfinite:
        return "tf"
    if tf_t.mismatched_nonfinite and not r_t.mismatched_nonfinite:
        return "refbn"
    if r_t.max_abs == tf_t.max_abs:
        return "tie"
    if r_t.max_abs < tf_t.max_abs:
        return "refbn"
    return "tie" if r_t.max_abs <= tf_t.max_abs + slack else "tf"


def with_reduction(cmp, n):
    """Apply a tolerance's ``ulps_per_n`` for an output of sums over n values per channel."""
    tol = tolerance(cmp.output, cmp.dtype, cmp.context)
    if tol.ulps_per_n and n:
        m = min(n, tol.max_n) if tol.max_n else n
        cmp.allowed_ulps = tol.ulps + tol.ulps_per_n * m
        cmp.reason = (f"{tol.reason} [n = {n}: {tol.ulps:g} + {tol.ulps_per_n:g}*{m} = "
                      f"{cmp.allowed_ulps:g} eps]")
    return cmp


def judged(actual, expected, output, dtype, context, scale=None, n=0):
    """refbn.testing.compare under a context, with the reduction allowance for n values."""
    return with_reduction(compare(actual, expected, output, dtype, context, scale), n)


def three_way(output, x_dtype, refbn_value, tf_value, truth_value, kernel, backend, scale=None, n=0,
              context=None, refbn_ctx=None):
    """refbn vs truth, TF (or a framework) vs truth, refbn vs TF; n: values reduced per channel."""
    dt = output_dtype(output, x_dtype)
    ctx = context or tf_context(kernel)
    r_t = judged(refbn_value, truth_value, output, dt, refbn_ctx or refbn_context(backend), scale, n)
    tf_t = judged(tf_value, truth_value, output, dt, ctx, r_t.scale, n)
    r_tf = judged(refbn_value, tf_value, output, dt, ctx, r_t.scale, n)
    t = np.asarray(truth_value, dtype=np.float64)
    t = t[np.isfinite(t)]
    magnitude = max(r_t.scale, float(np.abs(t).max()) if t.size else 0.0)
    return OutputResult(output, dt, r_t, tf_t, r_tf, closer_to_truth(r_t, tf_t, dt, magnitude))
