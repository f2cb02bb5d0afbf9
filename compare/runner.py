"""The harness: run cases through refbn, the float64 truth and TF's kernels, and judge them.

TensorFlow runs in worker processes (:mod:`refbn.compare.tf_worker`), one per
kernel family, because TF chooses oneDNN or Eigen once, at import.  This
process never imports TensorFlow: it sends descriptors, computes refbn's
outputs and the truth while the workers compute TF's, and reads TF's
outputs back from .npz files.
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np

import refbn
from refbn import dtypes
from refbn.testing import compare

from . import cases as cases_mod
from . import divergences as div
from . import metrics

KERNELS = ("onednn", "eigen")
VERDICTS = ("exact", "close", "divergence", "unsupported", "FAIL")


class TFUnavailable(RuntimeError):
    pass


# -- TF worker processes ---------------------------------------------------------------
class WorkerProcess:
    """A ``python -m MODULE`` worker speaking one JSON line per message on stdin/stdout (its
    stderr kept for the error message); the first message is its hello."""

    def __init__(self, module, args, outdir, env, label):
        self.outdir, self.label = outdir, label
        os.makedirs(self.outdir, exist_ok=True)
        self._stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module, *args, "--outdir", self.outdir],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, text=True, env=env)
        self.hello = None

    def stderr_tail(self, lines=8):
        self._stderr.seek(0)
        text = self._stderr.read().decode(errors="replace").strip().splitlines()
        return "\n".join(text[-lines:])

    def _read(self):
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(timeout=30)
            raise TFUnavailable(f"the {self.label} worker exited with code "
                                f"{self.proc.returncode}:\n{self.stderr_tail()}")
        return json.loads(line)

    def start(self):
        if self.hello is None:
            self.hello = self._read()
        return self.hello

    def close(self):
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)
        except Exception:
            self.proc.kill()
            self.proc.wait()
        self._stderr.close()


class TFWorker(WorkerProcess):
    """One ``python -m refbn.compare.tf_worker`` process running one kernel family."""

    def __init__(self, kernel, outdir):
        if kernel not in KERNELS:
            raise ValueError(f"tf_kernel: expected one of {', '.join(KERNELS)}, got {kernel!r}")
        self.kernel = kernel
        env = dict(os.environ, TF_ENABLE_ONEDNN_OPTS="1" if kernel == "onednn" else "0",
                   TF_CPP_MIN_LOG_LEVEL="2")
        super().__init__("refbn.compare.tf_worker", [], os.path.join(outdir, kernel), env,
                         f"TensorFlow ({kernel})")
        self.pending = []  # ids submitted, not yet received

    def start(self):
        """Wait for the worker's hello; checks that TF runs the requested kernel."""
        if self.hello is None:
            super().start()
            if self.hello.get("onednn") != (self.kernel == "onednn"):
                raise TFUnavailable(f"asked for the {self.kernel} kernel but TensorFlow reports "
                                    f"oneDNN={'on' if self.hello.get('onednn') else 'off'}")
        return self.hello

    def submit(self, jid, case):
        self.proc.stdin.write(json.dumps({"id": jid, "case": case.descriptor()}) + "\n")
        self.proc.stdin.flush()
        self.pending.append(jid)

    def receive(self):
        """The next result, in submission order: (id, arrays, info)."""
        msg = self._read()
        self.pending.remove(msg["id"])
        with np.load(msg["path"]) as z:
            arrays = {}
            for k in z.files:
                if k.endswith("@bf16"):
                    arrays[k[:-5]] = z[k].view(dtypes.bfloat16)
                else:
                    arrays[k] = z[k]
        os.unlink(msg["path"])
        return msg["id"], arrays, msg["info"]


# -- results ----------------------------------------------------------------------------
@dataclass
class CaseResult:
    case: object
    kernel: str            # the requested kernel family
    backend: str
    kernel_used: str = ""
    verdict: str = "FAIL"
    outputs: list = field(default_factory=list)      # metrics.OutputResult
    failures: list = field(default_factory=list)
    divergences: list = field(default_factory=list)  # names of documented divergences seen
    notes: list = field(default_factory=list)
    facts: list = field(default_factory=list)
    kernel_gap: dict = field(default_factory=dict)  # oneDNN vs Eigen on this case (both run)
    seconds: float = 0.0

    @property
    def descriptor(self):
        return self.case.descriptor()

    def repro(self):
        return f"refbn verify '{self.descriptor}' --backend {self.backend} --tf-kernel {self.kernel}"

    def worst(self, which="refbn_vs_tf"):
        """The output with the largest normalised error in one of the three comparisons."""
        if not self.outputs:
            return None
        return max(self.outputs, key=lambda o: getattr(o, which).max_ulps)

    def as_dict(self):
        return {"case": self.descriptor, "kernel": self.kernel, "kernel_used": self.kernel_used,
                "backend": self.backend, "verdict": self.verdict, "failures": self.failures,
                "divergences": self.divergences, "notes": self.notes, "facts": self.facts,
                "outputs": [o.as_dict() for o in self.outputs], "repro": self.repro(),
                "onednn_vs_eigen": {k: {"max_ulps": v[0], "max_ulp_distance": v[1]}
                                    for k, v in self.kernel_gap.items()},
                "seconds": round(self.seconds, 3)}


