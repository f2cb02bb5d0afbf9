"""Differential fuzz test of every public entry point, both backends, against refbn.reference.

refbn's promise (issue 12): every call either raises a ValueError/TypeError that names the
argument, or returns refbn.reference's float64 truth rounded to the output dtype (within the
declared tolerances; outputs whose correct rounding overflows are Inf), and no input (nor any
byte of its buffer) changes, successful or not; only ``out=`` is written, and only on success.

Hypothesis draws layouts (every data_format, BatchNorm's any axis), shapes from 1 value to
10^4 channels with N, H or W = 1, every dtype, C-contiguous / Fortran / strided / negative-stride
/ read-only / broadcast views, list and tuple parameters, extreme but finite values (float16
near 65504, subnormals, N(1e4, 0.01^2) data, channels on different scales, constant channels),
NaN/Inf in x, and out= buffers: fresh, x itself, or x shifted by one value or one row in a
larger buffer.  ``test_refused_calls_name_the_argument`` draws bad calls of every entry point.

Budget: ~60 s on 2 cores with numba's cache warm (the first compile of each kernel costs
seconds; ``_warm_numba`` pays it before the examples run).  REFBN_FUZZ_SCALE=10 runs ten
times the examples.  Each test counts its examples; the totals are printed at the end of the
module (``-rA`` not needed) and kept in COUNTS.
"""
import collections
import os
import pickle
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import refbn
from refbn import dtypes, reference, stats
from strategies import (DTYPES, FORMATS, SENTINEL, VALUE_KINDS, VEC_VIEWS, X_VIEWS, Snapshot, as_vector,
                        as_x_view, axis_shapes, data_format_shapes, inject_nonfinite, judge, make_values,
                        grad_noise, names_argument, f64_noise, state_close, rms_of, variance_noise,
                        vector_values)
from refbn.testing import assert_close

BACKENDS = ("numpy", "numba")
COUNTS = collections.Counter()
_SCALE = float(os.environ.get("REFBN_FUZZ_SCALE", "1"))

# CI draws the same examples every run (derandomize) so that a green submission stays green;
# REFBN_FUZZ_RANDOM=1 draws new ones (with REFBN_FUZZ_SCALE=N for N times as many) to explore.
RANDOM = os.environ.get("REFBN_FUZZ_RANDOM", "") not in ("", "0")
settings.register_profile("refbn-fuzz", deadline=None, print_blob=True, derandomize=not RANDOM,
                          database=None if not RANDOM else settings.default.database, suppress_health_check=[
    HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])


def fuzz_settings(n):
    return settings(settings.get_profile("refbn-fuzz"), max_examples=max(1, int(n * _SCALE)))


@pytest.fixture(scope="module", autouse=True)
def _report(request):
    yield
    capture = request.config.pluginmanager.getplugin("capturemanager")
    lines = [f"  {k}: {v}" for k, v in sorted(COUNTS.items())]
    text = (f"\ntest_fuzz: {sum(v for k, v in COUNTS.items() if not k.startswith('refused '))} "
            f"differential examples, {sum(v for k, v in COUNTS.items() if k.startswith('refused '))} "
            f"refused calls\n" + "\n".join(lines))
    if capture is not None:
        with capture.global_and_fixture_disabled():
            print(text)
    else:
        print(text)


@pytest.fixture(scope="module", autouse=True)
def _warm_numba():
    """Compile (or load from numba's cache) every serial kernel once, outside the examples."""
    for dt in DTYPES:
        sdt = dtypes.stats_dtype(dt)
        for fmt, shape in (("NHWC", (2, 1, 2, 3)), ("NCHW", (2, 3, 1, 2))):
            x = np.arange(12, dtype=np.float64).reshape(shape).astype(dt)
            s = np.ones(3, sdt)
            r = refbn.raw_ops.FusedBatchNormV3(x, s, s, [], [], data_format=fmt, backend="numba")
            refbn.raw_ops.FusedBatchNormV3(x, s, s, s, s, data_format=fmt, is_training=False, backend="numba")
            for training in (True, False):
                refbn.raw_ops.FusedBatchNormGradV3(x, x, s, r[3], r[4], [], data_format=fmt,
                                                   is_training=training, backend="numba")
    yield


# -- drawing a case ---------------------------------------------------------------------------------
def _seed():
    return st.integers(0, 2 ** 32 - 1).map(np.random.default_rng)


@st.composite
def x_values(draw, shape, axis, dt, allow_nonfinite=True):
    rng = draw(_seed())
    kind = draw(st.sampled_from(VALUE_KINDS))
    v = make_values(kind, shape, dt, axis, rng)
    nonfinite = draw(st.sampled_from([None] * 5 + ["nan", "inf", "-inf"])) if allow_nonfinite else None
    if nonfinite:
        v = inject_nonfinite(v, axis, rng, nonfinite)
    return kind if not nonfinite else f"{kind}+{nonfinite}", v, rng


