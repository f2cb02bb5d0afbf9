"""refbn against the other frameworks: PyTorch, JAX/Flax, tf-keras, ONNX Runtime, Keras 3 on jax/torch.

Each framework runs in its own worker process (:mod:`refbn.compare.fw_worker`,
the protocol of the TF workers); this process imports none of them.  The judge
is the float64 truth (refbn's numpy reference on float64 copies), and every
output is compared three ways as for TF (:func:`refbn.compare.metrics.three_way`):
refbn vs truth, the framework vs truth, refbn vs the framework.  Verdicts:
exact, close, divergence (an ill-conditioned case where the framework is the one
off the truth: refbn within its own tolerance and closer), FAIL.

Which cases each framework runs (:func:`supports`):

=============== ===================================================================
torch           float32 op cases (``F.batch_norm``; ``native_batch_norm`` and its
                backward, reserve spaces converted), ``torch`` parity
jax             ``flax`` parity (``flax.linen.BatchNorm``, ``flax.nnx.BatchNorm``)
tf_keras        ``tf_fused`` parity (``fused=True``), ``keras`` parity (``fused=False``)
onnxruntime     float32 op cases, forward only (inference; training mode)
keras_jax       ``keras`` parity under KERAS_BACKEND=jax
keras_torch     ``keras`` parity under KERAS_BACKEND=torch
=============== ===================================================================

Op cases with fewer than 2 values per channel in training, or none, are left
to the conventions probe (:mod:`refbn.compare.probe`), which every framework
also runs: its table says what each does there.
"""
import importlib.util
import json
import os
import sys
from dataclasses import dataclass, field

import numpy as np

import refbn
from refbn import reference as ref

from . import divergences as div
from . import metrics
from . import probe as probe_mod
from .runner import CaseResult, TFUnavailable, WorkerProcess, _call, parity_side as _tf_parity_side, refbn_side


@dataclass(frozen=True)
class Framework:
    name: str
    modules: tuple          # what must be importable
    worker: str             # fw_worker --framework
    env: tuple = ()         # (name, value) set before the framework loads
    title: str = ""


FRAMEWORKS = {f.name: f for f in (
    Framework("tf", ("tensorflow", "keras"), "keras", (("KERAS_BACKEND", "tensorflow"),),
              "TensorFlow's fused kernels (oneDNN, Eigen) and Keras 3"),
    Framework("torch", ("torch",), "torch", (), "PyTorch"),
    Framework("jax", ("jax", "flax"), "jax", (), "JAX/Flax"),
    Framework("tf_keras", ("tensorflow", "tf_keras"), "tf_keras", (), "tf-keras (Keras 2)"),
    Framework("onnxruntime", ("onnxruntime", "onnx"), "onnxruntime", (), "ONNX Runtime"),
    Framework("keras_jax", ("keras", "jax"), "keras", (("KERAS_BACKEND", "jax"),), "Keras 3 on jax"),
    Framework("keras_torch", ("keras", "torch"), "keras", (("KERAS_BACKEND", "torch"),), "Keras 3 on torch"),
)}
NAMES = tuple(FRAMEWORKS)
#: the setup.py extra that installs each module
EXTRA = {"tensorflow": "tf", "keras": "tf", "tf_keras": "tf", "torch": "torch", "jax": "jax", "flax": "jax",
         "onnxruntime": "onnx", "onnx": "onnx"}


def missing(name):
    """The modules of a framework that are not installed."""
    return [m for m in FRAMEWORKS[name].modules if importlib.util.find_spec(m) is None]


def installed():
    return [n for n in NAMES if not missing(n)]


def not_installed_text(name):
    extras = ",".join(dict.fromkeys(EXTRA[m] for m in missing(name)))
    return f'not installed (pip install "refbn[{extras}]")'


def parse_list(text):
    """--framework's value: names joined by commas ('all': every one)."""
    names = [t.strip() for t in str(text).split(",") if t.strip()]
    if names == ["all"]:
        return list(NAMES)
    bad = [n for n in names if n not in FRAMEWORKS]
    if bad or not names:
        raise ValueError(f"--framework: expected names from {', '.join(NAMES)} (comma-separated) or all, "
                         f"got {text!r}")
    return list(dict.fromkeys(names))


