"""refbn's ops against independent float64 closed forms, for every backend, layout and dtype."""
import numpy as np
import pytest

import closed_form as cf
import refbn
from conftest import DTYPES, LAYOUTS, channel_params, context, make_x
from refbn import dtypes
from refbn.testing import assert_close

EPS = 1e-3


def _stats_dt(x_dtype):
    return dtypes.stats_dtype(x_dtype)


@pytest.mark.parametrize("data_format", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtypes.short_name)
@pytest.mark.parametrize("factor", [1.0, 0.6])
def test_training_forward_matches_closed_form(backend, data_format, dtype, factor):
    shape, axis = LAYOUTS[data_format]
    x = make_x(shape, dtype)
    scale, offset, old_mean, old_var = channel_params(shape[axis])
    r = refbn.raw_ops.FusedBatchNormV3(x, scale, offset, old_mean, old_var, epsilon=EPS,
                                       exponential_avg_factor=factor, data_format=data_format,
                                       is_training=True, backend=backend)
    y, mean, var, unbiased = cf.train_forward(x, axis, scale, offset, EPS)
    ctx, sdt = context(backend), _stats_dt(dtype)
    assert r.y.dtype == dtype and r.y.shape == x.shape
    assert r.batch_mean.dtype == sdt and r.reserve_space_2.dtype == sdt
    assert r.reserve_space_3.shape == (0,)
    what = f"{data_format} {dtypes.short_name(dtype)} f={factor}"
    assert_close(r.y, y, "y", dtype, ctx, what=what)
    assert_close(r.reserve_space_1, mean, "reserve_space_1", sdt, ctx, what=what)
    assert_close(r.reserve_space_2, var, "reserve_space_2", sdt, ctx, what=what)
    want_mean = (1 - factor) * old_mean.astype(np.float64) + factor * mean
    want_var = (1 - factor) * old_var.astype(np.float64) + factor * unbiased
    assert_close(r.batch_mean, want_mean, "batch_mean", sdt, ctx, what=what)
    assert_close(r.batch_variance, want_var, "batch_variance", sdt, ctx, what=what)


@pytest.mark.parametrize("data_format", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtypes.short_name)
def test_inference_forward_matches_closed_form(backend, data_format, dtype):
    shape, axis = LAYOUTS[data_format]
    x = make_x(shape, dtype, seed=3)
    scale, offset, mean, var = channel_params(shape[axis], seed=4)
    r = refbn.raw_ops.FusedBatchNormV3(x, scale, offset, mean, var, epsilon=EPS, data_format=data_format,
                                       is_training=False, backend=backend)
    y = cf.infer_forward(x, axis, scale, offset, mean, var, EPS)
    assert_close(r.y, y, "y", dtype, context(backend), what=data_format)
    np.testing.assert_array_equal(r.batch_mean, mean.astype(_stats_dt(dtype)))
    np.testing.assert_array_equal(r.batch_variance, var.astype(_stats_dt(dtype)))


@pytest.mark.parametrize("data_format", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtypes.short_name)
@pytest.mark.parametrize("is_training", [True, False], ids=["train", "infer"])
def test_backward_matches_closed_form(backend, data_format, dtype, is_training):
    shape, axis = LAYOUTS[data_format]
    x = make_x(shape, dtype, seed=5)
    dy = make_x(shape, dtype, seed=6, loc=0.0, scale=1.0)
    scale, _, pop_mean, pop_var = channel_params(shape[axis], seed=7)
    if is_training:
        fwd = refbn.raw_ops.FusedBatchNormV3(x, scale, np.zeros_like(scale), [], [], epsilon=EPS,
                                             data_format=data_format)
        r1, r2 = fwd.reserve_space_1, fwd.reserve_space_2
        dx, dscale, doffset = cf.train_backward(dy, x, axis, scale, EPS)
    else:
        r1, r2 = pop_mean, pop_var
        dx, dscale, doffset = cf.infer_backward(dy, x, axis, scale, pop_mean, pop_var, EPS)
    g = refbn.raw_ops.FusedBatchNormGradV3(dy, x, scale, r1, r2, np.zeros(0, np.float32), epsilon=EPS,
                                           data_format=data_format, is_training=is_training,
                                           backend=backend)
    sdt, ctx = _stats_dt(dtype), context(backend)
    assert g.x_backprop.dtype == dtype and g.scale_backprop.dtype == sdt
    what = f"{data_format} {'train' if is_training else 'infer'}"
    if dtype != dtypes.float64:
        # The closed form takes float32-rounded statistics in low precision as refbn does.
        dx, dscale, doffset = _closed_backward_from_stats(dy, x, axis, scale, r1, r2, is_training)
    assert_close(g.x_backprop, dx, "x_backprop", dtype, ctx, what=what)
    assert_close(g.scale_backprop, dscale, "scale_backprop", sdt, ctx, what=what)
    assert_close(g.offset_backprop, doffset, "offset_backprop", sdt, ctx, what=what)