def place(v, view, out_kind, axis, rng):
    """(x, out): x holding v's values in a view of ``view`` kind; out= of ``out_kind``:
    None, "fresh", "x" (out is x), "shift" (x and out C-contiguous in one larger buffer, out
    shifted by one value or one row, either way)."""
    if out_kind in ("x", "shift"):
        if out_kind == "x":
            x = v.copy()
            return x, x
        row = v.size // v.shape[0] if v.ndim > 1 else 1
        s = int(rng.choice([1, -1, row, -row, v.shape[-1], -v.shape[-1]]))
        big = np.full(v.size + abs(s), SENTINEL, v.dtype)
        if s > 0:
            x, out = big[:v.size].reshape(v.shape), big[s:s + v.size].reshape(v.shape)
        else:
            x, out = big[-s:-s + v.size].reshape(v.shape), big[:v.size].reshape(v.shape)
        x[...] = v
        return x, out
    x = as_x_view(v, view, axis, rng)
    out = None if out_kind is None else np.full(v.shape, SENTINEL, v.dtype)
    return x, out


def _vec(draw, role, c, sdt, rng):
    return as_vector(vector_values(role, c, sdt, rng), draw(st.sampled_from(VEC_VIEWS)), rng)


def _f64(v):
    return np.asarray(v, np.float64)


def _y_noise(c, x64):
    """float64 noise of y = (x - mean) * k + offset: the mean (batch: known to f64_noise * |x|;
    given: exact) and the evaluation, each ~f64_noise times |k| * (|x| + |mean|) + |offset|."""
    n = reference.count(x64, c["axis"])
    fin = np.isfinite(x64)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        if c["training"]:
            _, var = reference.moments(np.where(fin, x64, 0.0), c["axis"])
        else:
            var = _f64(c["variance"])
        k = np.abs(_f64(c["scale"])) * reference.inv_std(var, c["eps"])
    mean = 0.0 if c["training"] else float(np.max(np.abs(_f64(c["mean"]))))
    return f64_noise(n) * (float(np.max(k)) * (rms_of(x64[fin]) + mean) + float(np.max(np.abs(_f64(c["offset"])))))


def _check_out(result, out, name, dt, truth, backend, what, noise=0.0):
    judge(result, truth, name, dt, backend, what, noise=noise)
    if out is not None:
        judge(out, truth, name + " (out=)", dt, backend, what, noise=noise)
        np.testing.assert_array_equal(np.asarray(result), out, err_msg=f"{what}: returned {name} != out")


def _refusal_ok(e, names, what):
    assert isinstance(e, (ValueError, TypeError)), f"{what}: {type(e).__name__} {e}"
    assert names_argument(str(e), names), f"{what}: the error does not name any of {names}: {e}"


# -- FusedBatchNormV3 / fused_batch_norm --------------------------------------------------------------
@st.composite
def forward_cases(draw):
    fmt, axis, shape = draw(data_format_shapes())
    dt = draw(st.sampled_from(DTYPES))
    sdt = dtypes.stats_dtype(dt)
    kind, v, rng = draw(x_values(shape, axis, dt))
    training = draw(st.booleans())
    out_kind = draw(st.sampled_from([None, None, "fresh", "x", "shift"]))
    view = draw(st.sampled_from(X_VIEWS))
    x, out = place(v, view, out_kind, axis, rng)
    c = shape[axis]
    scale = _vec(draw, draw(st.sampled_from(["scale", "scale", "big_scale"])), c, sdt, rng)
    offset = _vec(draw, draw(st.sampled_from(["offset", "offset", "big_offset"])), c, sdt, rng)
    factor = draw(st.sampled_from([1.0, 1.0, 0.0, 0.3, 0.99])) if training else 1.0
    if training and factor == 1.0 and draw(st.booleans()):
        mean = variance = []
    else:
        mean, variance = _vec(draw, "mean", c, sdt, rng), _vec(draw, "variance", c, sdt, rng)
    eps = draw(st.sampled_from([1e-3, 1e-4, 1e-5, 0.5]))
    backend = draw(st.sampled_from(BACKENDS))
    what = (f"{backend} {fmt} {'x'.join(map(str, shape))} {dt.name} {kind} view={view} out={out_kind} "
            f"training={training} f={factor} eps={eps}")
    return dict(x=x, out=out, fmt=fmt, axis=axis, dt=dt, sdt=sdt, training=training, scale=scale,
                offset=offset, mean=mean, variance=variance, eps=eps, factor=factor, backend=backend,
                what=what)


def _forward_truth(c, x64):
    if c["training"]:
        y, m, v = reference.forward_training(x64, _f64(c["scale"]), _f64(c["offset"]), c["eps"], c["axis"])
        unbiased = v * reference.bessel_factor(reference.count(x64, c["axis"]))
        if c["factor"] != 1.0:
            bm = reference.moving_average(_f64(c["mean"]), m, c["factor"])
            bv = reference.moving_average(_f64(c["variance"]), unbiased, c["factor"])
        else:
            bm, bv = m, unbiased
        return dict(y=y, batch_mean=bm, batch_variance=bv, reserve_space_1=m, reserve_space_2=v)
    y = reference.forward_inference(x64, _f64(c["scale"]), _f64(c["offset"]), _f64(c["mean"]),
                                    _f64(c["variance"]), c["eps"], c["axis"])
    return dict(y=y, batch_mean=_f64(c["mean"]), batch_variance=_f64(c["variance"]),
                reserve_space_1=_f64(c["mean"]), reserve_space_2=_f64(c["variance"]))


