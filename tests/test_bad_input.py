"""Every bad input: a clear ValueError/TypeError naming the argument and what was expected,
raised before any state changes, with the caller's arrays untouched."""
import numpy as np
import pytest

import refbn

C = 3


def _args(**over):
    rng = np.random.default_rng(0)
    a = dict(x=rng.normal(size=(2, 2, 2, C)).astype(np.float32), scale=np.ones(C, np.float32),
             offset=np.zeros(C, np.float32), mean=np.zeros(C, np.float32), variance=np.ones(C, np.float32))
    a.update(over)
    return a


FWD_CASES = [
    # (id, overrides, keyword arguments, exception, message pattern)
    ("rank", dict(x=np.ones((2, 2, C), np.float32)), {}, ValueError,
     r"x: data_format='NHWC' expects a rank-4 tensor, got rank 3"),
    ("rank-2-nhwc", dict(x=np.ones((2, C), np.float32)), {}, ValueError,
     r"expects a rank-4 tensor, got rank 2; for rank-2 input use data_format='NC'"),
    ("rank-5", {}, dict(data_format="NDHWC"), ValueError, r"x: data_format='NDHWC' expects a rank-5 tensor"),
    ("data_format", {}, dict(data_format="NHCW"), ValueError,
     r"data_format: expected one of NC, NWC, NCW, NHWC, NCHW, NDHWC, NCDHW, got 'NHCW'"),
    ("scale-length", dict(scale=np.ones(2, np.float32)), {}, ValueError,
     r"scale: expected 3 values \(one per channel of x\), got 2"),
    ("offset-length", dict(offset=np.ones(4, np.float32)), {}, ValueError, r"offset: expected 3 values"),
    ("mean-length", dict(mean=np.ones(2, np.float32)), dict(exponential_avg_factor=0.5), ValueError,
     r"mean: expected 3 values"),
    ("variance-length", dict(variance=np.ones(2, np.float32)), dict(is_training=False), ValueError,
     r"variance: expected 3 values"),
    ("scale-2d", dict(scale=np.ones((1, C), np.float32)), {}, ValueError,
     r"scale: expected a 1-D array of 3 values \(one per channel\), got shape \(1, 3\)"),
    ("int-x", dict(x=np.ones((2, 2, 2, C), np.int32)), {}, TypeError,
     r"x: expected dtype float16, bfloat16, float32 or float64, got int32 \(integer\)"),
    ("complex-x", dict(x=np.ones((2, 2, 2, C), np.complex64)), {}, TypeError,
     r"x: expected dtype .* got complex64 \(complex\)"),
    ("bool-x", dict(x=np.ones((2, 2, 2, C), bool)), {}, TypeError, r"got bool \(boolean\)"),
    ("eps-zero", {}, dict(epsilon=0.0), ValueError, r"epsilon: expected a finite number > 0, got 0.0"),
    ("eps-negative", {}, dict(epsilon=-1e-3), ValueError, r"epsilon: expected a finite number > 0"),
    ("eps-nan", {}, dict(epsilon=float("nan")), ValueError, r"epsilon: expected a finite number > 0, got nan"),
    ("eps-inf", {}, dict(epsilon=float("inf")), ValueError, r"epsilon: expected a finite number > 0"),
    ("eps-str", {}, dict(epsilon="0.1"), TypeError, r"epsilon: expected a real number, got str"),
    ("eaf-high", {}, dict(exponential_avg_factor=1.5), ValueError,
     r"exponential_avg_factor: expected a number in \[0, 1\], got 1.5"),
    ("eaf-negative", {}, dict(exponential_avg_factor=-0.1), ValueError, r"exponential_avg_factor: expected"),
    ("eaf-nan", {}, dict(exponential_avg_factor=float("nan")), ValueError,
     r"exponential_avg_factor: expected a number in \[0, 1\], got nan"),
    ("negative-variance", dict(variance=np.array([1.0, -0.5, 2.0], np.float32)), dict(is_training=False),
     ValueError, r"variance: expected every value >= 0, got \[1\]=-0.5"),
    ("nan-variance", dict(variance=np.array([1.0, 1.0, np.nan], np.float32)), dict(is_training=False),
     ValueError, r"variance: expected finite values, got \[2\]=nan"),
    ("empty-batch", dict(x=np.ones((0, 4, 4, C), np.float32)), {}, ValueError,
     r"x: training needs at least 1 value per channel .* got shape \(0, 4, 4, 3\)"),
    ("is_training", {}, dict(is_training="yes"), TypeError, r"is_training: expected True or False, got 'yes'"),
    ("backend", {}, dict(backend="cuda"), ValueError, r"backend: expected one of 'numpy', 'numba', 'tf_eigen', got 'cuda'"),
    ("out-shape", {}, dict(out=np.empty((2, 2, C), np.float32)), ValueError,
     r"out: expected shape \(2, 2, 2, 3\) and dtype float32"),
]


