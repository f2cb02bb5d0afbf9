"""refbn's ``"keras_sync"`` merge against TensorFlow's own distributed run.

TensorFlow runs ``keras.layers.BatchNormalization(synchronized=True)`` for a few
training steps under ``tf.distribute.MirroredStrategy`` (2 and 4 logical CPU
devices, one process) and ``MultiWorkerMirroredStrategy`` (2 worker processes
on 127.0.0.1), with equal and unequal per-replica batches; see
:mod:`refbn.compare._dist_worker`.  This process never imports TensorFlow: it
reads what TF computed and replays the same steps with refbn: per-replica
:class:`refbn.stats.Moments` from a backend's kernel, the ``"keras_sync"``
merge, then y, the moving averages and the gamma/beta gradients from
:mod:`refbn.reference`.  Every TF output must match within the float32
tolerances of ``refbn/tolerances.py`` (context ``"distributed"``).  The table
also shows how far TF's merged variance, and each framework's merge, are
from the exact one.

PyTorch and Flax run the cases of ``SYNC_CASES`` in their own worker processes
(:mod:`refbn.compare._torch_dist_worker`: SyncBatchNorm's gather and reduce on a
2-process gloo group on 127.0.0.1; :mod:`refbn.compare._jax_dist_worker`:
``flax.linen.BatchNorm(axis_name=...)`` under pmap over 4 host CPU devices, masked).
Each engine's merged mean and variance are judged against refbn.stats' emulation
of that engine (``torch_sync_cpu``, ``flax_pmean_merge``; contexts ``sync_torch``,
``sync_flax``), and the engine and the emulation against the exact float64
statistics of all the values, where each case's claim (accurate, keeps or loses the
variance, biased, NaN) is checked.

    python -m refbn.compare.distributed            # or: refbn verify --distributed
    python -m refbn.compare.distributed --engines torch,flax
"""
import argparse
import contextlib
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np

from refbn import reference as ref, stats
from refbn.layout import Layout
from refbn.testing import compare
from refbn.tolerances import tolerance

MOMENTUM = 0.9         # Keras' convention: moving = moving * momentum + batch * (1 - momentum)
EPSILON = 1e-3         # Keras' default
LEARNING_RATE = 0.01   # SGD on gamma and beta, loss = sum(y * sin(x))
COLLECTIVE_TIMEOUT_S = 60
DATA_FORMAT = "NHWC"
VARIANCE_LOST = 0.5    # relative error of the variance beyond which it is "lost"
OUTPUTS = ("batch_mean", "batch_variance", "y", "moving_mean", "moving_variance", "gamma", "beta")


@dataclass(frozen=True)
class DistCase:
    """One distributed run: per-replica batch sizes (fed with
    ``experimental_distribute_values_from_function``), or a global batch that TF's
    ``experimental_distribute_dataset`` splits itself."""
    name: str
    engine: str              # "mirrored" | "multiworker"
    replicas: int
    batches: tuple = ()      # per-replica batch sizes
    global_batch: int = 0    # or: a global batch split by TF
    steps: int = 3
    spatial: tuple = (3, 3)
    channels: int = 4
    loc: float = 2.0
    scale: float = 3.0
    seed: int = 0
    judged: tuple = OUTPUTS  # the outputs compared with refbn's replay
    loses_variance: bool = False  # TF and the keras_sync emulation must both lose the variance

    @property
    def describe(self):
        if self.global_batch:
            return f"global batch {self.global_batch} split by tf.data"
        return "batches " + "+".join(map(str, self.batches))


CASES = (
    DistCase("mirrored2-equal", "mirrored", 2, batches=(8, 8), seed=1),
    DistCase("mirrored2-uneven", "mirrored", 2, batches=(1, 31), seed=2),
    DistCase("mirrored4-equal", "mirrored", 4, batches=(4, 4, 4, 4), seed=3),
    DistCase("mirrored4-uneven", "mirrored", 4, batches=(1, 2, 5, 24), seed=4),
    DistCase("mirrored4-dataset10", "mirrored", 4, global_batch=10, seed=5),
    DistCase("mirrored4-dataset5", "mirrored", 4, global_batch=5, seed=6),
    # N(1e4, 0.01^2): E[x^2] - E[x]^2 cancels in float32 and TF loses the variance; only the
    # batch statistics are judged (against the same float32 arithmetic, on the scale of E[x^2])
    DistCase("mirrored2-offset1e4", "mirrored", 2, batches=(8, 8), loc=1e4, scale=0.01, seed=9,
             judged=("batch_mean", "batch_variance"), loses_variance=True),
    DistCase("multiworker2-equal", "multiworker", 2, batches=(8, 8), seed=7),
    DistCase("multiworker2-uneven", "multiworker", 2, batches=(3, 13), seed=8),
)
ENGINES = ("mirrored", "multiworker")   # TensorFlow's
SYNC_ENGINES = ("torch", "flax")         # the other engines (SyncCase)
ALL_ENGINES = ENGINES + SYNC_ENGINES
TORCH_EPSILON = 1e-5                     # torch's default
FLAX_EPSILON = 1e-5                      # Flax's default
BIASED_EPS = 1e3    # a mean error (float32 eps vs the truth) beyond which a merge is "biased"
INSTALL_HINT = {"torch": 'pip install "refbn[torch]"', "flax": 'pip install "refbn[jax]"'}


