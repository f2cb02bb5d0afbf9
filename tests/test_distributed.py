"""refbn's keras_sync merge against TF's synchronized BatchNormalization on tf.distribute.

TF runs in worker processes (MirroredStrategy on 2 and 4 logical CPU devices, and
MultiWorkerMirroredStrategy with 2 workers on 127.0.0.1), started once for the module;
this process never imports TensorFlow.
"""
import importlib.util
import os
import time

import numpy as np
import pytest

from refbn.compare import distributed as dist
from refbn.stats import Moments
from refbn.testing import assert_close

pytestmark = [pytest.mark.tf, pytest.mark.skipif(importlib.util.find_spec("tensorflow") is None
                                                 or importlib.util.find_spec("keras") is None,
                                                 reason="needs TensorFlow and Keras")]

CASES = {c.name: c for c in dist.CASES}
TIMEOUT_S = 300


@pytest.fixture(scope="module")
def tf_outdir(tmp_path_factory):
    """Where TF's workers (both engines at once) wrote what they computed."""
    outdir = str(tmp_path_factory.mktemp("dist"))
    pids = []
    errors = dist.run_tf(dist.ENGINES, outdir, TIMEOUT_S, pids=pids)
    assert not any(errors.values()), errors
    _assert_gone(pids)
    return outdir


@pytest.fixture(scope="module")
def tf_run(tf_outdir):
    """TF's recorded runs of every case: {case name: arrays}."""
    return {name: dist._load(case, tf_outdir) for name, case in CASES.items()}


def _assert_gone(pids):
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if c.engine == "mirrored"])
def test_mirrored_strategy_matches_keras_sync(tf_run, name):
    report = dist.judge(CASES[name], tf_run[name])
    assert report.passed, "\n".join(report.failures)
    assert set(report.worst) == set(CASES[name].judged)


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if c.engine == "multiworker"])
def test_multiworker_strategy_matches_keras_sync(tf_run, name):
    report = dist.judge(CASES[name], tf_run[name])
    assert report.passed, "\n".join(report.failures)


@pytest.mark.parametrize("name,counts", [("mirrored2-uneven", [9, 279]),
                                         ("mirrored4-dataset10", [27, 27, 27, 9]),
                                         ("mirrored4-dataset5", [18, 18, 9, 0]),
                                         ("multiworker2-uneven", [27, 117])])
def test_replicas_received_uneven_batches(tf_run, name, counts):
    """Values per channel per replica (batch * 3 * 3): TF splits a global batch of 10 over 4
    replicas as 3+3+3+1 samples and one of 5 as 2+2+1+0, an empty replica."""
    report = dist.judge(CASES[name], tf_run[name])
    assert report.counts == counts


@pytest.mark.parametrize("name", ["mirrored2-uneven", "mirrored4-uneven", "mirrored4-dataset10",
                                  "multiworker2-uneven"])
def test_an_equal_weight_merge_does_not_match_tf(tf_run, name):
    """The check can fail: replaying with Flax's pmean instead of Keras' sums misses TF."""
    report = dist.judge(CASES[name], tf_run[name], method="flax_pmean")
    assert not report.passed
    assert report.worst["batch_mean"].max_ulps > 1e3


def test_tf_loses_the_variance_at_large_offsets_as_emulated(tf_run):
    report = dist.judge(CASES["mirrored2-offset1e4"], tf_run["mirrored2-offset1e4"])
    assert report.passed, "\n".join(report.failures)
    assert report.tf_variance_error > dist.VARIANCE_LOST
    assert report.merge_errors["torch_sync"] < 0.1 and report.merge_errors["exact"] == 0.0


def test_workers_time_out_and_are_cleaned_up(tmp_path):
    pids = []
    t0 = time.monotonic()
    errors = dist.run_tf(("multiworker",), str(tmp_path), timeout=1.0, pids=pids)
    assert time.monotonic() - t0 < 30
    assert len(pids) == 2 and "timed out" in errors["multiworker2"]
    _assert_gone(pids)


