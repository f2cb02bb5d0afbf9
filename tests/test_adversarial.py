"""Issue 12's classes, one test each, on both backends: every finding of the adversarial review
either raises a ValueError/TypeError naming the argument, or gives the reference's result.
Inputs are unchanged and state is unchanged after every refused call.  (The hypothesis fuzz
test and the BatchNorm state machine look for the neighbours of these cases.)"""
import copy
import pickle

import numpy as np
import pytest

import refbn
from refbn import reference, stats
from refbn.testing import assert_close

BACKENDS = ("numpy", "numba")
C = 3


def _x(shape=(4, 2, 2, C), seed=0, dtype=np.float32):
    return np.random.default_rng(seed).normal(size=shape).astype(dtype)


def _state(bn):
    return {k: (None if v is None else np.array(v, copy=True)) for k, v in
            dict(gamma=bn.gamma, beta=bn.beta, mm=bn.moving_mean, mv=bn.moving_variance).items()} | {
        "steps": bn.steps, "w": bn.initial_weight, "built": bn.built}


def _same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], np.ndarray):
            assert a[k].tobytes() == b[k].tobytes(), k
        else:
            assert a[k] == b[k], k


# -- silent wrong results ----------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_moving_variance_overflow_is_refused_and_state_kept(backend):
    bn = refbn.BatchNorm(momentum=0.0, backend=backend, channels=C)      # moving = the batch's
    x = _x(dtype=np.float64) * 1e25          # variance 1e50: finite in float64, Inf in float32
    before = _state(bn)
    with pytest.raises(ValueError, match=r"x: the moving statistics of channel\(s\) \[0, 1, 2\] would overflow float32"):
        bn(x, training=True)
    _same_state(before, _state(bn))
    bn_skip = refbn.BatchNorm(momentum=0.0, backend=backend, channels=C, on_nonfinite="skip")
    with pytest.warns(RuntimeWarning, match="overflow"):
        bn_skip(x, training=True)
    assert np.isfinite(bn_skip.moving_variance).all() and bn_skip.moving_variance.tolist() == [1.0] * C


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["training", "inference", "backward"])
@pytest.mark.parametrize("shift", [1, -1, 2 * C])
def test_out_overlapping_x_gives_the_reference_result(backend, op, shift):
    """out = x shifted by one value, one row or in reverse inside one buffer: the result is the
    reference's of the original x, as if computed aside and copied (numpy's ufunc semantics)."""
    n = 8 * C
    buf = _x((n + abs(shift),), seed=3)
    x = buf[max(-shift, 0):][:n].reshape(8, C)
    out = buf[max(shift, 0):][:n].reshape(8, C)
    assert np.may_share_memory(x, out) and x.ctypes.data != out.ctypes.data
    x0 = x.copy()
    g, b = np.array([1.5, 0.5, 2.0], np.float32), np.array([0.1, -0.2, 0.3], np.float32)
    mean, var = reference.moments(x0.astype(np.float64), 1)
    if op == "training":
        got = refbn.raw_ops.FusedBatchNormV3(x, g, b, None, None, data_format="NC", backend=backend, out=out).y
        want = reference.forward_training(x0, g, b, 1e-4, 1)[0]
    elif op == "inference":
        got = refbn.raw_ops.FusedBatchNormV3(x, g, b, mean, var, data_format="NC", is_training=False,
                                             backend=backend, out=out).y
        want = reference.forward_inference(x0, g, b, mean, var, 1e-4, 1)
    else:
        dy0 = _x((8, C), seed=5)
        for dy, xx in ((dy0, x), (x, dy0)):       # out overlaps x, then dy
            a, b_ = dy.copy(), xx.copy()
            got = refbn.raw_ops.FusedBatchNormGradV3(dy, xx, g, *reference.moments(b_.astype(np.float64), 1), None,
                                                     data_format="NC", backend=backend, out=out).x_backprop
            want = reference.backward(a, b_, g, *reference.moments(b_.astype(np.float64), 1), 1e-4, True, 1)[0]
            assert got is out
            assert_close(got, want, "dx", np.float32)
            buf[...] = _x(buf.shape, seed=3)       # restore the shared buffer for the second case
        return
    assert got is out
    assert_close(got, want, "y" if op != "backward" else "dx", np.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_is_x_in_place(backend):
    x = _x()
    x0 = x.copy()
    r = refbn.raw_ops.FusedBatchNormV3(x, np.ones(C), np.zeros(C), None, None, backend=backend, out=x)
    assert r.y is x
    assert_close(x, reference.forward_training(x0, np.ones(C), np.zeros(C), 1e-4, 3)[0], "y", np.float32)


@pytest.mark.parametrize("dtype", [np.int32, "int8", np.bool_, np.complex64, "U3"])
def test_layer_dtype_must_be_floating(dtype):
    with pytest.raises((TypeError, ValueError), match=r"dtype: expected"):
        refbn.BatchNorm(dtype=dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,bad,pattern", [
    ("variance", [1.0, -0.5, 1.0], r"variance: expected every value >= 0, got \[1\]=-0.5"),
    ("variance", [1.0, np.inf, 1.0], r"variance: expected finite values, got \[1\]=inf"),
    ("mean", [0.0, np.inf, 0.0], r"mean: expected finite values, got \[1\]=inf"),
    ("mean", [np.nan, 0.0, 0.0], r"mean: expected finite values, got \[0\]=nan"),
    ("mean", [1e39, 0.0, 0.0], r"mean: expected finite values, got \[0\]=1e\+39 \(overflows float32\)"),
])
def test_old_statistics_of_the_moving_average_are_checked(backend, name, bad, pattern):
    """Training with exponential_avg_factor < 1 feeds the old mean/variance to the average."""
    args = dict(mean=np.zeros(C), variance=np.ones(C))
    args[name] = np.array(bad)
    before = {k: v.copy() for k, v in args.items()}
    with pytest.raises(ValueError, match=pattern):
        refbn.raw_ops.FusedBatchNormV3(_x(), np.ones(C), np.zeros(C), exponential_avg_factor=0.5,
                                       backend=backend, **args)
    for k in args:
        assert args[k].tobytes() == before[k].tobytes()