@fuzz_settings(700)
@given(c=forward_cases(), api=st.sampled_from(["raw_ops", "raw_ops", "fused_batch_norm"]))
def test_forward_matches_the_reference(c, api):
    COUNTS[f"forward {api}"] += 1
    x = c["x"]
    x64 = np.array(x, np.float64)
    snap = Snapshot(x=x, scale=c["scale"], offset=c["offset"], mean=c["mean"], variance=c["variance"])
    kw = {} if c["out"] is None else {"out": c["out"]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)   # numpy's overflow notes; the values are judged
        if api == "raw_ops":
            r = refbn.raw_ops.FusedBatchNormV3(
                x, c["scale"], c["offset"], c["mean"], c["variance"], epsilon=c["eps"],
                exponential_avg_factor=c["factor"], data_format=c["fmt"], is_training=c["training"],
                backend=c["backend"], **kw)
            got = r._asdict()
        else:
            mean = None if (isinstance(c["mean"], list) and not c["mean"]) else c["mean"]
            variance = None if mean is None else c["variance"]
            y, bm, bv = refbn.fused_batch_norm(
                x, c["scale"], c["offset"], mean, variance, epsilon=c["eps"], data_format=c["fmt"],
                is_training=c["training"], exponential_avg_factor=c["factor"], backend=c["backend"], **kw)
            got = dict(y=y, batch_mean=bm, batch_variance=bv)
    truth = _forward_truth(c, x64)
    what = f"{api} {c['what']}"
    snap.check(c["out"], what)
    _check_out(got["y"], c["out"], "y", c["dt"], truth["y"], c["backend"], what, noise=_y_noise(c, x64))
    vnoise = variance_noise(x64, reference.count(x64, c["axis"]))
    for name, value in got.items():
        if name in truth and name != "y":
            judge(value, truth[name], name, c["sdt"], c["backend"], what,
                  noise=vnoise if name in ("batch_variance", "reserve_space_2") else 0.0)


# -- FusedBatchNormGradV3 ------------------------------------------------------------------------------
@st.composite
def grad_cases(draw):
    fmt, axis, shape = draw(data_format_shapes())
    dt = draw(st.sampled_from(DTYPES))
    sdt = dtypes.stats_dtype(dt)
    kind, v, rng = draw(x_values(shape, axis, dt))
    dkind, dv, _ = draw(x_values(shape, axis, dt, allow_nonfinite=False))
    training = draw(st.booleans())
    out_kind = draw(st.sampled_from([None, None, "fresh", "x", "dy", "shift_x", "shift_dy"]))
    xv, dyv = draw(st.sampled_from(X_VIEWS)), draw(st.sampled_from(X_VIEWS))
    x, out_x = place(v, xv, out_kind[-1:] if out_kind in ("x", "shift_x") else None, axis, rng)
    if out_kind == "shift_x":
        x, out_x = place(v, xv, "shift", axis, rng)
    dy, out_dy = place(dv, dyv, {"dy": "x", "shift_dy": "shift"}.get(out_kind), axis, rng)
    out = {None: None, "fresh": np.full(shape, SENTINEL, dt), "x": out_x, "shift_x": out_x,
           "dy": out_dy, "shift_dy": out_dy}[out_kind]
    c = shape[axis]
    scale = _vec(draw, draw(st.sampled_from(["scale", "scale", "big_scale"])), c, sdt, rng)
    if training and draw(st.booleans()):     # the forward's own statistics
        with np.errstate(invalid="ignore", over="ignore"):
            m, var = reference.moments(np.array(x, np.float64), axis)
        rs1, rs2 = m.astype(sdt), var.astype(sdt)
        rs2 = np.where(np.isinf(rs2) & np.isfinite(var), np.finfo(sdt).max, rs2).astype(sdt)
        rs1, rs2 = as_vector(rs1, draw(st.sampled_from(VEC_VIEWS)), rng), as_vector(rs2, "array", rng)
    else:
        rs1, rs2 = _vec(draw, "mean", c, sdt, rng), _vec(draw, "variance", c, sdt, rng)
    eps = draw(st.sampled_from([1e-3, 1e-4, 1e-5, 0.5]))
    backend = draw(st.sampled_from(BACKENDS))
    what = (f"{backend} {fmt} {'x'.join(map(str, shape))} {dt.name} x={kind} dy={dkind} views={xv},{dyv} "
            f"out={out_kind} training={training} eps={eps}")
    return dict(x=x, dy=dy, out=out, fmt=fmt, axis=axis, dt=dt, sdt=sdt, training=training, scale=scale,
                rs1=rs1, rs2=rs2, eps=eps, backend=backend, what=what)


