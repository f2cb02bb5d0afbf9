"""Population statistics of sharded data, and on ``tf.distribute``, for :func:`recalibrate`.

``recalibrate(model, shards=[...])`` and ``recalibrate(model, data, strategy=...)`` land
here.  Layer by layer (as :func:`refbn.keras.recalibrate.recalibrate`), every shard's
input to the layer is reduced to per-channel :class:`refbn.stats.Moments` in its own
thread, and the shards are merged exactly (Chan's formula, in shard order, so the
result does not depend on the number of threads or on how the data were cut):

* ``shards``: a list of shards, each an array (or anything ``recalibrate``'s ``data``
  may be: ``(x, y)``, a ``tf.data.Dataset``, an iterable of batches) or a zero-argument
  callable returning one.  A callable is called once per layer and its batches are read
  one at a time, so a data set larger than memory streams from disk shard by shard.
* ``strategy``: ``data`` is split over the strategy's replicas (``Dataset.shard`` for a
  tf.data pipeline, contiguous rows for arrays, every k-th batch for other iterables)
  and each replica's part runs on that replica's device.  Under
  ``MultiWorkerMirroredStrategy`` every worker passes the same ``data``, reduces its
  own replicas' parts, and the workers' Moments are exchanged with one all-reduce per
  layer (a SUM of disjoint float64 rows, which is exact), so every worker merges the
  same numbers in the same order and writes identical statistics.
"""
import concurrent.futures
import contextlib
import importlib
import math
import os
import threading

import numpy as np

from .. import stats
from . import capture as cap

# the module, not the function refbn.keras.recalibrate that shadows it in the package
rc = importlib.import_module(__package__ + ".recalibrate")


def _is_dataset(data):
    return hasattr(data, "element_spec") and hasattr(data, "shard")


class _BatchList(list):
    """One shard made by :func:`split`: a list of batches (never read as (x, y) arrays)."""


def _is_arrays(data, n_inputs):
    if isinstance(data, _BatchList):
        return False
    return (hasattr(data, "shape") or isinstance(data, dict)
            or (isinstance(data, tuple) and len(data) in (2, 3) and n_inputs == 1
                and all(v is None or hasattr(v, "shape") for v in data))
            or (isinstance(data, (list, tuple)) and n_inputs > 1 and len(data) == n_inputs
                and all(hasattr(v, "shape") for v in data)))


def _model_input(item, n_inputs):
    """x of one batch (a batch may be ``(x, y[, sample_weight])`` as in ``fit``)."""
    if isinstance(item, tuple) and not (n_inputs > 1 and len(item) == n_inputs):
        return item[0]
    return item


def _iter_batches(source, batch_size, n_inputs):
    """The model inputs of one shard, one batch at a time (arrays are sliced, not copied)."""
    data = source() if callable(source) else source
    if _is_arrays(data, n_inputs):
        yield from rc.batches(data, batch_size, n_inputs)
        return
    if _is_dataset(data) or not isinstance(data, (list, tuple)):
        try:
            iterator = iter(data)
        except TypeError:
            raise TypeError(f"shards: expected arrays, a tf.data.Dataset or an iterable of batches, "
                            f"got {type(data).__name__}") from None
        for item in iterator:
            yield _model_input(item, n_inputs)
        return
    for item in data:
        yield _model_input(item, n_inputs)


def split(data, k, batch_size=32, n_inputs=1):
    """Cut ``data`` into k shards: ``Dataset.shard(k, i)`` for a tf.data pipeline, k runs of
    contiguous rows for arrays, batches i, i+k, i+2k, ... for any other iterable of batches."""
    if _is_dataset(data):
        return [data.shard(k, i) for i in range(k)]
    if _is_arrays(data, n_inputs):
        parts = rc.batches(data, batch_size=math.ceil(rc._rows(_strip(data, n_inputs)) / k),
                           n_inputs=n_inputs)
        return parts + [None] * (k - len(parts))  # fewer rows than shards: some get none
    every = rc.batches(data, batch_size, n_inputs)
    return [_BatchList(every[i::k]) or None for i in range(k)]


