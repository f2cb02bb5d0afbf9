"""The conventions probe: the same small experiment run in every framework's worker.

Each adapter runs, on a freshly built layer with the framework's defaults,

* ``defaults``: its default momentum and epsilon and the initial moving statistics;
* ``step``: one training step on :func:`batches`' ``step`` batch (2x3x2x2, n = 8 per channel);
* ``n1``: one training step on a batch with one value per channel (1x3x1x1);
* ``n0``: one training step on an empty batch (0x3x2x2);
* ``offset``: one training step with all the weight on the new value (x ~ N(1e4, 0.01^2),
  n = 4096 per channel), which puts the variance the framework feeds its average into the
  moving variance;

and returns what it saw (values, or the exception's first line).  The parent
(:mod:`refbn.compare.frameworks`) derives the conventions table from these
numbers and judges them against ``refbn.BatchNorm``; nothing here imports a framework.
Batches are channels first (N, C, H, W); adapters transpose them to their layout.
"""
import numpy as np

CHANNELS = 3


def batches():
    """The probe's batches, float32, channels first (N, C, H, W), the same in every process."""
    rng = np.random.default_rng(20261)
    step = rng.normal(3.0, 2.0, (2, CHANNELS, 2, 2)).astype(np.float32)
    n1 = rng.normal(3.0, 2.0, (1, CHANNELS, 1, 1)).astype(np.float32)
    n0 = np.zeros((0, CHANNELS, 2, 2), np.float32)
    offset = rng.normal(1e4, 0.01, (64, CHANNELS, 8, 8)).astype(np.float32)
    return {"step": step, "n1": n1, "n0": n0, "offset": offset}


def error_text(e):
    first = str(e).strip().splitlines()
    return f"{type(e).__name__}: {first[0] if first else ''}"[:200]


def listed(a):
    return [float(v) for v in np.asarray(a, np.float64).ravel()]


def run_probe(make, step, read, momentum_attr, epsilon_attr, full_weight):
    """The probe with one framework's three callables.

    make(**kw): a fresh layer with the framework's defaults (kw: momentum=...);
    step(layer, x_nchw): one training step, returns y (channels first) or raises;
    read(layer): (moving_mean, moving_variance) as numpy arrays;
    momentum_attr / epsilon_attr: the default layer's momentum and epsilon;
    full_weight: the momentum that puts all the weight on the new value.
    """
    b = batches()
    out = {"momentum": momentum_attr, "epsilon": epsilon_attr}
    layer = make()
    mm0, mv0 = read(layer)
    out["initial_mean"], out["initial_variance"] = listed(mm0), listed(mv0)
    step(layer, b["step"])
    mm, mv = read(layer)
    out["step"] = {"moving_mean": listed(mm), "moving_variance": listed(mv)}
    for name in ("n1", "n0"):
        layer = make()
        try:
            y = step(layer, b[name])
            mm, mv = read(layer)
            out[name] = {"y": listed(y)[:CHANNELS], "moving_mean": listed(mm), "moving_variance": listed(mv)}
        except Exception as e:  # the framework refuses: reported as its behaviour
            out[name] = {"error": error_text(e)}
    layer = make(momentum=full_weight)
    try:
        step(layer, b["offset"])
        out["offset"] = {"moving_variance": listed(read(layer)[1])}
    except Exception as e:
        out["offset"] = {"error": error_text(e)}
    return out