@fuzz_settings(450)
@given(c=grad_cases())
def test_gradient_matches_the_reference(c):
    COUNTS["gradient raw_ops"] += 1
    x, dy = c["x"], c["dy"]
    x64, dy64 = np.array(x, np.float64), np.array(dy, np.float64)
    snap = Snapshot(x=x, dy=dy, scale=c["scale"], rs1=c["rs1"], rs2=c["rs2"])
    kw = {} if c["out"] is None else {"out": c["out"]}
    nonfinite_stats = not (np.isfinite(_f64(c["rs1"])).all() and np.isfinite(_f64(c["rs2"])).all())
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            r = refbn.raw_ops.FusedBatchNormGradV3(dy, x, c["scale"], c["rs1"], c["rs2"], [], epsilon=c["eps"],
                                                   data_format=c["fmt"], is_training=c["training"],
                                                   backend=c["backend"], **kw)
    except (ValueError, TypeError) as e:
        # reserve spaces of a forward with NaN/Inf in x are NaN/Inf: refusing them is allowed
        if not nonfinite_stats:
            raise
        _refusal_ok(e, ("reserve_space_1", "reserve_space_2"), c["what"])
        snap.check(None, c["what"])
        if c["out"] is not None:
            assert not np.shares_memory(c["out"], x) or np.array_equal(np.array(x, np.float64), x64,
                                                                       equal_nan=True)
        return
    with np.errstate(invalid="ignore", over="ignore"):
        dx, ds, do = reference.backward(dy64, x64, _f64(c["scale"]), _f64(c["rs1"]), _f64(c["rs2"]), c["eps"],
                                        c["training"], c["axis"])
    snap.check(c["out"], c["what"])
    noise = grad_noise(dy64, x64, _f64(c["scale"]), _f64(c["rs1"]), _f64(c["rs2"]), c["eps"], c["training"], c["axis"])
    _check_out(r.x_backprop, c["out"], "x_backprop", c["dt"], dx, c["backend"], c["what"], noise["x_backprop"])
    judge(r.scale_backprop, ds, "scale_backprop", c["sdt"], c["backend"], c["what"], noise["scale_backprop"])
    judge(r.offset_backprop, do, "offset_backprop", c["sdt"], c["backend"], c["what"], noise["offset_backprop"])


# -- BatchNorm, one shot: train, backward, infer, backward ------------------------------------------
#: convention -> (default momentum, default epsilon, variance averaged, momentum = weight kept?)
CONVENTIONS = {"keras": (0.99, 1e-3, "biased", True), "tf_fused": (0.99, 1e-3, "unbiased", True),
               "torch": (0.1, 1e-5, "unbiased", False), "flax": (0.99, 1e-5, "biased", True)}


@st.composite
def layer_cases(draw):
    user_axis, axis, shape = draw(axis_shapes(min_count=2))
    dt = draw(st.sampled_from(DTYPES))
    kind, v, rng = draw(x_values(shape, axis, dt, allow_nonfinite=False))
    dkind, dv, _ = draw(x_values(shape, axis, dt, allow_nonfinite=False))
    xv, dyv = draw(st.sampled_from(X_VIEWS)), draw(st.sampled_from(X_VIEWS))
    conv = draw(st.sampled_from(sorted(CONVENTIONS)))
    state_dt = draw(st.sampled_from(["float32", "float64"]))
    backend = draw(st.sampled_from(BACKENDS))
    what = (f"BatchNorm({conv}, axis={user_axis}, dtype={state_dt}, {backend}) x {'x'.join(map(str, shape))} "
            f"{dt.name} {kind} dy={dkind} views={xv},{dyv}")
    return dict(x=as_x_view(v, xv, axis, rng), dy=as_x_view(dv, dyv, axis, rng), axis=axis,
                user_axis=user_axis, dt=dt, conv=conv, state_dt=np.dtype(state_dt), backend=backend, what=what)


@fuzz_settings(300)
@given(c=layer_cases())
def test_batchnorm_matches_the_reference(c):
    COUNTS["BatchNorm train/backward/infer/backward"] += 1
    x, dy, axis, what = c["x"], c["dy"], c["axis"], c["what"]
    x64, dy64 = np.array(x, np.float64), np.array(dy, np.float64)
    momentum, eps, variance_kind, keep = CONVENTIONS[c["conv"]]
    snap = Snapshot(x=x, dy=dy)
    bn = refbn.BatchNorm(axis=c["user_axis"], convention=c["conv"], dtype=c["state_dt"], backend=c["backend"])
    assert bn.epsilon == eps, what
    sdt = c["state_dt"]
    ones = np.ones(x.shape[axis])
    y_t, mean, var = reference.forward_training(x64, ones, 0 * ones, eps, axis)
    value = var * (reference.bessel_factor(reference.count(x64, axis)) if variance_kind == "unbiased" else 1.0)
    decay = 1.0 - momentum if keep else momentum
    mm_t, mv_t = reference.moving_average(0.0, mean, decay), reference.moving_average(1.0, value, decay)
    with np.errstate(over="ignore"):
        overflows = not np.isfinite(mv_t.astype(sdt)).all()
    if overflows:   # a float32 overflow of the moving variance counts as a non-finite batch: refused
        with pytest.raises(ValueError) as e:
            bn(x, training=True)
        _refusal_ok(e.value, ("x",), what)
        snap.check(None, what)
        assert not bn.built and bn.steps == 0, what
        return
    y = bn(x, training=True)
    snap.check(None, what)
    judge(y, y_t, "y", c["dt"], c["backend"], what + " training",
          noise=_y_noise(dict(training=True, axis=axis, scale=ones, offset=0 * ones, eps=eps), x64))
    state_close(bn.moving_mean, mm_t, "moving_mean", sdt, what)
    state_close(bn.moving_variance, mv_t, "moving_variance", sdt, what)
    assert bn.moving_mean.dtype == sdt and bn.steps == 1, what
    dx = bn.backward(dy)
    snap.check(None, what)
    dx_t, dg_t, db_t = reference.backward(dy64, x64, ones, mean, var, eps, True, axis)
    noise = grad_noise(dy64, x64, ones, mean, var, eps, True, axis)
    judge(dx, dx_t, "x_backprop", c["dt"], c["backend"], what + " backward (training)", noise["x_backprop"])
    judge(bn.dgamma, dg_t, "scale_backprop", sdt, c["backend"], what, noise["scale_backprop"])
    judge(bn.dbeta, db_t, "offset_backprop", sdt, c["backend"], what, noise["offset_backprop"])
    mm, mv = bn.moving_mean.astype(np.float64), bn.moving_variance.astype(np.float64)
    y = bn(x, training=False)
    snap.check(None, what)
    judge(y, reference.forward_inference(x64, ones, 0 * ones, mm, mv, eps, axis), "y", c["dt"], c["backend"],
          what + " inference", noise=_y_noise(dict(training=False, axis=axis, scale=ones, offset=0 * ones, eps=eps,
                                                   mean=mm, variance=mv), x64))
    dx = bn.backward(dy)
    dx_t, dg_t, db_t = reference.backward(dy64, x64, ones, mm, mv, eps, False, axis)
    noise = grad_noise(dy64, x64, ones, mm, mv, eps, False, axis)
    judge(dx, dx_t, "x_backprop", c["dt"], c["backend"], what + " backward (inference)", noise["x_backprop"])
    judge(bn.dgamma, dg_t, "scale_backprop", sdt, c["backend"], what, noise["scale_backprop"])
    snap.check(None, what)
    # the whole state survives pickle and deepcopy: the same results afterwards
    twin = pickle.loads(pickle.dumps(bn))
    np.testing.assert_array_equal(twin.backward(dy), bn.backward(dy), err_msg=what + " after pickle")


