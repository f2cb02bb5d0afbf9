"""refbn.BatchNorm: moving-average conventions, inference, backward, training loops."""
import warnings

import numpy as np
import pytest

import closed_form as cf
import refbn
from conftest import context, make_x
from refbn.testing import assert_close


def _batch_stats(x):
    _, mean, var, unbiased = cf.train_forward(x, x.ndim - 1, np.ones(x.shape[-1]), np.zeros(x.shape[-1]), 1e-3)
    return mean, var, unbiased


@pytest.mark.parametrize("convention,momentum", [("keras", 0.99), ("keras", 0.9), ("tf_fused", 0.99),
                                                 ("torch", 0.1), ("torch", 0.5)])
def test_moving_statistics_converge_as_one_minus_momentum_power_t(backend, convention, momentum):
    """Same batch every step: moving = initial * r**t + value * (1 - r**t), where r is the
    weight kept per step (momentum for Keras, 1 - momentum for PyTorch)."""
    x = make_x((6, 5, 3), np.float64, loc=4.0, scale=3.0)
    mean, biased, unbiased = _batch_stats(x)
    value_var = biased if convention == "keras" else unbiased
    r = momentum if convention != "torch" else 1.0 - momentum
    bn = refbn.BatchNorm(momentum=momentum, convention=convention, dtype="float64", backend=backend)
    for t in range(1, 61):
        bn(x, training=True)
        assert bn.steps == t
        kept = r ** t
        assert_close(bn.moving_mean, 0.0 * kept + mean * (1 - kept), "moving_mean", np.float64, "layer",
                     what=f"{convention} step {t}")
        assert_close(bn.moving_variance, 1.0 * kept + value_var * (1 - kept), "moving_variance",
                     np.float64, "layer", what=f"{convention} step {t}")
        assert_close(bn.initial_weight, kept, "initial_weight", np.float64, "layer")


def test_keras_update_is_variable_minus_update_delta_in_float32(backend):
    """The float32 state after one step is the float64 update rounded once."""
    x = make_x((8, 4), np.float32, loc=2.0)
    bn = refbn.BatchNorm(backend=backend)
    y, tr = bn(x, training=True, trace=True)
    mean, biased, _ = _batch_stats(x)
    want = 0.0 - (0.0 - mean) * (1 - 0.99)
    assert_close(bn.moving_mean, want, "moving_mean", np.float32, context(backend))
    assert bn.moving_mean.dtype == np.float32
    f = tr["decay"]
    assert f == 1 - 0.99
    before, value = tr["moving_variance_before"], tr["moving_variance_value"]
    np.testing.assert_array_equal(tr["moving_variance_after"], (1 - f) * before + f * value)
    # Keras' update_delta = (before - value) * decay, equal to before - after up to float64 round-off
    assert_close(tr["moving_variance_update_delta"], (before - value) * f, "update_delta", np.float64, "layer",
                 scale=float(np.max(np.abs(before))))


def test_torch_cumulative_average_with_momentum_none(backend):
    rng = np.random.default_rng(3)
    bn = refbn.BatchNorm(momentum=None, convention="torch", dtype="float64", backend=backend)
    means, vars_ = [], []
    for _ in range(7):
        x = rng.normal(rng.uniform(-3, 3), rng.uniform(0.5, 2), (10, 2))
        bn(x, training=True)
        m, _, u = _batch_stats(x)
        means.append(m)
        vars_.append(u)
    assert_close(bn.moving_mean, np.mean(means, axis=0), "moving_mean", np.float64, "layer")
    assert_close(bn.moving_variance, np.mean(vars_, axis=0), "moving_variance", np.float64, "layer")


def test_inference_uses_moving_statistics_and_backward_treats_them_as_constants(backend):
    x = make_x((5, 3, 2), np.float64, loc=2.0)
    bn = refbn.BatchNorm(axis=1, dtype="float64", backend=backend)
    bn(x, training=True)
    bn.gamma = np.array([1.5, 0.5, 2.0])
    y = bn(x, training=False)
    want = cf.infer_forward(x, 1, bn.gamma, bn.beta, bn.moving_mean, bn.moving_variance, bn.epsilon)
    assert_close(y, want, "y", np.float64)
    dy = make_x(x.shape, np.float64, seed=4)
    dx = bn.backward(dy)
    want_dx, want_dg, want_db = cf.infer_backward(dy, x, 1, bn.gamma, bn.moving_mean, bn.moving_variance,
                                                  bn.epsilon)
    assert_close(dx, want_dx, "x_backprop", np.float64)
    assert_close(bn.dgamma, want_dg, "scale_backprop", np.float64)
    assert_close(bn.dbeta, want_db, "offset_backprop", np.float64)