def _strip(data, n_inputs):
    if (isinstance(data, tuple) and n_inputs == 1 and 2 <= len(data) <= 3
            and all(v is None or hasattr(v, "shape") for v in data)):
        return data[0]
    return data


# -- tf.distribute -----------------------------------------------------------------------------
def _topology(strategy):
    """(local devices, number of workers, this worker's rank) of a tf.distribute strategy."""
    devices = list(strategy.extended.worker_devices)
    n_workers = max(1, strategy.num_replicas_in_sync // max(1, len(devices)))
    if n_workers == 1:
        return devices, 1, 0
    resolver = strategy.cluster_resolver
    spec = resolver.cluster_spec().as_dict()
    tasks = [("chief", i) for i in range(len(spec.get("chief", [])))] + \
            [("worker", i) for i in range(len(spec.get("worker", [])))]
    return devices, n_workers, tasks.index((resolver.task_type, resolver.task_id))


def _allgather(strategy, row, n_workers, rank):
    """Every worker's float64 row, by an all-reduce SUM of a table that is zero except for
    each worker's own row (adding zeros is exact)."""
    import tensorflow as tf

    table = np.zeros((n_workers, row.size))
    table[rank] = row
    given = []

    def value(ctx):
        if given:  # this worker's other replicas add nothing
            return tf.zeros(table.shape, tf.float64)
        given.append(ctx.replica_id_in_sync_group)
        return tf.constant(table, tf.float64)

    per_replica = strategy.experimental_distribute_values_from_function(value)
    return np.asarray(strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None))


def _row(m, batches, samples, channels):
    if m is None:
        return np.zeros(3 + 2 * channels)
    return np.concatenate([[m.count, batches, samples], m.mean, m.m2])


def _from_row(row, channels):
    count = int(round(row[0]))
    if count == 0:
        return None
    return stats.Moments(count, row[3:3 + channels], row[3 + channels:])


# -- the per-layer reduction ------------------------------------------------------------------
def _layer_moments(model, layer, sources, calls, devices, workers, batch_size, n_inputs):
    """Exact Moments of ``layer``'s input over every shard (None if no shard reached it), and
    the number of batches and samples read."""
    local = threading.local()

    def before(lyr, inputs, kwargs):
        if kwargs.get("mask") is not None:
            raise ValueError(f"model: layer {lyr.name!r} receives a mask; recalibrating masked "
                             "BatchNormalization inputs is not supported")
        local.seen.append(stats.Moments.from_array(cap.to_numpy(inputs), axis=lyr.axis))
        if len(local.seen) >= calls:
            raise cap.StopForward

    def one(i):
        acc, n_batches, n_samples = stats.MomentsAccumulator(), 0, 0
        if sources[i] is None:
            return None, 0, 0
        device = devices[i % len(devices)] if devices else None
        with _device(device):
            for xb in _iter_batches(sources[i], batch_size, n_inputs):
                local.seen = []
                cap.run(model, xb, training=False)
                for m in local.seen:
                    acc.add_moments(m)
                n_batches, n_samples = n_batches + 1, n_samples + rc._rows(xb)
        return (acc.result() if acc.shards else None), n_batches, n_samples

    with cap.hooked([layer], before=before):
        if workers == 1 or len(sources) == 1:
            parts = [one(i) for i in range(len(sources))]
        else:
            with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
                parts = list(pool.map(one, range(len(sources))))
    found = [p[0] for p in parts if p[0] is not None]
    total = stats.Moments.merge_all(found) if found else None
    return total, sum(p[1] for p in parts), sum(p[2] for p in parts)


def _device(name):
    if name is None:
        return contextlib.nullcontext()
    import tensorflow as tf

    return tf.device(name)


def _first_batch(sources, batch_size, n_inputs):
    for src in sources:
        if src is None:
            continue
        for xb in _iter_batches(src, batch_size, n_inputs):
            return xb
    return None