# -- Moments.from_array and the merges ---------------------------------------------------------------
@st.composite
def moments_cases(draw):
    if draw(st.booleans()):
        fmt, axis, shape = draw(data_format_shapes())
        where = dict(data_format=fmt)
    else:
        user_axis, axis, shape = draw(axis_shapes())
        where = dict(axis=user_axis)
    dt = draw(st.sampled_from(DTYPES))
    kind, v, rng = draw(x_values(shape, axis, dt))
    view = draw(st.sampled_from(X_VIEWS))
    shards = draw(st.integers(1, 5))
    backend = draw(st.sampled_from(BACKENDS))
    return dict(x=as_x_view(v, view, axis, rng), axis=axis, where=where, shards=shards, backend=backend,
                what=f"{backend} {where} {'x'.join(map(str, shape))} {dt.name} {kind} view={view} shards={shards}")


@fuzz_settings(300)
@given(c=moments_cases())
def test_moments_and_merges_match_the_reference(c):
    COUNTS["Moments.from_array + merges"] += 1
    x, axis, what = c["x"], c["axis"], c["what"]
    x64 = np.array(x, np.float64)
    snap = Snapshot(x=x)
    m = stats.Moments.from_array(x, backend=c["backend"], **c["where"])
    snap.check(None, what)
    with np.errstate(invalid="ignore", over="ignore"):
        mean, var = reference.moments(x64, axis)
    n = reference.count(x64, axis)
    assert m.count == n, what
    ctx = "reference" if c["backend"] == "numpy" else "numba_moments"
    tiny = np.finfo(np.float64).tiny
    fin = np.isfinite(x64)
    size = max(rms_of(x64[fin]), tiny)
    assert_close(m.mean, mean, "mean", np.float64, ctx, scale=size, what=what)
    assert_close(m.m2, var * n, "m2", np.float64, ctx,
                 scale=max(rms_of(var * n), variance_noise(x64, n) * n / np.finfo(np.float64).eps, tiny), what=what)
    if not fin.all():
        return
    # shards along a non-channel axis (some may be empty), merged pairwise and one by one
    k = 0 if axis != 0 else 1
    if x.ndim < 2:
        return
    parts = np.array_split(x, c["shards"], axis=k)
    per = [stats.Moments.from_array(p, backend=c["backend"], **c["where"]) for p in parts]
    snap.check(None, what)
    merged = stats.Moments.merge_all(per)
    one_by_one = per[0]
    for p in per[1:]:
        one_by_one = one_by_one.merge(p)
    std = np.sqrt(var)
    # the variance's own size, or (constant channels) the float64 noise of the shards' means,
    # each off by up to eps*|mean|: their spread enters the merge squared, below eps * mean^2
    var_scale = np.maximum(np.maximum(std * np.maximum(np.abs(mean), std), np.finfo(np.float64).eps * mean * mean), tiny)
    for got in (merged, one_by_one):
        assert got.count == n, what
        assert_close(got.mean, mean, "mean", np.float64, "merge", scale=np.maximum(np.maximum(np.abs(mean), std), tiny),
                     what=what + " merged")
        assert_close(got.variance, var, "variance", np.float64, "merge", scale=var_scale, what=what + " merged")
    repr(merged)
    r = stats.merge(per, "exact")
    repr(r)
    assert_close(r.variance, var, "variance", np.float64, "merge", scale=var_scale, what=what + " stats.merge")
    empties = [stats.Moments.empty(m.channels)] * c["shards"]
    assert stats.Moments.merge_all(empties).count == 0
    repr(stats.Moments.merge_all(empties))


