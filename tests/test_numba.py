"""The numba backend against the truth: refbn.reference (float64, whole arrays) and
independent float64 sums, never against the numpy backend.  Accuracy goals of issue 4, both
builds (serial and parallel), every layout and dtype, out=, non-finite data, determinism, the
trace not changing the outputs, and the compiled cache following the maths' source."""
import numpy as np
import pytest

import refbn
from refbn import dtypes, reference
from refbn.backends import numba_kernels as nk
from refbn.layout import Layout
from refbn.testing import assert_close, compare

from conftest import DTYPES, make_x

EPS = 1e-3
EMPTY = np.zeros(0, np.float32)
# one shape per layout, large enough (>= 2^17 values) for the parallel build
LARGE = {"NC": (4099, 40), "NHWC": (5, 33, 35, 24), "NCHW": (5, 24, 33, 35), "NDHWC": (2, 6, 17, 19, 40),
         "NCDHW": (2, 40, 6, 17, 19)}


def truth_moments(x, axis):
    """Float64 mean and biased variance, two passes with numpy's pairwise sums per channel."""
    x = np.moveaxis(np.asarray(x, np.float64), axis, -1).reshape(-1, x.shape[axis])
    cols = np.ascontiguousarray(x.T)
    mean = np.array([np.sum(c) for c in cols]) / cols.shape[1]
    var = np.array([np.sum((c - m) ** 2) for c, m in zip(cols, mean)]) / cols.shape[1]
    return mean, var


def truth_fwd(x, scale, offset, eps, data_format, mean=None, var=None):
    """refbn.reference's forward outputs (float64), by TF's output names."""
    axis = Layout.from_data_format(x.shape, data_format).axis
    if mean is None:
        y, m, v = reference.forward_training(x, scale, offset, eps, axis)
        n = reference.count(x, axis)
        return {"y": y, "batch_mean": m, "reserve_space_1": m, "reserve_space_2": v,
                "batch_variance": v * reference.bessel_factor(n)}
    return {"y": reference.forward_inference(x, scale, offset, mean, var, eps, axis)}


def truth_grad(dy, x, scale, mean, var, eps, data_format, training):
    axis = Layout.from_data_format(x.shape, data_format).axis
    dx, ds, do = reference.backward(dy, x, scale, np.asarray(mean, np.float64), np.asarray(var, np.float64),
                                    eps, training, axis)
    return {"x_backprop": dx, "scale_backprop": ds, "offset_backprop": do}


def _params(c, seed=2):
    rng = np.random.default_rng(seed)
    return rng.uniform(0.5, 2.0, c).astype(np.float32), rng.normal(0, 1, c).astype(np.float32)


# -- accuracy goals ---------------------------------------------------------------------------
@pytest.mark.parametrize("loc, std, n, c", [
    (1e4, 0.01, 65536, 4),     # TF: relative error 19 (oneDNN), 2e-5 (Eigen)
    (1e6, 1.0, 65536, 4),      # TF: 3e4 .. 4e4
    (0.0, 1.0, 2 ** 24, 1),    # TF: 3e-2 at n = 2^24
    (100.0, 1.0, 2 ** 20, 1),  # TF: 3e2 at n = 2^24; 2^20 keeps the test quick
], ids=["N(1e4,0.01^2)", "N(1e6,1)", "N(0,1) n=2^24", "N(100,1) n=2^20"])
def test_variance_of_offset_and_long_data_is_accurate(loc, std, n, c):
    """Issue 4 asks for a relative error of the biased variance <= 1e-6 where TF's float32
    sums reach 19 to 4e4: the float32 output is within the declared numba tolerance of the
    float64 truth (1 ulp, ~1.2e-7), and the kernel's float64 moments far closer."""
    x = (loc + std * np.random.default_rng(7).standard_normal((n, c))).astype(np.float32)
    mean, var = truth_moments(x, 1)
    r = refbn.raw_ops.FusedBatchNormV3(x.reshape(n, 1, 1, c), np.ones(c, np.float32), np.zeros(c, np.float32),
                                       [], [], epsilon=EPS, backend="numba")
    assert_close(r.reserve_space_2, var, "reserve_space_2", np.float32, "numba")
    assert_close(r.reserve_space_1, mean, "reserve_space_1", np.float32, "numba")
    m64, v64 = nk.moments(x.reshape(n, c, 1))
    assert_close(v64, var, "variance", np.float64, "numba_moments")
    assert_close(m64, mean, "mean", np.float64, "numba_moments", scale=float(np.abs(x).mean()))