@pytest.mark.parametrize("backend", BACKENDS)
def test_moving_average_of_extreme_old_values_is_the_reference(backend):
    """(1 - f) * old + f * new: a large old mean stays exact where old - (old - new) * f cancels."""
    x = _x()
    old_m, old_v = np.full(C, 3e38, np.float32), np.full(C, 3e38, np.float32)
    r = refbn.raw_ops.FusedBatchNormV3(x, np.ones(C), np.zeros(C), old_m, old_v, exponential_avg_factor=0.25,
                                       backend=backend)
    m, v = reference.moments(x.astype(np.float64), 3)
    n = x.size // C
    assert_close(r.batch_mean, reference.moving_average(3e38, m, 0.25), "batch_mean", np.float32)
    assert_close(r.batch_variance, reference.moving_average(3e38, v * n / (n - 1), 0.25), "batch_variance",
                 np.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,value,pattern", [
    ("variance", np.inf, r"variance: expected finite values, got \[1\]=inf"),
    ("mean", np.nan, r"mean: expected finite values, got \[1\]=nan"),
    ("scale", np.inf, r"scale: expected finite values"),
    ("offset", np.nan, r"offset: expected finite values"),
])
def test_inference_refuses_non_finite_statistics_and_parameters(backend, name, value, pattern):
    args = dict(scale=np.ones(C), offset=np.zeros(C), mean=np.zeros(C), variance=np.ones(C))
    args[name] = args[name].copy()
    args[name][1] = value
    with pytest.raises(ValueError, match=pattern):
        refbn.raw_ops.FusedBatchNormV3(_x(), is_training=False, backend=backend, **args)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ["x", "scale", "dy"])
def test_masked_arrays_are_refused(backend, where):
    x = _x()
    args = dict(x=x, scale=np.ones(C, np.float32))
    if where == "dy":
        with pytest.raises(TypeError, match=r"y_backprop: expected a plain array, got a numpy masked array"):
            refbn.raw_ops.FusedBatchNormGradV3(np.ma.masked_less(x, 0), x, np.ones(C), np.zeros(C), np.ones(C),
                                               None, backend=backend)
        return
    args[where] = np.ma.masked_less(args[where], 0.5 if where == "scale" else 0.0)
    with pytest.raises(TypeError, match=rf"{where}: expected a plain array, got a numpy masked array"):
        refbn.raw_ops.FusedBatchNormV3(args["x"], args["scale"], np.zeros(C), None, None, backend=backend)
    with pytest.raises(TypeError, match=r"x: expected a plain array"):
        refbn.BatchNorm(backend=backend)(np.ma.masked_less(x, 0), training=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False])
