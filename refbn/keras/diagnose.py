"""``refbn.keras.diagnose``: which BatchNormalization layers of a Keras model hold statistics
that do not describe the data, how much that changes their output, why, and what to do.

The data's statistics at each layer are measured exactly as :func:`recalibrate` does (layer
by layer, in inference mode, every earlier layer already recalibrated), on the model itself;
the model's own statistics are put back afterwards, so diagnosing changes nothing.

For each layer the report gives
  * mean offset: max over channels of |moving_mean - mean| / sqrt(variance + epsilon),
    in units of the channel's standard deviation;
  * variance ratio: (moving_variance + eps) / (variance + eps), median and range over channels;
  * output error: the root-mean-square, over the data and the channels, of the difference
    between the normalised output computed with the moving statistics and with the data's
    statistics, in standard deviations (:func:`refbn.convergence.normalized_error_ms`);
    0.5 means the layer's output is off by half a standard deviation;
  * momentum, the step count (the optimizer's ``iterations``, or given), the weight the
    initial values still hold (momentum**steps), and the weight implied by the statistics;
  * a verdict -- healthy / not converged / frozen / drifted -- with the reason and a remedy.
"""
import math
from dataclasses import asdict, dataclass, field

import numpy as np

from .. import convergence as conv
from . import capture as cap
from .recalibrate import _rows, _select, batches, initial_values, recalibrate, training_steps

HEALTHY, NOT_CONVERGED, FROZEN, DRIFTED = "healthy", "not converged", "frozen", "drifted"

REMEDIES = {
    HEALTHY: "none needed",
    NOT_CONVERGED: ("recalibrate: refbn.keras.recalibrate(model, x) writes the exact statistics of "
                    "your data; refbn.keras.debias(model) removes the initial values' weight if the "
                    "weights changed little in training; or train {need} steps at momentum {m:g}, "
                    "or lower the momentum"),
    FROZEN: ("recalibrate this layer on your data (refbn.keras.recalibrate); if you fine-tune, "
             "unfreeze it or recalibrate after fine-tuning: fit never updates a frozen layer's statistics"),
    DRIFTED: ("recalibrate on data like the data you will predict on (refbn.keras.recalibrate); "
              "the statistics converged, but to data or weights that are no longer these"),
}


@dataclass
class LayerReport:
    index: int
    name: str
    channels: int
    momentum: float
    epsilon: float
    trainable: bool
    count: int                      # values per channel in the data
    mean_offset: float              # max |moving_mean - mean| / std
    variance_ratio_median: float
    variance_ratio_min: float
    variance_ratio_max: float
    output_error: float             # RMS of x_hat(moving) - x_hat(data), in std units
    worst_channel: int
    worst_channel_error: float
    steps: object                   # int or None
    initial_weight: object          # momentum**steps or None
    implied_initial_weight: object  # median over channels, from the variances, or None
    steps_needed: object            # steps for momentum**t <= convergence weight
    verdict: str = ""
    reason: str = ""
    remedy: str = ""
    stats: dict = field(default_factory=dict, repr=False)  # arrays: moving/data mean/variance

    @property
    def healthy(self):
        return self.verdict == HEALTHY

    def as_dict(self):
        d = {k: v for k, v in asdict(self).items() if k != "stats"}
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


