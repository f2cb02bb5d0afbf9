"""Synchronized BN on the other real engines: PyTorch SyncBatchNorm's merge on a 2-process gloo
group on 127.0.0.1, and Flax BatchNorm(axis_name=...) under pmap over 4 host CPU devices.

The engines run in worker processes started once for the module (about 15 s here); this process
imports neither torch nor jax.  Each engine is judged against refbn.stats' emulation of its merge
and, with it, against the exact float64 statistics of all the values (math.fsum).
"""
import os
import time

import numpy as np
import pytest

from refbn import stats
from refbn.compare import distributed as dist
from refbn.testing import assert_close, compare

CASES = {c.name: c for c in dist.SYNC_CASES}
INSTALLED = tuple(e for e in dist.SYNC_ENGINES if dist.engine_installed(e))
TIMEOUT_S = 120


def _needs(engine):
    return pytest.mark.skipif(engine not in INSTALLED, reason=f"needs {engine}")


def _cases(engine=None):
    return [pytest.param(n, marks=_needs(c.engine)) for n, c in CASES.items()
            if engine is None or c.engine == engine]


def _assert_gone(pids):
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


@pytest.fixture(scope="module")
def engine_outdir(tmp_path_factory):
    if not INSTALLED:
        pytest.skip("needs torch or jax/flax")
    outdir = str(tmp_path_factory.mktemp("sync"))
    pids = []
    errors = dist.run_sync_engines(INSTALLED, outdir, TIMEOUT_S, pids=pids)
    assert not any(errors.values()), errors
    _assert_gone(pids)
    return outdir


@pytest.fixture(scope="module")
def runs(engine_outdir):
    return {n: dist.load_sync(c, engine_outdir) for n, c in CASES.items() if c.engine in INSTALLED}


@pytest.mark.parametrize("name", _cases())
def test_engine_matches_refbns_emulation_and_its_claim(runs, name):
    report = dist.judge_sync(CASES[name], runs[name])
    assert report.passed, "\n".join(report.failures)
    assert report.counts == [9 * b for b in CASES[name].batches]
    if CASES[name].claim != "nan":
        assert {"mean", "variance"} <= set(report.worst)


@pytest.mark.parametrize("name", _cases("torch"))
def test_torch_gathers_every_rank_and_drops_the_empty_one(runs, name):
    """Both ranks hold the same (mean, invstd, count) table, and an empty rank sends zeros."""
    case = CASES[name]
    table = runs[name][0]["table"]
    assert table.shape == (2, 2 * case.channels + 1)
    assert [int(c) for c in table[:, -1]] == [9 * b for b in case.batches]
    if 0 in case.batches:
        assert not table[case.batches.index(0)].any()


def test_torch_cpu_variance_is_var_plus_delta_squared(runs):
    """On N(1e4, 0.01^2) torch's per-replica variance is var + delta^2 (delta = mean - fl32(mean)),
    and the gather carries it: the correctly rounded model misses the engine, the CPU model does not."""
    case = CASES["torch2-offset1e4"]
    copies = runs[case.name]
    shards = [stats.Moments.from_array(c["x"], data_format="NHWC") for c in copies]
    rounded = stats.merge(shards, "torch_sync", epsilon=dist.TORCH_EPSILON)
    cpu = stats.torch_sync_cpu(shards, dist.TORCH_EPSILON)
    assert compare(copies[0]["variance"], cpu.variance, "variance", np.float32, "sync_torch").passed
    assert not compare(copies[0]["variance"], rounded.variance, "variance", np.float32, "sync_torch").passed


@_needs("flax")
def test_flax_masks_exclude_the_padding(runs):
    """The padding (1e6) is masked out: the merged mean is near the data's (N(2, 3^2)), and equal
    device weights put it where refbn's equal-weight mean of the devices' exact means is."""
    copies = runs["flax4-masked"]
    means = np.array([c["x"].astype(np.float64).reshape(-1, 4).mean(0) for c in copies])
    assert_close(copies[0]["mean"], means.mean(0), "mean", np.float32, "sync_flax",
                 scale=float(np.abs(means).max()))


@pytest.mark.parametrize("name", _cases())
def test_the_checks_can_fail(runs, name):
    """A variance off by 1e-3 relative (Flax's fast variance is judged on the scale of E[x^2]: a
    mean off by 1e-3 of sqrt(E[x^2]) there), or a number where NaN was claimed, is caught."""
    case = CASES[name]
    if case.claim == "nan":
        broken = [dict(c, mean=np.zeros_like(c["mean"])) for c in runs[name]]
    elif case.engine == "flax" and case.fast_variance:
        shift = np.float32(1e-3 * np.hypot(case.loc, case.scale))
        broken = [dict(c, mean=c["mean"] + shift) for c in runs[name]]
    else:
        broken = [dict(c, variance=c["variance"] * np.float32(1.001) + np.float32(1e-3 * case.scale ** 2))
                  for c in runs[name]]
    assert not dist.judge_sync(case, broken).passed


def test_workers_time_out_and_are_cleaned_up(tmp_path):
    if "torch" not in INSTALLED:
        pytest.skip("needs torch")
    pids = []
    t0 = time.monotonic()
    errors = dist.run_sync_engines(("torch",), str(tmp_path), timeout=1.0, pids=pids)
    assert time.monotonic() - t0 < 30
    assert len(pids) == 2 and "timed out" in errors["torch"]
    _assert_gone(pids)


def test_missing_engines_are_reported_not_installed(monkeypatch, tmp_path):
    monkeypatch.setattr(dist, "engine_installed", lambda engine: False)
    reports = dist.run_sync(dist.SYNC_ENGINES, outdir=str(tmp_path))
    assert len(reports) == len(dist.SYNC_CASES)
    assert all(r.not_installed.startswith("not installed (pip install") for r in reports)
    assert os.listdir(tmp_path) == []


# -- the emulations themselves (no engine) --------------------------------------------------------
def test_torch_cpu_replica_stats_by_hand():
    """Two values 1e4 +- 0.01 (mean 1e4 exactly: delta 0) and a mean that float32 cannot hold."""
    m = stats.Moments.from_array(np.array([[1e4 - 0.01], [1e4 + 0.01]]))
    mean32, invstd32 = stats.torch_cpu_replica_stats(m, 1e-5)
    assert mean32[0] == np.float32(1e4)
    assert_close(invstd32, 1 / np.sqrt(np.array([1e-4 + 1e-5])), "invstd", np.float32, "sync_torch")
    x = np.array([[0.1], [0.3]])          # mean 0.2; fl32(0.2) - 0.2 = delta
    m = stats.Moments.from_array(x)
    delta = 0.2 - float(np.float32(0.2))
    _, invstd32 = stats.torch_cpu_replica_stats(m, 1e-5)
    assert_close(invstd32, 1 / np.sqrt(np.array([0.01 + delta ** 2 + 1e-5])), "invstd", np.float32, "sync_torch")


def test_torch_gather_and_flax_merge_bad_input():
    with pytest.raises(ValueError, match="counts: expected >= 1"):
        stats.torch_gather_stats([[0.0]], [[1.0]], [0])
    with pytest.raises(ValueError, match="means, invstds, counts"):
        stats.torch_gather_stats([0.0], [1.0], [1])
    m = stats.Moments.from_array(np.arange(6.0).reshape(3, 2))
    with pytest.raises(ValueError, match="mean: only for use_fast_variance=False"):
        stats.flax_pmean_merge([m], True, mean=[0.0, 0.0])
    with pytest.raises(TypeError, match="m: expected a Moments"):
        stats.torch_cpu_replica_stats(np.zeros(2))
