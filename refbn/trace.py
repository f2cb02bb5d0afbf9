"""Trace: every intermediate of one Batch Normalization call, by stable name.

A trace is filled in by the orchestration in :mod:`refbn.core` (so it is the
same whatever backend did the reductions), then printed with
``print(trace)`` or ``trace.explain()`` as a step-by-step walk-through named
after the TF/Keras functions that perform each step.

Stable names (a name appears only when its step ran):

forward, training (``_fused_batch_norm_training``):
    x, reduction_axes, n, batch_mean, x_centered, biased_variance,
    bessel_factor, unbiased_variance, epsilon, inv_std, x_hat, scale, offset, y
forward, inference (``_fused_batch_norm_inference``):
    x, moving_mean, moving_variance, epsilon, x_centered, inv_std, x_hat,
    scale, offset, y
moving-average update (``moving_mean`` / ``moving_variance``, Keras'
``_assign_moving_average``):
    decay, moving_mean_before, moving_mean_value, moving_mean_update_delta,
    moving_mean_after, and the same four for moving_variance
backward (``_fused_batch_norm_grad``):
    dy, sum_dy, sum_dy_x_hat, dx_term_dy, dx_term_mean_dy, dx_term_x_hat,
    dx, dgamma, dbeta
"""
from dataclasses import dataclass

import numpy as np


@dataclass
class Entry:
    name: str
    value: object
    step: str
    formula: str


class Trace:
    """An ordered record of named intermediates; ``trace["batch_mean"]`` reads one."""

    def __init__(self, title, context=None, channel_axis=None):
        self.title = title
        self.context = dict(context or {})
        self.channel_axis = channel_axis  # set by the op, so arrays print channel by channel
        self._entries = {}

    def record(self, name, value, step, formula):
        self._entries[name] = Entry(name, value, step, formula)

    def __getitem__(self, name):
        try:
            return self._entries[name].value
        except KeyError:
            raise KeyError(f"trace has no {name!r}; it has: {', '.join(self._entries)}") from None

    def __contains__(self, name):
        return name in self._entries

    def __iter__(self):
        return iter(self._entries)

    def names(self):
        return list(self._entries)

    def entries(self):
        return list(self._entries.values())

    def as_dict(self):
        return {k: e.value for k, e in self._entries.items()}

    def explain(self, channels=4, values=4):
        """A step-by-step walk-through with the numbers (first ``channels`` channels)."""
        ctx = ", ".join(f"{k}={v}" for k, v in self.context.items())
        lines = [f"{self.title}" + (f"  ({ctx})" if ctx else "")]
        step = None
        for i, e in enumerate(self._entries.values(), 1):
            if e.step != step:
                step = e.step
                lines.append(f"\n== {step} ==")
            lines.append(f"{i:>3}. {e.name:<26} {e.formula}")
            shown = _show(e.value, channels, values, self.channel_axis)
            lines.append("      = " + shown.replace("\n", "\n        "))
        return "\n".join(lines)

    def __str__(self):
        return self.explain()

    def __repr__(self):
        return f"<Trace {self.title!r}: {', '.join(self._entries)}>"


def _show(value, channels, values, channel_axis=None):
    if isinstance(value, np.ndarray):
        a = value
        if a.ndim == 0:
            return _num(a.item())
        if a.ndim == 1:
            more = f" ... ({a.size} channels)" if a.size > channels else ""
            return "[" + " ".join(_num(v) for v in a[:channels].tolist()) + "]" + more
        a64 = np.asarray(a, dtype=np.float64)
        finite = a64[np.isfinite(a64)]
        rng = (f"min {_num(finite.min())}, max {_num(finite.max())}" if finite.size else "no finite values")
        head = f"array {a.dtype.name}{list(a.shape)} ({rng})"
        if channel_axis is None or channel_axis >= a.ndim:
            return head + ": [" + " ".join(_num(v) for v in a64.ravel()[:values].tolist()) + " ...]"
        per_channel = np.moveaxis(a64, channel_axis, -1).reshape(-1, a.shape[channel_axis])
        rows = [f"channel {c}: [" + " ".join(_num(v) for v in per_channel[:values, c].tolist())
                + (" ...]" if per_channel.shape[0] > values else "]")
                for c in range(min(channels, per_channel.shape[1]))]
        return head + "\n" + "\n".join(rows)
    if isinstance(value, float):
        return _num(value)
    return repr(value)


def _num(v):
    try:
        return f"{v:.7g}"
    except (TypeError, ValueError):
        return repr(v)
