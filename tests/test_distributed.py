"""refbn's keras_sync merge against TF's synchronized BatchNormalization on tf.distribute.

TF runs in worker processes (MirroredStrategy on 2 and 4 logical CPU devices, and
MultiWorkerMirroredStrategy with 2 workers on 127.0.0.1), started once for the module;
this process never imports TensorFlow.
"""
import importlib.util
import os
import time

import pytest

from refbn.compare import distributed as dist

pytestmark = [pytest.mark.tf, pytest.mark.skipif(importlib.util.find_spec("tensorflow") is None
                                                 or importlib.util.find_spec("keras") is None,
                                                 reason="needs TensorFlow and Keras")]

CASES = {c.name: c for c in dist.CASES}
TIMEOUT_S = 300


@pytest.fixture(scope="module")
def tf_run(tmp_path_factory):
    """TF's recorded runs of every case (both engines at once): {case name: arrays}."""
    outdir = str(tmp_path_factory.mktemp("dist"))
    pids = []
    errors = dist.run_tf(dist.ENGINES, outdir, TIMEOUT_S, pids=pids)
    assert not any(errors.values()), errors
    _assert_gone(pids)
    return {name: dist._load(case, outdir) for name, case in CASES.items()}


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