# -- refused calls -----------------------------------------------------------------------------------
def _masked(a, rng):
    return np.ma.masked_array(a, mask=rng.random(np.shape(a)) < 0.3)


def _bad_vector(kind, v, rng):
    v = np.array(v, copy=True)
    if kind == "len":
        return np.concatenate([v, v[:1]])
    if kind == "short":
        return v[:-1]
    if kind in ("nan", "inf", "-inf"):
        v[int(rng.integers(0, v.size))] = float(kind)
        return v
    if kind == "neg":
        v[int(rng.integers(0, v.size))] = -0.5
        return v
    if kind == "2d":
        return v.reshape(1, -1)
    if kind == "str":
        return ["a"] * v.size
    if kind == "complex":
        return v.astype(np.complex64)
    if kind == "masked":
        return _masked(v, rng)
    if kind == "none":
        return None
    raise AssertionError(kind)


def _bad_out(kind, shape, dt, rng):
    if kind == "shape":
        return np.empty(tuple(shape) + (1,), dt)
    if kind == "dtype":
        return np.empty(shape, np.float64 if np.dtype(dt) != np.float64 else np.float32)
    if kind == "readonly":
        a = np.empty(shape, dt)
        a.flags.writeable = False
        return a
    if kind == "strided":
        return np.empty(tuple(shape[:-1]) + (2 * shape[-1],), dt)[..., ::2]
    if kind == "fortran":
        big = np.empty(tuple(shape[:-1]) + (2 * shape[-1],), dt)
        return np.asfortranarray(big)[..., ::2] if shape[-1] > 1 else big[..., ::2]
    if kind == "list":
        return np.zeros(shape, dt).tolist()
    raise AssertionError(kind)


_X_BAD = ["masked", "masked_nomask", "int32", "complex", "object", "str", "scalar", "c0", "rank", "bool"]
_VEC_BAD = ["len", "short", "nan", "inf", "-inf", "2d", "str", "complex", "masked"]
_OUT_BAD = ["shape", "dtype", "readonly", "strided", "list"]


def _bad_x(kind, x, fmt_rank_axis, rng):
    if kind == "masked":
        return _masked(x, rng)
    if kind == "masked_nomask":
        return np.ma.masked_array(x)
    if kind == "int32":
        return x.astype(np.int32)
    if kind == "complex":
        return x.astype(np.float64).astype(np.complex64)
    if kind == "object":
        return x.astype(np.float64).astype(object)
    if kind == "str":
        return x.astype(np.float64).astype(str)
    if kind == "scalar":
        return 3.0
    if kind == "c0":
        shape = list(x.shape)
        shape[fmt_rank_axis] = 0
        return np.zeros(shape, x.dtype)
    if kind == "rank":
        return x[..., None]
    if kind == "bool":
        return x > 0
    raise AssertionError(kind)


