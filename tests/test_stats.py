"""refbn.stats: exact, associative merging of Moments, and the frameworks' cross-replica merges."""
import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from conftest import BACKENDS, LAYOUTS, make_x
from refbn import stats
from refbn.stats import Moments
from refbn import dtypes
from refbn.testing import assert_close
from refbn.tolerances import tolerance


def _small(err, dtype="float32", output="*"):
    """A merge's reported relative error is within the declared merge_error tolerance."""
    return err <= tolerance(output, dtype, "merge_error").ulps * dtypes.machine_epsilon(dtype)

C = 3


def _truth(values):
    """Independent float64 moments of an (n, C) array: math.fsum per channel, two passes."""
    v = np.asarray(values, np.float64)
    n = v.shape[0]
    mean = np.array([math.fsum(v[:, c]) / n for c in range(v.shape[1])])
    m2 = np.array([math.fsum((v[:, c] - mean[c]) ** 2) for c in range(v.shape[1])])
    return n, mean, m2


def assert_moments_close(m, values, what=""):
    n, mean, m2 = _truth(values)
    assert m.count == n, what
    std = np.sqrt(m2 / n)
    assert_close(m.mean, mean, "mean", np.float64, "merge", scale=float(std.max()), what=what)
    assert_close(m.variance, m2 / n, "variance", np.float64, "merge",
                 scale=float((std * np.maximum(np.abs(mean), std)).max()), what=what)


def _split(x, cuts):
    return np.split(x, sorted(cuts))


# -- exactness and associativity (hypothesis) ---------------------------------------------------
data_sets = st.tuples(st.integers(1, 400), st.floats(-1e3, 1e3), st.floats(1e-3, 1e2),
                      st.integers(0, 2**31))


def _values(spec):
    n, loc, scale, seed = spec
    return np.random.default_rng(seed).normal(loc, scale, (n, C))


@settings(max_examples=60, deadline=None)
@given(spec=data_sets, data=st.data())
def test_merge_of_random_uneven_splits_equals_single_device_moments(spec, data):
    x = _values(spec)
    cuts = data.draw(st.lists(st.integers(0, x.shape[0]), max_size=12))  # empty shards included
    shards = [Moments.from_array(s, axis=-1) for s in _split(x, cuts)]
    whole = Moments.from_array(x, axis=-1)
    assert_moments_close(whole, x, "single device")
    assert_moments_close(Moments.merge_all(shards), x, "pairwise merge of the shards")
    sequential = Moments.empty(C)
    for m in shards:
        sequential = sequential + m
    assert_moments_close(sequential, x, "sequential merge")
    rev = Moments.empty(C)
    for m in reversed(shards):
        rev = m.merge(rev)
    assert_moments_close(rev, x, "merge in reverse order")


@settings(max_examples=60, deadline=None)
@given(a=data_sets, b=data_sets, c=data_sets)
def test_merge_is_associative_and_commutative(a, b, c):
    xa, xb, xc = _values(a), _values(b), _values(c)
    ma, mb, mc = (Moments.from_array(v) for v in (xa, xb, xc))
    allx = np.concatenate([xa, xb, xc])
    for what, m in (("(a+b)+c", (ma + mb) + mc), ("a+(b+c)", ma + (mb + mc)), ("(c+a)+b", (mc + ma) + mb),
                    ("b+(c+a)", mb + (mc + ma))):
        assert_moments_close(m, allx, what)


def test_merge_is_exact_where_the_sums_are_exact():
    """Small integers: every intermediate of Chan's formula is exact in float64."""
    a = Moments.from_array(np.array([[1.0], [3.0]]))
    b = Moments.from_array(np.array([[5.0], [7.0], [9.0], [11.0]]))
    m = a + b
    assert m.count == 6 and m.mean[0] == 6.0 and m.m2[0] == 70.0
    assert m.variance[0] == 70.0 / 6
    assert_close(m.unbiased_variance, [14.0], "variance", np.float64, "merge")


