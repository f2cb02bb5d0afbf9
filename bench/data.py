"""Deterministic benchmark inputs and their float64 truth.

The same spec and seed give the same arrays in every process (the TF Eigen
worker rebuilds them).  The truth is refbn's numpy reference run on float64
copies of the inputs: the value every contender is validated against.
"""
from dataclasses import dataclass, field

import numpy as np

import refbn
from refbn.layout import Layout

EPSILON = 1e-3
OPS = ("train", "infer", "bwd")
#: values read and written by the cheapest conceivable pass, in units of x.nbytes:
#: train = a read pass plus a copy, infer = a copy, bwd = reads of x and dy plus a write of dx
FLOOR_TRAFFIC = {"train": 3, "infer": 2, "bwd": 3}

#: outputs validated per op
OUTPUTS = {
    "train": ("y", "batch_mean", "batch_variance", "reserve_space_1", "reserve_space_2"),
    "infer": ("y",),
    "bwd": ("x_backprop", "scale_backprop", "offset_backprop"),
}


@dataclass
class Inputs:
    spec: object
    layout: Layout
    x: np.ndarray
    dy: np.ndarray
    scale: np.ndarray
    offset: np.ndarray
    pop_mean: np.ndarray          # inference statistics
    pop_var: np.ndarray
    r1: np.ndarray = None        # the batch mean / biased variance fed to the backward pass
    r2: np.ndarray = None
    truth: dict = field(default_factory=dict)   # op -> {output: float64 array}
    n: int = 0


def make(spec, seed=0, dtype=np.float32):
    """Inputs for one shape: x ~ N(mu_c, sigma_c^2) per channel, dy ~ N(0, 1)."""
    rng = np.random.default_rng(seed)
    layout = Layout.from_data_format(spec.shape, spec.data_format)
    C = layout.channels
    mu = rng.normal(0.5, 1.0, C)
    sigma = rng.uniform(0.5, 2.0, C)
    x = (rng.standard_normal(spec.shape, dtype=np.float32) * layout.broadcastable(sigma).astype(np.float32)
         + layout.broadcastable(mu).astype(np.float32)).astype(dtype)
    dy = rng.standard_normal(spec.shape, dtype=np.float32).astype(dtype)
    f32 = np.float32
    inp = Inputs(spec, layout, x, dy, rng.uniform(0.5, 2.0, C).astype(f32), rng.normal(0.0, 1.0, C).astype(f32),
                 (mu + rng.normal(0, 0.1, C)).astype(f32), (sigma ** 2 * rng.uniform(0.8, 1.25, C)).astype(f32),
                 n=layout.count)
    return inp


def add_truth(inp, ops):
    """Float64 truth of the requested ops (and r1/r2, the statistics the backward pass takes)."""
    f64 = np.float64
    x64 = inp.x.astype(f64)
    s64, o64 = inp.scale.astype(f64), inp.offset.astype(f64)
    fmt = inp.spec.data_format
    fwd = refbn.raw_ops.FusedBatchNormV3(x64, s64, o64, [], [], epsilon=EPSILON, data_format=fmt)
    inp.r1 = fwd.reserve_space_1.astype(np.float32)
    inp.r2 = fwd.reserve_space_2.astype(np.float32)
    if "train" in ops:
        inp.truth["train"] = {k: getattr(fwd, k) for k in OUTPUTS["train"]}
    if "infer" in ops:
        r = refbn.raw_ops.FusedBatchNormV3(x64, s64, o64, inp.pop_mean.astype(f64), inp.pop_var.astype(f64),
                                           epsilon=EPSILON, data_format=fmt, is_training=False)
        inp.truth["infer"] = {"y": r.y}
    del fwd
    if "bwd" in ops:
        g = refbn.raw_ops.FusedBatchNormGradV3(inp.dy.astype(f64), x64, s64, inp.r1.astype(f64),
                                               inp.r2.astype(f64), [], epsilon=EPSILON, data_format=fmt)
        inp.truth["bwd"] = {k: getattr(g, k) for k in OUTPUTS["bwd"]}
    return inp


def scales(inp, op):
    """Error scales per output, as refbn verify judges them (refbn.compare.metrics)."""
    from types import SimpleNamespace

    from refbn.compare import metrics
    case = SimpleNamespace(is_training=op != "infer", channel_axis=inp.layout.axis, eps=EPSILON)
    x64 = inp.x.astype(np.float64)
    dy64 = inp.dy.astype(np.float64)
    return metrics.scales(case, x64, dy64, inp.scale, inp.r1, inp.r2, None)