def test_backward_uses_the_forward_x_after_the_buffer_is_reused(backend, training):
    bn = refbn.BatchNorm(backend=backend, channels=C)
    x = _x()
    x0 = x.copy()
    bn(x, training=training)
    mean, var = reference.moments(x0.astype(np.float64), 3)
    if not training:
        mean, var = np.zeros(C), np.ones(C)
    x[...] = 1000.0                   # the caller reuses the buffer
    dy = _x(seed=1)
    dx = bn.backward(dy)
    want = reference.backward(dy, x0, np.ones(C), mean, var, bn.epsilon, training, 3)
    assert_close(dx, want[0], "dx", np.float32)
    assert_close(bn.dgamma, want[1], "scale_backprop", np.float32)


def test_merge_reference_with_other_channels_is_refused():
    shards = [stats.Moments.from_array(_x((5, C), seed=s)) for s in range(2)]
    with pytest.raises(ValueError, match=r"reference: expected 3 channels \(as the shards\), got 4"):
        stats.merge(shards, "keras_sync", reference=stats.Moments.from_array(_x((5, 4))))


# -- raw tracebacks -----------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("call", ["raw_train", "raw_infer", "grad", "layer", "moments"])
def test_zero_channels(backend, call):
    x = np.zeros((2, 3, 0), np.float32)
    e = np.zeros(0)
    with pytest.raises(ValueError, match=r"x: expected at least 1 channel on axis 2, got shape \(2, 3, 0\)"):
        if call == "raw_train":
            refbn.raw_ops.FusedBatchNormV3(x, e, e, None, None, data_format="NWC", backend=backend)
        elif call == "raw_infer":
            refbn.raw_ops.FusedBatchNormV3(x, e, e, e, e, data_format="NWC", is_training=False, backend=backend)
        elif call == "grad":
            refbn.raw_ops.FusedBatchNormGradV3(x, x, e, e, e, None, data_format="NWC", backend=backend)
        elif call == "layer":
            refbn.BatchNorm(backend=backend)(x, training=True)
        else:
            stats.Moments.from_array(x, backend=backend)


@pytest.mark.parametrize("fmt", [b"\xff\xfe", b"NH\xc3WC", "NHWC\x00"])
def test_undecodable_data_format(fmt):
    with pytest.raises(ValueError, match=r"data_format: expected one of NC, NWC"):
        refbn.raw_ops.FusedBatchNormV3(_x(), np.ones(C), np.zeros(C), None, None, data_format=fmt)


@pytest.mark.parametrize("name", ["gamma", "beta", "moving_mean", "moving_variance"])
def test_assigning_state_validates_and_converts(name):
    bn = refbn.BatchNorm(channels=C)
    setattr(bn, name, [0.5, 1.0, 2.0])              # a list: converted to the layer's dtype
    assert getattr(bn, name).dtype == np.float32 and getattr(bn, name).tolist() == [0.5, 1.0, 2.0]
    before = _state(bn)
    for bad, exc, pattern in [([1.0, 2.0], ValueError, rf"{name}: expected 3 values"),
                              ([1.0, np.nan, 2.0], ValueError, rf"{name}: expected finite values"),
                              ("abc", TypeError, rf"{name}: expected a real float array"),
                              (None, ValueError, rf"{name}: expected a 1-D array of 3 values, got None"),
                              ([[1.0, 2.0, 3.0]], ValueError, rf"{name}: expected a 1-D array")]:
        with pytest.raises(exc, match=pattern):
            setattr(bn, name, bad)
        _same_state(before, _state(bn))
    if name == "moving_variance":
        with pytest.raises(ValueError, match=r"moving_variance: expected every value >= 0"):
            bn.moving_variance = [1.0, -1.0, 1.0]


def test_in_place_corruption_of_state_is_caught_at_the_next_call():
    bn = refbn.BatchNorm(channels=C)
    bn.moving_variance[1] = -2.0        # bypasses the setter
    with pytest.raises(ValueError, match=r"moving_variance: expected every value >= 0, got \[1\]=-2.0"):
        bn(_x(), training=False)
    bn.moving_variance[1] = 1.0
    bn.gamma[0] = np.inf
    with pytest.raises(ValueError, match=r"gamma: expected finite values"):
        bn(_x(), training=True)
    assert bn.steps == 0


def test_all_empty_replicas_are_refused():
    e = stats.Moments.empty(C)
    for method in stats.METHODS:
        with pytest.raises(ValueError, match=r"shards: every replica is empty"):
            stats.merge([e, e], method)


# -- state --------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_refused_first_call_does_not_build(backend):
    bn = refbn.BatchNorm(backend=backend)
    x = _x()
    x[0, 0, 0, 1] = np.nan
    with pytest.raises(ValueError, match=r"x: batch statistics are not finite in channel\(s\) \[1\]"):
        bn(x, training=True)
    assert not bn.built and bn.steps == 0 and bn._cache is None
    bn(_x(shape=(4, 5)), training=True)       # a layer never built may still take any channel count
    assert bn.channels == 5


