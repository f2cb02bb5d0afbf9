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

Non-finite batches: NaN/Inf in x make that channel's batch statistics
NaN/Inf (as in TF).  ``on_nonfinite`` decides what happens to the moving
statistics: "raise" (default: ValueError naming the channels, nothing
changes), "skip" (y is returned, the affected channels' moving statistics
are left as they were, a RuntimeWarning names them) or "propagate" (TF and
Keras behaviour: the NaN is written into the moving statistics for good).
"""
import warnings

import numpy as np

from . import convergence, core, dtypes, reference as ref, validate
from .layout import Layout

CONVENTIONS = ("keras", "tf_fused", "torch")
_DEFAULT = object()
_DEFAULTS = {"keras": (0.99, 1e-3), "tf_fused": (0.99, 1e-3), "torch": (0.1, 1e-5)}


class BatchNorm:
    def __init__(self, axis=-1, momentum=_DEFAULT, epsilon=None, convention="keras", backend="numpy",
                 debias=False, on_nonfinite="raise", dtype="float32", channels=None):
        self.convention = validate.choice(convention, "convention", CONVENTIONS)
        default_momentum, default_eps = _DEFAULTS[convention]
        if momentum is _DEFAULT:
            momentum = default_momentum
        if momentum is None and convention != "torch":
            raise ValueError("momentum: None (cumulative average) is only meaningful with "
                             f"convention='torch', got convention={convention!r}")
        self.momentum = None if momentum is None else validate.unit_interval(momentum, "momentum")
        self.epsilon = validate.epsilon(default_eps if epsilon is None else epsilon)
        self.axis = axis
        core.check_backend_and_trace(backend, False)
        self.backend = backend
        self.debias = validate.boolean(debias, "debias")
        self.on_nonfinite = validate.choice(on_nonfinite, "on_nonfinite", ("raise", "skip", "propagate"))
        self.dtype = dtypes.parse(dtype)
        self.steps = 0
        self.initial_weight = 1.0
        self.gamma = self.beta = self.moving_mean = self.moving_variance = None
        self.dgamma = self.dbeta = None
        self._cache = None
        if channels is not None:
            self.build(channels)

    # -- state -----------------------------------------------------------------
    def build(self, channels):
        """Create gamma=1, beta=0, moving_mean=0, moving_variance=1 (Keras' initial values)."""
        if isinstance(channels, bool) or not isinstance(channels, (int, np.integer)) or channels < 1:
            raise ValueError(f"channels: expected a positive int, got {channels!r}")
        self.gamma = np.ones(channels, self.dtype)
        self.beta = np.zeros(channels, self.dtype)
        self.moving_mean = np.zeros(channels, self.dtype)
        self.moving_variance = np.ones(channels, self.dtype)

    @property
    def built(self):
        return self.gamma is not None

    INITIAL_MEAN, INITIAL_VARIANCE = 0.0, 1.0

    def get_weights(self):
        """[gamma, beta, moving_mean, moving_variance], Keras' order."""
        return [self.gamma.copy(), self.beta.copy(), self.moving_mean.copy(), self.moving_variance.copy()]

    def set_weights(self, weights):
        if len(weights) != 4:
            raise ValueError(f"weights: expected 4 arrays [gamma, beta, moving_mean, moving_variance], "
                             f"got {len(weights)}")
        channels = np.asarray(weights[0]).shape[0] if np.ndim(weights[0]) == 1 else -1
        names = ("gamma", "beta", "moving_mean", "moving_variance")
        vs = [validate.channel_vector(w, n, channels, self.dtype) for w, n in zip(weights, names)]
        validate.nonnegative(vs[3], "moving_variance")
        self.gamma, self.beta, self.moving_mean, self.moving_variance = vs

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
        w = self.initial_weight
        return (convergence.debias(self.moving_mean.astype(np.float64), self.INITIAL_MEAN, w),
                convergence.debias(self.moving_variance.astype(np.float64), self.INITIAL_VARIANCE, w))

    # -- forward / backward --------------------------------------------------------
    def _layout(self, x):
        layout = Layout.from_axis(x.shape, self.axis)
        if self.built and layout.channels != self.gamma.shape[0]:
            raise ValueError(f"x: expected {self.gamma.shape[0]} channels on axis {self.axis}, "
                             f"got {layout.channels} (shape {x.shape})")
        return layout

    def __call__(self, x, training=False, trace=False):
        x = validate.as_x(x)
        training = validate.boolean(training, "training")
        layout = self._layout(x)
        kernel, want_trace = core.check_backend_and_trace(self.backend, trace)
        if training:
            validate.nonempty_batch(layout.count, x.shape, minimum=2)
        if not self.built:
            self.build(layout.channels)
        gamma, beta = self._state(layout, training)
        tr = core.new_trace("BatchNorm", want_trace, layout, convention=self.convention, training=training,
                            momentum=self.momentum, epsilon=self.epsilon, step=self.steps, backend=self.backend)
        if training:
            y, mean, var = core.forward_training(x, layout, gamma, beta, self.epsilon, kernel, trace=tr)
            self._update(mean, var, layout.count, tr)
            self._cache = (x, layout, mean, var, True)
        else:
            if self.debias:
                mean, var = self.debiased_statistics()
            else:
                mean, var = self.moving_mean.astype(np.float64), self.moving_variance.astype(np.float64)
            y = core.forward_inference(x, layout, gamma, beta, mean, var, self.epsilon, kernel, trace=tr)
            self._cache = (x, layout, mean, var, False)
        return (y, tr) if want_trace else y

    def _state(self, layout, training):
        """gamma and beta (float64) after checking every state array, which a user may have
        assigned: the same per-channel checks as the raw ops' arguments."""
        C = layout.channels
        names = ("gamma", "beta", "moving_mean", "moving_variance")
        vs = [validate.channel_vector(getattr(self, n), n, C, self.dtype) for n in names]
        if not training:
            validate.nonnegative(vs[3], "moving_variance")
        self.gamma, self.beta, self.moving_mean, self.moving_variance = vs
        return vs[0].astype(np.float64), vs[1].astype(np.float64)

    def _update(self, mean, var, n, tr):
        value_var = var if self.convention == "keras" else var * ref.bessel_factor(n)
        bad = ~(np.isfinite(mean) & np.isfinite(value_var))
        keep = np.zeros_like(bad)
        if bad.any():
            chans = np.flatnonzero(bad).tolist()
            msg = (f"x: batch statistics are not finite in channel(s) {chans[:10]}"
                   f"{' ...' if len(chans) > 10 else ''} (NaN or Inf in x)")
            if self.on_nonfinite == "raise":
                raise ValueError(msg + "; moving statistics left unchanged (on_nonfinite='raise')")
            if self.on_nonfinite == "skip":
                warnings.warn(msg + "; their moving statistics were not updated", RuntimeWarning,
                              stacklevel=3)
                keep = bad
        decay = self.decay()
        old_m = self.moving_mean.astype(np.float64)
        old_v = self.moving_variance.astype(np.float64)
        new_m = core.moving_update("moving_mean", old_m, mean, decay, tr)
        new_v = core.moving_update("moving_variance", old_v, value_var, decay, tr)
        self.moving_mean = np.where(keep, old_m, new_m).astype(self.dtype)
        self.moving_variance = np.where(keep, old_v, new_v).astype(self.dtype)
        self.steps += 1
        self.initial_weight *= 1.0 - decay

    def backward(self, dy, trace=False):
        """dx for the last forward call; stores self.dgamma and self.dbeta."""
        if self._cache is None:
            raise ValueError("dy: backward() needs a forward call first")
        x, layout, mean, var, training = self._cache
        dy = validate.as_x(dy, "dy")
        validate.same_shape(dy, x, "dy", "x of the last forward call")
        if dy.dtype != x.dtype:
            raise TypeError(f"dy: expected the dtype of the last forward call's x ({x.dtype.name}), "
                            f"got {dy.dtype.name}")
        kernel, want_trace = core.check_backend_and_trace(self.backend, trace)
        gamma, _ = self._state(layout, True)
        tr = core.new_trace("BatchNorm.backward", want_trace, layout, convention=self.convention, training=training)
        dx, dgamma, dbeta = core.backward(dy, x, layout, gamma, mean, var,
                                          self.epsilon, training, kernel, trace=tr)
        self.dgamma, self.dbeta = dgamma.astype(self.dtype), dbeta.astype(self.dtype)
        return (dx, tr) if want_trace else dx

    def __repr__(self):
        c = self.gamma.shape[0] if self.built else "?"
        return (f"BatchNorm(channels={c}, axis={self.axis}, momentum={self.momentum}, "
                f"epsilon={self.epsilon}, convention={self.convention!r}, steps={self.steps})")


def check_finite(x, data_format=None, axis=-1):
    """Channels whose values include NaN or Inf (empty list: all finite).

    Use it before a training step to keep NaN out of moving statistics.
    """
    x = validate.as_x(x)
    layout = (Layout.from_data_format(x.shape, data_format) if data_format is not None
              else Layout.from_axis(x.shape, axis))
    finite = np.isfinite(layout.to3(x)).all(axis=(0, 2))
    return np.flatnonzero(~finite).tolist()