def supports(name, case):
    """Whether framework name runs a case (see the module docstring)."""
    f32 = case.dtype == "f32"
    if name == "tf":
        return case.mode != "flax"
    if name == "torch":
        if case.kind == "op":
            return f32 and case.count >= (2 if case.is_training else 1)
        return case.mode == "torch"
    if name == "onnxruntime":
        return case.kind == "op" and f32 and case.count >= (2 if case.is_training else 1) and case.eaf == 1.0
    if name == "jax":
        return case.mode == "flax"
    if name == "tf_keras":
        return f32 and (case.mode == "tf_fused" or case.mode == "keras")
    if name in ("keras_jax", "keras_torch"):
        return f32 and case.mode == "keras"
    return False


# -- worker processes ----------------------------------------------------------------------------
class FrameworkWorker(WorkerProcess):
    """One ``python -m refbn.compare.fw_worker`` process running one framework."""

    def __init__(self, name, outdir):
        fw = FRAMEWORKS[name]
        self.name = name
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", JAX_PLATFORMS="cpu", **dict(fw.env))
        env.setdefault("OMP_NUM_THREADS", "1")
        super().__init__("refbn.compare.fw_worker", ["--framework", fw.worker], os.path.join(outdir, name),
                         env, name)

    def submit(self, jid, case=None, probe=False):
        job = {"id": jid, "probe": "conventions"} if probe else {"id": jid, "case": case.descriptor()}
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()

    def receive(self):
        """(id, {impl: arrays}, info) of the next result, in submission order."""
        msg = self._read()
        per = {}
        with np.load(msg["path"]) as z:
            for k in z.files:
                impl, _, key = k.partition("|")
                per.setdefault(impl, {})[key] = z[k]
        os.unlink(msg["path"])
        return msg["id"], per, msg["info"]


# -- results ---------------------------------------------------------------------------------------
@dataclass
class FrameworkResult(CaseResult):
    """A check of one implementation of one framework (kernel = the implementation's name)."""
    framework: str = ""

    @property
    def descriptor(self):
        return self.case.descriptor() if self.case is not None else f"{self.framework}:{self.kernel}"

    def repro(self):
        if self.case is None:
            return f"refbn verify frameworks --backend {self.backend} --framework {self.framework}"
        return f"refbn verify '{self.descriptor}' --backend {self.backend} --framework {self.framework}"

    def as_dict(self):
        return dict(super().as_dict(), framework=self.framework)


def not_installed_result(name, backend):
    r = FrameworkResult(None, name, backend, kernel_used=name, framework=name)
    r.verdict = "not installed"
    r.notes.append(f"{name}: {not_installed_text(name)}")
    return r


def _finish(res, ill):
    if res.failures:
        res.verdict = "FAIL"
    elif ill and div.ILL_CONDITIONED.name in res.divergences:
        res.verdict = "divergence"
    elif not res.outputs:
        res.verdict = "FAIL"
        res.failures.append("nothing was compared")
    elif all(o.refbn_vs_tf.exact for o in res.outputs):
        res.verdict = "exact"
    else:
        res.verdict = "close"
    return res


def _judge_outputs(res, case, ill, name):
    for o in res.outputs:
        if not o.refbn_ok:
            res.failures.append(o.refbn_vs_truth.message("refbn vs float64 truth"))
        elif not o.refbn_vs_tf.passed or not o.tf_vs_truth.passed:
            if ill and o.closer == "refbn":
                if div.ILL_CONDITIONED.name not in res.divergences:
                    res.divergences.append(div.ILL_CONDITIONED.name)
                res.notes.append(f"{o.output}: {name} off by {o.tf_vs_truth.max_ulps:.3g} eps "
                                 f"(rel {o.tf_vs_truth.max_rel:.2g}), refbn {o.refbn_vs_truth.max_ulps:.2g} eps")
            else:
                res.failures.append(o.refbn_vs_tf.message(f"refbn vs {name}") +
                                    f"\n  {name} vs truth: {o.tf_vs_truth.max_ulps:.3g} eps "
                                    f"(allowed {o.tf_vs_truth.allowed_ulps:.4g}); closer: {o.closer}")
        elif case.kind == "op" and o.closer not in ("refbn", "tie") and o.output not in CONVERTED:
            res.failures.append(f"{o.output}: {name} is closer to the float64 truth than refbn (refbn max "
                                f"abs error {o.refbn_vs_truth.max_abs:.3g}, {name} {o.tf_vs_truth.max_abs:.3g})")