def _assert_exact_for_inputs(mean, variance, count, inputs, what):
    """The merged statistics of a layer equal the exact (math.fsum) statistics of the float32
    inputs TF fed it: the merge is judged against what the layer saw, not against another run,
    whose float32 activations may differ (see dist.recording_layer_inputs)."""
    n, m, v = dist.exact_moments(inputs, mean.shape[0])
    assert int(count) == n, f"{what}: count {int(count)} != {n} values recorded"
    std = float(np.sqrt(v.max()))
    assert_close(mean, m, "mean", np.float64, "merge", scale=std)
    assert_close(variance, v, "variance", np.float64, "merge",
                 scale=float((np.sqrt(v) * np.maximum(np.abs(m), np.sqrt(v))).max()))


@pytest.mark.parametrize("engine,replicas", [("mirrored", 2), ("mirrored", 4), ("multiworker", 2)])
def test_recalibrate_with_a_strategy_is_exact(tf_outdir, engine, replicas):
    """refbn.keras.recalibrate(model, data, strategy=...): each replica reduces its part of the
    data (arrays: contiguous rows; tf.data: Dataset.shard) and the parts merge exactly."""
    runs = dist.load_recalibration(tf_outdir, engine, replicas)
    x = dist.recalibrate_data()
    exact = Moments.from_array(x)
    std = float(exact.std.max())
    for run in runs:
        for kind in ("arrays", "dataset"):
            s = f"{kind}_strategy"
            # the first layer normalises the data itself: its statistics are the data's
            assert int(run[f"{s}_count_0"]) == exact.count
            assert_close(run[f"{s}_mean_0"], exact.mean, "mean", np.float64, "merge", scale=std)
            assert_close(run[f"{s}_variance_0"], exact.variance, "variance", np.float64, "merge",
                         scale=float((exact.std * np.maximum(np.abs(exact.mean), exact.std)).max()))
            for how in ("strategy", "one_shard"):
                k = f"{kind}_{how}"
                # what every replica of every worker fed layer 0 is the data, each row once
                seen0 = np.concatenate([r[f"{k}_inputs_0"] for r in runs])
                assert np.array_equal(np.sort(seen0, axis=0), np.sort(np.tile(x, (1 if how == "strategy" else
                                                                                  len(runs), 1)), axis=0))
                for i in (0, 1):  # every layer: exact for the inputs it was fed, over all workers
                    inputs = [r[f"{k}_inputs_{i}"] for r in runs] if how == "strategy" else [run[f"{k}_inputs_{i}"]]
                    _assert_exact_for_inputs(run[f"{k}_mean_{i}"], run[f"{k}_variance_{i}"],
                                             run[f"{k}_count_{i}"], inputs, f"{engine}{replicas} {k} layer {i}")
                assert int(run[f"{s}_count_1"]) == int(run[f"{kind}_one_shard_count_1"])
    if engine == "multiworker":  # every worker merged the same rows in the same order
        for k in runs[0]:
            if "_inputs_" not in k:   # each worker fed its own part
                assert np.array_equal(runs[0][k], runs[1][k]), k


def test_recording_sees_what_the_merge_sees_and_can_fail():
    """The oracle of the recalibration checks is not a tautology: a shifted merge misses it."""
    x = dist.recalibrate_data()
    n, m, v = dist.exact_moments([x[:40], x[40:]], 6)
    assert n == 101
    assert_close(m, x.astype(np.float64).mean(0), "mean", np.float64, "merge", scale=float(np.sqrt(v.max())))
    with pytest.raises(AssertionError, match="mean"):
        _assert_exact_for_inputs(m + 1e-9, v, n, [x], "shifted")
    with pytest.raises(AssertionError, match="count"):
        _assert_exact_for_inputs(m, v, n - 1, [x], "short")


# -- recalibrate with shards= (in this process) ---------------------------------------------------
@pytest.fixture(scope="module")
def keras_mod():
    from refbn.keras._backend import keras
    return keras


