"""Fix a Keras model's BatchNormalization statistics: exact recalibration and bias correction.

``recalibrate(model, data)`` ("precise BN") replaces every BatchNormalization
layer's moving mean and variance with the exact population statistics of the
layer's input over ``data``, computed in inference mode, layer by layer: the
statistics of layer k are measured only after every earlier layer's statistics
were replaced, so each layer sees the inputs it will see at inference time.
Every batch is summarised by per-channel (count, mean, M2) from refbn's float64
reference ``moments`` and the batches are merged exactly with Chan's parallel
formula (:func:`refbn.stats.chan_merge`), so the result does not depend on
the batch size.  (Averaging per-batch variances, as most "precise BN" tools do,
drops the spread of the batch means and underestimates the variance.)

``debias(model, steps)`` removes the weight the initial values (mean 0,
variance 1) still hold after ``steps`` updates, as Adam does:
estimate = (moving - momentum**t * initial) / (1 - momentum**t).  Exact when the
batch statistics did not change during training; a cheap first aid otherwise.
"""
from dataclasses import dataclass, field

import numpy as np

from .. import convergence as conv
from ..stats import Moments
from . import capture as cap
from ._backend import keras


def average_of_batch_moments(batch_moments):
    """What per-batch averaging tools compute: the mean of the batch means and the mean of
    the batch (biased) variances.  Shown by the demo next to the exact merge."""
    means = np.mean([m.mean for m in batch_moments], axis=0)
    variances = np.mean([m.m2 / m.count for m in batch_moments], axis=0)
    return means, variances


# -- data ----------------------------------------------------------------------------
def _rows(x):
    if isinstance(x, dict):
        return len(next(iter(x.values())))
    if isinstance(x, (list, tuple)):
        return len(x[0])
    return len(x)