#: outputs the framework reports in another form, converted before comparison: refbn's value
#: is not the framework's rounding, so "closer" is reported but not judged
CONVERTED = ("reserve_space_2",)


def _context(name, case):
    return {"torch": "torch_cpu", "onnxruntime": "onnxruntime_cpu"}.get(name) if case.kind == "op" \
        else f"{case.mode}_parity"


def judge_op(case, side, impl, arrays, info, name, backend):
    res = FrameworkResult(case, impl, backend, kernel_used=impl, framework=name)
    ill = div.ill_conditioned(case)
    ctx = _context(name, case)
    arrays = dict(arrays)
    if "save_invstd" in arrays:  # torch's reserve space: invstd; TF's: the biased variance
        invstd = np.asarray(arrays.pop("save_invstd"), np.float64)
        arrays["fwd.reserve_space_2"] = 1.0 / (invstd * invstd) - case.eps
        res.notes.append("torch saves invstd: compared as reserve_space_2 = 1/invstd^2 - eps (float64)")
    for phase in ("fwd", "grad"):
        if phase in side.errors:
            res.failures.append(f"refbn refused a valid {phase} call: {side.errors[phase]}")
        if info.get(f"{phase}_error"):
            res.failures.append(f"{impl} raised on the {phase} call: {info[f'{phase}_error']}")
    for key in sorted(arrays):
        o = key.partition(".")[2]
        if o not in side.truth:
            continue
        n = case.count if (key.startswith("grad.") or case.is_training) else 0
        res.outputs.append(metrics.three_way(o, case.dtype, side.refbn[o], arrays[key], side.truth[o], name,
                                             backend, side.scales.get(o), n, context=ctx))
    _judge_outputs(res, case, ill, impl)
    return _finish(res, ill)


# -- parity ------------------------------------------------------------------------------------------
def parity_side(case, backend):
    """refbn.BatchNorm with the case's convention, float32 (backend) and float64 (the truth)."""
    if case.mode in ("keras", "tf_fused") or (case.mode == "torch" and not case.cumulative):
        return _tf_parity_side(case, backend)
    from . import cases as cases_mod
    from .runner import ParitySide

    batches, x_inf = cases_mod.parity_batches(case)

    def run(bs, xi, dtype, be):
        bn = refbn.BatchNorm(axis=case.channel_axis, momentum=case.mom, epsilon=case.eps,
                             convention=case.mode, backend=be, dtype=dtype)
        ys = [bn(xb, training=True) for xb in bs]
        return {"moving_mean": bn.moving_mean, "moving_variance": bn.moving_variance,
                "y_last_train": ys[-1], "y_infer": bn(xi, training=False)}

    out, errors = _call(run, batches, x_inf, "float32", backend)
    truth, _ = _call(run, [np.asarray(b, np.float64) for b in batches], np.asarray(x_inf, np.float64),
                     "float64", "numpy")
    return ParitySide(out or {}, truth or {}, {"parity": errors} if errors else {}, {})


def judge_parity(case, side, impl, arrays, info, name, backend):
    res = FrameworkResult(case, impl, backend, kernel_used=impl, framework=name)
    ill = div.ill_conditioned(case)
    if side.errors:
        res.failures.append(f"refbn.BatchNorm failed: {side.errors['parity']}")
        return _finish(res, ill)
    res.notes.append(f"against {info.get('implementation', impl)}")
    for o in metrics.PARITY:
        if metrics.key(o) not in arrays:
            res.failures.append(f"{impl} returned no {o}")
            continue
        res.outputs.append(metrics.three_way(o, case.dtype, side.refbn[o], arrays[metrics.key(o)], side.truth[o],
                                             name, backend, n=case.count, context=_context(name, case),
                                             refbn_ctx="refbn_layer"))
    if "num_batches_tracked" in info:
        nbt = info["num_batches_tracked"]
        res.notes.append(f"num_batches_tracked = {nbt} after {case.steps} steps")
        if nbt != case.steps:
            res.failures.append(f"num_batches_tracked is {nbt}, expected {case.steps}")
    _judge_outputs(res, case, ill, impl)
    return _finish(res, ill)


# -- the conventions probe, derived and judged ---------------------------------------------------------
#: the refbn.BatchNorm convention that should reproduce each implementation (and keywords)
REFBN_CONVENTION = {"torch.nn.BatchNorm2d": ("torch", None), "flax.linen.BatchNorm": ("flax", None),
                    "tf_keras fused=True": ("tf_fused", None), "tf_keras fused=False": ("keras", None),
                    "onnxruntime BatchNormalization": ("keras", {"momentum": 0.9, "epsilon": 1e-5}), "keras.jax": ("keras", None),
                    "keras.torch": ("keras", None), "keras.tensorflow": ("keras", None)}