@pytest.mark.parametrize("case", FWD_CASES, ids=[c[0] for c in FWD_CASES])
def test_forward_bad_input(case):
    _, over, kw, exc, pattern = case
    args = _args(**over)
    before = {k: v.copy() for k, v in args.items()}
    with pytest.raises(exc, match=pattern):
        refbn.raw_ops.FusedBatchNormV3(**args, **kw)
    for k, v in args.items():
        np.testing.assert_array_equal(v, before[k], err_msg=f"{k} was modified by a failed call")


def test_forward_ignores_statistics_only_when_factor_is_one():
    a = _args(mean=np.zeros(0, np.float32), variance=np.zeros(0, np.float32))
    refbn.raw_ops.FusedBatchNormV3(**a)  # f == 1: may be empty, like TF
    with pytest.raises(ValueError, match=r"mean: expected 3 values \(one per channel of x\), got 0"):
        refbn.raw_ops.FusedBatchNormV3(**a, exponential_avg_factor=0.5)
    with pytest.raises(ValueError, match=r"mean: expected 3 values"):
        refbn.raw_ops.FusedBatchNormV3(**a, is_training=False)


GRAD_CASES = [
    ("dy-shape", dict(y_backprop=np.ones((2, 2, 2, 4), np.float32)), {}, ValueError,
     r"y_backprop: expected the shape of x \(2, 2, 2, 3\), got \(2, 2, 2, 4\)"),
    ("dy-dtype", dict(y_backprop=np.ones((2, 2, 2, C), np.float64)), {}, TypeError,
     r"y_backprop: expected the dtype of x \(float32\), got float64"),
    ("int-dy", dict(y_backprop=np.ones((2, 2, 2, C), np.int64)), {}, TypeError, r"y_backprop: expected dtype"),
    ("rs1-length", dict(reserve_space_1=np.ones(2, np.float32)), {}, ValueError,
     r"reserve_space_1: expected 3 values"),
    ("rs2-negative", dict(reserve_space_2=np.array([1, -1, 1], np.float32)), {}, ValueError,
     r"reserve_space_2: expected every value >= 0, got \[1\]=-1.0"),
    ("empty-batch", dict(x=np.ones((0, 2, 2, C), np.float32), y_backprop=np.ones((0, 2, 2, C), np.float32)),
     {}, ValueError, r"x: training needs at least 1 value per channel"),
    ("eps", {}, dict(epsilon=-1.0), ValueError, r"epsilon: expected a finite number > 0"),
    ("rank", {}, dict(data_format="NCDHW"), ValueError, r"x: data_format='NCDHW' expects a rank-5 tensor"),
]


@pytest.mark.parametrize("case", GRAD_CASES, ids=[c[0] for c in GRAD_CASES])
def test_backward_bad_input(case):
    _, over, kw, exc, pattern = case
    x = np.random.default_rng(1).normal(size=(2, 2, 2, C)).astype(np.float32)
    args = dict(y_backprop=np.ones_like(x), x=x, scale=np.ones(C, np.float32),
                reserve_space_1=np.zeros(C, np.float32), reserve_space_2=np.ones(C, np.float32),
                reserve_space_3=np.zeros(0, np.float32))
    args.update(over)
    before = {k: v.copy() for k, v in args.items()}
    with pytest.raises(exc, match=pattern):
        refbn.raw_ops.FusedBatchNormGradV3(**args, **kw)
    for k, v in args.items():
        np.testing.assert_array_equal(v, before[k])


def _trained_layer():
    bn = refbn.BatchNorm()
    bn(np.random.default_rng(2).normal(3, 2, (8, C)).astype(np.float32), training=True)
    return bn


