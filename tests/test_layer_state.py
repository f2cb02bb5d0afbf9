"""refbn.BatchNorm as a state machine (hypothesis RuleBasedStateMachine), against a float64 model.

The model keeps the expected state (gamma, beta, moving statistics, steps, built, and what the
last successful forward call saw: its own copy of x, its statistics and its gamma) computed with
refbn.reference (moments, moving_average, forward_*, backward), never with BatchNorm itself.

Rules: training and inference calls (ordinary, offset, huge and non-finite batches), backward,
the user assigning gamma / beta / moving statistics (good values, lists included, and bad ones),
modifying x in place after a forward, bad calls, deepcopy and pickle.
Invariants: the state changes only on a successful call (a refused call leaves every attribute
as it was, and a refused first call does not build the layer); the moving statistics stay finite
unless on_nonfinite="propagate"; backward differentiates the last successful forward (its x,
statistics and gamma) or refuses; every result equals the reference's.

Budget: ~40 s on 2 cores with numba's cache warm.  REFBN_FUZZ_SCALE multiplies the runs; STEPS
counts the steps run (printed at the end of the module).
"""
import collections
import copy
import os
import pickle
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import refbn
from refbn import reference
from strategies import f64_noise, grad_noise, judge, names_argument, rms_of, state_close

STEPS = collections.Counter()
_SCALE = float(os.environ.get("REFBN_FUZZ_SCALE", "1"))
#: convention -> (default momentum, default epsilon, variance averaged, momentum = weight kept?)
CONVENTIONS = {"keras": (0.99, 1e-3, "biased", True), "tf_fused": (0.99, 1e-3, "unbiased", True),
               "torch": (0.1, 1e-5, "unbiased", False), "flax": (0.99, 1e-5, "biased", True)}
STATE = ("gamma", "beta", "moving_mean", "moving_variance")


def _snapshot(bn):
    """Every public attribute of the layer, copied."""
    out = {"built": bn.built, "steps": bn.steps, "initial_weight": bn.initial_weight}
    for k in STATE + ("dgamma", "dbeta"):
        v = getattr(bn, k)
        out[k] = None if v is None else (v.dtype, v.tobytes())
    return out


