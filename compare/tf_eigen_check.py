"""``refbn verify --backend tf_eigen``: refbn's emulation of TF's Eigen CPU kernel, bit for bit.

Not a tolerance check: every output TF defines for a case must have the same bits as
``refbn.raw_ops.FusedBatchNormV3`` / ``FusedBatchNormGradV3(..., backend="tf_eigen")`` (NaN
matches NaN).  TF runs in one worker process with ``TF_ENABLE_ONEDNN_OPTS=0`` and
``TF_NUM_INTRAOP_THREADS`` set to the thread count the emulation assumes
(refbn.backends.tf_eigen.intra_op_threads: the gradient's sums depend on it), through
compare/runner.py's TFWorker with the same inputs as every other check
(compare.cases.make_inputs).  Per case: ``exact``, or ``FAIL`` with the outputs that differ,
their largest distance in ulps and a repro line.

Compared: y, batch_mean, batch_variance (Bessel-corrected, or the moving averages when
exponential_avg_factor != 1) and, in training, reserve_space_1/2 (in inference TF's Eigen
kernel leaves them uninitialised); then the gradient's x_backprop, scale_backprop and
offset_backprop, both modes.  Where TF refuses the gradient (channels-first inference), refbn
must refuse it too.  Not compared, and said so: the multi-step parity cases and empty batches
(see eigen_op_cases).
"""
import os
import tempfile
import time

import numpy as np
from rich.text import Text

import refbn

from . import cases as cases_mod

BACKEND = "tf_eigen"
TRAIN_OUTPUTS = ("y", "batch_mean", "batch_variance", "reserve_space_1", "reserve_space_2")
INFER_OUTPUTS = ("y", "batch_mean", "batch_variance")
GRAD_OUTPUTS = ("x_backprop", "scale_backprop", "offset_backprop")


def _ordered(a):
    """Float bit patterns as integers whose difference counts ulps (-0 and +0 both 0)."""
    a = np.asarray(a)
    width = 16 if a.dtype.itemsize == 2 else 32
    bits = a.view(np.uint16 if width == 16 else np.uint32).astype(np.int64) if width == 16 else \
        np.asarray(a, np.float32).view(np.uint32).astype(np.int64)
    sign, magnitude = bits >> (width - 1), bits & ((1 << (width - 1)) - 1)
    return np.where(sign == 1, -magnitude, magnitude)


def ulp_distance(a, b):
    """(values that differ, the largest distance in ulps) between two arrays of the same
    float dtype; NaN equals NaN, a NaN against a number counts as differing by 2**31."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        return -1, None
    if a.size == 0:
        return 0, 0
    nan_a, nan_b = np.isnan(np.asarray(a, np.float32)), np.isnan(np.asarray(b, np.float32))
    d = np.abs(_ordered(a) - _ordered(b))
    d = np.where(nan_a & nan_b, 0, np.where(nan_a | nan_b, 2 ** 31, d))
    return int(np.count_nonzero(d)), int(d.max())


def eigen_op_cases(selected):
    """(cases this check compares, {descriptor: why not} for the others)."""
    ok, skipped = [], {}
    for c in selected:
        if c.mode not in cases_mod.OP_MODES:
            skipped[c.descriptor()] = "a multi-step parity case (not one op call)"
        elif c.count == 0:
            skipped[c.descriptor()] = ("an empty batch: refbn refuses it in training; TF's kernel returns "
                                       "NaN statistics in both modes (fused_batch_norm_op.cc: 'If input is "
                                       "empty, return NaN mean/variance'), refbn passes inference's through")
        else:
            ok.append(c)
    return ok, skipped


def emulate(case):
    """refbn's tf_eigen forward outputs for an op case, by name."""
    inp = cases_mod.make_inputs(case)
    r = refbn.raw_ops.FusedBatchNormV3(inp.x, inp.scale, inp.offset, inp.mean, inp.variance,
                                       epsilon=case.eps, exponential_avg_factor=case.eaf,
                                       data_format=case.layout, is_training=case.is_training,
                                       backend=BACKEND)
    return r._asdict()