@pytest.mark.parametrize("backend", BACKENDS)
def test_refused_call_keeps_the_previous_backward(backend):
    bn = refbn.BatchNorm(backend=backend)
    x = _x()
    bn(x, training=True)
    with pytest.raises(ValueError):
        bn(np.full_like(x, np.nan), training=True)
    dy = _x(seed=2)
    mean, var = reference.moments(x.astype(np.float64), 3)
    assert_close(bn.backward(dy), reference.backward(dy, x, np.ones(C), mean, var, bn.epsilon, True, 3)[0],
                 "dx", np.float32)


@pytest.mark.parametrize("setting,value,pattern", [
    ("momentum", 1.5, r"momentum: expected a number in \[0, 1\], got 1.5"),
    ("epsilon", 0.0, r"epsilon: expected a finite number > 0"),
    ("backend", "gpu", r"backend: expected one of"),
    ("on_nonfinite", "ignore", r"on_nonfinite: expected one of"),
    ("axis", "1", r"axis: expected an int"),
    ("debias", "yes", r"debias: expected True or False"),
])
def test_assigned_settings_are_checked(setting, value, pattern):
    bn = refbn.BatchNorm(channels=C)
    before = getattr(bn, setting)
    with pytest.raises((ValueError, TypeError), match=pattern):
        setattr(bn, setting, value)
    assert getattr(bn, setting) == before


@pytest.mark.parametrize("backend", BACKENDS)
def test_deepcopy_and_pickle_keep_the_whole_state(backend):
    bn = refbn.BatchNorm(backend=backend, momentum=0.5)
    x = _x()
    bn(x, training=True)
    dy = _x(seed=4)
    for make_twin in (copy.deepcopy, lambda b: pickle.loads(pickle.dumps(b))):
        twin = make_twin(bn)
        _same_state(_state(bn), _state(twin))
        assert twin.backward(dy).tobytes() == bn.backward(dy).tobytes()
        assert twin(x).tobytes() == bn(x).tobytes()


# -- the batched per-channel check (validate.channel_vectors) is channel_vector, item by item ---
_F32 = np.float32


def _vector_cases():
    good = np.array([1.0, -2.0, 3.0], _F32)
    nan = np.array([1.0, np.nan, 3.0], _F32)
    inf = np.array([np.inf, 1.0, 2.0], _F32)
    return {
        "plain": [(good, "scale", False), (good + 1, "offset", False)],
        "nan_second": [(good, "scale", False), (nan, "offset", False)],
        "inf_first": [(inf, "scale", False), (nan, "offset", False)],
        "empty_allowed": [(good, "scale", False), (np.zeros(0, _F32), "mean", True), (good * 2, "variance", False)],
        "empty_refused": [(good, "scale", False), (np.zeros(0, _F32), "mean", False)],
        "float64_cast": [(good.astype(np.float64), "scale", False), (good, "offset", False)],
        "float64_overflow": [(good, "scale", False), (np.array([1e39, 0, 0]), "offset", False)],
        "list": [([1.0, 2.0, 3.0], "scale", False), (good, "offset", False)],
        "wrong_length": [(good, "scale", False), (good[:2], "offset", False)],
        "matrix": [(good, "scale", False), (np.ones((3, 1), _F32), "offset", False)],
    }


@pytest.mark.parametrize("case", sorted(_vector_cases()))
def test_channel_vectors_agree_with_channel_vector(case):
    from refbn import validate
    items = _vector_cases()[case]
    originals = [np.array(v, copy=True) for v, _, _ in items]
    try:
        expected = [validate.channel_vector(v, name, C, _F32, empty_ok) for v, name, empty_ok in items]
    except (TypeError, ValueError) as e:
        with pytest.raises(type(e)) as got:
            validate.channel_vectors(C, _F32, items)
        assert str(got.value) == str(e)
    else:
        vectors, wide = validate.channel_vectors(C, _F32, items)
        assert [v.tobytes() for v in vectors] == [v.tobytes() for v in expected]
        assert all(v.dtype == _F32 for v in vectors)
        full = [v for v in expected if v.size]
        assert wide.dtype == np.float64 and wide.shape == (len(full), C)
        assert np.array_equal(wide, np.array(full, np.float64).reshape(len(full), C))
        for v, (orig, _, _) in zip(vectors, items):   # new arrays, never the caller's
            assert not np.shares_memory(v, np.asarray(orig))
    for (v, _, _), orig in zip(items, originals):
        assert np.array_equal(np.asarray(v), orig, equal_nan=True)