def test_training_backward_matches_closed_form_on_any_axis(backend):
    x = make_x((3, 4, 5), np.float64, loc=-1.0)
    dy = make_x(x.shape, np.float64, seed=8)
    bn = refbn.BatchNorm(axis=1, dtype="float64", backend=backend)
    bn(x, training=True)
    dx = bn.backward(dy)
    want_dx, want_dg, want_db = cf.train_backward(dy, x, 1, bn.gamma, bn.epsilon)
    assert_close(dx, want_dx, "x_backprop", np.float64)
    assert_close(bn.dgamma, want_dg, "scale_backprop", np.float64)


def test_runs_inside_a_numpy_training_loop(backend):
    """Fit y = BN(x) * gamma + beta to targets with plain gradient descent."""
    rng = np.random.default_rng(0)
    x = rng.normal(5.0, 3.0, (64, 4)).astype(np.float32)
    target = (2.0 * (x - x.mean(0)) / x.std(0) - 1.0).astype(np.float32)
    bn = refbn.BatchNorm(backend=backend)
    losses = []
    for _ in range(200):
        y = bn(x, training=True)
        losses.append(float(np.mean((y - target) ** 2)))
        bn.backward(2.0 * (y - target) / y.size)
        bn.gamma -= 2.0 * bn.dgamma
        bn.beta -= 2.0 * bn.dbeta
    assert losses[-1] < 1e-3 * losses[0]
    assert bn.steps == 200
    np.testing.assert_array_less(np.abs(bn.gamma - 2.0), 0.05)


def test_debiased_estimate_equals_batch_statistic_after_one_step_on_constant_data():
    """With w = momentum**t: (moving - w*initial)/(1 - w) recovers the batch statistic."""
    x = np.tile(np.array([[3.0, -2.0, 7.5]]), (4, 1)) + np.array([[0.5], [-0.5], [0.25], [-0.25]])
    mean, biased, _ = _batch_stats(x)
    for t in (1, 5):
        bn = refbn.BatchNorm(debias=True, dtype="float64")
        for _ in range(t):
            bn(x, training=True)
        m, v = bn.debiased_statistics()
        assert_close(m, mean, "moving_mean", np.float64, "layer")
        assert_close(v, biased, "moving_variance", np.float64, "layer")
        y = bn(x, training=False)
        want = cf.infer_forward(x, 1, bn.gamma, bn.beta, mean, biased, bn.epsilon)
        assert_close(y, want, "y", np.float64)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nonfinite_batches_never_reach_moving_statistics_silently(bad):
    x = make_x((6, 3), np.float32)
    x[2, 1] = bad
    assert refbn.check_finite(x) == [1]
    assert refbn.check_finite(x.reshape(6, 1, 1, 3), data_format="NHWC") == [1]
    bn = refbn.BatchNorm()
    bn(make_x((6, 3), np.float32, seed=1), training=True)
    before = bn.get_weights()
    with pytest.raises(ValueError, match=r"x: batch statistics are not finite in channel\(s\) \[1\]"):
        bn(x, training=True)
    for a, b in zip(bn.get_weights(), before):
        np.testing.assert_array_equal(a, b)
    assert bn.steps == 1

    skip = refbn.BatchNorm(on_nonfinite="skip")
    with pytest.warns(RuntimeWarning, match=r"channel\(s\) \[1\]"):
        y = skip(x, training=True)
    assert np.isnan(y[:, 1]).all() and np.isfinite(y[:, [0, 2]]).all()
    assert skip.moving_mean[1] == 0.0 and skip.moving_variance[1] == 1.0
    assert skip.moving_mean[0] != 0.0

    prop = refbn.BatchNorm(on_nonfinite="propagate")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prop(x, training=True)
    assert not np.isfinite(prop.moving_mean[1]) or not np.isfinite(prop.moving_variance[1])
    assert np.isfinite(prop.moving_mean[[0, 2]]).all()


def test_raw_op_propagates_nonfinite_per_channel_like_tf():
    x = make_x((2, 2, 2, 3), np.float32)
    x[0, 0, 0, 2] = np.nan
    r = refbn.raw_ops.FusedBatchNormV3(x, np.ones(3), np.zeros(3), [], [])
    assert np.isnan(r.y[..., 2]).all() and np.isnan(r.batch_mean[2]) and np.isnan(r.batch_variance[2])
    assert np.isfinite(r.y[..., :2]).all() and np.isfinite(r.batch_mean[:2]).all()