@dataclass(frozen=True)
class SyncCase:
    """One synchronized-BN merge on another engine: PyTorch (a gloo group of ``len(batches)``
    processes) or Flax (pmap over ``len(batches)`` host CPU devices, padded and masked to
    ``batches`` samples each).  ``claim``: what refbn.stats says of this merge against the
    exact statistics of all the values, checked on the engine's result:

    ``accurate``        mean and variance within tolerance("*", f32, "merge_error") of the truth
    ``keeps_variance``  variance error < VARIANCE_LOST (torch_sync: "stable for offsets")
    ``loses_variance``  variance error > VARIANCE_LOST (E[x^2] - E[x]^2 cancels in float32)
    ``biased``          mean error > BIASED_EPS eps (equal weights per device, unequal counts)
    ``nan``             NaN mean and variance (a device with no values)
    """
    name: str
    engine: str              # "torch" | "flax"
    batches: tuple           # samples per replica (process or device)
    claim: str = "accurate"
    spatial: tuple = (3, 3)
    channels: int = 4
    loc: float = 2.0
    scale: float = 3.0
    seed: int = 0
    fast_variance: bool = True  # flax.linen.BatchNorm(use_fast_variance=...)

    @property
    def replicas(self):
        return len(self.batches)

    @property
    def describe(self):
        return "batches " + "+".join(map(str, self.batches))


SYNC_CASES = (
    SyncCase("torch2-equal", "torch", (8, 8), seed=21),
    SyncCase("torch2-uneven", "torch", (1, 31), seed=22),
    SyncCase("torch2-empty", "torch", (0, 16), seed=23),   # SyncBatchNorm drops the empty rank
    # N(1e4, 0.01^2): torch's CPU per-replica variance is var + delta^2 (delta = mean - fl32(mean))
    SyncCase("torch2-offset1e4", "torch", (8, 8), claim="keeps_variance", loc=1e4, scale=0.01, seed=24),
    SyncCase("flax4-equal", "flax", (4, 4, 4, 4), seed=31),
    SyncCase("flax4-masked", "flax", (1, 2, 5, 24), claim="biased", seed=32),
    SyncCase("flax4-masked-twopass", "flax", (1, 2, 5, 24), claim="biased", seed=32,
             fast_variance=False),
    SyncCase("flax4-empty", "flax", (0, 4, 4, 4), claim="nan", seed=33),
    SyncCase("flax4-offset1e4", "flax", (4, 4, 4, 4), claim="loses_variance", loc=1e4, scale=0.01,
             seed=34),
    SyncCase("flax4-offset1e4-twopass", "flax", (4, 4, 4, 4), claim="keeps_variance", loc=1e4,
             scale=0.01, seed=34, fast_variance=False),
)


def sync_case_data(case):
    """The float32 NHWC inputs of a SyncCase: one array per replica (possibly empty)."""
    rng = np.random.default_rng(case.seed)
    return [rng.normal(case.loc, case.scale, (b,) + tuple(case.spatial) + (case.channels,))
            .astype(np.float32) for b in case.batches]


def case_data(case, step):
    """The float32 NHWC inputs of one step: one array per replica, or one global batch."""
    rng = np.random.default_rng([case.seed, step])
    sizes = (case.global_batch,) if case.global_batch else case.batches
    return [rng.normal(case.loc, case.scale, (b,) + tuple(case.spatial) + (case.channels,))
            .astype(np.float32) for b in sizes]


def recalibrate_data():
    """Inputs of the recalibration check: 101 samples (shards of unequal size on 2 or 4 replicas)."""
    return np.random.default_rng(11).normal(3.0, 2.0, (101, 6)).astype(np.float32)


def recalibrate_model(keras):
    """BatchNormalization on the input (its exact statistics are those of the data), then
    Dense -> BatchNormalization; the same weights every time."""
    keras.utils.set_random_seed(0)
    inp = keras.Input((6,))
    h = keras.layers.BatchNormalization()(inp)
    h = keras.layers.Dense(5)(h)
    h = keras.layers.BatchNormalization()(h)
    return keras.Model(inp, h)


@contextlib.contextmanager
def recording_layer_inputs():
    """Record every array the sharded recalibration reduces, per recalibrated layer.

    Yields a list that gets one list of arrays per layer, in the order the layers are
    recalibrated: the float32 inputs TF actually fed that layer, batch by batch.  They are the
    truth the merged statistics are judged by (:func:`exact_moments`): a downstream layer's
    input is TF's float32 output of the layers before it, and that depends on how the data are
    batched.  TF's Eigen matmul (the default on CPUs without AVX-512) takes a GEMV path for a
    one-row batch and rounds differently from its GEMM (measured: 94 of 101 Dense rows differ
    by an ulp), while oneDNN's sgemm does not; so "the same data in one shard" is not the same
    float32 input to layer 1 under every kernel, but each run's own inputs are.
    """
    import threading

    from refbn.keras import sharded

    layers, lock = [], threading.Lock()
    current = []
    original_moments, original_to_numpy = sharded._layer_moments, sharded.cap.to_numpy

    def layer_moments(*args, **kwargs):
        current[:] = [[]]
        try:
            return original_moments(*args, **kwargs)
        finally:
            layers.append(current[0])
            current[:] = []

    def to_numpy(t):
        a = original_to_numpy(t)
        if current:
            with lock:
                current[0].append(np.array(a, copy=True))
        return a

    sharded._layer_moments, sharded.cap.to_numpy = layer_moments, to_numpy
    try:
        yield layers
    finally:
        sharded._layer_moments, sharded.cap.to_numpy = original_moments, original_to_numpy