LAYER_CASES = [
    ("one-value-per-channel", lambda bn: bn(np.ones((1, C), np.float32), training=True), ValueError,
     r"x: training needs at least 2 values per channel, got 1 \(shape \(1, 3\)\)"),
    ("empty", lambda bn: bn(np.ones((0, C), np.float32), training=True), ValueError,
     r"x: training needs at least 2 values per channel, got 0"),
    ("channels", lambda bn: bn(np.ones((4, 5), np.float32), training=True), ValueError,
     r"x: expected 3 channels on axis -1, got 5 \(shape \(4, 5\)\)"),
    ("int-x", lambda bn: bn(np.ones((4, C), np.int64), training=True), TypeError,
     r"x: expected dtype .* got int64 \(integer\)"),
    ("training-flag", lambda bn: bn(np.ones((4, C), np.float32), training=1), TypeError,
     r"training: expected True or False, got 1"),
    ("nan-batch", lambda bn: bn(np.full((4, C), np.nan, np.float32), training=True), ValueError,
     r"x: batch statistics are not finite in channel\(s\) \[0, 1, 2\]"),
    ("negative-moving-variance", lambda bn: bn.set_weights([np.ones(C), np.zeros(C), np.zeros(C),
                                                            np.array([1.0, -2.0, 1.0])]),
     ValueError, r"moving_variance: expected every value >= 0, got \[1\]=-2.0"),
    ("weights-count", lambda bn: bn.set_weights([np.ones(C)]), ValueError,
     r"weights: expected 4 arrays \[gamma, beta, moving_mean, moving_variance\], got 1"),
    ("backward-shape", lambda bn: bn.backward(np.ones((2, C), np.float32)), ValueError,
     r"dy: expected the shape of x of the last forward call \(8, 3\), got \(2, 3\)"),
    ("axis", lambda bn: bn.__class__(axis=3)(np.ones((4, C), np.float32)), ValueError,
     r"axis: expected an axis of a rank-2 input, got 3"),
]


@pytest.mark.parametrize("case", LAYER_CASES, ids=[c[0] for c in LAYER_CASES])
def test_layer_bad_input_leaves_state_unchanged(case):
    _, call, exc, pattern = case
    bn = _trained_layer()
    before, steps, w = bn.get_weights(), bn.steps, bn.initial_weight
    with pytest.raises(exc, match=pattern):
        call(bn)
    for a, b in zip(bn.get_weights(), before):
        np.testing.assert_array_equal(a, b)
    assert bn.steps == steps and bn.initial_weight == w


@pytest.mark.parametrize("kw,exc,pattern", [
    (dict(momentum=1.5), ValueError, r"momentum: expected a number in \[0, 1\], got 1.5"),
    (dict(momentum=float("nan")), ValueError, r"momentum: expected a number in \[0, 1\], got nan"),
    (dict(momentum=-0.01), ValueError, r"momentum: expected a number in \[0, 1\]"),
    (dict(momentum=None), ValueError, r"momentum: None .* only meaningful with convention='torch'"),
    (dict(epsilon=0.0), ValueError, r"epsilon: expected a finite number > 0"),
    (dict(convention="jax"), ValueError, r"convention: expected one of 'keras', 'tf_fused', 'torch', 'flax', got 'jax'"),
    (dict(on_nonfinite="ignore"), ValueError, r"on_nonfinite: expected one of 'raise', 'skip', 'propagate'"),
    (dict(dtype="int8"), ValueError, r"dtype: expected one of"),
    (dict(channels=0), ValueError, r"channels: expected a positive int, got 0"),
])
def test_layer_constructor_bad_input(kw, exc, pattern):
    with pytest.raises(exc, match=pattern):
        refbn.BatchNorm(**kw)


def test_layer_input_arrays_are_never_modified():
    x = np.random.default_rng(5).normal(size=(6, C)).astype(np.float32)
    dy = np.ones_like(x)
    keep_x, keep_dy = x.copy(), dy.copy()
    bn = refbn.BatchNorm()
    bn(x, training=True)
    bn.backward(dy)
    bn(x, training=False)
    np.testing.assert_array_equal(x, keep_x)
    np.testing.assert_array_equal(dy, keep_dy)