@pytest.mark.parametrize("data_format", list(LAYOUTS))
def test_from_array_follows_the_layout(data_format, backend):
    shape, axis = LAYOUTS[data_format]
    x = make_x(shape, np.float32, seed=3)
    m = Moments.from_array(x, data_format=data_format, backend=backend)
    values = np.moveaxis(x, axis, -1).reshape(-1, shape[axis])
    assert_moments_close(m, values, f"{data_format} {backend}")
    assert_moments_close(Moments.from_array(x, axis=axis, backend=backend), values, "axis=")
    assert_moments_close(stats.moments(x, axis=axis - len(shape)), values, "negative axis")


def test_half_precision_and_bfloat16_inputs():
    for dtype in ("float16", "bfloat16"):
        x = make_x((50, 4), np.float32).astype(stats.dtypes.parse(dtype))
        assert_moments_close(Moments.from_array(x), x.astype(np.float64), dtype)


def test_empty_moments_are_the_identity():
    m = Moments.from_array(make_x((9, C), np.float64))
    e = Moments.empty(C)
    assert (m + e) is m and (e + m) is m
    assert Moments.from_array(np.zeros((0, 4, C))).count == 0
    with pytest.raises(ValueError, match="count 0"):
        e.variance


def test_unbiased_variance_of_one_value_is_zero_as_in_tf():
    m = Moments.from_array(np.array([[2.5, -1.0]]))
    assert m.unbiased_variance.tolist() == [0.0, 0.0]


def test_sums_round_trip():
    x = make_x((20, C), np.float64, loc=-3.0)
    s, s2 = Moments.from_array(x).sums()
    assert_close(s, x.sum(0), "mean", np.float64, "merge", scale=float(np.abs(x).sum(0).max()))
    assert_close(s2, (x * x).sum(0), "mean", np.float64, "merge")


def test_moments_are_immutable():
    m = Moments.from_array(make_x((5, C), np.float64))
    with pytest.raises(AttributeError):
        m.count = 3
    with pytest.raises(ValueError):
        m.mean[0] = 1.0


# -- streaming, sharded data sets ------------------------------------------------------------
def test_moments_of_shards_streams_in_parallel_and_is_independent_of_workers():
    rng = np.random.default_rng(5)
    parts = [rng.normal(10.0, 2.0, (int(n), 2, C)).astype(np.float32) for n in rng.integers(0, 300, 23)]
    allx = np.concatenate(parts).reshape(-1, C)
    loaded = []

    def loader(p):
        def load():
            loaded.append(1)
            return p
        return load

    one = stats.moments_of_shards(parts, workers=1)
    many = stats.moments_of_shards((loader(p) for p in parts), workers=4)  # a generator of loaders
    assert len(loaded) == len(parts)
    assert one.count == many.count == allx.shape[0]
    assert np.array_equal(one.mean, many.mean) and np.array_equal(one.m2, many.m2)
    assert_moments_close(many, allx, "23 shards, 4 workers")


def test_accumulator_matches_merge_all():
    parts = [make_x((k + 1, 2, C), np.float64, seed=k) for k in range(10)]
    acc = stats.MomentsAccumulator(data_format="NWC")
    for p in parts:
        acc.add(p)
    assert acc.shards == 10
    ref = Moments.merge_all(Moments.from_array(p, data_format="NWC") for p in parts)
    assert np.array_equal(acc.result().mean, ref.mean) and np.array_equal(acc.result().m2, ref.m2)


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_backends_give_the_same_moments(backend_name):
    x = make_x((64, 5, C), np.float32, loc=100.0)
    assert_moments_close(Moments.from_array(x, backend=backend_name), x.reshape(-1, C), backend_name)