def test_first_value_outlier_keeps_the_cancellation_bounded():
    """The shift is the channel's first value; even when that value is a far outlier the
    cancellation factor is at most n, so the variance stays within the float64 tolerance."""
    x = np.random.default_rng(3).standard_normal((50000, 3)).astype(np.float32)
    x[0] = [1e6, -3e5, 40.0]
    mean, var = truth_moments(x, 1)
    m64, v64 = nk.moments(x.reshape(50000, 3, 1))
    assert_close(v64, var, "variance_outlier_first", np.float64, "numba_moments")


# -- every layout and dtype, both builds ----------------------------------------------------------
@pytest.mark.parametrize("data_format", LARGE)
def test_parallel_build_matches_the_closed_form_in_every_layout(data_format):
    shape = LARGE[data_format]
    assert np.prod(shape) >= nk._PARALLEL_MIN_VALUES
    layout = Layout.from_data_format(shape, data_format)
    x = make_x(shape, np.float32, seed=1, loc=3.0, scale=2.0)
    dy = make_x(shape, np.float32, seed=2, loc=0.0, scale=1.0)
    scale, offset = _params(layout.channels)
    r = refbn.raw_ops.FusedBatchNormV3(x, scale, offset, [], [], epsilon=EPS, data_format=data_format,
                                       backend="numba")
    ref = truth_fwd(x, scale, offset, EPS, data_format)
    for name in ("y", "batch_mean", "batch_variance", "reserve_space_1", "reserve_space_2"):
        assert_close(getattr(r, name), ref[name], name, np.float32, "numba", what=data_format)
    g = refbn.raw_ops.FusedBatchNormGradV3(dy, x, scale, r.reserve_space_1, r.reserve_space_2, [], epsilon=EPS,
                                           data_format=data_format, backend="numba")
    g0 = truth_grad(dy, x, scale, r.reserve_space_1, r.reserve_space_2, EPS, data_format, True)
    for name in ("x_backprop", "scale_backprop", "offset_backprop"):
        assert_close(getattr(g, name), g0[name], name, np.float32, "numba", what=data_format)


@pytest.mark.parametrize("shape", [(1031, 200), (2051, 100), (1027, 130)], ids=str)
def test_wide_and_narrow_row_walks_match_the_closed_form(shape):
    """Channels-last rows wider than nk._NARROW_WIDTH are reduced one row at a time, narrower
    ones four rows at a time with prefetching (moments); row counts not divisible by 4 and
    widths on both sides of the limit, all in the parallel build."""
    assert np.prod(shape) >= nk._PARALLEL_MIN_VALUES
    x = make_x(shape, np.float32, seed=21, loc=5.0, scale=0.5)
    dy = make_x(shape, np.float32, seed=22, loc=0.0, scale=1.0)
    mean, var = truth_moments(x, 1)
    m64, v64 = nk.moments(x.reshape(shape[0], shape[1], 1))
    assert_close(m64, mean, "mean", np.float64, "numba_moments", what=str(shape))
    assert_close(v64, var, "variance", np.float64, "numba_moments", what=str(shape))
    # the gradient's two sums, read off a float64 backward (dscale = sum(dy*(x-mean))*inv_std, doffset = sum(dy))
    x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
    g = refbn.raw_ops.FusedBatchNormGradV3(dy64, x64, np.ones(shape[1]), mean, var, [], epsilon=EPS,
                                           data_format="NC", backend="numba")
    istd = 1.0 / np.sqrt(var + EPS)
    assert_close(g.offset_backprop, dy64.sum(axis=0), "sum_dy", np.float64, "numba_moments", what=str(shape),
                 scale=np.abs(dy64).sum(axis=0))
    assert_close(g.scale_backprop, (dy64 * (x64 - mean)).sum(axis=0) * istd, "sum_dy_xc", np.float64,
                 "numba_moments", what=str(shape), scale=np.abs(dy64 * (x64 - mean)).sum(axis=0) * istd)