def emulate_grad(case):
    """refbn's tf_eigen gradient outputs for an op case, by name (the arguments TF's worker
    gives FusedBatchNormGradV3: compare.cases.make_inputs' dy, grad_mean, grad_variance)."""
    inp = cases_mod.make_inputs(case)
    g = refbn.raw_ops.FusedBatchNormGradV3(inp.dy, inp.x, inp.scale, inp.grad_mean, inp.grad_variance,
                                           np.zeros(0, np.float32), epsilon=case.eps,
                                           data_format=case.layout, is_training=case.is_training,
                                           backend=BACKEND)
    return g._asdict()


def _compare_grad(case, tf_arrays, tf_info):
    """({name: (differing, max_ulps)}, error, note) for the gradient."""
    tf_err = tf_info.get("grad_error")
    try:
        mine = emulate_grad(case)
    except (ValueError, TypeError) as e:
        if tf_err:   # both refuse: as TF
            return {}, "", f"gradient refused by TF and by refbn, as TF ({tf_err.split(': ', 1)[0]})"
        return {}, f"refbn refused the gradient, TF computed it: {type(e).__name__}: {e}", ""
    if tf_err:
        return {}, f"TF refused the gradient, refbn computed it: {tf_err}", ""
    return {n: ulp_distance(mine[n], tf_arrays[f"grad.{n}"]) for n in GRAD_OUTPUTS}, "", ""


def compare(case, tf_arrays, tf_info):
    """{'verdict': 'exact'|'FAIL', 'outputs': {name: (differing, max_ulps)}, 'error': str,
    'note': str}; the outputs are the forward's (y, ...) then the gradient's (x_backprop, ...)."""
    names = TRAIN_OUTPUTS if case.is_training else INFER_OUTPUTS
    if "fwd_error" in tf_info:
        return {"verdict": "FAIL", "outputs": {}, "error": f"TF refused: {tf_info['fwd_error']}", "note": ""}
    try:
        mine = emulate(case)
    except (ValueError, TypeError) as e:
        return {"verdict": "FAIL", "outputs": {}, "error": f"refbn refused: {type(e).__name__}: {e}",
                "note": ""}
    outs = {n: ulp_distance(mine[n], tf_arrays[f"fwd.{n}"]) for n in names}
    grad_outs, error, note = _compare_grad(case, tf_arrays, tf_info)
    outs.update(grad_outs)
    bad = bool(error) or any(k != 0 for k, _ in outs.values())
    return {"verdict": "FAIL" if bad else "exact", "outputs": outs, "error": error, "note": note}


def machine():
    """What the emulation's bits depend on, for the report."""
    from refbn.bench.cli import cpu_model
    return cpu_model()


def _start_worker(tmp, threads):
    """TF's Eigen worker with ``threads`` intra-op threads (TF reads TF_NUM_INTRAOP_THREADS when
    it starts; the worker inherits this process's environment)."""
    from .runner import TFWorker
    before = os.environ.get("TF_NUM_INTRAOP_THREADS")
    os.environ["TF_NUM_INTRAOP_THREADS"] = str(threads)
    try:
        return TFWorker("eigen", tmp)
    finally:
        if before is None:
            del os.environ["TF_NUM_INTRAOP_THREADS"]
        else:
            os.environ["TF_NUM_INTRAOP_THREADS"] = before