def exact_moments(arrays, channels):
    """Per-channel mean and biased variance of float32 arrays (channels last), in float64 with
    exactly rounded sums (math.fsum): independent of refbn's Moments and merges."""
    a = np.concatenate([np.asarray(x, np.float64).reshape(-1, channels) for x in arrays])
    n = a.shape[0]
    mean = np.array([math.fsum(col) for col in a.T]) / n
    var = np.array([math.fsum(col) for col in ((a - mean) ** 2).T]) / n
    return n, mean, var


def load_recalibration(outdir, engine, replicas):
    """The recalibration check's arrays: one dict per process (worker) of the group."""
    names = ([f"recalibrate.{engine}{replicas}.npz"] if engine == "mirrored" else
             [f"recalibrate.{engine}{replicas}.w{i}.npz" for i in range(replicas)])
    out = []
    for name in names:
        err = os.path.join(outdir, name[:-len(".npz")] + ".error.txt")
        if os.path.exists(err):
            with open(err) as f:
                raise WorkerError(f"recalibrate failed in the TF worker:\n{f.read()}")
        with np.load(os.path.join(outdir, name)) as z:
            out.append({k: z[k] for k in z.files})
    return out


# -- running TF ----------------------------------------------------------------------------
class WorkerError(RuntimeError):
    pass