def _recal(keras, **kw):
    import refbn.keras

    model = dist.recalibrate_model(keras)
    return model, refbn.keras.recalibrate(model, batch_size=16, **kw)


def test_recalibrate_shards_equal_the_whole_data_set(keras_mod):
    """Shards merge exactly.  Layer 0 sees the data in both runs, so both equal the data's exact
    statistics; layer 1 sees TF's float32 Dense outputs, which depend on the batching under
    Eigen's matmul (a 1-row batch takes its GEMV path), so each run is judged against the
    exact statistics of the inputs it recorded (dist.recording_layer_inputs)."""
    import tensorflow as tf

    x = dist.recalibrate_data()
    with dist.recording_layer_inputs() as seen_whole:
        _, whole = _recal(keras_mod, shards=[x])
    parts = [x[:7], x[7:60], x[60:]]
    loads = []

    def load():
        loads.append(1)
        return parts[1]

    shards = [(parts[0], np.zeros(7)),  # (x, y) as for fit: y is ignored
              load,                     # loaded again for every layer, never kept
              tf.data.Dataset.from_tensor_slices(parts[2]).batch(5)]
    with dist.recording_layer_inputs() as seen:
        _, res = _recal(keras_mod, shards=shards, workers=3)
    assert len(loads) == 2  # once per layer (the call order came from shard 0's first batch)
    assert len(seen) == len(seen_whole) == len(res.layers) == 2
    for i, (a, b) in enumerate(zip(whole.layers, res.layers)):
        assert a.moments.count == b.moments.count == 101
        for r, inputs in ((a, seen_whole[i]), (b, seen[i])):
            _assert_exact_for_inputs(r.mean, r.variance, r.moments.count, inputs, f"layer {i}")
        assert np.array_equal(b.layer.moving_variance.numpy(), b.variance.astype(np.float32))
    exact = Moments.from_array(x)   # layer 0: both runs are the data's own statistics
    for r in (whole.layers[0], res.layers[0]):
        assert_close(r.mean, exact.mean, "mean", np.float64, "merge", scale=float(exact.std.max()))
    _, serial = _recal(keras_mod, shards=shards, workers=1)
    for a, b in zip(serial.layers, res.layers):  # the merge order is fixed: threads change nothing
        assert np.array_equal(a.mean, b.mean) and np.array_equal(a.variance, b.variance)


def test_recalibrate_shards_bad_input_changes_nothing(keras_mod):
    from refbn.keras import sharded

    x = dist.recalibrate_data()
    model = dist.recalibrate_model(keras_mod)
    before = [layer.moving_variance.numpy().copy() for layer in sharded.cap.bn_layers(model)]

    def broken():
        raise OSError("shard 2 could not be read")

    calls = []

    def flaky():
        calls.append(1)
        if len(calls) > 1:  # the first layer succeeds, the second fails
            raise OSError("shard 2 could not be read")
        return x[:10]

    with pytest.raises(OSError, match="could not be read"):
        sharded.recalibrate_sharded(model, shards=[x[10:], flaky])
    with pytest.raises(ValueError, match="exactly one of them"):
        sharded.recalibrate_sharded(model, x, shards=[x])
    with pytest.raises(ValueError, match="shards: expected a non-empty list"):
        sharded.recalibrate_sharded(model, shards=[])
    with pytest.raises(ValueError, match="workers: expected a positive int"):
        sharded.recalibrate_sharded(model, shards=[x], workers=0)
    with pytest.raises(TypeError, match="strategy: expected a tf.distribute strategy"):
        sharded.recalibrate_sharded(model, x, strategy="mirrored")
    with pytest.raises(OSError):
        sharded.recalibrate_sharded(model, shards=[broken])
    after = [layer.moving_variance.numpy() for layer in sharded.cap.bn_layers(model)]
    assert all(np.array_equal(a, b) for a, b in zip(before, after))