# -- the frameworks' merges -------------------------------------------------------------------
def _shards(sizes, loc=0.0, scale=1.0, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    xs = [rng.normal(loc, scale, (n, C)).astype(dtype) for n in sizes]
    return xs, [Moments.from_array(x) for x in xs]


def _keras_from_raw(xs):
    """Keras' synchronized moments, written independently from the raw values: exact sums
    (math.fsum) rounded to float32, added over replicas in float32, then divided."""
    f = np.float32
    tot, tot2, cnt = np.zeros(C, f), np.zeros(C, f), f(0)
    for x in xs:
        v = x.astype(np.float64)
        tot = tot + np.array([math.fsum(v[:, c]) for c in range(C)], f)
        tot2 = tot2 + np.array([math.fsum(v[:, c] ** 2) for c in range(C)], f)
        cnt = cnt + f(x.shape[0])
    mean = tot / cnt
    return mean, np.maximum(tot2 / cnt - mean * mean, f(0))


@pytest.mark.parametrize("loc,scale", [(0.0, 1.0), (3.0, 0.5), (1e4, 0.01)])
def test_keras_sync_is_keras_float32_arithmetic(loc, scale):
    xs, shards = _shards((7, 300, 1, 64), loc, scale, seed=2)
    mean, var = _keras_from_raw(xs)
    r = stats.merge(shards, "keras_sync")
    e2 = float((mean.astype(np.float64) ** 2).max()) + float(var.max())
    assert_close(r.mean, mean, "mean", np.float32, "merge")
    assert_close(r.variance, var, "variance", np.float32, "merge", scale=e2)


def test_count_weighted_merges_are_exact_on_uneven_shards_and_flax_is_not():
    xs, shards = _shards((1, 1000), seed=4)
    for method in ("exact", "keras_sync", "torch_sync"):
        r = stats.merge(shards, method)
        assert _small(r.variance_error) and _small(r.mean_error), r
    flax = stats.merge(shards, "flax_pmean")
    # pmean weights each replica equally: the mean is the plain average of the replicas' means
    expected = (xs[0].astype(np.float64).mean(0) + xs[1].astype(np.float64).mean(0)) / 2
    assert_close(flax.mean, expected, "mean", np.float32, "merge")
    assert flax.mean_error > 0.05 and flax.variance_error > 0.05, flax


def test_float64_emulations_equal_the_exact_merge_on_equal_shards():
    _, shards = _shards((50, 50, 50), loc=1.0, seed=6, dtype=np.float64)
    for method in stats.METHODS:
        r = stats.merge(shards, method, dtype="float64")
        assert _small(r.mean_error, "float64") and _small(r.variance_error, "float64"), r


def test_large_offsets_break_the_sum_of_squares_merges_not_torch():
    _, shards = _shards((4096,) * 4, loc=1e6, scale=1.0, seed=7)
    for method in ("keras_sync", "flax_pmean"):
        assert stats.merge(shards, method).variance_error > 0.5
    assert _small(stats.merge(shards, "torch_sync").variance_error, output="torch_sync_offset")
    assert stats.merge(shards, "exact").variance_error == 0.0


def test_torch_loses_variances_far_below_epsilon():
    _, shards = _shards((4096,) * 4, loc=0.0, scale=1e-5, seed=8)  # var 1e-10, eps 1e-5
    torch = stats.merge(shards, "torch_sync", epsilon=1e-5)
    keras = stats.merge(shards, "keras_sync")
    assert torch.variance_error > 1e-3 and _small(keras.variance_error)  # torch loses it, keras does not
    # with a smaller epsilon the round trip (1/invstd)^2 - eps keeps the variance
    assert _small(stats.merge(shards, "torch_sync", epsilon=1e-12).variance_error)


def test_empty_replicas():
    xs, shards = _shards((3, 5, 0), seed=9)
    nonempty = stats.merge(shards[:2], "exact")
    for method in ("keras_sync", "torch_sync", "exact"):
        r = stats.merge(shards, method)
        assert r.count == 8 and _small(r.variance_error), r
        assert_close(r.variance, nonempty.variance, "variance", np.float32, "merge")
    flax = stats.merge(shards, "flax_pmean")  # jnp.mean of no values is NaN, and pmean spreads it
    assert np.isnan(flax.mean).all() and flax.variance_error == float("inf")


def test_merge_error_table_shows_each_failure_mode():
    rows = {(r["case"], r["method"]): r for r in stats.merge_error_table()}
    cases = sorted({c for c, _ in rows})
    assert len(cases) == 6 and len(rows) == 6 * len(stats.METHODS)
    for c in cases:
        assert _small(rows[(c, "exact")]["variance_error"], "float64")
    offset = [c for c in cases if c.startswith("N(1e6")][0]
    assert rows[(offset, "keras_sync")]["variance_error"] > 0.5
    assert _small(rows[(offset, "torch_sync")]["variance_error"], output="torch_sync_offset")
    uneven = [c for c in cases if "1 + 1000" in c][0]
    assert rows[(uneven, "flax_pmean")]["mean_error"] > 0.05


# -- bad input -------------------------------------------------------------------------------
@pytest.mark.parametrize("args,exc,match", [
    ((-1, [0.0], [0.0]), ValueError, "count: expected a non-negative integer"),
    ((True, [0.0], [0.0]), TypeError, "count"),
    ((2.0, [0.0], [0.0]), TypeError, "count"),
    ((2, [0.0, 1.0], [0.0]), ValueError, "m2: expected 2 values"),
    ((2, [[0.0]], [[0.0]]), ValueError, "mean: expected a 1-D array"),
    ((2, [0.0], [-1.0]), ValueError, "m2: expected sums of squares >= 0"),
    ((0, [1.0], [0.0]), ValueError, "count is 0"),
    ((2, ["a"], [0.0]), TypeError, "mean"),
])
def test_bad_moments(args, exc, match):
    with pytest.raises(exc, match=match):
        Moments(*args)


def test_bad_merges_change_nothing():
    a = Moments.from_array(make_x((4, 3), np.float64))
    mean, m2 = a.mean.copy(), a.m2.copy()
    with pytest.raises(ValueError, match="other: expected 3 channels, got 2"):
        a.merge(Moments.from_array(make_x((4, 2), np.float64)))
    with pytest.raises(TypeError, match="other: expected a Moments"):
        a + 1.0
    assert np.array_equal(a.mean, mean) and np.array_equal(a.m2, m2)
    with pytest.raises(ValueError, match="method: expected one of"):
        stats.merge([a], "horovod")
    with pytest.raises(ValueError, match="dtype: expected float32 or float64"):
        stats.merge([a], "keras_sync", dtype="float16")
    with pytest.raises(ValueError, match="shards: expected at least one"):
        stats.merge([], "exact")
    with pytest.raises(TypeError, match=r"shards\[1\]: expected a Moments"):
        stats.merge([a, np.zeros(3)], "exact")
    with pytest.raises(TypeError, match="single Moments"):
        stats.merge(a, "exact")
    with pytest.raises(ValueError, match="epsilon"):
        stats.merge([a], "torch_sync", epsilon=0.0)
    with pytest.raises(ValueError, match="axis, data_format: expected one of them"):
        Moments.from_array(make_x((4, 3), np.float64), axis=1, data_format="NC")
    with pytest.raises(TypeError, match="x: expected dtype"):
        Moments.from_array(np.ones((4, 3), np.int32))
    with pytest.raises(ValueError, match="backend"):
        Moments.from_array(make_x((4, 3), np.float64), backend="cuda")
    with pytest.raises(ValueError, match="workers: expected at least 1"):
        stats.moments_of_shards([make_x((4, 3), np.float64)], workers=0)
    with pytest.raises(ValueError, match="no shards"):
        stats.moments_of_shards([])