def _closed_backward_from_stats(dy, x, axis, scale, mean, var, is_training):
    """Closed-form gradient given the (rounded) statistics the op receives."""
    x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
    axes = tuple(i for i in range(x.ndim) if i != axis)
    shape = [1] * x.ndim
    shape[axis] = -1
    n = x.size // x.shape[axis]
    m = np.asarray(mean, np.float64).reshape(shape)
    r = (1.0 / np.sqrt(np.asarray(var, np.float64) + EPS)).reshape(shape)
    s = np.asarray(scale, np.float64).reshape(shape)
    xhat = (x64 - m) * r
    dbeta = dy64.sum(axis=axes)
    dgamma = (dy64 * xhat).sum(axis=axes)
    if is_training:
        dx = s * r * (dy64 - dbeta.reshape(shape) / n - xhat * dgamma.reshape(shape) / n)
    else:
        dx = s * r * dy64
    return dx, dgamma, dbeta


@pytest.mark.parametrize("is_training", [True, False], ids=["train", "infer"])
@pytest.mark.parametrize("data_format", ["NHWC", "NCHW", "NC"])
def test_backward_matches_finite_differences(backend, is_training, data_format):
    """Central differences of the float64 forward pass. In inference the statistics are
    constants, so the gradient ignores their dependence on x (which the FD also does)."""
    shape = {"NHWC": (2, 2, 3, 3), "NCHW": (2, 3, 2, 2), "NC": (5, 3)}[data_format]
    axis = LAYOUTS[data_format][1]
    rng = np.random.default_rng(11)
    x = rng.normal(1.0, 2.0, shape)
    w = rng.normal(0.0, 1.0, shape)  # loss = sum(w * y), so dy = w
    scale, offset, pop_mean, pop_var = (v.astype(np.float64) for v in channel_params(shape[axis], 12))

    def loss(xv, sv, ov):
        if is_training:
            y = refbn.raw_ops.FusedBatchNormV3(xv, sv, ov, [], [], epsilon=EPS, data_format=data_format).y
        else:
            y = refbn.raw_ops.FusedBatchNormV3(xv, sv, ov, pop_mean, pop_var, epsilon=EPS,
                                               data_format=data_format, is_training=False).y
        return float(np.sum(w * y))

    def fd(f, v):
        g = np.zeros_like(v)
        for i in np.ndindex(v.shape):
            h = np.cbrt(np.finfo(np.float64).eps) * max(1.0, abs(v[i]))
            vp, vm = v.copy(), v.copy()
            vp[i] += h
            vm[i] -= h
            g[i] = (f(vp) - f(vm)) / (2 * h)
        return g

    if is_training:
        fwd = refbn.raw_ops.FusedBatchNormV3(x, scale, offset, [], [], epsilon=EPS, data_format=data_format)
        r1, r2 = fwd.reserve_space_1, fwd.reserve_space_2
    else:
        r1, r2 = pop_mean, pop_var
    g = refbn.raw_ops.FusedBatchNormGradV3(w, x, scale, r1, r2, [], epsilon=EPS, data_format=data_format,
                                           is_training=is_training, backend=backend)
    ctx = "finite_difference"
    assert_close(g.x_backprop, fd(lambda v: loss(v, scale, offset), x), "x_backprop", np.float64, ctx)
    assert_close(g.scale_backprop, fd(lambda v: loss(x, v, offset), scale), "scale_backprop", np.float64, ctx)
    assert_close(g.offset_backprop, fd(lambda v: loss(x, scale, v), offset), "offset_backprop",
                 np.float64, ctx)


def test_single_value_per_channel_gives_zero_unbiased_variance(backend):
    x = make_x((1, 1, 1, 4), np.float32)
    r = refbn.raw_ops.FusedBatchNormV3(x, np.ones(4), np.zeros(4), [], [], backend=backend)
    assert np.all(r.batch_variance == 0) and np.all(r.reserve_space_2 == 0)
    np.testing.assert_array_equal(r.batch_mean, x.reshape(4))
    np.testing.assert_array_equal(r.y, np.zeros_like(x))  # (x - mean) = 0 exactly, offset 0


def test_fused_batch_norm_matches_raw_op(backend):
    x = make_x((3, 4, 5, 2), np.float32)
    scale, offset, mean, var = channel_params(2)
    y, m, v = refbn.fused_batch_norm(x, scale, offset, backend=backend)
    r = refbn.raw_ops.FusedBatchNormV3(x, scale, offset, [], [], epsilon=0.001, backend=backend)
    np.testing.assert_array_equal(y, r.y)
    np.testing.assert_array_equal(m, r.batch_mean)
    np.testing.assert_array_equal(v, r.batch_variance)
    y2, m2, v2 = refbn.fused_batch_norm(x, scale, offset, mean, var, is_training=False, backend=backend)
    r2 = refbn.raw_ops.FusedBatchNormV3(x, scale, offset, mean, var, epsilon=0.001, is_training=False,
                                        backend=backend)
    np.testing.assert_array_equal(y2, r2.y)
    with pytest.raises(ValueError, match=r"mean: expected a 1-D array .* when is_training is False"):
        refbn.fused_batch_norm(x, scale, offset, is_training=False)