_TRACE_CASES = [("NHWC", (5, 33, 35, 24), np.float32), ("NCHW", (5, 24, 33, 35), np.float32),
                ("NC", (1001, 3), np.float32), ("NHWC", (2, 5, 6, 7), dtypes.bfloat16),
                ("NCHW", (2, 7, 5, 6), np.float16), ("NC", (3, 300), np.float64)]


@pytest.mark.parametrize("backend", ["numpy", "numba"])
@pytest.mark.parametrize("data_format, shape, dtype", _TRACE_CASES,
                         ids=[f"{f}-{'x'.join(map(str, s))}-{np.dtype(d).name}" for f, s, d in _TRACE_CASES])
def test_a_trace_never_changes_the_outputs(data_format, shape, dtype, backend):
    """One orchestration: the same backend code computes the outputs whether or not a trace is
    recorded (the trace adds refbn.reference's intermediates beside them), so every output is
    bit-identical with and without trace=True."""
    layout = Layout.from_data_format(shape, data_format)
    x = make_x(shape, dtype, seed=31, loc=1.5, scale=2.0)
    dy = make_x(shape, dtype, seed=32)
    scale, offset = _params(layout.channels)
    mean, var = (np.abs(v) for v in _params(layout.channels, seed=33))
    kw = dict(epsilon=EPS, data_format=data_format, backend=backend)
    for training, stats in ((True, ([], [])), (False, (mean, var))):
        one = refbn.raw_ops.FusedBatchNormV3(x, scale, offset, *stats, is_training=training, **kw)
        traced = refbn.raw_ops.FusedBatchNormV3(x, scale, offset, *stats, is_training=training, trace=True, **kw)
        for name in ("y", "batch_mean", "batch_variance", "reserve_space_1", "reserve_space_2"):
            a, b = getattr(one, name), getattr(traced, name)
            assert a.dtype == b.dtype and np.array_equal(a, b, equal_nan=True), (
                f"{name} (training={training}): trace=True changed {np.sum(a != b)} of {a.size} values")
        g1 = refbn.raw_ops.FusedBatchNormGradV3(dy, x, scale, one.reserve_space_1, one.reserve_space_2, [],
                                                is_training=training, **kw)
        g2 = refbn.raw_ops.FusedBatchNormGradV3(dy, x, scale, one.reserve_space_1, one.reserve_space_2, [],
                                                is_training=training, trace=True, **kw)
        for name in ("x_backprop", "scale_backprop", "offset_backprop"):
            a, b = getattr(g1, name), getattr(g2, name)
            assert a.dtype == b.dtype and np.array_equal(a, b, equal_nan=True), (
                f"{name} (training={training}): trace=True changed {np.sum(a != b)} of {a.size} values")
        assert np.array_equal(traced.trace["y"], traced.y, equal_nan=True)   # the trace shows the backend's y


# float64 runs the same parallel code as float32, so its parallel build (3 s of compiling) is left out
_BUILDS = [(s, d) for s in ("serial", "parallel") for d in DTYPES if not (s == "parallel" and d == dtypes.float64)]


