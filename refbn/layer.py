"""``refbn.BatchNorm``: a numpy Batch Normalization layer with Keras-like state.

Use it inside a plain numpy training loop::

    bn = refbn.BatchNorm()                  # Keras 3: momentum 0.99, epsilon 1e-3
    y = bn(x, training=True)                # batch statistics; moving stats updated
    dx = bn.backward(dy)                    # and bn.dgamma, bn.dbeta
    bn.gamma -= lr * bn.dgamma
    y_inf = bn(x, training=False)           # moving statistics

Conventions (which variance feeds the moving average, and what momentum means):

========== ======================== =========================================
convention  variance averaged        decay applied per step
========== ======================== =========================================
"keras"     biased (Keras 3)         1 - momentum   (momentum default 0.99)
"tf_fused"  Bessel-corrected         1 - momentum   (tf-keras fused path)
"torch"     Bessel-corrected         momentum       (default 0.1); momentum=None
                                     gives a cumulative average, decay 1/t
========== ======================== =========================================

Every update is ``variable = (1 - decay) * variable + decay * value`` (Keras writes it
``variable -= (variable - value) * decay``; refbn.reference.moving_average), evaluated in
float64 and rounded once to the state dtype.

"flax" is "keras" with Flax's defaults (momentum 0.99, epsilon 1e-5): ``flax.linen.BatchNorm``
averages the biased variance as ``ra = momentum * ra + (1 - momentum) * value``.

Non-finite batches: NaN/Inf in x make that channel's batch statistics
NaN/Inf (as in TF).  ``on_nonfinite`` decides what happens to the moving
statistics: "raise" (default: ValueError naming the channels, nothing
changes), "skip" (y is returned, the affected channels' moving statistics
are left as they were, a RuntimeWarning names them) or "propagate" (TF and
Keras behaviour: the NaN is written into the moving statistics for good).
A moving statistic whose update overflows the layer's dtype (a float16
variance above 65504) counts as non-finite in the same way.

State is transactional: every argument and every state array (which a user may assign, or
modify in place) is checked before anything changes, and a call that raises leaves the layer
as it was (a refused first call does not even build it).  Assigning ``gamma``, ``beta``,
``moving_mean`` or ``moving_variance`` validates and converts the value at once (C finite
values, a variance >= 0).  ``backward`` differentiates the last successful forward call: it
uses that call's own copy of x, its statistics and its gamma, so x may be reused as a buffer
in between.
"""
import warnings

import numpy as np

from . import convergence, core, dtypes, reference as ref, validate
from .layout import Layout

CONVENTIONS = ("keras", "tf_fused", "torch", "flax")
_DEFAULT = object()
_DEFAULTS = {"keras": (0.99, 1e-3), "tf_fused": (0.99, 1e-3), "torch": (0.1, 1e-5), "flax": (0.99, 1e-5)}
_STATE = ("gamma", "beta", "moving_mean", "moving_variance")


def _state_property(name):
    """An attribute validated and converted on assignment (refbn.validate's checks)."""
    def get(self):
        return self.__dict__["_" + name]

    def set_(self, value):
        if not self.built:
            raise ValueError(f"{name}: the layer has no channels yet; call build(channels), "
                             f"set_weights(...) or a forward call first")
        self.__dict__["_" + name] = self._checked(name, value, self.channels)
    return property(get, set_, doc=f"{name} (one value per channel; validated when assigned)")


def _checked_property(name, check):
    def get(self):
        return self.__dict__["_" + name]

    def set_(self, value):
        self.__dict__["_" + name] = check(self, value)
    return property(get, set_)