@dataclass
class ConventionRow:
    framework: str
    implementation: str
    cells: dict = field(default_factory=dict)   # column -> text
    failures: list = field(default_factory=list)
    refbn: str = ""

    @property
    def verdict(self):
        return "FAIL" if self.failures else "match"


COLUMNS = ("variance averaged", "momentum", "initial mean, var", "default eps", "Bessel factor (n=8)",
           "one value per channel", "N = 0", "variance on N(1e4, 0.01^2)")


def _g(v):
    return f"{v:.6g}"


def _behaviour(d, initial_var):
    if "error" in d:
        return "raises " + d["error"].split(":")[0]
    mm, mv = np.asarray(d["moving_mean"]), np.asarray(d["moving_variance"])
    if np.isnan(mm).any() or np.isnan(mv).any():
        return "NaN written into the moving statistics"
    if d.get("num_batches_tracked") is not None and np.all(mm == 0) and np.all(mv == initial_var):
        return f"statistics unchanged, num_batches_tracked += 1"
    y = np.asarray(d.get("y", []))
    ytxt = "y = beta" if y.size and np.all(y == 0) else (f"y within {np.max(np.abs(y)):.2g} of beta" if y.size else "")
    return ", ".join(t for t in (ytxt, f"batch variance 0 averaged (moving var {_g(mv.max())})") if t)


def derive(name, impl, facts, backend="numpy"):
    """A conventions row from a probe's facts, judged against refbn.BatchNorm(convention=...)."""
    row = ConventionRow(name, impl)
    b = probe_mod.batches()
    x = np.asarray(b["step"], np.float64)
    n = x.size // x.shape[1]
    mean = x.mean(axis=(0, 2, 3))
    var = ((x - mean[None, :, None, None]) ** 2).mean(axis=(0, 2, 3))
    mm0, mv0 = np.asarray(facts["initial_mean"]), np.asarray(facts["initial_variance"])
    mm1, mv1 = np.asarray(facts["step"]["moving_mean"]), np.asarray(facts["step"]["moving_variance"])
    decay = float(np.mean((mm1 - mm0) / (mean - mm0)))
    fed = (mv1 - (1 - decay) * mv0) / decay
    bessel = float(np.mean(fed / var))
    m = facts["momentum"]
    unbiased = abs(bessel - n / (n - 1)) < 1e-4
    row.cells["variance averaged"] = "Bessel-corrected" if unbiased else (
        "biased" if abs(bessel - 1) < 1e-4 else f"? (factor {bessel:.6g})")
    row.cells["Bessel factor (n=8)"] = f"{bessel:.5f}" + (" = n/(n-1)" if unbiased else "")
    if abs(decay - m) < 1e-5:
        meaning = f"{_g(m)} = weight of the new value"
    elif abs(decay - (1 - m)) < 1e-5:
        meaning = f"{_g(m)} = weight of the old value"
    else:
        meaning = f"{_g(m)} (decay measured {decay:.6g})"
    row.cells["momentum"] = meaning
    row.cells["initial mean, var"] = f"{_g(mm0.mean())}, {_g(mv0.mean())}"
    row.cells["default eps"] = _g(facts["epsilon"])
    row.cells["one value per channel"] = _behaviour(facts["n1"], 1.0)
    row.cells["N = 0"] = _behaviour(facts["n0"], 1.0)
    off = facts["offset"]
    if "error" in off:
        row.cells["variance on N(1e4, 0.01^2)"] = "raises " + off["error"]
    else:
        xo = np.asarray(b["offset"], np.float64)
        mo = xo.mean(axis=(0, 2, 3))
        true = ((xo - mo[None, :, None, None]) ** 2).mean(axis=(0, 2, 3))
        n_off = xo.size // xo.shape[1]
        got = np.asarray(off["moving_variance"]) / (n_off / (n_off - 1) if unbiased else 1.0)
        rel = float(np.max(np.abs(got - true) / true))
        row.cells["variance on N(1e4, 0.01^2)"] = (f"{', '.join(f'{v:.3g}' for v in got)} "
                                                   f"(truth {true.mean():.3g}; rel err {rel:.2g})")
    # refbn's convention on the same probe
    conv, mom = REFBN_CONVENTION.get(impl, (None, None))
    if conv is None:
        row.failures.append(f"no refbn convention is declared for {impl}")
        return row
    kw = mom or {}
    bn = refbn.BatchNorm(axis=1, convention=conv, **kw)
    row.refbn = f"convention={conv!r}" + "".join(f", {k}={v}" for k, v in kw.items())
    bn(b["step"], training=True)
    if conv != "flax" and impl.startswith("flax"):
        row.failures.append("refbn.BatchNorm has no 'flax' convention")
    expect_m = bn.momentum
    if abs(expect_m - m) > 1e-7:
        row.failures.append(f"default momentum: {impl} {m}, refbn {row.refbn} {expect_m}")
    if abs(bn.epsilon - facts["epsilon"]) > 1e-12 * max(1.0, bn.epsilon):
        row.failures.append(f"default epsilon: {impl} {facts['epsilon']}, refbn {row.refbn} {bn.epsilon}")
    if abs(bn.decay() - decay) > 1e-5:
        row.failures.append(f"decay per step: {impl} {decay:.6g}, refbn {row.refbn} {bn.decay():.6g}")
    r_fed = (bn.moving_variance.astype(np.float64) - (1 - bn.decay()) * 1.0) / bn.decay()
    r_bessel = float(np.mean(r_fed / var))
    if abs(r_bessel - bessel) > 1e-4:
        row.failures.append(f"variance averaged: {impl} factor {bessel:.6g}, refbn {row.refbn} {r_bessel:.6g}")
    if not (np.all(mm0 == bn.INITIAL_MEAN) and np.all(mv0 == bn.INITIAL_VARIANCE)):
        row.failures.append(f"initial values: {impl} {mm0.tolist()}, {mv0.tolist()}")
    return row