def _slice(x, i, j):
    if isinstance(x, dict):
        return {k: v[i:j] for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [v[i:j] for v in x]
    return x[i:j]


def batches(data, batch_size=32, n_inputs=1):
    """A re-iterable list of model inputs from ``data``.

    ``data`` may be an array, an ``(x, y[, sample_weight])`` tuple of arrays (as for ``fit``;
    y is ignored), for a model with several inputs a list/dict of arrays, a ``tf.data.Dataset``, a ``keras.utils.PyDataset`` or any iterable of batches;
    batches may be ``x`` or ``(x, y[, sample_weight])`` as in ``fit``.  Iterators are
    read once and kept in memory, because recalibration passes over the data once per layer.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
    if (isinstance(data, tuple) and n_inputs == 1 and 2 <= len(data) <= 3
            and all(v is None or hasattr(v, "shape") for v in data)):
        data = data[0]  # (x, y[, sample_weight]) as passed to fit
    if hasattr(data, "shape") or isinstance(data, dict) or (
            isinstance(data, (list, tuple)) and n_inputs > 1 and len(data) == n_inputs
            and all(hasattr(v, "shape") for v in data)):
        n = _rows(data)
        if n == 0:
            raise ValueError("data: expected at least one sample, got an empty array")
        return [_slice(data, i, min(i + batch_size, n)) for i in range(0, n, batch_size)]
    if isinstance(data, keras.utils.PyDataset):
        items = [data[i] for i in range(len(data))]
    else:
        try:
            items = list(data)
        except TypeError:
            raise TypeError(f"data: expected an array, a tf.data.Dataset, a PyDataset or an iterable "
                            f"of batches, got {type(data).__name__}") from None
    out = []
    for item in items:
        if isinstance(item, tuple) and not (n_inputs > 1 and len(item) == n_inputs):
            item = item[0]
        out.append(item)
    if not out:
        raise ValueError("data: the dataset yielded no batches")
    return out


# -- recalibration ------------------------------------------------------------------
@dataclass
class LayerStatistics:
    """One layer's statistics before and after recalibration (float64)."""
    layer: object
    moments: Moments
    old_mean: np.ndarray
    old_variance: np.ndarray
    mean: np.ndarray
    variance: np.ndarray

    @property
    def name(self):
        return self.layer.name


@dataclass
class Recalibration:
    layers: list = field(default_factory=list)
    batches: int = 0
    samples: int = 0

    def __iter__(self):
        return iter(self.layers)

    def __len__(self):
        return len(self.layers)

    def __getitem__(self, key):
        if isinstance(key, str):
            for s in self.layers:
                if s.name == key:
                    return s
            raise KeyError(key)
        return self.layers[key]

    def summary(self):
        return (f"recalibrated {len(self.layers)} BatchNormalization layer(s) on {self.samples} "
                f"sample(s) in {self.batches} batch(es)")


def _select(model, layers):
    all_bn = cap.bn_layers(model)
    if not all_bn:
        raise ValueError("model: expected a Keras model containing BatchNormalization layers, found none")
    if layers is None:
        return all_bn
    by_name = {layer.name: layer for layer in all_bn}
    chosen = []
    for item in layers:
        if isinstance(item, str):
            if item not in by_name:
                raise ValueError(f"layers: no BatchNormalization layer named {item!r}; "
                                 f"the model has {', '.join(by_name)}")
            chosen.append(by_name[item])
        elif isinstance(item, cap.BatchNormalization) and any(item is layer for layer in all_bn):
            chosen.append(item)
        else:
            raise ValueError(f"layers: expected names or BatchNormalization layers of this model, "
                             f"got {item!r}")
    return chosen


def _check_mask(layer, kwargs):
    if kwargs.get("mask") is not None:
        raise ValueError(f"model: layer {layer.name!r} receives a mask; recalibrating masked "
                         "BatchNormalization inputs is not supported")


def layer_moments(model, layer, data_batches, calls=1, per_batch=False):
    """Exact (count, mean, M2) of ``layer``'s input over the batches, in inference mode with the
    model's current statistics.  With ``per_batch=True`` also returns each batch's Moments."""
    total, each = None, []

    def before(lyr, inputs, kwargs):
        _check_mask(lyr, kwargs)
        seen.append(Moments.from_array(cap.to_numpy(inputs), axis=lyr.axis))
        if len(seen) >= calls:
            raise cap.StopForward

    for xb in data_batches:
        seen = []
        with cap.hooked([layer], before=before):
            cap.run(model, xb, training=False)
        for m in seen:
            each.append(m)
            total = m if total is None else total.merge(m)
    if total is None:
        raise ValueError(f"data: layer {layer.name!r} was never reached by the forward pass")
    return (total, each) if per_batch else total


def recalibrate(model, data=None, batch_size=32, layers=None, unbiased=False, verbose=False, *,
                shards=None, strategy=None, workers=None):
    """Replace the BatchNormalization layers' moving statistics with the exact statistics of
    their inputs over ``data`` ("precise BN"), layer by layer in the order the model calls them.

    Args:
      model: a Keras 3 model (any kind: Sequential, functional, nested, subclassed).
      data: inputs (see :func:`batches`); labels are ignored.
      batch_size: batch size for arrays.  It changes the cost, not the result: batches are
        merged exactly.
      layers: optional names/layers to recalibrate (default: all).
      unbiased: write the Bessel-corrected variance instead of the biased one Keras 3 uses.
      verbose: print one line per layer.
      shards: instead of ``data``, a list of shards (each anything ``data`` may be, or a
        zero-argument callable that loads one): reduced in parallel threads (``workers``) and
        merged exactly, streaming one batch at a time (see :mod:`refbn.keras.sharded`).
      strategy: a ``tf.distribute`` strategy: ``data`` is split over its replicas, each part
        runs on its replica's device, and under MultiWorkerMirroredStrategy the workers'
        statistics are merged exactly across workers (see :mod:`refbn.keras.sharded`).

    Returns a :class:`Recalibration` with each layer's old and new statistics.  Cost: when
    the data are one batch, one forward pass; otherwise one pass over the data per layer, each
    forward stopped as soon as the layer's input is known (about layers/2 full passes).
    """
    if shards is not None or strategy is not None or workers is not None:
        from .sharded import recalibrate_sharded
        return recalibrate_sharded(model, data, shards=shards, strategy=strategy, batch_size=batch_size,
                                   layers=layers, unbiased=unbiased, verbose=verbose, workers=workers)
    chosen = _select(model, layers)
    n_inputs = len(getattr(model, "inputs", None) or [None])
    data_batches = batches(data, batch_size, n_inputs)
    order, calls = cap.call_order(model, data_batches[0], chosen)
    missing = [layer.name for layer in chosen if id(layer) not in calls]
    if missing:
        raise ValueError(f"layers: {', '.join(missing)} not reached by a forward pass of the model")
    result = Recalibration(batches=len(data_batches), samples=sum(_rows(b) for b in data_batches))
    saved = cap.statistics(order)
    try:
        _recalibrate(model, order, calls, data_batches, unbiased, verbose, result)
    except BaseException:
        for layer in order:  # a failed call changes nothing
            cap.write_statistics(layer, *saved[layer])
        raise
    return result


def _recalibrate(model, order, calls, data_batches, unbiased, verbose, result):

    def replace(layer, m):
        mean, var = m.mean, (m.unbiased_variance if unbiased else m.variance)
        old_m, old_v = (cap.to_numpy(v).astype(np.float64) for v in (layer.moving_mean, layer.moving_variance))
        cap.write_statistics(layer, mean, var)
        result.layers.append(LayerStatistics(layer, m, old_m, old_v, mean, var))
        if verbose:
            print(f"[{len(result.layers)}/{len(order)}] {layer.name}: n={m.count}, mean variance "
                  f"{np.mean(old_v):.4g} -> {np.mean(var):.4g}")

    if len(data_batches) == 1 and all(calls[id(layer)] == 1 for layer in order):
        # One batch: a single forward pass is exact.  Each layer's hook measures its input and
        # writes the statistics before the layer runs, so every later layer already receives
        # the output of recalibrated layers.
        def before(layer, inputs, kwargs):
            _check_mask(layer, kwargs)
            replace(layer, Moments.from_array(cap.to_numpy(inputs), axis=layer.axis))

        with cap.hooked(order, before=before):
            cap.run(model, data_batches[0], training=False)
        return
    for layer in order:  # one pass over the data per layer, each stopped at the layer
        replace(layer, layer_moments(model, layer, data_batches, calls[id(layer)]))


# -- bias correction ----------------------------------------------------------------
def _initial_value(initializer, what):
    init = keras.initializers.get(initializer)
    if isinstance(init, keras.initializers.Zeros):
        return 0.0
    if isinstance(init, keras.initializers.Ones):
        return 1.0
    if isinstance(init, keras.initializers.Constant):
        return float(np.asarray(init.value))
    raise ValueError(f"{what}: debiasing needs a constant initial value, got {type(init).__name__}")


def initial_values(layer):
    """(initial moving mean, initial moving variance) of a BatchNormalization layer."""
    return (_initial_value(layer.moving_mean_initializer, f"{layer.name}.moving_mean_initializer"),
            _initial_value(layer.moving_variance_initializer, f"{layer.name}.moving_variance_initializer"))


def training_steps(model):
    """The optimizer's step count (``model.optimizer.iterations``), or None without an optimizer."""
    opt = getattr(model, "optimizer", None)
    if opt is None or getattr(opt, "iterations", None) is None:
        return None
    return int(cap.to_numpy(opt.iterations))


@dataclass
class Debiased:
    layer: object
    steps: int
    initial_weight: float
    old_mean: np.ndarray
    old_variance: np.ndarray
    mean: np.ndarray
    variance: np.ndarray
    clipped: int  # channels whose corrected variance came out negative and was set to 0


def debias(model, steps=None, layers=None):
    """Bias-correct the moving statistics of every trainable BatchNormalization layer in place:
    estimate = (moving - momentum**steps * initial) / (1 - momentum**steps), for the mean
    (initial 0) and the variance (initial 1).

    ``steps``: how many training-mode updates the layers received; default: the optimizer's
    ``iterations``.  Frozen layers (``trainable=False``) were not updated by ``fit`` and are
    left alone.  Returns a list of :class:`Debiased`.  Apply it once: it is not idempotent.
    """
    if steps is None:
        steps = training_steps(model)
        if steps is None:
            raise ValueError("steps: the model has no optimizer to read the step count from; pass "
                             "steps= (how many training steps the BatchNormalization layers saw)")
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 0:
        raise ValueError(f"steps: expected a non-negative int, got {steps!r}")
    out = []
    for layer in _select(model, layers):
        if not layer.trainable:
            continue
        init_mean, init_var = initial_values(layer)
        w = conv.initial_weight_after([1.0 - layer.momentum] * int(steps))
        old_m, old_v = (cap.to_numpy(v).astype(np.float64) for v in (layer.moving_mean, layer.moving_variance))
        mean = conv.debias(old_m, init_mean, w)
        var = conv.debias(old_v, init_var, w)
        clipped = int(np.sum(var < 0))
        var = np.maximum(var, 0.0)
        cap.write_statistics(layer, mean, var)
        out.append(Debiased(layer, int(steps), w, old_m, old_v, mean, var, clipped))
    return out
