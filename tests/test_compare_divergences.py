"""Bad input as TF 2.21 handles it, asserted as documented divergences (compare/divergences.py).

Each test checks both halves: what TF does (so the documentation stays true)
and that refbn refuses or agrees as documented.  TF runs in this process
with its default kernel (oneDNN for float32).
"""
import numpy as np
import pytest

import refbn
from refbn.compare import divergences as dv
from refbn.testing import compare

tf = pytest.importorskip("tensorflow")  # installed by the README's test set-up (".[all]")
pytestmark = pytest.mark.tf

RNG = np.random.default_rng(0)
X = RNG.standard_normal((2, 3, 4, 5)).astype(np.float32)
ONES, ZEROS = np.ones(5, np.float32), np.zeros(5, np.float32)
EMPTY = np.zeros(0, np.float32)


def _tf(x=X, scale=ONES, offset=ZEROS, mean=EMPTY, variance=EMPTY, **kw):
    r = tf.raw_ops.FusedBatchNormV3(x=x, scale=scale, offset=offset, mean=mean, variance=variance, **kw)
    return [t.numpy() for t in r]


def _y64(eps):
    """y of X with unit scale/zero offset for an epsilon taken as given (refbn.reference, float64)."""
    from refbn import reference as ref

    x3 = X.astype(np.float64).reshape(-1, 5, 1)
    mean, var = ref.moments(x3, 1)
    return ref.batch_norm(x3, mean[None, :, None], ref.inv_std(var, eps)[None, :, None], 0.0).reshape(X.shape)


@pytest.mark.parametrize("eps", [0.0, -1e-4])
def test_epsilon_not_clamped(eps):
    assert dv.EPSILON_NOT_CLAMPED.reason
    y_tf = _tf(epsilon=eps)[0]
    # TF used epsilon as given: y matches the float64 y for that epsilon, not for the old clamp
    c = compare(y_tf, _y64(eps), "y", "f32", "tf_onednn")
    assert c.passed, c.message("TF with epsilon as given")
    assert not compare(y_tf, _y64(1.001e-5), "y", "f32", "tf_onednn").passed
    with pytest.raises(ValueError, match="epsilon"):
        refbn.raw_ops.FusedBatchNormV3(X, ONES, ZEROS, EMPTY, EMPTY, epsilon=eps)


def test_nonfinite_x_agrees_channel_by_channel():
    x = X.copy()
    x[0, 1, 2, 3] = np.nan
    x[1, 0, 0, 1] = np.inf
    t = _tf(x=x, epsilon=1e-3)
    r = refbn.raw_ops.FusedBatchNormV3(x, ONES, ZEROS, EMPTY, EMPTY, epsilon=1e-3)
    for name, a, b in zip(("y", "batch_mean", "batch_variance"), r[:3], t[:3]):
        assert np.array_equal(np.isfinite(a), np.isfinite(b)), name
    assert np.isnan(t[0][..., 3]).all() and np.isfinite(t[0][..., 0]).all()
    ok = [0, 2, 4]
    c = compare(r.y[..., ok], t[0][..., ok], "y", "f32", "tf_onednn")
    assert c.passed, c.message("clean channels")
    with pytest.raises(ValueError, match=r"channel\(s\) \[1, 3\]"):
        refbn.BatchNorm()(x, training=True)  # the layer refuses to poison its moving statistics


def test_negative_variance_in_inference():
    var = np.array([1, -2, 1, 1, 1], np.float32)
    y = _tf(mean=ZEROS, variance=var, is_training=False, epsilon=1e-3)[0]
    assert np.isnan(y[..., 1]).all() and np.isfinite(y[..., 0]).all()  # silently NaN, no error
    with pytest.raises(ValueError, match="variance"):
        refbn.raw_ops.FusedBatchNormV3(X, ONES, ZEROS, ZEROS, var, is_training=False)


@pytest.mark.parametrize("factor", [2.0, -0.5])
def test_exponential_avg_factor_outside_unit_interval(factor):
    old_m, old_v = np.full(5, 3.0, np.float32), np.full(5, 2.0, np.float32)
    t = _tf(mean=old_m, variance=old_v, exponential_avg_factor=factor, epsilon=1e-3)
    bm = refbn.raw_ops.FusedBatchNormV3(X, ONES, ZEROS, EMPTY, EMPTY, epsilon=1e-3).batch_mean
    expected = (1 - factor) * old_m.astype(np.float64) + factor * bm.astype(np.float64)
    c = compare(t[1], expected, "batch_mean", "f32", "tf_onednn", scale=3.0)
    assert c.passed, c.message("TF extrapolates")  # (1-f)*old + f*new, whatever f is
    with pytest.raises(ValueError, match="exponential_avg_factor"):
        refbn.raw_ops.FusedBatchNormV3(X, ONES, ZEROS, old_m, old_v, exponential_avg_factor=factor)


def test_wrong_scale_length_both_refuse():
    with pytest.raises(tf.errors.InvalidArgumentError) as e:
        _tf(scale=np.ones(4, np.float32))
    assert "4" in str(e.value) and "5" in str(e.value)
    with pytest.raises(ValueError, match="scale: expected 5 values"):
        refbn.raw_ops.FusedBatchNormV3(X, np.ones(4, np.float32), ZEROS, EMPTY, EMPTY)


def test_empty_batch_keras3_poisons_its_moving_statistics():
    import keras

    layer = keras.layers.BatchNormalization()
    layer(np.zeros((0, 4), np.float32), training=True)
    assert np.isnan(np.asarray(layer.moving_mean)).all()
    with pytest.raises(ValueError, match="at least 2 values per channel"):
        refbn.BatchNorm()(np.zeros((0, 4), np.float32), training=True)
