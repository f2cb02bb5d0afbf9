"""refbn.reference, the truth, judged by truths of its own: small cases derived by hand, the
independent chain-rule derivation in tests/closed_form.py, and its identities."""
import numpy as np
import pytest

from refbn import reference as ref
from refbn.testing import assert_close

import closed_form

EPS = 0.25


def test_four_values_by_hand():
    """x = 1, 2, 3, 4 in one channel: mean 5/2, biased variance 5/4, unbiased 5/3; with
    epsilon 1/4 the inverse std is 1/sqrt(3/2), so y = (x - 5/2) * 2 / sqrt(3/2) + 1."""
    x = np.array([[1.0], [2.0], [3.0], [4.0]])
    y, mean, var = ref.forward_training(x, [2.0], [1.0], EPS, axis=1)
    assert mean.tolist() == [2.5] and var.tolist() == [1.25]
    assert_close(var * ref.bessel_factor(4), [5 / 3], "batch_variance", np.float64)
    want = (np.array([-1.5, -0.5, 0.5, 1.5]) * 2 / np.sqrt(1.5) + 1)[:, None]
    assert_close(y, want, "y", np.float64)
    # inference with mean 0, variance 3/4: y = x * 2 / sqrt(1) + 1
    assert_close(ref.forward_inference(x, [2.0], [1.0], [0.0], [0.75], EPS, 1), 2 * x + 1, "y", np.float64)


def test_gradient_of_four_values_by_hand():
    """dy = 1, 0, 0, 0 on x = 1, 2, 3, 4 (scale 2): mean(dy) = 1/4, x_hat = (x - 5/2)/sqrt(3/2),
    mean(dy * x_hat) = -1.5/sqrt(3/2)/4; dx = 2/sqrt(3/2) * (dy - 1/4 - x_hat * mean(dy * x_hat)).
    dscale = sum(dy * x_hat) = -1.5/sqrt(3/2), doffset = sum(dy) = 1.  Inference: dx = 2*dy/sqrt(var+eps)."""
    x = np.array([[1.0], [2.0], [3.0], [4.0]])
    dy = np.array([[1.0], [0.0], [0.0], [0.0]])
    r = 1 / np.sqrt(1.5)
    xhat = (x[:, 0] - 2.5) * r
    want = 2 * r * (dy[:, 0] - 0.25 - xhat * (-1.5 * r / 4))
    dx, ds, do = ref.backward(dy, x, [2.0], [2.5], [1.25], EPS, True, 1)
    assert_close(dx[:, 0], want, "x_backprop", np.float64)
    assert_close(ds, [-1.5 * r], "scale_backprop", np.float64)
    assert do.tolist() == [1.0]
    # the training gradient sums to 0 (mean(dy) is taken out), to round-off of its terms
    assert_close(dx.sum(), 0.0, "x_backprop", np.float64, scale=float(np.abs(dx).sum()))
    dx, ds, do = ref.backward(dy, x, [2.0], [0.0], [0.75], EPS, False, 1)
    assert dx[:, 0].tolist() == [2.0, 0.0, 0.0, 0.0] and do.tolist() == [1.0]


def test_moving_average_and_bessel_by_hand():
    assert_close(ref.moving_average(0.0, 10.0, 0.01), 0.1, "moving_mean", np.float64)
    assert ref.moving_average(1.0, 5.0, 0.5) == 3.0
    assert ref.moving_average(np.inf, 1.0, 0.5) == np.inf       # not inf - inf
    assert ref.moving_average(2.0, 7.0, 1.0) == 7.0 and ref.moving_average(2.0, 7.0, 0.0) == 2.0
    assert ref.bessel_factor(1) == 1.0 and ref.bessel_factor(4) == 4 / 3
    assert ref.inv_std(3.0, 1.0) == 0.5


@pytest.mark.parametrize("axis, shape", [(3, (2, 3, 4, 5)), (1, (3, 4, 2, 2)), (1, (9, 2))])
@pytest.mark.parametrize("training", [True, False])
def test_reference_matches_the_independent_closed_forms(axis, shape, training):
    rng = np.random.default_rng(5)
    x = rng.normal(2.0, 3.0, shape)
    dy = rng.normal(0.0, 1.0, shape)
    c = shape[axis]
    scale, offset = rng.uniform(0.5, 2, c), rng.normal(0, 1, c)
    mean, var = rng.normal(0, 1, c), rng.uniform(0.5, 2, c)
    if training:
        y, m, v = ref.forward_training(x, scale, offset, EPS, axis)
        y0, m0, v0, _ = closed_form.train_forward(x, axis, scale, offset, EPS)
        dx, ds, do = ref.backward(dy, x, scale, m, v, EPS, True, axis)
        dx0, ds0, do0 = closed_form.train_backward(dy, x, axis, scale, EPS)
        assert_close(m, m0, "batch_mean", np.float64, scale=float(np.abs(x).max()))
        assert_close(v, v0, "batch_variance", np.float64)
    else:
        y = ref.forward_inference(x, scale, offset, mean, var, EPS, axis)
        y0 = closed_form.infer_forward(x, axis, scale, offset, mean, var, EPS)
        dx, ds, do = ref.backward(dy, x, scale, mean, var, EPS, False, axis)
        dx0, ds0, do0 = closed_form.infer_backward(dy, x, axis, scale, mean, var, EPS)
    assert_close(y, y0, "y", np.float64, scale=float(np.abs(y0).max()))
    assert_close(dx, dx0, "x_backprop", np.float64, scale=float(np.abs(dx0).max()))
    assert_close(ds, ds0, "scale_backprop", np.float64, scale=float(np.abs(dy).sum()))
    assert_close(do, do0, "offset_backprop", np.float64, scale=float(np.abs(dy).sum()))


def test_channel_sums_are_pairwise_accurate():
    """The truth's sums: 2^20 values of 0.1 in float64 add to n * 0.1 within ~log2(n) eps;
    a sequential sum along a strided axis would drift by ~n eps."""
    n = 1 << 20
    x = np.full((n, 2), 0.1)
    s = ref.channel_sum(x, 1)
    assert_close(s, np.full(2, n * 0.1), "sum", np.float64, scale=n * 0.1)