_VERDICT_DIVERGENCES = (div.ILL_CONDITIONED.name, div.EMPTY_BATCH_TRAINING.name)


def _finish(res):
    """exact / close / divergence / unsupported / FAIL (the notes say what was not compared)."""
    if res.failures:
        res.verdict = "FAIL"
    elif any(d in _VERDICT_DIVERGENCES for d in res.divergences):
        res.verdict = "divergence"
    elif not res.outputs:
        res.verdict = "unsupported"
    elif all(o.refbn_vs_tf.exact for o in res.outputs):
        res.verdict = "exact"
    else:
        res.verdict = "close"
    return res


# -- refbn side of an op case -------------------------------------------------------------
@dataclass
class RefbnSide:
    inputs: object
    refbn: dict      # output name -> array
    truth: dict
    errors: dict     # "fwd"/"grad" -> "ValueError: ..."
    scales: dict


def _call(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs), None
    except (ValueError, TypeError) as e:
        return None, f"{type(e).__name__}: {e}"


def refbn_side(case, backend):
    """refbn's outputs (backend) and the float64 truth (numpy on float64 copies)."""
    inp = cases_mod.make_inputs(case)
    f64 = lambda a: np.asarray(a, dtype=np.float64)  # noqa: E731
    x64, dy64 = f64(inp.x), f64(inp.dy)
    common = dict(epsilon=case.eps, data_format=case.layout, is_training=case.is_training)
    fwd_kw = dict(common, exponential_avg_factor=case.eaf)
    out, truth, errors = {}, {}, {}
    r, errors["fwd"] = _call(refbn.raw_ops.FusedBatchNormV3, inp.x, inp.scale, inp.offset, inp.mean,
                             inp.variance, backend=backend, **fwd_kw)
    t, _ = _call(refbn.raw_ops.FusedBatchNormV3, x64, f64(inp.scale), f64(inp.offset), f64(inp.mean),
                 f64(inp.variance), backend="numpy", **fwd_kw)
    if r is not None:
        out.update(r._asdict())
    if t is not None:
        truth.update(t._asdict())
    empty = np.zeros(0, np.float32)
    g, errors["grad"] = _call(refbn.raw_ops.FusedBatchNormGradV3, inp.dy, inp.x, inp.scale, inp.grad_mean,
                              inp.grad_variance, empty, backend=backend, **common)
    tg, _ = _call(refbn.raw_ops.FusedBatchNormGradV3, dy64, x64, f64(inp.scale), f64(inp.grad_mean),
                  f64(inp.grad_variance), f64(empty), backend="numpy", **common)
    if g is not None:
        out.update(g._asdict())
    if tg is not None:
        truth.update(tg._asdict())
    sc = metrics.scales(case, x64, dy64, inp.scale, inp.grad_mean, inp.grad_variance, truth)
    return RefbnSide(inp, out, truth, {k: v for k, v in errors.items() if v}, sc)