def run(selected, on_result=None, threads=None):
    """Runs TF's Eigen kernel and the emulation on the op cases; yields (case, result dict).
    ``threads``: TF's intra-op thread count, emulated too (default: tf_eigen.intra_op_threads())."""
    from refbn.backends import tf_eigen
    todo, _ = eigen_op_cases(selected)
    threads = tf_eigen.intra_op_threads() if threads is None else threads
    with tempfile.TemporaryDirectory(prefix="refbn-tf-eigen-") as tmp:
        worker = _start_worker(tmp, threads)
        previous = tf_eigen.set_intra_op_threads(threads)
        try:
            hello = worker.start()
            for i, case in enumerate(todo):
                t0 = time.perf_counter()
                worker.submit(i, case)
                _, arrays, info = worker.receive()
                res = compare(case, arrays, info)
                res["seconds"] = time.perf_counter() - t0
                res["tf_version"] = hello.get("tf_version", "?")
                res["threads"] = threads
                yield case, res
        finally:
            tf_eigen.set_intra_op_threads(previous)
            worker.close()


def repro(case, threads=None):
    """The command that repeats one case (with the thread count, which the gradient's bits need)."""
    prefix = "" if threads is None else f"TF_NUM_INTRAOP_THREADS={threads} "
    return f"{prefix}refbn verify '{case.descriptor()}' --backend {BACKEND}"


def main(args, selected, con):
    """The CLI's --backend tf_eigen branch: exit status 0 when every compared case is exact."""
    from refbn.backends import tf_eigen

    from .runner import TFUnavailable
    todo, skipped = eigen_op_cases(selected)
    n_exact, n_grad, n_refused, fails, version = 0, 0, 0, [], "?"
    threads = tf_eigen.intra_op_threads()
    try:
        for case, res in run(todo, threads=threads):
            version = res["tf_version"]
            if res["verdict"] == "exact":
                n_exact += 1
                n_grad += "x_backprop" in res["outputs"]
                n_refused += bool(res["note"])
                note = f"  ({res['note']})" if res["note"] else ""
                con.print(Text(f"exact  {case.descriptor()}{note}"), soft_wrap=True)
            else:
                fails.append(case)
                worst = ", ".join(f"{n}: {k} differ, max {u} ulps" for n, (k, u) in res["outputs"].items() if k)
                con.print(Text(f"FAIL   {case.descriptor()}  {worst or res['error']}"), soft_wrap=True)
                con.print(Text(f"       repro: {repro(case, threads)}"), soft_wrap=True)
    except TFUnavailable as e:
        con.print(Text(f"refbn verify: TensorFlow failed: {e}"), soft_wrap=True)
        con.print(Text(f"FAIL: TensorFlow (Eigen) could not run; {n_exact} case(s) checked before"), soft_wrap=True)
        return 2
    for d, why in skipped.items():
        con.print(Text(f"not compared  {d}: {why}"), soft_wrap=True)
    con.print(Text(
        f"machine: {machine()}; TF's Eigen build uses AVX packets of 8 floats. Machine-dependent: the "
        "vrsqrtps estimate (its bits are the CPU's own) in y, x_backprop and scale_backprop of channels "
        "below 8*floor(C/8); refbn runs the same instruction here, so they match TF on the same CPU. "
        f"TF's intra-op thread count: {threads} (TF_NUM_INTRAOP_THREADS, emulated). The gradient's sums "
        "(TF's ReduceOuterDimensions) split the rows into per-thread blocks when C <= 32 * threads, so "
        "its bits depend on that count; the forward's sums do not (each channel is one thread's)."))
    con.print()
    head = f"TensorFlow {version} Eigen, {threads} intra-op thread(s), backend {BACKEND}"
    tail = f"; {len(skipped)} case(s) not compared (see above)"
    if fails:
        con.print(Text(f"FAIL: {len(fails)} of {len(todo)} case(s) not bit-identical ({head}){tail}; "
                       "see the repro lines above"))
        return 1
    con.print(Text(f"OK: {n_exact} case(s) bit-identical ({head}: y, batch_mean, batch_variance, "
                   f"reserve_space_1/2; x_backprop, scale_backprop, offset_backprop in {n_grad}, the "
                   f"gradient refused by both as TF in {n_refused}){tail}"))
    return 0