@dataclass
class Diagnosis:
    layers: list
    samples: int
    steps: object
    steps_source: str
    tolerance: float
    convergence: float
    accuracy: object = None                # current inference-mode accuracy (with labels)
    accuracy_recalibrated: object = None   # after recalibration (with labels)
    changed_predictions: object = None     # fraction of samples whose predicted class changes
    max_output_change: object = None       # max |out_recalibrated - out| / max |out_recalibrated|

    @property
    def healthy(self):
        return all(r.healthy for r in self.layers)

    @property
    def unhealthy(self):
        return [r for r in self.layers if not r.healthy]

    def as_dict(self):
        def clean(v):
            return None if isinstance(v, float) and not math.isfinite(v) else v
        return {
            "healthy": self.healthy,
            "samples": self.samples,
            "steps": self.steps,
            "steps_source": self.steps_source,
            "tolerance": self.tolerance,
            "convergence_weight": self.convergence,
            "accuracy": clean(self.accuracy),
            "accuracy_recalibrated": clean(self.accuracy_recalibrated),
            "changed_predictions": clean(self.changed_predictions),
            "max_output_change": clean(self.max_output_change),
            "unhealthy_layers": [r.name for r in self.unhealthy],
            "summary": self.summary(),
            "layers": [r.as_dict() for r in self.layers],
        }

    def summary(self):
        bad = self.unhealthy
        lines = []
        if not bad:
            lines.append(f"All {len(self.layers)} BatchNormalization layers are healthy: their moving "
                         f"statistics normalise these data to within {self.tolerance:g} standard "
                         "deviations of their exact statistics.")
        else:
            counts = {}
            for r in bad:
                counts[r.verdict] = counts.get(r.verdict, 0) + 1
            kinds = ", ".join(f"{n} {v}" for v, n in counts.items())
            first = bad[0]
            worst = max(bad, key=lambda r: r.output_error)
            lines.append(f"{len(bad)} of {len(self.layers)} BatchNormalization layers are unhealthy ({kinds}). "
                         f"The distortion starts at {first.name!r} (#{first.index}); the worst is "
                         f"{worst.name!r}, whose output is off by {worst.output_error:.3g} standard deviations. "
                         "Errors compound: each layer passes its distorted output to the next.")
            lines.append(f"Remedy: {REMEDIES[first.verdict].split(';')[0]}.")
        if self.accuracy is not None:
            lines.append(f"Accuracy in inference mode: {self.accuracy:.3f} now, "
                         f"{self.accuracy_recalibrated:.3f} after recalibration.")
        if self.changed_predictions is not None:
            lines.append(f"Recalibration changes the predicted class of {100 * self.changed_predictions:.1f}% "
                         f"of the samples (largest output change {self.max_output_change:.3g} of the "
                         "output's range).")
        return "\n".join(lines)

    def table(self):
        from rich.table import Table
        t = Table(title="BatchNormalization layers: moving statistics vs the data's exact statistics")
        for col, just in (("#", "right"), ("layer", "left"), ("C", "right"), ("mean offset\n(std)", "right"),
                          ("variance ratio\nmedian [min, max]", "right"), ("output error\n(std)", "right"),
                          ("momentum", "right"), ("initial\nweight", "right"), ("verdict", "left")):
            t.add_column(col, justify=just)
        for r in self.layers:
            w = r.initial_weight if r.initial_weight is not None else r.implied_initial_weight
            wtxt = "-" if w is None else (f"{w:.3g}" + ("" if r.initial_weight is not None else " (implied)"))
            style = None if r.healthy else ("red" if r.verdict != DRIFTED else "yellow")
            t.add_row(str(r.index), r.name, str(r.channels), f"{r.mean_offset:.3g}",
                      f"{r.variance_ratio_median:.3g} [{r.variance_ratio_min:.3g}, {r.variance_ratio_max:.3g}]",
                      f"{r.output_error:.3g}", f"{r.momentum:g}", wtxt,
                      r.verdict if r.trainable else f"{r.verdict} (trainable=False)", style=style)
        return t

    def print(self, console=None, details=True):
        from rich.console import Console
        console = console or Console()
        console.print(self.table())
        if details and self.unhealthy:
            console.print("[bold]Why[/bold]", highlight=False)
            for r in self.unhealthy[:5]:
                console.print(f"  {r.name} ({r.verdict}): {r.reason}.", highlight=False)
            if len(self.unhealthy) > 5:
                console.print(f"  ... and {len(self.unhealthy) - 5} more unhealthy layer(s) (all in the JSON report)")
            console.print("[bold]What to do[/bold]", highlight=False)
            for verdict in (NOT_CONVERGED, FROZEN, DRIFTED):
                r = next((r for r in self.unhealthy if r.verdict == verdict), None)
                if r is not None:
                    console.print(f"  {verdict}: {r.remedy}.", highlight=False)
        console.print(self.summary(), highlight=False)


def _median(v):
    v = np.asarray(v, dtype=np.float64)
    v = v[np.isfinite(v)]
    return float(np.median(v)) if v.size else None


def _judge(r, layer, init_mean, init_var, moving_mean, moving_var, tolerance, convergence):
    m = r.momentum
    never_updated = bool(np.all(moving_mean == init_mean) and np.all(moving_var == init_var))
    w = r.initial_weight if r.initial_weight is not None else r.implied_initial_weight
    facts = (f"moving variance {r.variance_ratio_median:.3g}x the data's (median; "
             f"{r.variance_ratio_min:.3g}x to {r.variance_ratio_max:.3g}x), means off by up to "
             f"{r.mean_offset:.3g} std, output off by {r.output_error:.3g} std")
    if r.output_error <= tolerance:
        return HEALTHY, f"output within {tolerance:g} std of exact ({r.output_error:.3g})", REMEDIES[HEALTHY]
    if not layer.trainable:
        return (FROZEN, f"the layer is frozen (trainable=False), so fit runs it in inference mode and "
                        f"never updates its statistics, which describe other data; {facts}", REMEDIES[FROZEN])
    if never_updated:
        return (FROZEN, f"its statistics are still the initial values (mean {init_mean:g}, variance "
                        f"{init_var:g}): it never ran in training mode; {facts}", REMEDIES[FROZEN])
    if w is not None and w > convergence:
        how = (f"after {r.steps} steps the initial values still weigh {m:g}^{r.steps} = {w:.3g}"
               if r.initial_weight is not None else
               f"the statistics imply the initial values still weigh about {w:.3g}")
        need = r.steps_needed
        return (NOT_CONVERGED, f"{how} ({need} steps bring that under {convergence:g}); {facts}",
                REMEDIES[NOT_CONVERGED].format(need=need, m=m))
    how = (f"the initial values weigh only {w:.3g}" if w is not None else "the step count is unknown")
    return (DRIFTED, f"{how}, yet {facts}: the data or the weights changed after the statistics "
                     "were accumulated", REMEDIES[DRIFTED])