def judge_op(case, side, tf_arrays, tf_info, kernel, backend):
    res = CaseResult(case, kernel, backend, kernel_used=tf_info.get("kernel", kernel))
    used = res.kernel_used
    if div.empty_training(case):
        return _judge_empty_training(res, side, tf_arrays, tf_info)
    ill = div.ill_conditioned(case)
    phases = (("fwd", metrics.FWD_TRAIN if case.is_training else metrics.FWD_INFER), ("grad", metrics.GRAD))
    for phase, outputs in phases:
        if phase in side.errors:
            res.failures.append(f"refbn refused a valid {phase} call: {side.errors[phase]}")
            continue
        tf_err = tf_info.get(f"{phase}_error")
        refused = phase == "grad" and div.eigen_grad_refused(case, used, tf_err)
        if tf_err:
            if refused and "only support NHWC" in tf_err:
                res.divergences.append(div.EIGEN_GRAD_NCHW_INFERENCE.name)
                res.notes.append(f"gradient unsupported by TF ({used}): {tf_err}")
            else:
                res.failures.append(f"TF raised on the {phase} call: {tf_err}")
            continue
        if refused and used == "eigen":
            res.notes.append("TF's Eigen kernel now computes the channels-first inference gradient "
                             "(documented as refused); compared normally")
        if phase == "fwd" and div.empty_inference(case):
            outputs = _empty_inference_stats(res, tf_arrays, outputs)
        for o in outputs:
            key = metrics.key(o)
            if key not in tf_arrays:
                res.failures.append(f"TF returned no {o}")
                continue
            n = case.count if (phase == "grad" or case.is_training) else 0
            res.outputs.append(metrics.three_way(o, case.dtype, side.refbn[o], tf_arrays[key], side.truth[o],
                                                 used, backend, side.scales.get(o), n))
    if case.mode == "infer" and "fwd" not in side.errors:
        res.divergences.append(div.INFERENCE_RESERVE_SPACES.name)
        inp = side.inputs
        if not (np.array_equal(side.refbn["reserve_space_1"], inp.mean)
                and np.array_equal(side.refbn["reserve_space_2"], inp.variance)):
            res.failures.append("refbn's inference reserve_space_1/2 are not copies of mean/variance")
    for o in res.outputs:
        if not o.refbn_ok:
            res.failures.append(o.refbn_vs_truth.message("refbn vs float64 truth"))
        elif o.closer == "tf":
            res.failures.append(
                f"{o.output}: TF is closer to the float64 truth than refbn (refbn max abs error "
                f"{o.refbn_vs_truth.max_abs:.3g}, TF {o.tf_vs_truth.max_abs:.3g})")
        elif not o.refbn_vs_tf.passed:
            if ill:
                if div.ILL_CONDITIONED.name not in res.divergences:
                    res.divergences.append(div.ILL_CONDITIONED.name)
                res.notes.append(f"{o.output}: TF off by {o.tf_vs_truth.max_ulps:.3g} eps "
                                 f"(rel {o.tf_vs_truth.max_rel:.2g}), refbn {o.refbn_vs_truth.max_ulps:.2g} eps")
            else:
                res.failures.append(o.refbn_vs_tf.message("refbn vs TF") +
                                    f"\n  closer to the float64 truth: {o.closer} (refbn "
                                    f"{o.refbn_vs_truth.max_ulps:.3g} eps, TF {o.tf_vs_truth.max_ulps:.3g} eps)")
    return _finish(res)


def _empty_inference_stats(res, tf_arrays, outputs):
    """N == 0 in inference: TF's batch_mean/batch_variance are NaN (documented); y is compared."""
    stats = ("batch_mean", "batch_variance")
    tf_stats = [tf_arrays.get(metrics.key(o)) for o in stats]
    if all(v is not None and np.isnan(v).all() for v in tf_stats):
        res.divergences.append(div.EMPTY_BATCH_TRAINING.name)
        res.notes.append("N == 0: TF's batch_mean/batch_variance are NaN, refbn passes mean/variance "
                         "through (not compared)")
        return tuple(o for o in outputs if o not in stats)
    res.notes.append("TF now passes mean/variance through for N == 0 too (documented as NaN); compared")
    return outputs


def _judge_empty_training(res, side, tf_arrays, tf_info):
    """N == 0 in training: refbn must refuse; TF's statistics must be NaN (documented)."""
    d = div.EMPTY_BATCH_TRAINING
    for phase in ("fwd", "grad"):
        if not side.errors.get(phase, "").startswith("ValueError"):
            res.failures.append(f"refbn should raise ValueError on an empty training batch ({phase})")
    mean = tf_arrays.get("fwd.batch_mean")
    if tf_info.get("fwd_error"):
        res.notes.append(f"TF now refuses it too: {tf_info['fwd_error']}")
    elif mean is None or not np.isnan(mean).all():
        res.failures.append(f"documented divergence no longer holds: TF's batch_mean is {mean!r}, not NaN")
    if not res.failures:
        res.divergences.append(d.name)
        res.notes.append(f"refbn: {side.errors['fwd']}")
        res.notes.append("TF: batch_mean/batch_variance NaN, gradient zeros")
    return _finish(res)


# -- parity cases -------------------------------------------------------------------------
@dataclass
class ParitySide:
    refbn: dict
    truth: dict
    errors: dict
    gap: dict      # predicted moving_variance gap tf_fused - keras (float64)