class BatchNormMachine(RuleBasedStateMachine):
    @initialize(conv=st.sampled_from(sorted(CONVENTIONS)), backend=st.sampled_from(["numpy", "numba"]),
                on_nonfinite=st.sampled_from(["raise", "skip", "propagate"]),
                state_dt=st.sampled_from(["float32", "float64"]), x_dt=st.sampled_from(["float32", "float64", "float16"]),
                rank=st.integers(2, 4), c=st.integers(1, 6), data=st.data())
    def setup(self, conv, backend, on_nonfinite, state_dt, x_dt, rank, c, data):
        STEPS["machines"] += 1
        self.axis = data.draw(st.integers(0, rank - 1))
        self.user_axis = self.axis - rank if data.draw(st.booleans()) else self.axis
        self.rank, self.c = rank, c
        momentum, eps, self.var_kind, self.keep = CONVENTIONS[conv]
        if conv == "torch" and data.draw(st.booleans()):
            momentum = None
        elif data.draw(st.booleans()):
            momentum = data.draw(st.sampled_from([0.5, 0.9, 0.0, 1.0]))
        self.momentum, self.eps = momentum, eps
        kw = {} if momentum == CONVENTIONS[conv][0] else {"momentum": momentum}
        self.bn = refbn.BatchNorm(axis=self.user_axis, convention=conv, backend=backend, on_nonfinite=on_nonfinite,
                                  dtype=state_dt, **kw)
        assert self.bn.epsilon == eps
        self.conv, self.backend, self.on_nonfinite = conv, backend, on_nonfinite
        self.sdt, self.xdt = np.dtype(state_dt), np.dtype(x_dt)
        self.rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 32 - 1)))
        # the model
        self.built, self.steps = False, 0
        self.gamma = self.beta = self.mm = self.mv = None
        self.last = None          # (x64 copy, mean, var, training, gamma64) of the last successful forward
        self.user_x = None        # the array the user passed to the last successful forward
        self.what = f"BatchNorm({conv}, momentum={momentum}, {backend}, {on_nonfinite}, {state_dt}) x {x_dt}"

    # -- helpers ----------------------------------------------------------------------------------
    def shape(self, n=None):
        s = [int(self.rng.integers(1, 4)) for _ in range(self.rank)]
        s[self.axis] = self.c
        if n is not None:   # at least n values per channel
            while np.prod(s) // self.c < n:
                s[(self.axis + 1) % self.rank] += 1
        return tuple(s)

    def x(self, kind, n=2):
        s = self.shape(n)
        if kind == "offset":
            v = 1e3 + self.rng.standard_normal(s) * (1e-2 if self.xdt != np.float16 else 1.0)
        elif kind == "huge":        # the moving variance overflows a float32 state
            v = self.rng.choice([-1.0, 1.0], size=s) * 1e20 * self.rng.uniform(0.5, 1, s)
        else:
            v = self.rng.normal(self.rng.uniform(-3, 3), self.rng.uniform(0.5, 3), s)
        if kind == "huge" and self.xdt == np.float16:
            v = v * 6e-16              # ~6e4: the largest float16 values (their variance fits float32)
        v = v.astype(self.xdt)
        if kind in ("nan", "inf"):
            v[tuple(int(self.rng.integers(0, d)) for d in s)] = np.nan if kind == "nan" else np.inf
        return v

    def y_noise(self, x64, var, mean_abs):
        """float64 noise of y (see strategies.judge): f64_noise * (|k| * (|x| + |mean|) + |beta|)."""
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            k = np.abs(self.gamma if self.built else np.ones(self.c)) * reference.inv_std(var, self.eps)
        k = float(np.max(np.where(np.isfinite(k), k, 0.0)))
        beta = float(np.max(np.abs(self.beta))) if self.built else 0.0
        fin = np.isfinite(x64)
        return f64_noise(reference.count(x64, self.axis)) * (k * (rms_of(x64[fin]) + mean_abs) + beta)

    def decay(self):
        if not self.keep:
            return 1.0 / (self.steps + 1) if self.momentum is None else self.momentum
        return 1.0 - self.momentum

    def build_model(self):
        if not self.built:
            self.built = True
            self.gamma, self.beta = np.ones(self.c), np.zeros(self.c)
            self.mm, self.mv = np.zeros(self.c), np.ones(self.c)

    def refused(self, call, names, what):
        """call() must raise a ValueError/TypeError naming one of names, and change nothing."""
        before = _snapshot(self.bn)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                call()
            except (ValueError, TypeError) as e:
                assert names_argument(str(e), names), f"{self.what} {what}: the error does not name {names}: {e}"
            else:
                raise AssertionError(f"{self.what} {what}: accepted")
        assert _snapshot(self.bn) == before, f"{self.what} {what}: the refused call changed the layer's state"
        STEPS["refused calls"] += 1

    # -- rules -------------------------------------------------------------------------------------
    @rule(kind=st.sampled_from(["normal", "normal", "normal", "offset", "huge", "nan", "inf"]))
    def train(self, kind):
        STEPS["train"] += 1
        x = self.x(kind)
        x_before = x.tobytes()
        x64 = x.astype(np.float64)
        with np.errstate(invalid="ignore", over="ignore"):
            y_t, mean, var = reference.forward_training(
                x64, self.gamma if self.built else np.ones(self.c), self.beta if self.built else np.zeros(self.c),
                self.eps, self.axis)
            value = var * (reference.bessel_factor(reference.count(x64, self.axis)) if self.var_kind == "unbiased"
                           else 1.0)
            d = self.decay()
            mm0, mv0 = (self.mm, self.mv) if self.built else (np.zeros(self.c), np.ones(self.c))
            new_m, new_v = reference.moving_average(mm0, mean, d), reference.moving_average(mv0, value, d)
            bad = ~(np.isfinite(new_m.astype(self.sdt)) & np.isfinite(new_v.astype(self.sdt))
                    & np.isfinite(mean) & np.isfinite(value))
        if bad.any() and self.on_nonfinite == "raise":
            self.refused(lambda: self.bn(x, training=True), ("x",), f"train({kind})")
            assert x.tobytes() == x_before
            return
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            y = self.bn(x, training=True)
        assert x.tobytes() == x_before, f"{self.what}: x was modified by a training call"
        if bad.any() and self.on_nonfinite == "skip":
            assert any(issubclass(i.category, RuntimeWarning) for i in w), f"{self.what}: skip without a warning"
            new_m, new_v = np.where(bad, mm0, new_m), np.where(bad, mv0, new_v)
        judge(y, y_t, "y", self.xdt, self.backend, f"{self.what} train({kind})",
              noise=self.y_noise(x64, var, 0.0))
        self.build_model()
        with np.errstate(over="ignore", invalid="ignore"):
            self.mm, self.mv = new_m.astype(self.sdt).astype(np.float64), new_v.astype(self.sdt).astype(np.float64)
        self.steps += 1
        self.last = (x64.copy(), mean, var, True, self.gamma.copy())
        self.user_x = x

    @rule(kind=st.sampled_from(["normal", "offset", "nan"]))
    def infer(self, kind):
        STEPS["infer"] += 1
        x = self.x(kind, n=1)
        x64 = x.astype(np.float64)
        nonfinite_state = self.built and not (np.isfinite(self.mm).all() and np.isfinite(self.mv).all())
        before = _snapshot(self.bn)
        try:
            y = self.bn(x, training=False)
        except (ValueError, TypeError) as e:
            # only a layer whose moving statistics were propagated NaN/Inf may refuse an inference
            assert nonfinite_state, f"{self.what}: inference refused: {e}"
            assert names_argument(str(e), ("moving_mean", "moving_variance")), e
            assert _snapshot(self.bn) == before
            return
        self.build_model()
        # the reference on the layer's own moving statistics (checked against the model by the invariant)
        mm, mv = self.bn.moving_mean.astype(np.float64), self.bn.moving_variance.astype(np.float64)
        with np.errstate(invalid="ignore", over="ignore"):
            y_t = reference.forward_inference(x64, self.gamma, self.beta, mm, mv, self.eps, self.axis)
        judge(y, y_t, "y", self.xdt, self.backend, f"{self.what} infer({kind})",
              noise=self.y_noise(x64, mv, float(np.max(np.abs(np.where(np.isfinite(mm), mm, 0.0))))))
        self.last = (x64.copy(), mm, mv, False, self.gamma.copy())
        self.user_x = x

    @rule()
    def backward(self):
        STEPS["backward"] += 1
        if self.last is None:
            dy = self.x("normal")
            self.refused(lambda: self.bn.backward(dy), ("dy", "backward", "forward"), "backward before any forward")
            return
        x64, mean, var, training, gamma = self.last
        dy = self.rng.standard_normal(x64.shape).astype(self.xdt)
        dy_before = dy.tobytes()
        before = _snapshot(self.bn)
        try:
            dx = self.bn.backward(dy)
        except (ValueError, TypeError) as e:
            # allowed only when the forward's statistics are not finite
            assert not (np.isfinite(mean).all() and np.isfinite(var).all()), f"{self.what}: backward refused: {e}"
            assert _snapshot(self.bn) == before
            return
        assert dy.tobytes() == dy_before, f"{self.what}: dy was modified by backward"
        dy64 = dy.astype(np.float64)
        with np.errstate(invalid="ignore", over="ignore"):
            dx_t, dg_t, db_t = reference.backward(dy64, x64, gamma, mean, var, self.eps, training, self.axis)
            noise = grad_noise(dy64, x64, gamma, mean, var, self.eps, training, self.axis)
        what = f"{self.what} backward ({'training' if training else 'inference'})"
        judge(dx, dx_t, "x_backprop", self.xdt, self.backend, what, noise["x_backprop"])
        judge(self.bn.dgamma, dg_t, "scale_backprop", self.sdt, self.backend, what, noise["scale_backprop"])
        judge(self.bn.dbeta, db_t, "offset_backprop", self.sdt, self.backend, what, noise["offset_backprop"])

    @precondition(lambda self: self.user_x is not None)
    @rule()
    def modify_x_in_place(self):
        """The user reuses x's buffer after a forward: backward must not see it."""
        STEPS["modify x in place"] += 1
        if self.user_x.flags.writeable:
            self.user_x[...] = self.rng.standard_normal(self.user_x.shape).astype(self.xdt) * 7 + 11

    @precondition(lambda self: self.built)
    @rule(attr=st.sampled_from(STATE), form=st.sampled_from(["list", "float64", "state dtype", "float16", "tuple"]))
    def assign_good(self, attr, form):
        STEPS["assign good"] += 1
        v = self.rng.uniform(0.1, 2.0, self.c) if attr == "moving_variance" else self.rng.normal(0, 2, self.c)
        if attr == "moving_variance" and self.rng.random() < 0.2:
            v[0] = 0.0
        value = {"list": lambda: [float(t) for t in v], "tuple": lambda: tuple(float(t) for t in v),
                 "float64": lambda: v.copy(), "state dtype": lambda: v.astype(self.sdt),
                 "float16": lambda: v.astype(np.float16)}[form]()
        kept = copy.deepcopy(value)
        setattr(self.bn, attr, value)
        assert _same(value, kept), f"{self.what}: assigning {attr} modified the value assigned"
        got = getattr(self.bn, attr)
        assert isinstance(got, np.ndarray) and got.dtype == self.sdt and got.shape == (self.c,), \
            f"{self.what}: {attr} after assigning a {form}: {got!r}"
        want = np.asarray(value, np.float64).astype(self.sdt).astype(np.float64)
        assert np.array_equal(got.astype(np.float64), want), f"{self.what}: {attr} = {got} after assigning {want}"
        if isinstance(value, np.ndarray):   # the layer keeps its own copy
            value[...] = 99
            assert np.array_equal(getattr(self.bn, attr).astype(np.float64), want), \
                f"{self.what}: {attr} aliases the array assigned"
        setattr(self, {"moving_mean": "mm", "moving_variance": "mv"}.get(attr, attr), want)

    @precondition(lambda self: self.built)
    @rule(attr=st.sampled_from(STATE), how=st.sampled_from(["long", "short", "nan", "inf", "negative", "string",
                                                            "2d", "dict", "none", "complex"]))
    def assign_bad(self, attr, how):
        STEPS["assign bad"] += 1
        v = np.ones(self.c)
        if how == "negative":
            if attr != "moving_variance":
                return              # a negative gamma, beta or mean is a good value
            v[-1] = -1.0
        if how in ("nan", "inf") and attr.startswith("moving") and self.on_nonfinite == "propagate":
            return                  # propagate: non-finite moving statistics are the user's choice
        value = {"long": lambda: np.ones(self.c + 1), "short": lambda: [1.0] * (self.c - 1) if self.c > 1 else [],
                 "nan": lambda: np.where(np.arange(self.c) == 0, np.nan, v), "inf": lambda: [np.inf] * self.c,
                 "negative": lambda: v, "string": lambda: "ones", "2d": lambda: np.ones((1, self.c)),
                 "dict": lambda: {"a": 1.0}, "none": lambda: None, "complex": lambda: v.astype(complex)}[how]()
        self.refused(lambda: setattr(self.bn, attr, value), (attr,), f"{attr} = {how}")

    @rule(how=st.sampled_from(["channels", "int", "masked", "training", "n1", "rank0", "complex"]))
    def bad_call(self, how):
        STEPS["bad call"] += 1
        x = self.x("normal")
        if how == "channels":
            if not self.built:
                return
            x = np.concatenate([x, np.take(x, [0], axis=self.axis)], axis=self.axis)
            call, names = (lambda: self.bn(x, training=bool(self.rng.integers(0, 2)))), ("x",)
        elif how == "int":
            call, names = (lambda: self.bn(x.astype(np.int32), training=True)), ("x",)
        elif how == "complex":
            call, names = (lambda: self.bn(x.astype(np.complex64), training=False)), ("x",)
        elif how == "masked":
            call, names = (lambda: self.bn(np.ma.masked_array(x, mask=x > 0), training=True)), ("x",)
        elif how == "training":
            call, names = (lambda: self.bn(x, training="no")), ("training",)
        elif how == "rank0":
            call, names = (lambda: self.bn(np.float32(1.0), training=False)), ("x", "axis")
        else:   # one value per channel in training
            one = x
            for i in range(x.ndim):
                if i != self.axis:
                    one = np.take(one, [0], axis=i)
            call, names = (lambda: self.bn(one, training=True)), ("x",)
        self.refused(call, names, f"bad call ({how})")

    @precondition(lambda self: self.last is not None)
    @rule(how=st.sampled_from(["shape", "dtype", "masked", "int"]))
    def bad_backward(self, how):
        STEPS["bad backward"] += 1
        shape = self.last[0].shape
        dy = self.rng.standard_normal(shape).astype(self.xdt)
        bad = {"shape": lambda: np.concatenate([dy, dy], axis=0),
               "dtype": lambda: dy.astype(np.float64 if self.xdt != np.float64 else np.float32),
               "masked": lambda: np.ma.masked_array(dy, mask=dy > 0), "int": lambda: dy.astype(np.int64)}[how]()
        self.refused(lambda: self.bn.backward(bad), ("dy",), f"backward(dy {how})")

    @rule(how=st.sampled_from(["deepcopy", "pickle"]))
    def round_trip(self, how):
        STEPS[how] += 1
        twin = copy.deepcopy(self.bn) if how == "deepcopy" else pickle.loads(pickle.dumps(self.bn))
        assert _snapshot(twin) == _snapshot(self.bn), f"{self.what}: {how} changed the state"
        if self.last is not None:
            dy = self.rng.standard_normal(self.last[0].shape).astype(self.xdt)
            with np.errstate(invalid="ignore", over="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    a = self.bn.backward(dy)
                except (ValueError, TypeError):
                    a = None
                try:
                    b = twin.backward(dy)
                except (ValueError, TypeError):
                    b = None
            assert (a is None) == (b is None), f"{self.what}: backward after {how} differs in refusing"
            if a is not None:
                np.testing.assert_array_equal(a, b, err_msg=f"{self.what}: backward after {how}")
                assert _snapshot(twin) == _snapshot(self.bn)
        # carry on with the copy: it must behave as the original from now on
        self.bn = twin
        self.user_x = None   # the copy's cache does not alias the user's x

    # -- invariants ---------------------------------------------------------------------------------
    @invariant()
    def state_matches_the_model(self):
        if not hasattr(self, "bn"):
            return
        STEPS["invariant checks"] += 1
        bn = self.bn
        assert bn.built == self.built, f"{self.what}: built {bn.built}, expected {self.built}"
        assert bn.steps == self.steps, f"{self.what}: steps {bn.steps}, expected {self.steps}"
        if not self.built:
            return
        for name, want in (("gamma", self.gamma), ("beta", self.beta)):
            got = getattr(bn, name)
            assert got.dtype == self.sdt and np.array_equal(got.astype(np.float64), want), \
                f"{self.what}: {name} {got}, expected {want}"
        for name, want in (("moving_mean", self.mm), ("moving_variance", self.mv)):
            got = getattr(bn, name)
            if self.on_nonfinite != "propagate":
                assert np.isfinite(got).all(), f"{self.what}: {name} not finite: {got}"
            fin = np.isfinite(want)
            assert np.array_equal(np.isfinite(got), fin) and np.array_equal(np.isnan(got), np.isnan(want)), \
                f"{self.what}: {name} {got}, expected {want}"
            if fin.any():
                state_close(got[fin], want[fin], name, self.sdt, self.what)


def _same(a, b):
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and a.tobytes() == b.tobytes()
    return a == b


BatchNormMachine.TestCase.settings = settings(
    max_examples=max(1, int(700 * _SCALE)), stateful_step_count=30, deadline=None, print_blob=True,
    derandomize=os.environ.get("REFBN_FUZZ_RANDOM", "") in ("", "0"),   # as tests/test_fuzz.py
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
TestBatchNormStateMachine = BatchNormMachine.TestCase


@pytest.fixture(scope="module", autouse=True)
def _report(request):
    yield
    capture = request.config.pluginmanager.getplugin("capturemanager")
    text = (f"\ntest_layer_state: {STEPS['machines']} machines, "
            f"{sum(v for k, v in STEPS.items() if k not in ('machines', 'invariant checks', 'refused calls'))} rule steps, "
            f"{STEPS['invariant checks']} invariant checks\n"
            + "\n".join(f"  {k}: {v}" for k, v in sorted(STEPS.items())))
    if capture is not None:
        with capture.global_and_fixture_disabled():
            print(text)
    else:
        print(text)