@st.composite
def refusal_cases(draw):
    """(entry point, argument that is bad, how, callable making the call, inputs to snapshot, names)."""
    entry = draw(st.sampled_from(["FusedBatchNormV3", "FusedBatchNormGradV3", "fused_batch_norm", "BatchNorm",
                                  "BatchNorm.backward", "BatchNorm()", "Moments", "merge"]))
    fmt, axis, shape = draw(data_format_shapes(min_count=2))
    while int(np.prod(shape)) > 4096:
        fmt, axis, shape = "NHWC", 3, (2, 1, 2, 3)
    dt = draw(st.sampled_from(DTYPES))
    sdt = dtypes.stats_dtype(dt)
    rng = draw(_seed())
    c = shape[axis]
    x = make_values("normal", shape, dt, axis, rng)
    backend = draw(st.sampled_from(BACKENDS))
    vec = {k: vector_values(r, c, sdt, rng) for k, r in (("scale", "scale"), ("offset", "offset"),
                                                           ("mean", "mean"), ("variance", "variance"))}
    if entry in ("FusedBatchNormV3", "fused_batch_norm"):
        training = draw(st.booleans())
        factor = draw(st.sampled_from([1.0, 0.5])) if training else 1.0
        kw = dict(x=x, scale=vec["scale"], offset=vec["offset"], mean=vec["mean"], variance=vec["variance"],
                  epsilon=1e-3, exponential_avg_factor=factor, data_format=fmt, is_training=training,
                  backend=backend)
        stats_used = not training or factor != 1.0
        choices = [("x", k) for k in _X_BAD] + [("scale", k) for k in _VEC_BAD] + \
                  [("offset", k) for k in _VEC_BAD] + [("out", k) for k in _OUT_BAD] + \
                  [("epsilon", k) for k in (0.0, -1e-3, float("nan"), float("inf"), "0.001", None)] + \
                  [("data_format", k) for k in ("NHCW", b"\xff\xfe", 3, None, "")] + \
                  [("is_training", k) for k in ("yes", None)] + [("backend", k) for k in ("cuda", None)]
        if training:
            choices += [("exponential_avg_factor", k) for k in (1.5, -0.1, float("nan"))]
            choices += [("x", "n0")]
        if stats_used:
            choices += [("mean", k) for k in ("nan", "inf", "-inf", "len", "masked")]
            choices += [("variance", k) for k in ("nan", "inf", "neg", "len", "masked")]
        if not training:
            choices += [("mean", "none"), ("variance", "none")]
        arg, how = draw(st.sampled_from(choices))
        if arg == "x":
            kw["x"] = _bad_x(how, x, axis, rng) if how != "n0" else np.zeros((0,) + shape[1:], dt)
        elif arg in vec:
            kw[arg] = _bad_vector(how, vec[arg], rng)
        elif arg == "out":
            kw["out"] = _bad_out(how, shape, dt, rng)
        else:
            kw[arg] = how
        if entry == "FusedBatchNormV3":
            call = lambda: refbn.raw_ops.FusedBatchNormV3(**kw)
        else:
            call = lambda: refbn.fused_batch_norm(**kw)
        names = (arg,) if arg != "x" or how != "rank" else ("x", "data_format")
        return entry, arg, how, call, kw, names
    if entry == "FusedBatchNormGradV3":
        training = draw(st.booleans())
        dy = make_values("normal", shape, dt, axis, rng)
        kw = dict(y_backprop=dy, x=x, scale=vec["scale"], reserve_space_1=vec["mean"],
                  reserve_space_2=vec["variance"], reserve_space_3=[], epsilon=1e-3, data_format=fmt,
                  is_training=training, backend=backend)
        choices = [("y_backprop", k) for k in ("masked", "int32", "shape", "dtype", "scalar")] + \
                  [("x", k) for k in ("masked", "int32", "complex", "c0", "rank")] + \
                  [("scale", k) for k in _VEC_BAD] + [("reserve_space_1", k) for k in ("len", "short", "2d")] + \
                  [("reserve_space_2", k) for k in ("len", "neg", "2d")] + [("out", k) for k in _OUT_BAD] + \
                  [("epsilon", k) for k in (0.0, float("nan"))] + [("data_format", k) for k in ("NHCW", b"\xff")]
        arg, how = draw(st.sampled_from(choices))
        if arg == "y_backprop":
            kw[arg] = {"masked": lambda: _masked(dy, rng), "int32": lambda: dy.astype(np.int32),
                       "shape": lambda: dy[:1] if dy.shape[0] > 1 else np.concatenate([dy, dy]),
                       "dtype": lambda: dy.astype(np.float64 if dt != np.float64 else np.float32),
                       "scalar": lambda: 1.0}[how]()
        elif arg == "x":
            kw["x"] = _bad_x(how, x, axis, rng)
            if how == "c0":
                kw["y_backprop"] = kw["x"].copy()
            if how == "rank":
                kw["y_backprop"] = dy[..., None]
        elif arg in ("scale",):
            kw[arg] = _bad_vector(how, vec["scale"], rng)
        elif arg == "reserve_space_1":
            kw[arg] = _bad_vector(how, vec["mean"], rng)
        elif arg == "reserve_space_2":
            kw[arg] = _bad_vector(how, vec["variance"], rng)
        elif arg == "out":
            kw["out"] = _bad_out(how, shape, dt, rng)
        else:
            kw[arg] = how
        names = (arg,) if not (arg == "x" and how == "rank") else ("x", "y_backprop", "data_format")
        if arg == "x" and how == "c0":
            names = ("x", "y_backprop")
        return entry, arg, how, (lambda: refbn.raw_ops.FusedBatchNormGradV3(**kw)), kw, names
    if entry == "BatchNorm()":
        arg, value = draw(st.sampled_from([
            ("dtype", np.int32), ("dtype", "int32"), ("dtype", np.complex64), ("dtype", bool), ("momentum", 1.5),
            ("momentum", float("nan")), ("momentum", -0.1), ("epsilon", 0.0), ("epsilon", float("inf")),
            ("convention", "caffe"), ("on_nonfinite", "ignore"), ("backend", "cuda"), ("axis", "last"),
            ("axis", 1.5), ("debias", "yes"), ("channels", 0), ("channels", -3)]))
        return entry, arg, value, (lambda: refbn.BatchNorm(**{arg: value})), {}, (arg,)
    if entry in ("BatchNorm", "BatchNorm.backward"):
        user_axis = axis - len(shape) if draw(st.booleans()) else axis
        bn = refbn.BatchNorm(axis=user_axis, backend=backend,
                             on_nonfinite=draw(st.sampled_from(["raise", "raise", "skip"])))
        built = draw(st.booleans())
        good = make_values("normal", shape, dt, axis, rng)
        if built:
            bn(good, training=True)
        if entry == "BatchNorm":
            how = draw(st.sampled_from([k for k in _X_BAD if k != "rank"] + ["nan", "inf", "channels", "n1", "training"]))
            if how in ("nan", "inf"):
                if bn.on_nonfinite != "raise":
                    bn.on_nonfinite = "raise"
                bad = inject_nonfinite(good, axis, rng, how)
            elif how == "channels":
                if not built:
                    bn(good, training=False)
                bad = np.concatenate([good, np.take(good, [0], axis=axis)], axis=axis)
            elif how == "n1":
                bad = np.take(good, [0], axis=[i for i in range(len(shape)) if i != axis][0]) if len(shape) > 1 \
                    else good
                if len(shape) > 1:
                    bad = np.array(bad)
                    for i in range(len(shape)):
                        if i != axis:
                            bad = np.take(bad, [0], axis=i)
            elif how == "training":
                bad = good
            else:
                bad = _bad_x(how, good, axis, rng)
            training = "yes" if how == "training" else (True if how in ("nan", "inf", "n1") else draw(st.booleans()))
            names = ("training",) if how == "training" else ("x",)
            if how == "rank":
                names = ("x", "axis")
            if how == "c0":
                names = ("x",)
            return entry, "x" if how != "training" else "training", how, (lambda: bn(bad, training=training)), \
                {"x": bad, "layer": bn}, names
        dy = make_values("normal", shape, dt, axis, rng)
        if not built and draw(st.booleans()):
            return entry, "dy", "no forward", (lambda: bn.backward(dy)), {"dy": dy, "layer": bn}, ("dy", "backward")
        if not built:
            bn(good, training=draw(st.booleans()))
        how = draw(st.sampled_from(["masked", "int32", "shape", "dtype", "scalar", "str"]))
        bad = {"masked": lambda: _masked(dy, rng), "int32": lambda: dy.astype(np.int32),
               "shape": lambda: dy[..., :0] if dy.shape[-1] > 0 and dy.ndim > 1 else dy[None],
               "dtype": lambda: dy.astype(np.float64 if dt != np.float64 else np.float32),
               "scalar": lambda: 2.0, "str": lambda: dy.astype(np.float64).astype(str)}[how]()
        return entry, "dy", how, (lambda: bn.backward(bad)), {"dy": bad, "layer": bn}, ("dy",)
    if entry == "Moments":
        how = draw(st.sampled_from(["masked", "int32", "complex", "c0", "both", "axis", "axis_type", "format"]))
        kw = dict(x=x, data_format=fmt, backend=backend)
        if how in ("masked", "int32", "complex", "c0"):
            kw["x"] = _bad_x(how, x, axis, rng)
            names = ("x",)
        elif how == "both":
            kw["axis"] = axis
            names = ("axis", "data_format")
        elif how == "axis":
            kw.pop("data_format")
            kw["axis"] = len(shape) + 2
            names = ("axis",)
        elif how == "axis_type":
            kw.pop("data_format")
            kw["axis"] = "c"
            names = ("axis",)
        else:
            kw["data_format"] = b"\xff\xfe"
            names = ("data_format",)
        return entry, names[0], how, (lambda: stats.Moments.from_array(**kw)), kw, names
    # merge
    m = [stats.Moments.from_array(p, data_format=fmt) for p in np.array_split(x, 2, axis=0)]
    how = draw(st.sampled_from(["reference", "method", "dtype", "epsilon", "shards", "shards_mixed"]))
    kw = dict(shards=m, method="exact", dtype="float32", epsilon=1e-5)
    if how == "reference":
        kw["reference"] = stats.Moments.empty(c + 1) if draw(st.booleans()) else \
            stats.Moments(3, np.zeros(c + 2), np.ones(c + 2))
        kw["method"] = draw(st.sampled_from(stats.METHODS))
    elif how == "method":
        kw["method"] = "sum"
    elif how == "dtype":
        kw["dtype"] = "float16"
    elif how == "epsilon":
        kw["epsilon"] = 0.0
    elif how == "shards":
        kw["shards"] = []
    else:
        kw["shards"] = m + [stats.Moments.empty(c + 1)]
    names = {"shards_mixed": ("shards",)}.get(how, (how,))
    return entry, how, how, (lambda: stats.merge(**kw)), kw, names