def test_defaults_match_tf_signatures():
    import inspect
    p = inspect.signature(refbn.raw_ops.FusedBatchNormV3).parameters
    assert [k for k in p][:10] == ["x", "scale", "offset", "mean", "variance", "epsilon",
                                   "exponential_avg_factor", "data_format", "is_training", "name"]
    assert p["epsilon"].default == 0.0001 and p["exponential_avg_factor"].default == 1.0
    assert p["data_format"].default == "NHWC" and p["is_training"].default is True
    g = inspect.signature(refbn.raw_ops.FusedBatchNormGradV3).parameters
    assert list(g)[:10] == ["y_backprop", "x", "scale", "reserve_space_1", "reserve_space_2",
                            "reserve_space_3", "epsilon", "data_format", "is_training", "name"]
    f = inspect.signature(refbn.fused_batch_norm).parameters
    assert list(f)[:10] == ["x", "scale", "offset", "mean", "variance", "epsilon", "data_format",
                            "is_training", "name", "exponential_avg_factor"]
    assert f["epsilon"].default == 0.001
    assert refbn.raw_ops.FusedBatchNormV3Output._fields == (
        "y", "batch_mean", "batch_variance", "reserve_space_1", "reserve_space_2", "reserve_space_3")
    assert refbn.raw_ops.FusedBatchNormGradV3Output._fields == (
        "x_backprop", "scale_backprop", "offset_backprop", "reserve_space_4", "reserve_space_5")


def test_inputs_are_never_modified_and_out_is_written(backend):
    x = make_x((2, 3, 4, 3), np.float32)
    scale, offset, mean, var = channel_params(3)
    dy = make_x(x.shape, np.float32, seed=9)
    keep = [a.copy() for a in (x, scale, offset, mean, var, dy)]
    out = np.empty_like(x)
    r = refbn.raw_ops.FusedBatchNormV3(x, scale, offset, mean, var, exponential_avg_factor=0.3,
                                       backend=backend, out=out)
    assert r.y is out or np.shares_memory(r.y, out)
    refbn.raw_ops.FusedBatchNormV3(x, scale, offset, mean, var, is_training=False, backend=backend)
    dx_out = np.empty_like(x)
    g = refbn.raw_ops.FusedBatchNormGradV3(dy, x, scale, r.reserve_space_1, r.reserve_space_2, [],
                                           backend=backend, out=dx_out)
    assert np.shares_memory(g.x_backprop, dx_out)
    for a, k in zip((x, scale, offset, mean, var, dy), keep):
        np.testing.assert_array_equal(a, k)
    # the result in out= equals a freshly allocated result
    np.testing.assert_array_equal(out, refbn.raw_ops.FusedBatchNormV3(
        x, scale, offset, mean, var, exponential_avg_factor=0.3, backend=backend).y)


def test_trace_names_and_explanation(backend):
    x = make_x((2, 2, 2, 3), np.float32)
    scale, offset, mean, var = channel_params(3)
    r = refbn.raw_ops.FusedBatchNormV3(x, scale, offset, mean, var, exponential_avg_factor=0.5,
                                       backend=backend, trace=True)
    tr = r.trace
    for name in ("reduction_axes", "n", "batch_mean", "x_centered", "biased_variance", "bessel_factor",
                 "unbiased_variance", "inv_std", "x_hat", "y", "decay", "moving_mean_before",
                 "moving_mean_update_delta", "moving_mean_after", "moving_variance_before",
                 "moving_variance_after"):
        assert name in tr, name
    assert tr["reduction_axes"] == (0, 1, 2) and tr["n"] == 8
    assert tr["bessel_factor"] == 8 / 7
    np.testing.assert_array_equal(tr["y"], r.y)
    np.testing.assert_array_equal(tr["unbiased_variance"], tr["biased_variance"] * tr["bessel_factor"])
    # update_delta = (variable - value) * decay, and after = before - update_delta
    np.testing.assert_array_equal(tr["moving_mean_update_delta"],
                                  (tr["moving_mean_before"] - tr["moving_mean_value"]) * tr["decay"])
    np.testing.assert_array_equal(tr["moving_mean_after"],
                                  tr["moving_mean_before"] - tr["moving_mean_update_delta"])
    text = tr.explain()
    for step in ("_fused_batch_norm_training", "update_delta", "moving_mean", "batch_mean", "inv_std"):
        assert step in text
    assert str(tr) == text
    inf = refbn.trace(refbn.raw_ops.FusedBatchNormV3, x, scale, offset, mean, var, is_training=False,
                      backend=backend)
    assert "_fused_batch_norm_inference" in inf.explain() and "moving_variance" in inf
    g = refbn.raw_ops.FusedBatchNormGradV3(x, x, scale, r.reserve_space_1, r.reserve_space_2, [],
                                           backend=backend, trace=True).trace
    for name in ("dx_term_dy", "dx_term_mean_dy", "dx_term_x_hat", "dx", "dgamma", "dbeta"):
        assert name in g
    # dx (float32) is the float64 sum of its three terms, rounded once
    assert_close(g["dx"], g["dx_term_dy"] + g["dx_term_mean_dy"] + g["dx_term_x_hat"], "x_backprop",
                 np.float32, context(backend))