@pytest.mark.parametrize("size, dtype", _BUILDS, ids=[f"{s}-{dtypes.short_name(d)}" for s, d in _BUILDS])
@pytest.mark.parametrize("data_format", ["NHWC", "NCHW"])
def test_every_dtype_in_both_builds_matches_the_reference(dtype, data_format, size):
    """y, the statistics and the gradients, against refbn.reference (float64)."""
    shape = LARGE[data_format] if size == "parallel" else {"NHWC": (2, 5, 6, 7), "NCHW": (2, 7, 5, 6)}[data_format]
    layout = Layout.from_data_format(shape, data_format)
    x = make_x(shape, dtype, seed=4, loc=-2.0, scale=3.0)
    dy = make_x(shape, dtype, seed=5, loc=0.0, scale=1.0)
    scale, offset = _params(layout.channels)
    sdt = dtypes.stats_dtype(dtype)
    for training in (True, False):
        args = [] if training else [np.abs(a).astype(sdt) for a in _params(layout.channels, seed=8)]
        r = refbn.raw_ops.FusedBatchNormV3(x, scale, offset, *(args or ([], [])), epsilon=EPS,
                                           data_format=data_format, is_training=training, backend="numba")
        r0 = truth_fwd(x, scale, offset, EPS, data_format, *args)
        assert r.y.dtype == dtype
        assert_close(r.y, r0["y"], "y", dtype, "numba", what=f"training={training}")
        if training:
            assert_close(r.batch_variance, r0["batch_variance"], "batch_variance", sdt, "numba")
        gm, gv = (r.reserve_space_1, r.reserve_space_2) if training else args
        g = refbn.raw_ops.FusedBatchNormGradV3(dy, x, scale, gm, gv, [], epsilon=EPS, data_format=data_format,
                                               is_training=training, backend="numba")
        g0 = truth_grad(dy, x, scale, gm, gv, EPS, data_format, training)
        for name in ("x_backprop", "scale_backprop", "offset_backprop"):
            out_dt = dtype if name == "x_backprop" else sdt
            assert_close(getattr(g, name), g0[name], name, out_dt, "numba", what=f"training={training}")


@pytest.mark.parametrize("shape", [(1001, 3), (7, 1), (130, 5, 1), (64, 1)], ids=str)
def test_few_channels_use_virtual_channels_with_a_remainder(shape):
    """Channels-last with C < 64 is processed as (rows/k, k*C); rows % k != 0 leaves a remainder."""
    fmt = {2: "NC", 3: "NWC"}[len(shape)]
    c = shape[-1]
    x = make_x(shape, np.float32, seed=6)
    scale, offset = _params(c)
    r = refbn.raw_ops.FusedBatchNormV3(x, scale, offset, [], [], epsilon=EPS, data_format=fmt, backend="numba")
    r0 = truth_fwd(x, scale, offset, EPS, fmt)
    for name in ("y", "reserve_space_1", "reserve_space_2"):
        assert_close(getattr(r, name), r0[name], name, np.float32, "numba", what=str(shape))


# -- out=, inputs untouched, non-finite data, determinism ------------------------------------
@pytest.mark.parametrize("shape, fmt", [((5, 33, 35, 24), "NHWC"), ((2, 3, 4, 5), "NCHW")], ids=["large", "small"])
def test_out_is_written_in_place_and_inputs_are_untouched(shape, fmt):
    x = make_x(shape, np.float32, seed=9)
    dy = make_x(shape, np.float32, seed=10)
    c = Layout.from_data_format(shape, fmt).channels
    scale, offset = _params(c)
    keep = x.copy(), dy.copy()
    out = np.full_like(x, np.nan)
    r = refbn.raw_ops.FusedBatchNormV3(x, scale, offset, [], [], data_format=fmt, backend="numba", out=out)
    assert r.y is out or np.shares_memory(r.y, out)
    fresh = refbn.raw_ops.FusedBatchNormV3(x, scale, offset, [], [], data_format=fmt, backend="numba")
    np.testing.assert_array_equal(out, fresh.y)
    dx = np.full_like(x, np.nan)
    g = refbn.raw_ops.FusedBatchNormGradV3(dy, x, scale, r.reserve_space_1, r.reserve_space_2, [],
                                           data_format=fmt, backend="numba", out=dx)
    assert np.shares_memory(g.x_backprop, dx)
    np.testing.assert_array_equal(x, keep[0])
    np.testing.assert_array_equal(dy, keep[1])
    # x itself as out=: y overwrites x (allowed: x was passed as out=) and equals the fresh y
    inplace = x.copy()
    refbn.raw_ops.FusedBatchNormV3(inplace, scale, offset, [], [], data_format=fmt, backend="numba", out=inplace)
    np.testing.assert_array_equal(inplace, fresh.y)
    with pytest.raises(ValueError, match="out: expected shape"):
        refbn.raw_ops.FusedBatchNormV3(x, scale, offset, [], [], data_format=fmt, backend="numba",
                                       out=np.empty(x.shape, np.float64))


