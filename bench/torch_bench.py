"""PyTorch CPU contenders for ``refbn bench`` (imports torch; only bench/ does).

The peer a CPU user would pick: ``torch.native_batch_norm`` (training and
inference) and ``aten::native_batch_norm_backward``, the kernels under
``nn.BatchNorm*d`` without the module's bookkeeping.  A channels-last refbn
layout (NHWC, NDHWC, NWC) runs as torch's channels_last (a permuted view of
the same memory, no copy); a channels-first one as a contiguous NCHW tensor;
(N, C) as it is.  torch's thread count is set to refbn's (numba's).

Forward passes write into preallocated tensors (``out=``), as refbn's
contenders do, so neither side pays for a fresh 25 MB allocation per call.
torch saves (mean, invstd), TF and refbn (mean, biased variance): for the
validation the variance is recovered in float64 as 1/invstd^2 - eps, and
the backward is fed invstd = 1/sqrt(r2 + eps) rounded once to float32.
"""
import numpy as np
import torch

_BWD = torch.ops.aten.native_batch_norm_backward


def configure_threads(threads):
    if threads:
        torch.set_num_threads(int(threads))


def info():
    return {"torch_version": torch.__version__, "threads": torch.get_num_threads(),
            "parallel": torch.__config__.parallel_info().splitlines()[0:3]}


def _tensor(a):
    """A torch tensor on the memory of a numpy array (bfloat16 through its uint16 bits)."""
    if a.dtype.name == "bfloat16":
        return torch.from_numpy(a.view(np.uint16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def _numpy(t, dtype):
    """A torch tensor's values as a numpy array of ``dtype`` (copied)."""
    t = t.detach()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16).view(dtype).copy()
    return t.numpy().copy()


def torch_view(a, data_format):
    """torch's NC... view of a refbn-layout array: channels-last layouts move the channel axis
    to position 1 by a permutation (torch's channels_last memory format), channels-first and
    (N, C) arrays are used as they are."""
    t = _tensor(a)
    if data_format in ("NC", "NCW", "NCHW", "NCDHW"):
        return t
    return t.permute(0, t.dim() - 1, *range(1, t.dim() - 1))


def layout_name(data_format):
    return "contiguous" if data_format in ("NC", "NCW", "NCHW", "NCDHW") else "channels_last"


def ops(inp, epsilon, which):
    """op -> (run, outputs), as refbn.compare.tf_bench.ops: ``run()`` is the timed call,
    ``outputs()`` the refbn-named outputs as numpy arrays, in x's layout."""
    fmt = inp.spec.data_format
    x, dy = torch_view(inp.x, fmt), torch_view(inp.dy, fmt)
    w, b = torch.from_numpy(inp.scale), torch.from_numpy(inp.offset)
    pm, pv = torch.from_numpy(inp.pop_mean.copy()), torch.from_numpy(inp.pop_var.copy())
    y_np = np.empty_like(inp.x)
    y = torch_view(y_np, fmt)
    C = inp.scale.shape[0]
    save_mean, save_invstd = torch.empty(C), torch.empty(C)
    r1 = torch.from_numpy(inp.r1)
    invstd = torch.from_numpy((1.0 / np.sqrt(inp.r2.astype(np.float64) + epsilon)).astype(np.float32))
    n = inp.n
    result = {}
    if "train" in which:
        def train():
            return torch.native_batch_norm(x, w, b, None, None, True, 0.0, epsilon,
                                           out=(y, save_mean, save_invstd))

        def train_out():
            r = train()
            mean = r[1].numpy().astype(np.float64)
            var = 1.0 / r[2].numpy().astype(np.float64) ** 2 - epsilon
            return {"y": y_np.copy(),
                    "batch_mean": mean.astype(np.float32),
                    "batch_variance": (var * n / max(n - 1, 1)).astype(np.float32),
                    "reserve_space_1": mean.astype(np.float32), "reserve_space_2": var.astype(np.float32)}
        result["train"] = (train, train_out)
    if "infer" in which:
        def infer():
            return torch.native_batch_norm(x, w, b, pm, pv, False, 0.0, epsilon, out=(y, save_mean, save_invstd))

        def infer_out():
            infer()
            return {"y": y_np.copy()}
        result["infer"] = (infer, infer_out)
    if "bwd" in which:
        def bwd():
            return _BWD(dy, x, w, None, None, r1, invstd, True, epsilon, [True, True, True])

        def bwd_out():
            g = bwd()
            dx = g[0]
            if fmt not in ("NC", "NCW", "NCHW", "NCDHW"):   # back to channels last, as x
                dx = dx.permute(0, *range(2, dx.dim()), 1)
            return {"x_backprop": _numpy(dx.contiguous(), inp.x.dtype).reshape(inp.x.shape),
                    "scale_backprop": g[1].numpy().copy(), "offset_backprop": g[2].numpy().copy()}
        result["bwd"] = (bwd, bwd_out)
    return result


def floor_callables(x, dy, out):
    """torch's own streaming passes over the same memory (its threads): floor candidates."""
    xt, dyt, ot = _tensor(x).reshape(-1), _tensor(dy).reshape(-1), _tensor(out).reshape(-1)
    return {
        "read:torch": ("read", lambda: xt.sum()),
        "copy:torch": ("copy", lambda: ot.copy_(xt)),
        "add:torch": ("add", lambda: torch.add(xt, dyt, out=ot)),
    }