class BatchNorm:
    gamma = _state_property("gamma")
    beta = _state_property("beta")
    moving_mean = _state_property("moving_mean")
    moving_variance = _state_property("moving_variance")

    def __init__(self, axis=-1, momentum=_DEFAULT, epsilon=None, convention="keras", backend="numpy",
                 debias=False, on_nonfinite="raise", dtype="float32", channels=None):
        convention = validate.choice(convention, "convention", CONVENTIONS)
        self.__dict__["convention"] = convention
        default_momentum, default_eps = _DEFAULTS[convention]
        self.momentum = default_momentum if momentum is _DEFAULT else momentum
        self.epsilon = default_eps if epsilon is None else epsilon
        self.axis = axis
        self.backend = backend
        self.debias = debias
        self.on_nonfinite = on_nonfinite
        dt = dtypes.parse(dtype) if isinstance(dtype, str) else _dtype_of(dtype)
        if not dtypes.is_supported(dt):
            raise TypeError(f"dtype: expected {dtypes.SUPPORTED_NAMES} (the state is floating point), "
                            f"got {dt.name}")
        self.__dict__["dtype"] = dt
        self.steps = 0
        self.initial_weight = 1.0
        for n in _STATE:
            self.__dict__["_" + n] = None
        self.dgamma = self.dbeta = None
        self._cache = None
        if channels is not None:
            self.build(channels)

    # -- settings, checked when assigned ---------------------------------------------
    def _check_momentum(self, value):
        if value is None:
            if self.convention != "torch":
                raise ValueError("momentum: None (cumulative average) is only meaningful with "
                                 f"convention='torch', got convention={self.convention!r}")
            return None
        return validate.unit_interval(value, "momentum")

    momentum = _checked_property("momentum", _check_momentum)
    epsilon = _checked_property("epsilon", lambda self, v: validate.epsilon(v))
    def _check_backend(self, value):
        core.check_backend_and_trace(value, False)
        return value

    backend = _checked_property("backend", _check_backend)
    debias = _checked_property("debias", lambda self, v: validate.boolean(v, "debias"))
    on_nonfinite = _checked_property(
        "on_nonfinite", lambda self, v: validate.choice(v, "on_nonfinite", ("raise", "skip", "propagate")))

    def _check_axis(self, value):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
            raise TypeError(f"axis: expected an int, got {type(value).__name__} {value!r}")
        return int(value)

    axis = _checked_property("axis", _check_axis)

    @property
    def convention(self):
        return self.__dict__["convention"]

    @property
    def dtype(self):
        return self.__dict__["dtype"]

    # -- state -----------------------------------------------------------------
    def build(self, channels):
        """Create gamma=1, beta=0, moving_mean=0, moving_variance=1 (Keras' initial values)."""
        if isinstance(channels, bool) or not isinstance(channels, (int, np.integer)) or channels < 1:
            raise ValueError(f"channels: expected a positive int, got {channels!r}")
        if self.built and channels != self.channels:
            raise ValueError(f"channels: the layer is already built with {self.channels} channels, "
                             f"got {channels}")
        self._commit_state(*self._initial_state(int(channels)))

    def _initial_state(self, channels):
        return (np.ones(channels, self.dtype), np.zeros(channels, self.dtype),
                np.full(channels, self.INITIAL_MEAN, self.dtype), np.full(channels, self.INITIAL_VARIANCE, self.dtype))

    def _commit_state(self, gamma, beta, moving_mean, moving_variance):
        for n, v in zip(_STATE, (gamma, beta, moving_mean, moving_variance)):
            self.__dict__["_" + n] = v

    @property
    def built(self):
        return self.__dict__["_gamma"] is not None

    @property
    def channels(self):
        """C, once built (None before)."""
        return self.gamma.shape[0] if self.built else None

    INITIAL_MEAN, INITIAL_VARIANCE = 0.0, 1.0

    def _finite_moving(self):
        return self.on_nonfinite != "propagate"

    def _checked(self, name, value, channels):
        """A value for one state array: C values of the layer's dtype (a new array), finite
        (moving statistics may be NaN/Inf under on_nonfinite='propagate'), variance >= 0."""
        moving = name.startswith("moving")
        v = validate.channel_vector(value, name, channels, self.dtype,
                                    finite=not moving or self._finite_moving())
        if name == "moving_variance":
            _nonnegative_or_nan(v, name)
        return v

    def _check_state(self):
        """Re-check the stored arrays (a user may have modified them in place)."""
        for n in _STATE:
            a = getattr(self, n)
            if n in ("gamma", "beta") or self._finite_moving():
                validate.all_finite(a, n)
        _nonnegative_or_nan(self.moving_variance, "moving_variance")

    def get_weights(self):
        """[gamma, beta, moving_mean, moving_variance], Keras' order."""
        if not self.built:
            raise ValueError("weights: the layer has no weights yet; call build(channels) or a forward call first")
        return [getattr(self, n).copy() for n in _STATE]

    def set_weights(self, weights):
        """Assign [gamma, beta, moving_mean, moving_variance] (building the layer if needed);
        all four are checked before any is assigned."""
        if isinstance(weights, (str, bytes, np.ndarray)) or not hasattr(weights, "__len__"):
            raise TypeError(f"weights: expected a list of 4 arrays [gamma, beta, moving_mean, "
                            f"moving_variance], got {type(weights).__name__}")
        if len(weights) != 4:
            raise ValueError(f"weights: expected 4 arrays [gamma, beta, moving_mean, moving_variance], "
                             f"got {len(weights)}")
        weights = list(weights)
        if self.built:
            channels = self.channels
        else:
            shape = np.shape(weights[0]) if not isinstance(weights[0], (str, bytes)) else ()
            channels = shape[0] if len(shape) == 1 and shape[0] > 0 else -1
        vs = [self._checked(n, w, channels) for n, w in zip(_STATE, weights)]
        self._commit_state(*vs)

    def decay(self):
        """Weight of the new value in the next update."""
        if self.convention == "torch":
            return 1.0 / (self.steps + 1) if self.momentum is None else self.momentum
        return 1.0 - self.momentum

    def debiased_statistics(self):
        """Moving statistics with the initial values' remaining weight removed (float64).

        estimate = (moving - w * initial) / (1 - w), w = prod(1 - decay_t)
        (momentum**t for Keras): exact for constant data after any step.
        """
        if not self.built:
            raise ValueError("moving_mean: the layer has no moving statistics yet; call a forward first")
        w = self.initial_weight
        return (convergence.debias(self.moving_mean.astype(np.float64), self.INITIAL_MEAN, w),
                convergence.debias(self.moving_variance.astype(np.float64), self.INITIAL_VARIANCE, w))

    # -- forward / backward --------------------------------------------------------
    def _layout(self, x):
        layout = Layout.from_axis(x.shape, self.axis)
        if self.built and layout.channels != self.channels:
            raise ValueError(f"x: expected {self.channels} channels on axis {self.axis}, "
                             f"got {layout.channels} (shape {x.shape})")
        return layout

    def __call__(self, x, training=False, trace=False):
        """y for x; in training the moving statistics are updated.  Nothing changes unless the
        call succeeds."""
        x = validate.as_x(x)
        training = validate.boolean(training, "training")
        layout = self._layout(x)
        kernel, want_trace = core.check_backend_and_trace(self.backend, trace)
        if training:
            validate.nonempty_batch(layout.count, x.shape, minimum=2)
        if self.built:
            self._check_state()
            state = [getattr(self, n) for n in _STATE]
        else:
            state = list(self._initial_state(layout.channels))
        gamma, beta = state[0].astype(np.float64), state[1].astype(np.float64)
        tr = core.new_trace("BatchNorm", want_trace, layout, convention=self.convention, training=training,
                            momentum=self.momentum, epsilon=self.epsilon, step=self.steps, backend=self.backend)
        if training:
            y, mean, var = core.forward_training(x, layout, gamma, beta, self.epsilon, kernel, trace=tr)
            new_mean, new_var, decay = self._updated(state[2], state[3], mean, var, layout.count, tr)
            state[2], state[3] = new_mean, new_var
        else:
            if self.debias and self.built:
                mean, var = self.debiased_statistics()
            else:
                mean, var = state[2].astype(np.float64), state[3].astype(np.float64)
            y = core.forward_inference(x, layout, gamma, beta, mean, var, self.epsilon, kernel, trace=tr)
        # -- commit: nothing above changed the layer --
        cache = (np.array(x, copy=True), layout, mean, var, training, gamma, self.epsilon)
        self._commit_state(*state)
        if training:
            self.steps += 1
            self.initial_weight *= 1.0 - decay
        self._cache = cache
        return (y, tr) if want_trace else y

    def _updated(self, old_mean, old_var, mean, var, n, tr):
        """The moving statistics after this batch (new arrays of the layer's dtype) and the decay
        used; raises (on_nonfinite='raise') before anything is changed."""
        value_var = var * ref.bessel_factor(n) if self.convention in ("tf_fused", "torch") else var
        decay = self.decay()
        old_m, old_v = old_mean.astype(np.float64), old_var.astype(np.float64)
        new_m = core.moving_update("moving_mean", old_m, mean, decay, tr)
        new_v = core.moving_update("moving_variance", old_v, value_var, decay, tr)
        with np.errstate(over="ignore", invalid="ignore"):
            cast_m, cast_v = new_m.astype(self.dtype), new_v.astype(self.dtype)
        batch_bad = ~(np.isfinite(mean) & np.isfinite(value_var))
        overflow = ~batch_bad & ~(np.isfinite(cast_m) & np.isfinite(cast_v)) & np.isfinite(old_m) & np.isfinite(old_v)
        bad = batch_bad | overflow
        if bad.any() and self._finite_moving():
            chans = np.flatnonzero(bad).tolist()
            shown = f"{chans[:10]}{' ...' if len(chans) > 10 else ''}"
            if overflow.any() and not batch_bad.any():
                msg = (f"x: the moving statistics of channel(s) {shown} would overflow {self.dtype.name} "
                       f"(the batch's values are too large for the layer's dtype)")
            else:
                msg = f"x: batch statistics are not finite in channel(s) {shown} (NaN or Inf in x)"
                if overflow.any():
                    msg += ", or their moving statistics overflow " + self.dtype.name
            if self.on_nonfinite == "raise":
                raise ValueError(msg + "; moving statistics left unchanged (on_nonfinite='raise')")
            warnings.warn(msg + "; their moving statistics were not updated", RuntimeWarning, stacklevel=3)
            cast_m, cast_v = np.where(bad, old_mean, cast_m), np.where(bad, old_var, cast_v)
        return cast_m.astype(self.dtype), cast_v.astype(self.dtype), decay

    def backward(self, dy, trace=False):
        """dx for the last successful forward call (its own copy of x, its statistics and its
        gamma); stores self.dgamma and self.dbeta."""
        if self._cache is None:
            raise ValueError("dy: backward() needs a forward call first")
        x, layout, mean, var, training, gamma, epsilon = self._cache
        dy = validate.as_x(dy, "dy")
        validate.same_shape(dy, x, "dy", "x of the last forward call")
        if dy.dtype != x.dtype:
            raise TypeError(f"dy: expected the dtype of the last forward call's x ({x.dtype.name}), "
                            f"got {dy.dtype.name}")
        kernel, want_trace = core.check_backend_and_trace(self.backend, trace)
        tr = core.new_trace("BatchNorm.backward", want_trace, layout, convention=self.convention, training=training)
        dx, dgamma, dbeta = core.backward(dy, x, layout, gamma, mean, var,
                                          epsilon, training, kernel, trace=tr, dy_name="dy")
        with np.errstate(over="ignore"):
            self.dgamma, self.dbeta = dgamma.astype(self.dtype), dbeta.astype(self.dtype)
        return (dx, tr) if want_trace else dx

    def __repr__(self):
        c = self.channels if self.built else "?"
        return (f"BatchNorm(channels={c}, axis={self.axis}, momentum={self.momentum}, "
                f"epsilon={self.epsilon}, convention={self.convention!r}, steps={self.steps})")


def _dtype_of(dtype):
    try:
        return np.dtype(dtype)
    except TypeError:
        raise TypeError(f"dtype: expected {dtypes.SUPPORTED_NAMES}, got {dtype!r}") from None


def _nonnegative_or_nan(v, name):
    """variance >= 0 where it is a number (NaN is the finiteness check's business)."""
    if v.size and (v < 0).any():
        validate.nonnegative(np.where(np.isnan(v), 0, v), name)


def check_finite(x, data_format=None, axis=-1):
    """Channels whose values include NaN or Inf (empty list: all finite).

    Use it before a training step to keep NaN out of moving statistics.
    """
    x = validate.as_x(x)
    layout = (Layout.from_data_format(x.shape, data_format) if data_format is not None
              else Layout.from_axis(x.shape, axis))
    finite = np.isfinite(layout.to3(x)).all(axis=(0, 2))
    return np.flatnonzero(~finite).tolist()
