"""The PyTorch side of ``refbn verify --framework torch``.  Imports torch.

Only :mod:`refbn.compare.fw_worker` imports this module, in its own process.
Op cases run ``F.batch_norm``, ``torch.native_batch_norm`` and
``native_batch_norm_backward`` on the case's inputs (channels-last layouts as
channels_last tensors, so torch's own NHWC kernel runs).  Reserve spaces are
converted where the parent judges them: torch saves (mean, invstd), TF
(mean, biased variance); the gradient gets invstd = rsqrt(var + eps) of TF's
reserve_space_2, rounded to float32.  Parity cases run ``nn.BatchNorm1d``
(NCHW with h = 1, as (N, C, W)), ``BatchNorm2d`` or ``BatchNorm3d`` for K
training steps, then one eval step.
"""
import numpy as np
import torch
import torch.nn.functional as F

from . import cases as cases_mod
from . import probe

torch.set_num_threads(1)  # the harness runs several workers on a small machine

_TO_FIRST = {"NHWC": (0, 3, 1, 2), "NDHWC": (0, 4, 1, 2, 3)}


def hello():
    return {"framework": "torch", "version": torch.__version__}


def _err(e):
    return probe.error_text(e)


def _tensor(a, layout):
    """A channels-first view of a numpy array in layout (channels_last strides for NHWC/NDHWC)."""
    t = torch.from_numpy(np.ascontiguousarray(a))
    return t.permute(*_TO_FIRST[layout]) if layout in _TO_FIRST else t


def _numpy(t, layout):
    """A torch result back in the case's layout."""
    if layout in _TO_FIRST:
        perm = _TO_FIRST[layout]
        t = t.permute(*[perm.index(i) for i in range(len(perm))])
    return np.ascontiguousarray(t.detach().numpy())


def _vec(a):
    return torch.from_numpy(np.array(a, np.float32))


def run_op(case):
    inp = cases_mod.make_inputs(case)
    x, lay = _tensor(inp.x, case.layout), case.layout
    w, b = _vec(inp.scale), _vec(inp.offset)
    C = case.channels
    out = {}
    # F.batch_norm: momentum is the weight of the new value (TF's exponential_avg_factor)
    arrays, info = {}, {}
    try:
        if case.is_training:
            if case.eaf == 1.0:  # TF ignores the running statistics: any values, full weight on the batch
                rm, rv = torch.zeros(C), torch.ones(C)
            else:
                rm, rv = _vec(inp.mean), _vec(inp.variance)
            y = F.batch_norm(x, rm, rv, w, b, training=True, momentum=case.eaf, eps=case.eps)
            arrays = {"fwd.y": _numpy(y, lay), "fwd.batch_mean": rm.numpy(), "fwd.batch_variance": rv.numpy()}
        else:
            y = F.batch_norm(x, _vec(inp.mean), _vec(inp.variance), w, b, training=False, eps=case.eps)
            arrays = {"fwd.y": _numpy(y, lay)}
    except Exception as e:
        info["fwd_error"] = _err(e)
    out["F.batch_norm"] = (arrays, info)
    # torch.native_batch_norm (y, save_mean, save_invstd) and its backward
    arrays, info = {}, {}
    try:
        if case.is_training:
            y, save_mean, save_invstd = torch.native_batch_norm(x, w, b, None, None, True, 0.0, case.eps)
            arrays.update({"fwd.y": _numpy(y, lay), "fwd.reserve_space_1": save_mean.numpy(),
                           "save_invstd": save_invstd.numpy()})
    except Exception as e:
        info["fwd_error"] = _err(e)
    try:
        dy = _tensor(inp.dy, lay)
        g_mean = _vec(inp.grad_mean)
        g_invstd = _vec(1.0 / np.sqrt(np.asarray(inp.grad_variance, np.float64) + case.eps))
        if case.is_training:
            r = torch.ops.aten.native_batch_norm_backward(dy, x, w, None, None, g_mean, g_invstd, True,
                                                          case.eps, [True, True, True])
        else:
            r = torch.ops.aten.native_batch_norm_backward(dy, x, w, g_mean, _vec(inp.grad_variance), None,
                                                          None, False, case.eps, [True, True, True])
        dx, dw, db = r
        arrays.update({"grad.x_backprop": _numpy(dx, lay), "grad.scale_backprop": dw.numpy(),
                       "grad.offset_backprop": db.numpy()})
    except Exception as e:
        info["grad_error"] = _err(e)
    out["native_batch_norm"] = (arrays, info)
    return out


def _layer_class(case):
    if case.layout == "NCDHW":
        return torch.nn.BatchNorm3d, None
    if case.layout != "NCHW":
        raise ValueError("torch parity needs a channels-first layout (NCHW or NCDHW)")
    if dict(case.dims)["h"] == 1:
        n, c, _, w = case.shape
        return torch.nn.BatchNorm1d, (n, c, w)
    return torch.nn.BatchNorm2d, None


def run_parity(case):
    batches, x_inf = cases_mod.parity_batches(case)
    cls, view = _layer_class(case)
    layer = cls(case.channels, eps=case.eps, momentum=case.mom, dtype=torch.float32)
    shape = lambda a: a.reshape(view) if view else a  # noqa: E731
    layer.train()
    with torch.no_grad():
        ys = [layer(torch.from_numpy(shape(np.asarray(xb, np.float32)))).numpy() for xb in batches]
        layer.eval()
        y_inf = layer(torch.from_numpy(shape(np.asarray(x_inf, np.float32)))).numpy()
    arrays = {"parity.moving_mean": layer.running_mean.numpy().copy(),
              "parity.moving_variance": layer.running_var.numpy().copy(),
              "parity.y_last_train": ys[-1].reshape(case.shape), "parity.y_infer": y_inf.reshape(case.shape)}
    info = {"implementation": f"torch {torch.__version__} nn.{cls.__name__}" + (
        f" on x.reshape{view}" if view else "") + (" momentum=None" if case.mom is None else ""),
        "num_batches_tracked": int(layer.num_batches_tracked)}
    return {f"nn.{cls.__name__}": (arrays, info)}


def run(case):
    return run_op(case) if case.kind == "op" else run_parity(case)


def conventions():
    def step(layer, x):
        layer.train()
        with torch.no_grad():
            return layer(torch.from_numpy(x)).numpy()

    def read(layer):
        return layer.running_mean.numpy().copy(), layer.running_var.numpy().copy()

    d = torch.nn.BatchNorm2d(probe.CHANNELS)
    facts = probe.run_probe(lambda **kw: torch.nn.BatchNorm2d(probe.CHANNELS, **kw), step, read,
                            d.momentum, d.eps, full_weight=1.0)
    layer = torch.nn.BatchNorm2d(probe.CHANNELS)
    step(layer, probe.batches()["n0"])
    facts["n0"]["num_batches_tracked"] = int(layer.num_batches_tracked)
    return {"torch.nn.BatchNorm2d": facts}