def _layer_run(case, convention, batches, x_inf, dtype, backend):
    bn = refbn.BatchNorm(axis=case.channel_axis, momentum=case.mom if convention == case.mode else
                         (0.99 if case.momentum is None else case.momentum),
                         epsilon=case.eps, convention=convention, backend=backend, dtype=dtype)
    ys = [bn(xb, training=True) for xb in batches]
    y_inf = bn(x_inf, training=False)
    return {"moving_mean": bn.moving_mean, "moving_variance": bn.moving_variance,
            "y_last_train": ys[-1], "y_infer": y_inf}


def parity_side(case, backend):
    batches, x_inf = cases_mod.parity_batches(case)
    b64, xi64 = [np.asarray(b, np.float64) for b in batches], np.asarray(x_inf, np.float64)
    errors, out, truth, gap = {}, {}, {}, {}
    try:
        out = _layer_run(case, case.mode, batches, x_inf, "float32", backend)
        truth = _layer_run(case, case.mode, b64, xi64, "float64", "numpy")
        if case.mode == "tf_fused":
            keras64 = _layer_run(case, "keras", b64, xi64, "float64", "numpy")
            gap = {"moving_variance": truth["moving_variance"] - keras64["moving_variance"],
                   "keras3_truth_moving_variance": keras64["moving_variance"]}
    except (ValueError, TypeError) as e:
        errors["parity"] = f"{type(e).__name__}: {e}"
    return ParitySide(out, truth, errors, gap)


def judge_parity(case, side, tf_arrays, tf_info, kernel, backend):
    res = CaseResult(case, kernel, backend, kernel_used=tf_info.get("kernel", kernel))
    if "unsupported" in tf_info:
        res.notes.append(f"{case.mode} parity not run: {tf_info['unsupported']}")
        return _finish(res)
    if side.errors:
        res.failures.append(f"refbn.BatchNorm failed: {side.errors['parity']}")
        return _finish(res)
    if "parity_error" in tf_info:
        res.failures.append(f"{case.mode} run failed: {tf_info['parity_error']}")
        return _finish(res)
    res.notes.append(f"against {tf_info.get('implementation', case.mode)}")
    ctx = f"{case.mode}_parity"
    for o in metrics.PARITY:
        out = metrics.three_way(o, case.dtype, side.refbn[o], tf_arrays[metrics.key(o)], side.truth[o],
                                res.kernel_used, backend, n=case.count, context=ctx, refbn_ctx="refbn_layer")
        r_t, r_tf = out.refbn_vs_truth, out.refbn_vs_tf
        res.outputs.append(out)
        if not r_t.passed:
            res.failures.append(r_t.message("refbn.BatchNorm vs float64 truth"))
        elif not r_tf.passed:
            if div.ill_conditioned(case) and out.closer == "refbn":
                # the framework's float32 statistics lose the variance (|mean| >> std): documented
                if div.ILL_CONDITIONED.name not in res.divergences:
                    res.divergences.append(div.ILL_CONDITIONED.name)
                res.notes.append(f"{o}: {case.mode} off by {out.tf_vs_truth.max_ulps:.3g} eps "
                                 f"(rel {out.tf_vs_truth.max_rel:.2g}), refbn {r_t.max_ulps:.2g} eps")
                continue
            res.failures.append(r_tf.message(f"refbn.BatchNorm(convention={case.mode!r}) vs {case.mode}") +
                                f"\n  closer to the float64 truth: {out.closer}")
    if case.mode == "tf_fused" and "keras3.moving_variance" in tf_arrays:
        _convention_gap_fact(res, side, tf_arrays)
    return _finish(res)


def _convention_gap_fact(res, side, tf_arrays):
    """Keras 3 (biased) vs tf-keras fused (Bessel-corrected) moving variance, as a checked fact."""
    fused = np.asarray(tf_arrays["parity.moving_variance"], np.float64)
    keras3 = np.asarray(tf_arrays["keras3.moving_variance"], np.float64)
    measured, predicted = fused - keras3, side.gap["moving_variance"]
    eps32 = dtypes.machine_epsilon(np.float32)
    n = res.case.count
    k3 = metrics.judged(keras3, side.gap["keras3_truth_moving_variance"], "moving_variance", "f32",
                        "keras_parity", n=n)
    fu = metrics.judged(fused, side.truth["moving_variance"], "moving_variance", "f32", "tf_fused_parity", n=n)
    allowed = (k3.allowed_ulps + fu.allowed_ulps) * eps32 * float(np.max(np.abs(fused)))
    err = float(np.max(np.abs(measured - predicted)))
    rel = float(np.max(np.abs(measured) / np.maximum(np.abs(keras3), 1e-30)))
    ok = err <= allowed
    res.facts.append(
        f"convention gap: tf-keras fused (Bessel-corrected) minus Keras 3 (biased) moving variance "
        f"= up to {rel:.3g} relative after {res.case.steps} steps; predicted by refbn.reference "
        f"to within {err:.2g} (allowed {allowed:.2g}) -> {'as documented' if ok else 'NOT as documented'}")
    if not ok:
        res.failures.append("the Keras 3 vs tf-keras fused moving-variance gap differs from the "
                            f"documented convention gap by {err:.3g} (allowed {allowed:.3g})")


