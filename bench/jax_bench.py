"""JAX CPU contenders for ``refbn bench`` (imports jax; only bench/ and compare/ do).

Batch normalization as a JAX user writes it, each op one ``jax.jit`` function
on arrays put on the CPU device once (``jax.device_put``); ``run()`` blocks
until the result is ready.  Statistics reduce over every axis but the
channel axis of refbn's layout (the last for NHWC/NDHWC/NWC/NC, axis 1 for
channels first), so JAX runs the same memory layout as refbn:

train   mean = x.mean(axes); var = ((x - mean)**2).mean(axes) (two passes,
        float32, biased); y = (x - mean) * rsqrt(var + eps) * scale + offset
infer   y from the population statistics, as above
bwd     ``jax.vjp`` of the training forward w.r.t. (x, scale, offset), fed dy,
        jitted as one function: what ``jax.jit(jax.grad(...))`` gives at a BN
        layer.  JAX has no saved-statistics entry point, so XLA recomputes the
        batch statistics from x inside the backward (a fused extra read of x).

XLA allocates a fresh output per call (there is no ``out=``).  For the
validation the batch_variance is the Bessel-corrected biased variance, in
float64 (as torch_bench recovers it).

Threads: in jax 0.10.2, ``XLA_FLAGS="--xla_cpu_multi_thread_eigen=false
intra_op_parallelism_threads=N"`` does not limit XLA's CPU threads (measured:
still all cores busy; ``intra_op_parallelism_threads`` alone is not even a
flag).  XLA sizes its intra-op pool from the CPUs this process may run on,
when the CPU backend starts; :func:`configure_threads` therefore narrows the
affinity to N CPUs while the backend starts, then gives every thread (the
pool's included) all CPUs back: a pool of N threads that float, as numba's do.
"""
import os

import jax
import numpy as np
from jax._src import xla_bridge

_THREADS = {}


def configure_threads(threads):
    """XLA's CPU pool of ``threads`` threads; call before any jax op (starts the CPU backend)."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if not threads or int(threads) >= len(cpus) or xla_bridge.backends_are_initialized():
        jax.devices()
        late = bool(threads) and 0 < int(threads) < len(cpus)
        _THREADS.update(threads=len(cpus) or os.cpu_count(),
                        how="all CPUs" + (": the CPU backend had started before the limit" if late else ""))
        return
    tasks = "/proc/self/task"
    before = set(os.listdir(tasks))
    os.sched_setaffinity(0, cpus[:int(threads)])
    try:
        jax.devices()                     # the CPU client and its thread pool start here
    finally:
        for tid in [0] + [int(t) for t in set(os.listdir(tasks)) - before]:
            try:
                os.sched_setaffinity(tid, cpus)
            except OSError:               # a thread that has already ended
                pass
    _THREADS.update(threads=int(threads), how="pool sized by the CPU affinity at backend start, then unpinned")


def info():
    return {"jax_version": jax.__version__, "threads": _THREADS.get("threads"), "threads_how": _THREADS.get("how"),
            "devices": [str(d) for d in jax.devices()]}


def _forward_train(axes, shape, eps):
    def f(x, scale, offset):
        mean = x.mean(axes, keepdims=True)
        var = ((x - mean) ** 2).mean(axes, keepdims=True)
        y = (x - mean) * jax.lax.rsqrt(var + eps) * scale.reshape(shape) + offset.reshape(shape)
        return y, mean.reshape(-1), var.reshape(-1)
    return f


def ops(inp, epsilon, which):
    """op -> (run, outputs), as refbn.compare.tf_bench.ops: ``run()`` is the timed call,
    ``outputs()`` the refbn-named outputs as numpy arrays, in x's layout."""
    axes = inp.layout.reduction_axes
    shape = [1] * inp.x.ndim
    shape[inp.layout.axis] = inp.layout.channels
    dev = jax.devices("cpu")[0]
    x, dy, scale, offset, pm, pv = (jax.device_put(a, dev) for a in
                                    (inp.x, inp.dy, inp.scale, inp.offset, inp.pop_mean, inp.pop_var))
    fwd = _forward_train(axes, shape, epsilon)
    n = inp.n
    result = {}
    if "train" in which:
        train_fn = jax.jit(fwd)

        def train():
            return jax.block_until_ready(train_fn(x, scale, offset))

        def train_out():
            y, mean, var = (np.asarray(a) for a in train())
            var64 = var.astype(np.float64)
            return {"y": y.copy(), "batch_mean": mean.copy(),
                    "batch_variance": (var64 * n / max(n - 1, 1)).astype(np.float32),
                    "reserve_space_1": mean.copy(), "reserve_space_2": var.copy()}
        result["train"] = (train, train_out)
    if "infer" in which:
        infer_fn = jax.jit(lambda x, scale, offset, pm, pv: (x - pm.reshape(shape)) * jax.lax.rsqrt(
            pv.reshape(shape) + epsilon) * scale.reshape(shape) + offset.reshape(shape))

        def infer():
            return infer_fn(x, scale, offset, pm, pv).block_until_ready()

        def infer_out():
            return {"y": np.array(infer())}
        result["infer"] = (infer, infer_out)
    if "bwd" in which:
        bwd_fn = jax.jit(lambda x, scale, offset, dy: jax.vjp(lambda *a: fwd(*a)[0], x, scale, offset)[1](dy))

        def bwd():
            return jax.block_until_ready(bwd_fn(x, scale, offset, dy))

        def bwd_out():
            dx, ds, do = (np.array(a) for a in bwd())
            return {"x_backprop": dx, "scale_backprop": ds, "offset_backprop": do}
        result["bwd"] = (bwd, bwd_out)
    return result