def convention_failures(rows, backend):
    """A FAIL result per conventions row that does not match refbn (so the exit status says so)."""
    out = []
    for row in rows:
        if row.failures:
            r = FrameworkResult(None, f"conventions {row.implementation}", backend,
                                kernel_used=f"conventions {row.implementation}", framework=row.framework)
            r.failures = list(row.failures)
            r.verdict = "FAIL"
            out.append(r)
    return out


def conventions_rows(name, info):
    if "error" in info:
        row = ConventionRow(name, name)
        row.failures.append(f"the probe failed: {info['error']}")
        return [row]
    return [derive(name, impl, facts) for impl, facts in info["probe"].items()]


# -- the driver ------------------------------------------------------------------------------------------
def start_workers(names, outdir):
    return {n: FrameworkWorker(n, outdir) for n in names}


def submit_all(workers, cases):
    """Send every supported case, then the probe; returns {name: [case or None (probe), ...]}."""
    jobs = {}
    for name, w in workers.items():
        todo = ([c for c in dict.fromkeys(cases) if supports(name, c)] if name != "tf" else []) + [None]
        for i, c in enumerate(todo):
            w.submit(i, c, probe=c is None)
        jobs[name] = todo
    return jobs


def collect(workers, jobs, backends_, conventions, cases):
    """Yield FrameworkResults, case by case in registry order (refbn's side of a case is computed
    once for every framework that runs it); then append each probe's ConventionRows."""
    for w in workers.values():
        w.start()
    pos = {name: 0 for name in workers}
    for case in dict.fromkeys(cases):  # every worker's jobs are in this order
        sides = {}
        for name, w in workers.items():
            todo = jobs[name]
            if pos[name] >= len(todo) or todo[pos[name]] != case:
                continue
            jid, per, info = w.receive()
            assert jid == pos[name], (jid, pos[name])
            pos[name] += 1
            for be in backends_:
                if "error" in info:
                    r = FrameworkResult(case, name, be, kernel_used=name, framework=name)
                    r.failures.append(f"{name} failed: {info['error']}")
                    yield _finish(r, False)
                    continue
                if be not in sides:
                    sides[be] = (refbn_side if case.kind == "op" else parity_side)(case, be)
                judge = judge_op if case.kind == "op" else judge_parity
                for impl, impl_info in info.items():
                    yield judge(case, sides[be], impl, per.get(impl, {}), impl_info, name, be)
    for name, w in workers.items():
        assert jobs[name][pos[name]] is None, (name, pos[name])
        _, _, info = w.receive()
        conventions.extend(conventions_rows(name, info))