def _layer_state(bn):
    return {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in vars(bn).items()
            if not k.startswith("__")} | {"built": bn.built}


def _same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        va, vb = a[k], b[k]
        if isinstance(va, np.ndarray):
            assert isinstance(vb, np.ndarray) and va.dtype == vb.dtype and va.tobytes() == vb.tobytes(), k
        elif isinstance(va, tuple):   # e.g. a cached forward
            assert len(va) == len(vb), k
            for p, q in zip(va, vb):
                if isinstance(p, np.ndarray):
                    assert p.tobytes() == q.tobytes(), k
                else:
                    assert p is q or p == q, k
        else:
            assert va is vb or va == vb or (va != va and vb != vb), k


@fuzz_settings(1200)
@given(case=refusal_cases())
def test_refused_calls_name_the_argument(case):
    """A bad argument of any entry point: a ValueError/TypeError naming it, raised before anything is
    computed; no input, no out= buffer and no layer state changes, and a refused first call does not
    build the layer."""
    entry, arg, how, call, inputs, names = case
    COUNTS[f"refused {entry}"] += 1
    layer = inputs.get("layer")
    arrays = {k: v for k, v in inputs.items() if k not in ("layer", "shards", "reference") and v is not None
              and not isinstance(v, (str, bytes, int, float, refbn.BatchNorm, stats.Moments))}
    snap = Snapshot(**arrays)
    before = _layer_state(layer) if layer is not None else None
    what = f"{entry}: {arg} = {how!r}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            result = call()
        except (ValueError, TypeError) as e:
            _refusal_ok(e, names, what)
        except Exception as e:   # a raw traceback: the class the issue forbids
            raise AssertionError(f"{what}: raised {type(e).__name__}: {e}") from e
        else:
            raise AssertionError(f"{what}: accepted, returned {type(result).__name__}")
    snap.check(None, what)
    if layer is not None:
        _same_state(before, _layer_state(layer))