def recalibrate_sharded(model, data=None, *, shards=None, strategy=None, batch_size=32, layers=None,
                        unbiased=False, verbose=False, workers=None):
    """:func:`refbn.keras.recalibrate` for sharded data or a ``tf.distribute`` strategy (see the
    module docstring).  Returns a :class:`refbn.keras.recalibrate.Recalibration`; a failed
    call leaves every layer's statistics as they were."""
    if (shards is None) == (data is None):
        raise ValueError("data, shards: expected exactly one of them (shards= is a list of shards)")
    if shards is not None and (isinstance(shards, (str, bytes)) or not hasattr(shards, "__len__")
                               or len(shards) == 0):
        raise ValueError(f"shards: expected a non-empty list of shards, got {type(shards).__name__}")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise ValueError(f"workers: expected a positive int, got {workers!r}")
    chosen = rc._select(model, layers)
    n_inputs = len(getattr(model, "inputs", None) or [None])
    devices, n_workers, rank = [], 1, 0
    if strategy is not None:
        if not hasattr(strategy, "extended") or not hasattr(strategy, "num_replicas_in_sync"):
            raise TypeError(f"strategy: expected a tf.distribute strategy, got {type(strategy).__name__}")
        devices, n_workers, rank = _topology(strategy)
    if shards is None:
        k = max(1, len(devices)) * n_workers
        shards = split(data, k, batch_size, n_inputs)
    sources = list(shards)
    # the call order comes from the first batch of all the data, the same on every worker
    first = _first_batch(sources, batch_size, n_inputs)
    if first is None:
        raise ValueError("data: expected at least one batch, got none")
    order, calls = cap.call_order(model, first, chosen)
    missing = [layer.name for layer in chosen if id(layer) not in calls]
    if missing:
        raise ValueError(f"layers: {', '.join(missing)} not reached by a forward pass of the model")
    if n_workers > 1:  # this worker's part, when every worker passed the same data
        per = len(sources) // n_workers if len(sources) % n_workers == 0 else None
        if per is None:
            raise ValueError(f"shards: expected a multiple of the {n_workers} workers, got {len(sources)}")
        sources = sources[rank * per:(rank + 1) * per]
    workers = workers or max(1, min(len(sources), os.cpu_count() or 1, len(devices) or len(sources)))
    result = rc.Recalibration()
    saved = cap.statistics(order)
    try:
        for i, layer in enumerate(order):
            channels = int(layer.moving_mean.shape[0])
            m, n_batches, n_samples = _layer_moments(model, layer, sources, calls[id(layer)],
                                                     devices, workers, batch_size, n_inputs)
            if n_workers > 1:
                table = _allgather(strategy, _row(m, n_batches, n_samples, channels), n_workers, rank)
                found = [x for x in (_from_row(r, channels) for r in table) if x is not None]
                m = stats.Moments.merge_all(found) if found else None
                n_batches, n_samples = int(table[:, 1].sum()), int(table[:, 2].sum())
            if m is None:
                raise ValueError(f"data: layer {layer.name!r} was never reached by the forward pass")
            if i == 0:
                result.batches, result.samples = n_batches, n_samples
            mean, var = m.mean, (m.unbiased_variance if unbiased else m.variance)
            old_m, old_v = (cap.to_numpy(v).astype(np.float64)
                            for v in (layer.moving_mean, layer.moving_variance))
            cap.write_statistics(layer, mean, var)
            result.layers.append(rc.LayerStatistics(layer, m,
                                                    old_m, old_v, mean, var))
            if verbose:
                print(f"[{i + 1}/{len(order)}] {layer.name}: n={m.count} over {len(shards)} shard(s), "
                      f"mean variance {np.mean(old_v):.4g} -> {np.mean(var):.4g}")
    except BaseException:
        for layer in order:  # a failed call changes nothing
            cap.write_statistics(layer, *saved[layer])
        raise
    return result