def _predict(model, data_batches):
    return np.concatenate([cap.run(model, xb, training=False) for xb in data_batches], axis=0)


def accuracy(pred, y):
    """Fraction of correct predictions: argmax for several outputs, 0.5 threshold for one."""
    pred = np.asarray(pred)
    y = np.asarray(y)
    if pred.ndim >= 2 and pred.shape[-1] > 1:
        p = pred.argmax(-1)
        t = y.argmax(-1) if (y.ndim == pred.ndim and y.shape[-1] == pred.shape[-1]) else y.reshape(p.shape)
    else:
        p = (pred.reshape(len(pred), -1)[:, 0] > 0.5).astype(int)
        t = y.reshape(len(y), -1)[:, 0].astype(int)
    return float(np.mean(p == t))


def _classes(pred):
    pred = np.asarray(pred)
    return pred.argmax(-1) if pred.ndim >= 2 and pred.shape[-1] > 1 else (pred.reshape(len(pred), -1)[:, 0] > 0.5)


def diagnose(model, data, y=None, batch_size=32, steps=None, tolerance=0.1, convergence=0.01):
    """Per-layer report on a Keras model's BatchNormalization statistics over ``data``.

    Args:
      model: a Keras 3 model with BatchNormalization layers.
      data: the inputs (array, (x, y) tuple, tf.data.Dataset, ...; see refbn.keras.batches).
      y: optional labels, for the accuracy before and after recalibration.
      steps: training steps the layers saw; default: the optimizer's ``iterations``.
      tolerance: a layer is healthy when its output error is at most this many std.
      convergence: a layer whose initial values still weigh more than this is "not converged".
    Returns a :class:`Diagnosis`; the model is left exactly as it was.
    """
    if not (isinstance(tolerance, (int, float)) and tolerance > 0):
        raise ValueError(f"tolerance: expected a positive number of standard deviations, got {tolerance!r}")
    if not (isinstance(convergence, (int, float)) and 0 < convergence < 1):
        raise ValueError(f"convergence: expected a weight in (0, 1), got {convergence!r}")
    if steps is None:
        steps = training_steps(model)
        source = "optimizer.iterations" if steps is not None else "unknown"
    else:
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 0:
            raise ValueError(f"steps: expected a non-negative int, got {steps!r}")
        source = "given"
    layers = _select(model, None)
    n_inputs = len(getattr(model, "inputs", None) or [None])
    data_batches = batches(data, batch_size, n_inputs)
    samples = sum(_rows(b) for b in data_batches)
    if y is not None and len(y) != samples:
        raise ValueError(f"y: expected one label per sample ({samples}), got {len(y)} labels")
    with cap.preserved_statistics(layers):
        before = _predict(model, data_batches)
        rec = recalibrate(model, data_batches, batch_size=batch_size)
        after = _predict(model, data_batches)
    reports = []
    for k, s in enumerate(rec.layers):
        layer = s.layer
        m = float(layer.momentum)
        eps = float(layer.epsilon)
        init_mean, init_var = initial_values(layer)
        std = np.sqrt(s.variance + eps)
        ms = conv.normalized_error_ms(s.mean, s.variance, s.old_mean, s.old_variance, eps)
        ratio = (s.old_variance + eps) / (s.variance + eps)
        w_steps = None if steps is None else conv.initial_weight_after([1.0 - m] * int(steps))
        big = np.abs(init_var - s.variance) > 0.1 * np.maximum(abs(init_var), s.variance)
        implied = _median(conv.implied_initial_weight(s.old_variance[big], init_var, s.variance[big])) \
            if big.any() else None
        need = conv.steps_to_converge(m, convergence)
        r = LayerReport(
            index=k, name=layer.name, channels=int(s.mean.shape[0]), momentum=m, epsilon=eps,
            trainable=bool(layer.trainable), count=int(s.moments.count),
            mean_offset=float(np.max(np.abs(s.old_mean - s.mean) / std)),
            variance_ratio_median=float(np.median(ratio)), variance_ratio_min=float(ratio.min()),
            variance_ratio_max=float(ratio.max()), output_error=float(np.sqrt(np.mean(ms))),
            worst_channel=int(np.argmax(ms)), worst_channel_error=float(np.sqrt(ms.max())),
            steps=None if steps is None else int(steps), initial_weight=w_steps,
            implied_initial_weight=implied, steps_needed=need if math.isfinite(need) else None,
            stats={"moving_mean": s.old_mean, "moving_variance": s.old_variance,
                   "mean": s.mean, "variance": s.variance})
        r.verdict, r.reason, r.remedy = _judge(r, layer, init_mean, init_var, s.old_mean, s.old_variance,
                                               tolerance, convergence)
        reports.append(r)
    d = Diagnosis(reports, rec.samples, None if steps is None else int(steps), source, float(tolerance),
                  float(convergence))
    scale = float(np.max(np.abs(after))) or 1.0
    d.max_output_change = float(np.max(np.abs(after - before)) / scale)
    d.changed_predictions = float(np.mean(_classes(after) != _classes(before)))
    if y is not None:
        d.accuracy = accuracy(before, y)
        d.accuracy_recalibrated = accuracy(after, y)
    return d