def kernel_gap(case, received, side):
    """oneDNN vs Eigen on the same case: {output: (normalised max error in eps, ulps apart)}."""
    (a, _), (b, _) = received["onednn"], received["eigen"]
    outputs = (metrics.PARITY if case.kind == "parity" else
               (metrics.FWD_TRAIN if case.is_training else metrics.FWD_INFER) + metrics.GRAD)
    gap = {}
    for o in outputs:
        key = metrics.key(o)
        if key not in a or key not in b or (case.kind == "op" and case.count == 0):
            continue
        dt = metrics.output_dtype(o, case.dtype)
        scale = side.scales.get(o) if case.kind == "op" else None
        c = compare(a[key], b[key], o, dt, "tf_eigen" if case.kind == "op" else f"{case.mode}_parity", scale)
        gap[o] = (c.max_ulps, c.max_ulp_distance)
    return gap


# -- the driver -------------------------------------------------------------------------------
def verify(cases, backend="numpy", kernels=KERNELS, ahead=3, on_start=None, frameworks=("tf",),
           conventions=None):
    """Yield a :class:`CaseResult` per (case, kernel, backend), in order, then (frameworks other
    than "tf") a :class:`refbn.compare.frameworks.FrameworkResult` per (case, implementation,
    backend) of each framework.

    ``backend`` may be one name or several: TF then runs once per case and
    every backend is judged against the same TF outputs.  ``frameworks``:
    names from :data:`refbn.compare.frameworks.NAMES` (installed ones; torch
    parity cases go to the torch worker when "torch" is among them).
    ``conventions``: a list to which each framework's conventions probe
    appends its rows (None: no probe).
    Raises TFUnavailable when TensorFlow (or a framework's worker) cannot be started.
    """
    from refbn import backends

    from . import frameworks as fw_mod

    names = [backend] if isinstance(backend, str) else list(backend)
    for name in names:
        backends.get(name)  # a clear error for an unknown or unavailable backend, before TF starts
    cases = [cases_mod.parse(c) if isinstance(c, str) else c for c in cases]
    all_cases = cases
    if "tf" in frameworks:
        cases = [c for c in cases if fw_mod.supports("tf", c) and not (c.mode == "torch" and "torch" in frameworks)]
    else:
        cases, kernels = [], ()
    outdir = tempfile.mkdtemp(prefix="refbn-verify-")
    workers, others = {}, {}
    try:
        probed = [f for f in frameworks if f != "tf" or conventions is not None]
        others = fw_mod.start_workers(probed, outdir)
        jobs = fw_mod.submit_all(others, all_cases) if others else {}
        for k in kernels:
            workers[k] = TFWorker(k, outdir)
        for w in workers.values():
            w.start()
        if on_start:
            on_start({k: w.hello for k, w in workers.items()})
        submitted = 0

        def top_up(upto):
            nonlocal submitted
            while submitted < min(upto, len(cases)):
                for w in workers.values():
                    w.submit(submitted, cases[submitted])
                submitted += 1

        top_up(ahead)
        for i, case in enumerate(cases):
            sides = {}
            for name in names:
                t0 = time.perf_counter()
                sides[name] = (refbn_side if case.kind == "op" else parity_side)(case, name)
                sides[name] = (sides[name], time.perf_counter() - t0)
            received = {}
            for k, w in workers.items():
                jid, arrays, info = w.receive()
                assert jid == i, (jid, i)
                received[k] = (arrays, info)
            gap = kernel_gap(case, received, sides[names[0]][0]) if len(received) == 2 else {}
            judge = judge_op if case.kind == "op" else judge_parity
            for k, (arrays, info) in received.items():
                for name in names:
                    side, t_side = sides[name]
                    t1 = time.perf_counter()
                    res = judge(case, side, arrays, info, k, name)
                    res.kernel_gap = gap
                    res.seconds = t_side + (time.perf_counter() - t1)
                    yield res
            top_up(i + 1 + ahead)
        found = [] if conventions is None else conventions
        yield from fw_mod.collect(others, jobs, names, found, all_cases)
    finally:
        for w in list(workers.values()) + list(others.values()):
            w.close()
        shutil.rmtree(outdir, ignore_errors=True)