def _free_ports(k):
    socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(k)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _launch(args, log_path, pids=None, module="refbn.compare._dist_worker"):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1")
    env.pop("TF_CONFIG", None)
    log = open(log_path, "wb")
    proc = subprocess.Popen([sys.executable, "-m", module, *args],
                            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    proc._refbn_log = log
    if pids is not None:
        pids.append(proc.pid)
    return proc


def _kill(proc):
    """End a worker and everything it started (its own process group)."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    proc._refbn_log.close()


def _tail(path, n=25):
    try:
        with open(path, errors="replace") as f:
            lines = [l for l in f.read().splitlines() if l.strip()]
    except OSError:
        return ""
    return "\n".join(lines[-n:])


def run_tf(engines, outdir, timeout, pids=None):
    """Start the TF workers of the given engines at once; wait for all of them (at most
    ``timeout`` seconds), kill every process group on the way out.  One group of
    processes per engine and replica count.  Returns {group: error text or None}.
    ``pids``: a list to which the workers' process ids are appended."""
    procs = {}  # group name -> [(proc, log)]; a group's cases fail together
    try:
        for engine in engines:
            for replicas in sorted({c.replicas for c in CASES if c.engine == engine}):
                group = f"{engine}{replicas}"
                base = ["--engine", engine, "--replicas", str(replicas), "--outdir", outdir]
                if engine == "mirrored":
                    log = os.path.join(outdir, f"{group}.log")
                    procs[group] = [(_launch(base, log, pids), log)]
                else:
                    ports = ",".join(map(str, _free_ports(replicas)))
                    procs[group] = []
                    for i in range(replicas):
                        log = os.path.join(outdir, f"{group}.w{i}.log")
                        procs[group].append(
                            (_launch(base + ["--index", str(i), "--ports", ports], log, pids), log))
        return _wait_all(procs, timeout)
    finally:
        for plist in procs.values():
            for proc, _ in plist:
                _kill(proc)


def _load(case, outdir):
    if case.engine == "mirrored":
        files = [os.path.join(outdir, f"{case.name}.npz")]
    else:
        files = [os.path.join(outdir, f"{case.name}.w{i}.npz") for i in range(case.replicas)]
    arrays = {}
    for f in files:
        with np.load(f) as z:
            arrays.update({k: z[k] for k in z.files})
    return arrays


# -- refbn's replay -----------------------------------------------------------------------
@dataclass
class StepReplay:
    """refbn's values for one step (float64 vectors of float32 values where Keras stores float32)."""
    counts: list
    keras: stats.MergeResult
    merges: dict                 # method -> MergeResult (vs exact)
    y: list                      # per replica
    moving_mean: np.ndarray
    moving_variance: np.ndarray
    gamma: np.ndarray
    beta: np.ndarray
    second_moment: np.ndarray    # E[x^2] per channel: the scale of E[x^2] - E[x]^2


def _f32(v):
    return np.asarray(v, np.float64).astype(np.float32).astype(np.float64)


def replay(case, xs_per_step, backend="numpy", method="keras_sync"):
    """Replay the case's steps with refbn; xs_per_step[s] = the per-replica x TF received.
    ``method``: the merge that refbn uses for the batch statistics (Keras': "keras_sync")."""
    c = case.channels
    moving_mean, moving_var = np.zeros(c), np.ones(c)
    gamma, beta = np.ones(c), np.zeros(c)
    out = []
    for xs in xs_per_step:
        shards = [stats.Moments.from_array(x, data_format=DATA_FORMAT, backend=backend) for x in xs]
        merges = {m: stats.merge(shards, m, dtype="float32", epsilon=EPSILON) for m in stats.METHODS}
        k = merges[method]
        mean, var = k.mean, k.variance
        istd = ref.inv_std(var, EPSILON)
        coef = ref.y_coefficient(gamma, istd)
        ys, sum_dy, sum_dy_xc = [], np.zeros(c), np.zeros(c)
        for x in xs:
            layout = Layout.from_data_format(x.shape, DATA_FORMAT)
            ys.append(ref.batch_norm(x.astype(np.float64), layout.broadcastable(mean),
                                     layout.broadcastable(coef), layout.broadcastable(beta)))
            if layout.count:
                dy = np.sin(x.astype(np.float64)).astype(x.dtype)  # TF: tf.sin(x) in float32
                dy64, xc = dy.astype(np.float64), x.astype(np.float64) - layout.broadcastable(mean)
                sum_dy = sum_dy + ref.channel_sum(dy64, layout.axis)
                sum_dy_xc = sum_dy_xc + ref.channel_sum(dy64 * xc, layout.axis)
        n = sum(s.count for s in shards)
        *_, dgamma, dbeta = ref.backward_coefficients(sum_dy, sum_dy_xc, n, gamma, istd, True)
        decay = 1.0 - MOMENTUM
        moving_mean = _f32(ref.moving_average(moving_mean, mean, decay))
        moving_var = _f32(ref.moving_average(moving_var, var, decay))
        new_gamma = _f32(gamma - LEARNING_RATE * dgamma)
        new_beta = _f32(beta - LEARNING_RATE * dbeta)
        exact = merges["exact"].reference
        out.append(StepReplay([s.count for s in shards], k, merges, ys, moving_mean, moving_var,
                              new_gamma, new_beta, exact.variance + exact.mean ** 2))
        gamma, beta = new_gamma, new_beta
    return out


# -- judging ------------------------------------------------------------------------------
@dataclass
class CaseReport:
    case: DistCase
    counts: list = field(default_factory=list)      # values per channel per replica, step 0
    worst: dict = field(default_factory=dict)       # output -> worst Comparison over steps/replicas
    failures: list = field(default_factory=list)
    tf_variance_error: float = float("nan")         # TF's merged variance vs the exact merge
    merge_errors: dict = field(default_factory=dict)  # method -> worst variance error vs exact
    replicas_agree: bool = True
    error: str = ""

    @property
    def passed(self):
        return not self.error and not self.failures and self.replicas_agree


def _judge(report, output, tf_value, ref_value, step, replica, scale=None):
    if output not in report.case.judged:
        return
    c = compare(tf_value, ref_value, output, "f32", "distributed", scale=scale)
    prev = report.worst.get(output)
    if prev is None or c.max_ulps > prev.max_ulps:
        report.worst[output] = c
    if not c.passed:
        report.failures.append(c.message(f"{report.case.name} step {step} replica {replica}"))


def judge(case, arrays, backend="numpy", method="keras_sync"):
    """Compare TF's recorded run with refbn's replay (merging with ``method``)."""
    report = CaseReport(case)
    xs_per_step = [[arrays[f"x_{s}_{r}"] for r in range(case.replicas)] for s in range(case.steps)]
    steps = replay(case, xs_per_step, backend, method)
    report.counts = steps[0].counts
    for s, st in enumerate(steps):
        for r in range(case.replicas):
            scale_m = float(np.sqrt(np.max(st.second_moment)))
            _judge(report, "batch_mean", arrays[f"mean_{s}_{r}"], st.keras.mean, s, r, scale=scale_m)
            _judge(report, "batch_variance", arrays[f"var_{s}_{r}"], st.keras.variance, s, r,
                   scale=float(np.max(st.second_moment)))
            if st.counts[r]:
                _judge(report, "y", arrays[f"y_{s}_{r}"], st.y[r], s, r)
            for name, value in (("moving_mean", st.moving_mean), ("moving_variance", st.moving_variance),
                                ("gamma", st.gamma), ("beta", st.beta)):
                tf_value = arrays[f"{name}_{s}_{r}"]
                _judge(report, name, tf_value, value, s, r)
                if not np.array_equal(tf_value, arrays[f"{name}_{s}_0"]):
                    report.replicas_agree = False
                    report.failures.append(f"{case.name} step {s}: replica {r}'s {name} differs "
                                           f"from replica 0's")
            tf_var = stats.MergeResult("tf", "float32", 0, st.keras.mean, arrays[f"var_{s}_{r}"],
                                       st.keras.reference)
            report.tf_variance_error = np.nanmax([report.tf_variance_error, tf_var.variance_error])
        for m, res in st.merges.items():
            report.merge_errors[m] = max(report.merge_errors.get(m, 0.0), res.variance_error)
    if case.loses_variance:
        for who, err in (("TF", report.tf_variance_error),
                         ("the keras_sync emulation", report.merge_errors["keras_sync"])):
            if not err > VARIANCE_LOST:
                report.failures.append(
                    f"{case.name}: expected {who} to lose the variance (E[x^2] - E[x]^2 in float32, "
                    f"relative error > {VARIANCE_LOST}), got {err:.3g}")
    return report


def run(engines=ALL_ENGINES, backend="numpy", timeout=240, keep=None):
    """Run the distributed cases of the given engines and judge them: a CaseReport per TF case
    (engines "mirrored", "multiworker"), then a SyncReport per torch/flax case."""
    engines = tuple(engines)
    for e in engines:
        if e not in ALL_ENGINES:
            raise ValueError(f"engines: expected a subset of {ALL_ENGINES}, got {e!r}")
    outdir = keep or tempfile.mkdtemp(prefix="refbn-dist-")
    os.makedirs(outdir, exist_ok=True)
    try:
        tf_engines = tuple(e for e in engines if e in ENGINES)
        errors = run_tf(tf_engines, outdir, timeout) if tf_engines else {}
        reports = []
        for case in CASES if tf_engines else ():
            if case.engine not in engines:
                continue
            group = f"{case.engine}{case.replicas}"
            if errors.get(group):
                reports.append(CaseReport(case, error=errors[group]))
                continue
            try:
                arrays = _load(case, outdir)
            except OSError as e:
                reports.append(CaseReport(case, error=f"no TF output: {e}"))
                continue
            reports.append(judge(case, arrays, backend))
        sync = tuple(e for e in engines if e in SYNC_ENGINES)
        if sync:
            reports += run_sync(sync, backend, timeout, outdir)
        return reports
    finally:
        if keep is None:
            shutil.rmtree(outdir, ignore_errors=True)



# -- the other engines: PyTorch (gloo) and Flax (pmap) ----------------------------------------
def engine_installed(engine):
    """Whether a SyncCase engine's framework can be imported here (checked without importing it)."""
    import importlib.util

    mods = {"torch": ("torch",), "flax": ("jax", "flax")}[engine]
    return all(importlib.util.find_spec(m) is not None for m in mods)


def _wait_all(procs, timeout):
    """Wait for every (proc, log) of every group, ``timeout`` seconds in all; {group: error or None}."""
    deadline = time.monotonic() + timeout
    errors = {}
    for group, plist in procs.items():
        for proc, log in plist:
            try:
                rc = proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                errors[group] = f"timed out after {timeout:.0f} s\n{_tail(log)}"
                break
            if rc != 0:
                errors[group] = f"worker exited with {rc}\n{_tail(log)}"
                break
        errors.setdefault(group, None)
    return errors


def run_sync_engines(engines, outdir, timeout, pids=None):
    """Start the workers of the given SyncCase engines at once (torch: one process per rank of a
    gloo group on a free 127.0.0.1 port; flax: one process with len(batches) host devices), wait
    for all of them (at most ``timeout`` seconds) and kill every process group on the way out.
    Returns {engine: error text or None}; ``pids`` gets the workers' process ids."""
    procs = {}
    try:
        for engine in engines:
            sizes = sorted({c.replicas for c in SYNC_CASES if c.engine == engine})
            if len(sizes) != 1:
                raise ValueError(f"{engine}: expected one replica count for all its cases, got {sizes}")
            k = sizes[0]
            if engine == "torch":
                port = str(_free_ports(1)[0])
                procs[engine] = []
                for r in range(k):
                    log = os.path.join(outdir, f"torch.r{r}.log")
                    args = ["--rank", str(r), "--world", str(k), "--port", port, "--outdir", outdir]
                    procs[engine].append((_launch(args, log, pids, "refbn.compare._torch_dist_worker"), log))
            else:
                log = os.path.join(outdir, "flax.log")
                procs[engine] = [(_launch(["--devices", str(k), "--outdir", outdir], log, pids,
                                          "refbn.compare._jax_dist_worker"), log)]
        return _wait_all(procs, timeout)
    finally:
        for plist in procs.values():
            for proc, _ in plist:
                _kill(proc)


def load_sync(case, outdir):
    """What the engine wrote for a SyncCase: one dict per replica copy (torch: per rank; flax:
    per device, split from the one file)."""
    if case.engine == "torch":
        out = []
        for r in range(case.replicas):
            with np.load(os.path.join(outdir, f"{case.name}.r{r}.npz")) as z:
                out.append({k: z[k] for k in z.files})
        return out
    with np.load(os.path.join(outdir, f"{case.name}.npz")) as z:
        a = {k: z[k] for k in z.files}
    samples = a["mask"].reshape(a["mask"].shape[:2] + (-1,))   # the mask masks whole samples
    if not (samples == samples[..., :1]).all():
        raise ValueError(f"{case.name}: expected a mask of whole samples")
    return [{"x": a["x"][d][samples[d, :, 0]], "mean": a["mean"][d], "variance": a["variance"][d]}
            for d in range(case.replicas)]


@dataclass
class SyncReport:
    """A SyncCase judged: the engine against refbn's emulation of its merge (``worst``), the
    engine and the emulation against the float64 truth (errors in float32 eps), and the claim."""
    case: SyncCase
    counts: list = field(default_factory=list)       # values per channel per replica
    worst: dict = field(default_factory=dict)        # output -> worst Comparison (engine vs emulation)
    engine_error: dict = field(default_factory=dict)     # "mean"/"variance" -> eps vs the truth
    emulation_error: dict = field(default_factory=dict)  # the same for refbn's emulation
    rounded_error: dict = field(default_factory=dict)    # merge(..., "torch_sync"): rounded replicas
    notes: list = field(default_factory=list)
    failures: list = field(default_factory=list)
    error: str = ""
    not_installed: str = ""

    @property
    def passed(self):
        return not self.error and not self.failures


_EPS32 = float(np.finfo(np.float32).eps)


def _truth(xs, channels):
    """The exact float64 statistics of the concatenated shards, as Moments (math.fsum)."""
    n, mean, var = exact_moments(xs, channels)
    if n == 0:
        raise ValueError("xs: expected at least one value per channel in all the shards")
    return stats.Moments(n, mean, var * n)


def _errors_eps(mean, variance, truth):
    r = stats.MergeResult("engine", "float32", truth.count, np.asarray(mean, np.float64),
                          np.asarray(variance, np.float64), truth)
    return {"mean": r.mean_error / _EPS32, "variance": r.variance_error / _EPS32}


def _sync_emulation(case, shards, truth):
    if case.engine == "torch":
        return stats.torch_sync_cpu(shards, TORCH_EPSILON, reference=truth)
    return stats.flax_pmean_merge(shards, case.fast_variance, reference=truth)


def judge_sync(case, copies, backend="numpy"):
    """Judge one SyncCase from what its engine wrote (:func:`load_sync`)."""
    rep = SyncReport(case)
    xs = [c["x"] for c in copies]
    rep.counts = [int(np.prod(x.shape[:-1])) for x in xs]
    expected = [int(np.prod(case.spatial)) * b for b in case.batches]
    if rep.counts != expected:
        rep.failures.append(f"{case.name}: the engine saw {rep.counts} values per channel per replica, "
                            f"expected {expected}")
        return rep
    for x, want in zip(xs, sync_case_data(case)):
        if not np.array_equal(x, want):
            rep.failures.append(f"{case.name}: a replica's x is not the case's data")
            return rep
    shards = [stats.Moments.from_array(x, data_format=DATA_FORMAT, backend=backend) for x in xs]
    truth = _truth(xs, case.channels)
    emu = _sync_emulation(case, shards, truth)
    second = truth.variance + truth.mean ** 2   # E[x^2]: the size of what fast variance cancels
    # torch's and Flax's two-pass variances are judged on their own size; Flax's sums of x (and
    # of x^2 for its fast variance) on the size of those sums
    scales = {"mean": None if case.engine == "torch" else float(np.sqrt(second.max())),
              "variance": float(second.max()) if case.engine == "flax" and case.fast_variance else None}
    ctx = f"sync_{case.engine}"
    emu_variance = emu.variance
    if case.engine == "flax" and not case.fast_variance:
        # the second pass centred on the engine's own mean: XLA's float32 per-device sums of x
        # put that mean ~1e-3 std off the correctly rounded one on N(1e4, 0.01^2), and
        # (mean_i - mu)^2 carries it into the variance (3e-3 relative)
        emu_variance = stats.flax_pmean_merge(shards, False, truth, mean=copies[0]["mean"]).variance
    for i, c in enumerate(copies):
        for out, emu_value in (("mean", emu.mean), ("variance", emu_variance)):
            if not np.array_equal(c[out], copies[0][out], equal_nan=True):
                rep.failures.append(f"{case.name}: replica {i}'s merged {out} differs from replica 0's")
            if case.claim == "nan":
                continue
            cmp = compare(c[out], emu_value, out, "f32", ctx, scale=scales[out])
            prev = rep.worst.get(out)
            if prev is None or cmp.max_ulps > prev.max_ulps:
                rep.worst[out] = cmp
            if not cmp.passed:
                rep.failures.append(cmp.message(f"{case.name} replica {i} vs refbn's emulation"))
    if case.engine == "torch":
        _judge_torch_rows(rep, copies, shards)
    rep.engine_error = _errors_eps(copies[0]["mean"], copies[0]["variance"], truth)
    rep.emulation_error = _errors_eps(emu.mean, emu.variance, truth)
    if case.engine == "torch":
        rounded = stats.merge(shards, "torch_sync", dtype="float32", epsilon=TORCH_EPSILON, reference=truth)
        rep.rounded_error = _errors_eps(rounded.mean, rounded.variance, truth)
        if rep.engine_error["variance"] < rep.rounded_error["variance"]:
            rep.notes.append(f"{case.name}: torch's variance error ({rep.engine_error['variance']:.3g} eps) "
                             f"is below merge(..., 'torch_sync')'s ({rep.rounded_error['variance']:.3g} eps): "
                             f"that emulation's error is not a lower bound of the engine's")
    _check_claim(rep, copies[0])
    return rep


def _judge_torch_rows(rep, copies, shards):
    """The gathered table (every rank's (mean, invstd, count)) against torch_cpu_replica_stats:
    the per-replica model behind the torch_sync_cpu emulation."""
    case, c = rep.case, rep.case.channels
    table = copies[0]["table"]
    for i, cp in enumerate(copies):
        if not np.array_equal(cp["table"], table):
            rep.failures.append(f"{case.name}: rank {i} gathered a different table from rank 0")
    for r, m in enumerate(shards):
        row = table[r]
        if int(row[2 * c]) != m.count:
            rep.failures.append(f"{case.name}: rank {r} sent count {row[2 * c]}, expected {m.count}")
            continue
        if m.count == 0:
            if row.any():
                rep.failures.append(f"{case.name}: empty rank {r} sent {row}, expected zeros")
            continue
        mean32, invstd32 = stats.torch_cpu_replica_stats(m, TORCH_EPSILON)
        for out, got, want in (("replica_mean", row[:c], mean32), ("replica_invstd", row[c:2 * c], invstd32)):
            cmp = compare(got, want, out, "f32", "sync_torch")
            prev = rep.worst.get(out)
            if prev is None or cmp.max_ulps > prev.max_ulps:
                rep.worst[out] = cmp
            if not cmp.passed:
                rep.failures.append(cmp.message(f"{case.name} rank {r} vs torch_cpu_replica_stats"))


def _check_claim(rep, engine):
    case, e = rep.case, rep.engine_error
    what = f"{case.name}: refbn.stats claims the {case.engine} merge is {case.claim!r}"
    if case.claim == "nan":
        ok = np.isnan(engine["mean"]).all() and np.isnan(engine["variance"]).all()
        if not ok:
            rep.failures.append(f"{what}, got mean {engine['mean']} and variance {engine['variance']}")
        return
    if case.claim == "accurate":
        for out in ("mean", "variance"):
            allowed = tolerance("*", "f32", "merge_error").ulps
            if not e[out] <= allowed:
                rep.failures.append(f"{what}: {out} {e[out]:.3g} eps from the truth, allowed {allowed:g}")
    elif case.claim == "keeps_variance":
        if not e["variance"] * _EPS32 < VARIANCE_LOST:
            rep.failures.append(f"{what}: variance error {e['variance'] * _EPS32:.3g} (relative)")
    elif case.claim == "loses_variance":
        if not e["variance"] * _EPS32 > VARIANCE_LOST:
            rep.failures.append(f"{what}: variance error {e['variance'] * _EPS32:.3g} (relative)")
    elif case.claim == "biased":
        if not e["mean"] > BIASED_EPS:
            rep.failures.append(f"{what}: mean error {e['mean']:.3g} eps")
    else:
        raise ValueError(f"claim: expected accurate, keeps_variance, loses_variance, biased or nan, "
                         f"got {case.claim!r}")


def run_sync(engines=SYNC_ENGINES, backend="numpy", timeout=120, outdir=None):
    """Run the SyncCases of the given engines (installed ones) and judge them; SyncReports."""
    reports, todo = [], []
    for engine in engines:
        if engine_installed(engine):
            todo.append(engine)
        else:
            reports += [SyncReport(c, not_installed=f"not installed ({INSTALL_HINT[engine]})")
                        for c in SYNC_CASES if c.engine == engine]
    if not todo:
        return reports
    errors = run_sync_engines(todo, outdir, timeout)
    for case in SYNC_CASES:
        if case.engine not in todo:
            continue
        if errors.get(case.engine):
            reports.append(SyncReport(case, error=errors[case.engine]))
            continue
        try:
            copies = load_sync(case, outdir)
        except OSError as e:
            reports.append(SyncReport(case, error=f"no {case.engine} output: {e}"))
            continue
        reports.append(judge_sync(case, copies, backend))
    return reports


# -- output -------------------------------------------------------------------------------
def table(reports):
    from rich.table import Table

    t = Table(title="Keras BatchNormalization(synchronized=True) on tf.distribute vs refbn's keras_sync replay",
              caption="worst: the output furthest from refbn, in float32 eps (allowed); "
                      "var err: relative error of the merged variance vs the exact merge (worst step)")
    for col in ("case", "values/channel", "worst eps (allowed)", "TF var err", "keras_sync",
                "torch_sync", "flax_pmean", "verdict"):
        t.add_column(col, justify="left" if col in ("case", "values/channel") else "right")
    for rep in reports:
        if rep.error:
            t.add_row(rep.case.name, rep.case.describe, "-", "-", "-", "-", "-", "[red]ERROR[/red]")
            continue
        worst = max(rep.worst.values(), key=lambda c: c.max_ulps / c.allowed_ulps)
        me = rep.merge_errors
        t.add_row(rep.case.name, "+".join(map(str, rep.counts)),
                  f"{worst.output} {worst.max_ulps:.2g} ({worst.allowed_ulps:g})",
                  f"{rep.tf_variance_error:.1e}", f"{me['keras_sync']:.1e}", f"{me['torch_sync']:.1e}",
                  f"{me['flax_pmean']:.1e}", "[green]pass[/green]" if rep.passed else "[red]FAIL[/red]")
    return t


def _eps(v):
    return "-" if v is None else ("NaN" if not np.isfinite(v) else f"{v:.3g}")


def sync_table(reports):
    """The SyncReports: each engine against refbn's emulation of its merge, and both against
    the exact float64 statistics of all the values (errors in float32 eps)."""
    from rich.table import Table

    t = Table(title="PyTorch SyncBatchNorm (gloo, 2 ranks) and Flax BatchNorm(axis_name) (pmap, 4 CPU "
                    "devices) vs refbn.stats' emulations (torch_sync_cpu, flax_pmean_merge)",
              caption="worst: the output furthest from the emulation, in float32 eps (allowed); then the "
                      "errors of the engine's and the emulation's merged mean and variance against the "
                      "exact statistics of all the values, in float32 eps (mean: of max(|mean|, std); "
                      "variance: relative); claim: what refbn.stats says of this merge")
    for col in ("case", "values/channel", "worst eps (allowed)", "engine mean", "engine var",
                "emulation var", "claim", "verdict"):
        t.add_column(col, justify="left" if col in ("case", "values/channel", "claim") else "right")
    for rep in reports:
        if rep.not_installed or rep.error:
            t.add_row(rep.case.name, rep.case.describe, "-", "-", "-", "-", rep.case.claim,
                      "not installed" if rep.not_installed else "[red]ERROR[/red]")
            continue
        worst = (max(rep.worst.values(), key=lambda c: c.max_ulps / c.allowed_ulps) if rep.worst else None)
        t.add_row(rep.case.name, "+".join(map(str, rep.counts)),
                  f"{worst.output} {worst.max_ulps:.2g} ({worst.allowed_ulps:g})" if worst else "-",
                  _eps(rep.engine_error.get("mean")), _eps(rep.engine_error.get("variance")),
                  _eps(rep.emulation_error.get("variance")), rep.case.claim,
                  "[green]pass[/green]" if rep.passed else "[red]FAIL[/red]")
    return t


def print_report(reports, console=None):
    from rich.console import Console

    console = console or Console()
    if not console.is_terminal:
        console.width = max(console.width, 130)
    tf_reports = [r for r in reports if isinstance(r, CaseReport)]
    sync_reports = [r for r in reports if isinstance(r, SyncReport)]
    console.print(stats.error_table())
    if tf_reports:
        console.print(table(tf_reports))
    if sync_reports:
        console.print(sync_table(sync_reports))
    for rep in reports:
        if rep.error:
            console.print(f"{rep.case.name}: {rep.error}", markup=False, highlight=False)
        for f in rep.failures[:5] + getattr(rep, "notes", [])[:5]:
            console.print(f, markup=False, highlight=False)


def configure(parser):
    parser.add_argument("--engines", default=",".join(ALL_ENGINES),
                        help="comma-separated: mirrored, multiworker (TensorFlow), torch, flax "
                             "(default: all; torch and flax are reported 'not installed' when missing)")
    parser.add_argument("--backend", default="numpy", help="refbn backend for the per-replica moments")
    parser.add_argument("--timeout", type=float, default=240.0, help="seconds for all TF workers")
    parser.add_argument("--keep", default=None, help="keep TF's outputs and logs in this folder")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")


def to_json(reports):
    rows = []
    for rep in reports:
        if isinstance(rep, SyncReport):
            rows.append({"case": rep.case.name, "engine": rep.case.engine, "replicas": rep.case.replicas,
                         "counts": rep.counts, "passed": rep.passed, "error": rep.error,
                         "not_installed": rep.not_installed, "claim": rep.case.claim,
                         "worst_eps": {k: c.max_ulps for k, c in rep.worst.items()},
                         "engine_error_eps": rep.engine_error, "emulation_error_eps": rep.emulation_error,
                         "torch_sync_rounded_error_eps": rep.rounded_error, "notes": rep.notes,
                         "failures": rep.failures})
            continue
        rows.append({"case": rep.case.name, "engine": rep.case.engine, "replicas": rep.case.replicas,
                     "counts": rep.counts, "passed": rep.passed, "error": rep.error,
                     "worst_eps": {k: c.max_ulps for k, c in rep.worst.items()},
                     "tf_variance_error": rep.tf_variance_error, "merge_errors": rep.merge_errors,
                     "failures": rep.failures})
    return rows


def main(args=None):
    """Entry point: ``python -m refbn.compare.distributed`` (an argv list) or ``refbn verify
    --distributed`` (its Namespace; options it lacks take their defaults here)."""
    if not isinstance(args, argparse.Namespace):
        p = argparse.ArgumentParser(prog="python -m refbn.compare.distributed",
                                    description=__doc__.splitlines()[0])
        configure(p)
        args = p.parse_args(args)
    engines = tuple(e for e in getattr(args, "engines", ",".join(ALL_ENGINES)).split(",") if e)
    t0 = time.perf_counter()
    reports = run(engines, backend=getattr(args, "backend", "numpy"),
                  timeout=getattr(args, "timeout", 240.0), keep=getattr(args, "keep", None))
    print_report(reports)
    print(f"{len(reports)} distributed cases in {time.perf_counter() - t0:.1f} s")
    if getattr(args, "json", None):
        with open(args.json, "w") as f:
            json.dump(to_json(reports), f, indent=1)
    judged = [r for r in reports if not getattr(r, "not_installed", "")]
    return 0 if judged and all(r.passed for r in judged) else 1


if __name__ == "__main__":
    sys.exit(main())
