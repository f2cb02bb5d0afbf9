"""Hypothesis properties of the reference (float64, so the properties hold to round-off)."""
import numpy as np
from hypothesis import given, settings, strategies as st

import refbn
from conftest import BACKENDS
from refbn.testing import assert_close

EPS = 1e-3
shapes4 = st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(1, 4), st.integers(1, 4)).filter(
    lambda s: s[0] * s[1] * s[2] >= 2)
backends = st.sampled_from(BACKENDS)


def _data(shape, seed):
    rng = np.random.default_rng(seed)
    return rng.normal(0.5, 1.5, shape), rng.normal(0.0, 1.0, shape)


@settings(max_examples=40, deadline=None)
@given(shape=shapes4, seed=st.integers(0, 2**31), backend=backends)
def test_training_gradient_is_orthogonal_to_one_and_x_hat(shape, seed, backend):
    """sum(dx) = 0 and sum(dx * x_hat) = 0 per channel: the training gradient cannot move
    the batch mean or the batch variance of x_hat.  The second identity is exact only for
    epsilon -> 0 (its residual is proportional to eps / (var + eps)), so this uses an epsilon
    that vanishes next to the variance in float64 (var + 1e-30 == var)."""
    tiny_eps = 1e-30
    x, dy = _data(shape, seed)
    c = shape[-1]
    scale = np.linspace(0.5, 2.0, c)
    fwd = refbn.raw_ops.FusedBatchNormV3(x, scale, np.zeros(c), [], [], epsilon=tiny_eps, trace=True)
    g = refbn.raw_ops.FusedBatchNormGradV3(dy, x, scale, fwd.reserve_space_1, fwd.reserve_space_2, [],
                                           epsilon=tiny_eps, backend=backend, trace=True)
    x_hat = fwd.trace["x_hat"]
    dx = g.x_backprop
    axes = (0, 1, 2)
    # Judge each sum against the size of the three terms of dx that cancel in it (dx itself
    # can be pure round-off, e.g. dx == 0 exactly when n == 2).
    terms = sum(np.abs(g.trace[k]) for k in ("dx_term_dy", "dx_term_mean_dy", "dx_term_x_hat"))
    assert_close(dx.sum(axis=axes), np.zeros(c), "x_backprop", np.float64, scale=terms.sum())
    assert_close((dx * x_hat).sum(axis=axes), np.zeros(c), "x_backprop", np.float64,
                 scale=(terms * np.abs(x_hat)).sum())


@settings(max_examples=40, deadline=None)
@given(shape=shapes4, seed=st.integers(0, 2**31), shift=st.lists(st.integers(-64, 64), min_size=4,
                                                                  max_size=4), backend=backends)
def test_y_is_invariant_to_a_per_channel_shift(shape, seed, shift, backend):
    """y(x + s_c) == y(x). x lies on a dyadic grid so x + s is exact and the sums are exact."""
    rng = np.random.default_rng(seed)
    x = rng.integers(-512, 512, shape) / 256.0
    c = shape[-1]
    s = np.asarray(shift[:c], np.float64)
    scale, offset = np.linspace(0.5, 2.0, c), np.linspace(-1, 1, c)
    y0 = refbn.raw_ops.FusedBatchNormV3(x, scale, offset, [], [], epsilon=EPS, backend=backend).y
    y1 = refbn.raw_ops.FusedBatchNormV3(x + s, scale, offset, [], [], epsilon=EPS, backend=backend).y
    assert_close(y1, y0, "y", np.float64)


_PAIRS = {  # channels-last format, channels-first format, permutation last -> first
    4: ("NHWC", "NCHW", (0, 3, 1, 2)),
    5: ("NDHWC", "NCDHW", (0, 4, 1, 2, 3)),
}


@settings(max_examples=40, deadline=None)
@given(rank=st.sampled_from([4, 5]), dims=st.lists(st.integers(1, 3), min_size=5, max_size=5),
       seed=st.integers(0, 2**31), is_training=st.booleans(), backend=backends)
def test_layouts_agree_after_transposition(rank, dims, seed, is_training, backend):
    last, first, perm = _PAIRS[rank]
    shape = tuple(dims[:rank - 1]) + (dims[-1] + 1,)
    rng = np.random.default_rng(seed)
    x = rng.normal(1.0, 2.0, shape).astype(np.float32)
    dy = rng.normal(0.0, 1.0, shape).astype(np.float32)
    c = shape[-1]
    scale, offset = np.linspace(0.5, 2, c).astype(np.float32), np.linspace(-1, 1, c).astype(np.float32)
    mean, var = np.linspace(-1, 1, c).astype(np.float32), np.linspace(0.5, 2, c).astype(np.float32)
    xt, dyt = np.transpose(x, perm), np.transpose(dy, perm)
    a = refbn.raw_ops.FusedBatchNormV3(x, scale, offset, mean, var, data_format=last, is_training=is_training,
                                       backend=backend)
    b = refbn.raw_ops.FusedBatchNormV3(xt, scale, offset, mean, var, data_format=first,
                                       is_training=is_training, backend=backend)
    assert_close(np.transpose(a.y, perm), b.y, "y", np.float32, what=f"{last} vs {first}")
    for name in ("batch_mean", "batch_variance", "reserve_space_1", "reserve_space_2"):
        assert_close(getattr(a, name), getattr(b, name), name, np.float32)
    ga = refbn.raw_ops.FusedBatchNormGradV3(dy, x, scale, a.reserve_space_1, a.reserve_space_2, [],
                                            data_format=last, is_training=is_training, backend=backend)
    gb = refbn.raw_ops.FusedBatchNormGradV3(dyt, xt, scale, a.reserve_space_1, a.reserve_space_2, [],
                                            data_format=first, is_training=is_training, backend=backend)
    assert_close(np.transpose(ga.x_backprop, perm), gb.x_backprop, "x_backprop", np.float32)
    assert_close(ga.scale_backprop, gb.scale_backprop, "scale_backprop", np.float32)
    assert_close(ga.offset_backprop, gb.offset_backprop, "offset_backprop", np.float32)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(2, 40), c=st.integers(1, 4), seed=st.integers(0, 2**31), backend=backends)
def test_2d_nc_equals_nhwc_with_unit_spatial_dims(n, c, seed, backend):
    x = np.random.default_rng(seed).normal(0, 3, (n, c))
    one = np.ones(c)
    a = refbn.raw_ops.FusedBatchNormV3(x, one, 0 * one, [], [], data_format="NC", backend=backend)
    b = refbn.raw_ops.FusedBatchNormV3(x.reshape(n, 1, 1, c), one, 0 * one, [], [], backend=backend)
    assert_close(a.y, b.y.reshape(n, c), "y", np.float64)
