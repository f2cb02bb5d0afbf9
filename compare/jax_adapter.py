"""The JAX/Flax side of ``refbn verify --framework jax``.  Imports jax and flax.

Only :mod:`refbn.compare.fw_worker` imports this module, in its own process.
Parity cases (mode ``flax``) run ``flax.linen.BatchNorm`` and, when the
installed Flax has it, ``flax.nnx.BatchNorm`` for K training steps on the
case's batches, then one step with the running averages.
"""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import flax  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import linen  # noqa: E402

try:  # noqa: E402
    from flax import nnx
except ImportError:  # pragma: no cover - Flax < 0.8
    nnx = None

from . import cases as cases_mod  # noqa: E402
from . import probe  # noqa: E402


def hello():
    return {"framework": "jax", "version": f"jax {jax.__version__}, flax {flax.__version__}",
            "nnx": nnx is not None}


def _val(v):
    return np.asarray(v[...] if hasattr(v, "__getitem__") and not isinstance(v, jax.Array) else v)


def _linen(case, batches, x_inf):
    layer = linen.BatchNorm(use_running_average=None, axis=case.channel_axis, momentum=case.mom,
                            epsilon=case.eps)
    variables = layer.init(jax.random.PRNGKey(0), jnp.asarray(batches[0]), use_running_average=True)
    ys = []
    for xb in batches:
        y, upd = layer.apply(variables, jnp.asarray(xb), use_running_average=False, mutable=["batch_stats"])
        variables = {**variables, "batch_stats": upd["batch_stats"]}
        ys.append(np.asarray(y))
    y_inf = np.asarray(layer.apply(variables, jnp.asarray(x_inf), use_running_average=True))
    bs = variables["batch_stats"]
    return {"parity.moving_mean": np.asarray(bs["mean"]), "parity.moving_variance": np.asarray(bs["var"]),
            "parity.y_last_train": ys[-1], "parity.y_infer": y_inf}, \
        {"implementation": f"flax {flax.__version__} linen.BatchNorm (use_fast_variance=True)"}


def _nnx(case, batches, x_inf):
    layer = nnx.BatchNorm(case.channels, axis=case.channel_axis, momentum=case.mom, epsilon=case.eps,
                          rngs=nnx.Rngs(0))
    layer.train()
    ys = [np.asarray(layer(jnp.asarray(xb))) for xb in batches]
    layer.eval()
    y_inf = np.asarray(layer(jnp.asarray(x_inf)))
    return {"parity.moving_mean": _val(layer.mean), "parity.moving_variance": _val(layer.var),
            "parity.y_last_train": ys[-1], "parity.y_infer": y_inf}, \
        {"implementation": f"flax {flax.__version__} nnx.BatchNorm"}


def run(case):
    batches, x_inf = cases_mod.parity_batches(case)
    out = {"flax.linen": _linen(case, batches, x_inf)}
    if nnx is not None:
        out["flax.nnx"] = _nnx(case, batches, x_inf)
    return out


def conventions():
    def make(**kw):
        layer = linen.BatchNorm(use_running_average=False, axis=1, **kw)
        v = layer.init(jax.random.PRNGKey(0), jnp.zeros((2, probe.CHANNELS, 2, 2)))
        return [layer, v]

    def step(state, x):
        layer, v = state
        y, upd = layer.apply(v, jnp.asarray(x), mutable=["batch_stats"])
        state[1] = {**v, "batch_stats": upd["batch_stats"]}
        return np.asarray(y).transpose(1, 0, 2, 3)  # channel-major: y's first values per channel

    def read(state):
        bs = state[1]["batch_stats"]
        return np.asarray(bs["mean"]), np.asarray(bs["var"])

    d = linen.BatchNorm()
    return {"flax.linen.BatchNorm": probe.run_probe(make, step, read, d.momentum, d.epsilon, full_weight=0.0)}