def test_half_output_overflows_to_inf_as_the_reference_does():
    x = np.array([[0.0], [60000.0]], np.float16).repeat(3, axis=1)
    scale = np.full(3, 2.0, np.float32)
    r = refbn.raw_ops.FusedBatchNormV3(x, scale, np.zeros(3, np.float32), [0, 0, 0], [1, 1, 1], epsilon=EPS,
                                       data_format="NC", is_training=False, backend="numba")
    y0 = (x.astype(np.float64) - 0.0) * 2.0 / np.sqrt(1.0 + EPS)   # hand-derived: 0 and 1.2e5 (> 65504)
    assert np.isinf(r.y[1]).all() and np.all(r.y[0] == 0.0)
    with np.errstate(over="ignore"):
        np.testing.assert_array_equal(r.y, y0.astype(np.float16))


@pytest.mark.parametrize("size", [(6, 5, 5, 4), (90, 40, 40, 4)], ids=["serial", "parallel"])
def test_nonfinite_values_land_where_the_reference_puts_them(size):
    x = make_x(size, np.float32, seed=11)
    x[2, 1, 3, 0] = np.nan
    x[0, 0, 0, 2] = np.inf         # the shift (first value) of channel 2
    x[3, 2, 1, 3] = -np.inf
    scale, offset = _params(4)
    r = refbn.raw_ops.FusedBatchNormV3(x, scale, offset, [], [], backend="numba")
    with np.errstate(invalid="ignore"):
        r0 = truth_fwd(x, scale, offset, 1e-4, "NHWC")
    for name in ("reserve_space_1", "reserve_space_2", "y"):
        c = compare(getattr(r, name), r0[name], name, np.float32, "numba")
        assert c.passed, c.message(name)
    assert np.isinf(r.reserve_space_1[2]) and np.isnan(r.reserve_space_2[2])   # Inf mean, (Inf-Inf)^2 variance
    assert np.isfinite(r.reserve_space_2[1])      # the untouched channel


def test_results_do_not_depend_on_the_thread_count():
    """Blocks, not threads, own the partial sums: 1 and 2 threads give identical bits."""
    import numba
    x = make_x((5, 33, 35, 24), np.float32, seed=12)
    scale, offset = _params(24)
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        r1 = refbn.raw_ops.FusedBatchNormV3(x, scale, offset, [], [], backend="numba")
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
        r2 = refbn.raw_ops.FusedBatchNormV3(x, scale, offset, [], [], backend="numba")
    finally:
        numba.set_num_threads(before)
    for a, b in zip(r1, r2):
        np.testing.assert_array_equal(a, b)


def test_batch_norm_layer_runs_on_the_numba_backend():
    """Three Keras-convention steps on the numba backend against the reference's moving average."""
    x = make_x((8, 4, 4, 6), np.float32, seed=13)
    a = refbn.BatchNorm(backend="numba")
    ones, zeros = np.ones(6), np.zeros(6)
    y64, m, v = reference.forward_training(x, ones, zeros, a.epsilon, 3)
    mm, mv = zeros, ones
    for _ in range(3):
        assert_close(a(x, training=True), y64, "y", np.float32, "numba")
        mm, mv = (reference.moving_average(mm, m, 0.01).astype(np.float32).astype(np.float64),
                  reference.moving_average(mv, v, 0.01).astype(np.float32).astype(np.float64))
    assert_close(a.moving_variance, mv, "moving_variance", np.float32, "numba")
    dy = make_x(x.shape, np.float32, seed=14)
    dx64 = reference.backward(dy, x, ones, m, v, a.epsilon, True, 3)[0]
    assert_close(a.backward(dy), dx64, "x_backprop", np.float32, "numba")
