"""``python -m refbn.bench.percall [SHAPE ...]``: where a small batch's time goes, layer by layer.

For each shape (default: the small batches of bench/shapes/small.txt) and op, the per-call
time of refbn's numba path is split into its layers, each timed alone on the same warm
inputs, alternating, as the 10th percentile of single calls:

    raw_ops    refbn.raw_ops.FusedBatchNormV3 / FusedBatchNormGradV3 with out= (the whole call)
    backend    refbn.backends.numba_kernels.forward_* / backward on the canonical view
    driver     the compiled driver alone (numba's dispatch + the kernels)
    dispatch   an empty compiled function with the same arguments (numba's dispatch alone)
    torch      torch.native_batch_norm / native_batch_norm_backward (when torch is installed)

so that validation + orchestration = raw_ops - backend, the backend's Python glue = backend -
driver, and the kernels = driver - dispatch.  Outputs are checked against the float64 truth
once before anything is timed.
"""
import sys
import time

import numpy as np
from numba import njit


@njit(cache=True)
def _empty(*args):
    return 0


def _p10(f, calls):
    for _ in range(50):
        f()
    pc, ts = time.perf_counter, []
    for _ in range(calls):
        t = pc()
        f()
        ts.append(pc() - t)
    return 1e6 * float(np.percentile(ts, 10))


def layers(spec, calls=4000):
    """{op: {layer: us}} for one shape descriptor (a refbn.bench.specs spec)."""
    import refbn
    from refbn.backends import numba_kernels as nk
    from refbn.testing import assert_close

    from . import data
    inp = data.add_truth(data.make(spec), ("train", "infer", "bwd"))
    fmt, eps, lay = spec.data_format, data.EPSILON, inp.layout
    x3, dy3 = lay.to3(inp.x), lay.to3(inp.dy)
    out = np.empty_like(inp.x)
    y3 = out.reshape(lay.shape3)
    empty = np.zeros(0, np.float32)
    s64, o64, m64, v64 = (a.astype(np.float64) for a in (inp.scale, inp.offset, inp.pop_mean, inp.pop_var))
    r1, r2 = inp.r1.astype(np.float64), inp.r2.astype(np.float64)
    ro = refbn.raw_ops
    ops = {
        "train": (lambda: ro.FusedBatchNormV3(inp.x, inp.scale, inp.offset, empty, empty, epsilon=eps, data_format=fmt,
                                              backend="numba", out=out),
                  lambda: nk.forward_training(x3, s64, o64, eps, y3),
                  (nk.driver("training", x3), (x3, 0, s64, o64, eps, y3))),
        "infer": (lambda: ro.FusedBatchNormV3(inp.x, inp.scale, inp.offset, inp.pop_mean, inp.pop_var, epsilon=eps,
                                              data_format=fmt, is_training=False, backend="numba", out=out),
                  lambda: nk.forward_inference(x3, s64, o64, m64, v64, eps, y3),
                  (nk.driver("inference", x3), (x3, 0, s64, o64, m64, v64, eps, y3))),
        "bwd": (lambda: ro.FusedBatchNormGradV3(inp.dy, inp.x, inp.scale, inp.r1, inp.r2, empty, epsilon=eps,
                                                data_format=fmt, backend="numba", out=out),
                lambda: nk.backward(dy3, x3, s64, r1, r2, eps, True, y3),
                (nk.driver("backward", x3), (dy3, x3, 0, s64, r1, r2, eps, True, y3))),
    }
    try:
        from . import torch_bench
        torch_bench.configure_threads(__import__("numba").get_num_threads())
        peers = torch_bench.ops(inp, eps, tuple(ops))
    except ImportError:
        peers = {}
    result = {}
    for op, (whole, backend, (drv, args)) in ops.items():
        key = {"train": "y", "infer": "y", "bwd": "x_backprop"}[op]
        got = whole()
        assert_close(got[0], inp.truth[op][key], key, inp.x.dtype, "numba", what=f"{spec} {op}")
        row = {"raw_ops": whole, "backend": backend, "driver": lambda d=drv, a=args: d(*a),
               "dispatch": lambda a=args: _empty(*a)}
        if op in peers:
            row["torch"] = peers[op][0]
        times = {k: [] for k in row}
        for _ in range(4):                 # alternate the layers, a quarter of the calls at a time
            for k, f in row.items():
                times[k].append(_p10(f, calls // 4))
        result[op] = {k: float(np.median(v)) for k, v in times.items()}
    return result


def main(argv=None):
    from rich.console import Console
    from rich.table import Table

    from . import specs
    argv = sys.argv[1:] if argv is None else argv
    shapes = specs.load(",".join(argv) if argv else "small")
    table = Table(title="Per-call time of refbn's numba path, layer by layer (us, warm, 10th percentile)")
    for col in ("shape", "op", "raw_ops", "validation + orchestration", "backend glue", "dispatch",
                "kernels", "torch", "numba / torch"):
        table.add_column(col, justify="right" if col not in ("shape", "op") else "left")
    for spec in shapes:
        for op, t in layers(spec).items():
            torch_us = t.get("torch")
            table.add_row(str(spec), op, f"{t['raw_ops']:.1f}", f"{t['raw_ops'] - t['backend']:.1f}",
                          f"{t['backend'] - t['driver']:.1f}", f"{t['dispatch']:.1f}",
                          f"{t['driver'] - t['dispatch']:.1f}", "-" if torch_us is None else f"{torch_us:.1f}",
                          "-" if torch_us is None else f"{t['raw_ops'] / torch_us:.2f}")
    Console(width=160).print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
