"""Per-channel statistics that merge exactly, and how each framework merges them across replicas.

A :class:`Moments` is (count, mean, M2) per channel, where M2 = sum((x - mean)^2).
Two of them merge exactly and associatively with Chan, Golub & LeVeque's formula
(:func:`chan_merge` below), so the moments of a data set too large for
one device or one machine's memory are the merge of its shards' moments, in any
order and grouping.  Each shard's moments come from a backend's ``moments``
kernel (the same one single-device BN uses; ``backend="numba"`` reuses the numba
kernels).

Synchronized BatchNorm merges the replicas' statistics, and each framework does
it its own way.  :func:`merge` reproduces each one's arithmetic, in its dtype and
order of operations, and reports its error against the exact merge:

``"exact"``
    Chan's merge in float64 (refbn's reference).
``"keras_sync"``
    Keras 3 ``BatchNormalization(synchronized=True)`` on TensorFlow
    (``keras.src.backend.tensorflow.nn._compute_moments_sync``): every replica
    sums x, x^2 and a count (``ones_like(x)``) in float32, the three are
    all-reduced with SUM, then mean = sum/count, var = max(sum2/count - mean^2, 0).
    Exact on uneven shards (count-weighted); loses the variance when
    |mean| >> std, because E[x^2] - E[x]^2 cancels in float32.
``"torch_sync"``
    PyTorch ``SyncBatchNorm``: every replica sends (mean, invstd, count) with
    invstd = 1/sqrt(var + eps); ``batch_norm_gather_stats_with_counts`` recovers
    var = (1/invstd)^2 - eps and merges the replicas in order with Chan's formula
    in float32 (replicas with count 0 are left out).  Stable for offsets and
    uneven shards; loses the variance when var << eps.
``"flax_pmean"``
    Flax ``nn.BatchNorm(axis_name=...)`` (``use_fast_variance=True``, the
    default): every replica computes mean(x) and mean(x^2) in float32, then
    ``lax.pmean`` averages them with equal weights and var = max(mu2 - mu^2, 0).
    Wrong when replicas hold different numbers of values (a masked or padded
    batch), NaN when one holds none, and the same cancellation as Keras.

The per-replica reductions are modelled as correctly rounded (computed in
float64 by the backend, rounded once to the framework's dtype).  What
``merge`` guarantees is exactly that: it reproduces the framework's merge
arithmetic, in its dtype and order, applied to correctly rounded per-replica
statistics, so ``variance_error`` is the error of the merge step alone.  It is
not a bound on the framework's end-to-end error: a framework's own per-replica
rounding adds to it or cancels part of it.  PyTorch's CPU kernel, for one, sums
(x - fl32(mean))^2, i.e. it returns var + delta^2 with delta = mean - fl32(mean);
on N(1e4, 0.01^2) data torch's merged variance can therefore be closer to the
truth than the ``"torch_sync"`` emulation's (issue 13 saw it in 8 of 65 draws).  :func:`torch_cpu_replica_stats` and
:func:`torch_sync_cpu` model those per-replica statistics too (an emulation of
the engine, not of the merge alone).
TensorFlow is never imported here.
"""
import collections
import concurrent.futures
import numbers
import os
from dataclasses import dataclass

import numpy as np

from . import backends, dtypes, reference as ref, validate
from .layout import Layout

METHODS = ("exact", "keras_sync", "torch_sync", "flax_pmean")

__all__ = ["Moments", "MomentsAccumulator", "MergeResult", "METHODS", "moments", "moments_of_shards",
           "merge", "merge_error_table"]


# -- the merge maths (Chan, Golub & LeVeque) and the frameworks' arrangements of it ----------
def chan_merge(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Merge two (count, mean, M2) summaries exactly: with delta = mean_b - mean_a and
    n = n_a + n_b, mean = mean_a + delta * n_b / n and M2 = M2_a + M2_b + delta^2 * n_a * n_b / n."""
    n = n_a + n_b
    with np.errstate(invalid="ignore", divide="ignore"):
        delta = mean_b - mean_a
        w_b = np.where(n > 0, n_b / np.where(n > 0, n, 1), 0.0)
        mean = mean_a + delta * w_b
        m2 = m2_a + m2_b + delta * delta * n_a * w_b
    return n, mean, m2


# The emulations below evaluate in the dtype of their inputs (float32 inputs: float32
# arithmetic), to reproduce a framework's float32 steps in its order of operations.
def _chan_merge_as_torch(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """chan_merge in the order PyTorch's batch_norm_reduce_statistics_kernel evaluates it (the
    same merge; only the float32 rounding differs): f = 1/(n_a+n_b),
    M2 = M2_a + (M2_b + (mean_a-mean_b)^2*n_a*n_b*f), mean = n_a*f*mean_a + n_b*f*mean_b."""
    f = 1 / (n_a + n_b)
    d = mean_a - mean_b
    return n_a + n_b, n_a * f * mean_a + n_b * f * mean_b, m2_a + (m2_b + d * d * n_a * n_b * f)


def _sums_from_moments(n, mean, m2):
    """(sum(x), sum(x^2)) of a (count, mean, M2) summary: n*mean and M2 + n*mean^2."""
    return n * mean, m2 + n * mean * mean


def _mean_and_mean_square(n, sum_x, sum_x2):
    """E[x] = sum(x)/n and E[x^2] = sum(x^2)/n (Keras' synchronized moments divide so)."""
    return sum_x / n, sum_x2 / n


def _variance_from_mean_square(mean, mean_square):
    """Biased variance as E[x^2] - E[x]^2, clamped at 0 (Keras' synchronized moments, Flax's
    fast variance).  In float32 it cancels: the error is ~eps * E[x^2], i.e. relative to the
    variance eps * (1 + mean^2/var), total loss when |mean| >> std."""
    d = mean_square - mean * mean
    return np.maximum(d, np.zeros_like(d))


def _variance_from_inv_std(inv_std_, epsilon):
    """(1/inv_std)^2 - epsilon: PyTorch's gather recovers each replica's variance from the
    inv_std it was sent.  Loses the variance when var << epsilon."""
    s = 1 / inv_std_
    return s * s - epsilon


def _count(value, name="count"):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected a non-negative integer, got {type(value).__name__} {value!r}")
    if value < 0:
        raise ValueError(f"{name}: expected a non-negative integer, got {value}")
    return int(value)


def _vector(v, name):
    try:
        a = np.array(v, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{name}: expected a 1-D array of floats, got {type(v).__name__} ({e})") from None
    if a.ndim != 1 or a.size == 0:
        raise ValueError(f"{name}: expected a 1-D array with one value per channel, got shape {a.shape}")
    a.flags.writeable = False
    return a


class Moments:
    """Per-channel (count, mean, M2) of a set of values; M2 = sum((x - mean)^2).

    ``count`` is a Python int (the same for every channel, as in BatchNorm);
    ``mean`` and ``m2`` are read-only float64 vectors.  ``a.merge(b)`` (or
    ``a + b``) is exact and associative: merging the moments of the shards of a
    data set gives the moments of the whole, to float64 round-off.
    """
    __slots__ = ("count", "mean", "m2")

    def __init__(self, count, mean, m2):
        count = _count(count)
        mean, m2 = _vector(mean, "mean"), _vector(m2, "m2")
        if m2.shape != mean.shape:
            raise ValueError(f"m2: expected {mean.size} values (one per channel, as mean), got {m2.size}")
        if (m2 < 0).any():  # NaN passes: it propagates per channel, as in BatchNorm
            c = int(np.flatnonzero(m2 < 0)[0])
            raise ValueError(f"m2: expected sums of squares >= 0, got m2[{c}] = {m2[c]!r}")
        if count == 0 and (mean.any() or m2.any()):
            raise ValueError("mean, m2: expected zeros when count is 0 (the moments of no values)")
        object.__setattr__(self, "count", count)
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "m2", m2)

    def __setattr__(self, name, value):
        raise AttributeError("Moments is immutable; merge() returns a new one")

    # -- construction -----------------------------------------------------------------
    @classmethod
    def empty(cls, channels):
        """The moments of no values: the identity of :meth:`merge`."""
        channels = _count(channels, "channels")
        if channels == 0:
            raise ValueError("channels: expected at least 1 channel, got 0")
        return cls(0, np.zeros(channels), np.zeros(channels))

    @classmethod
    def from_array(cls, x, axis=None, data_format=None, backend="numpy"):
        """Moments of x per channel, by a backend's ``moments`` kernel.

        The channel axis is ``axis`` (any axis, default -1) or given by a
        ``data_format`` (NC, NWC, NCW, NHWC, NCHW, NDHWC, NCDHW), not both.
        """
        layout = _layout(x, axis, data_format)
        x = validate.as_x(x)
        if layout.count == 0:
            return cls.empty(layout.channels)
        validate.representable(x, layout.count)
        mean, var = backends.get(backend).moments(layout.to3(x))
        return cls(layout.count, mean, var * layout.count)

    # -- views ------------------------------------------------------------------------
    @property
    def channels(self):
        return self.mean.size

    @property
    def variance(self):
        """The biased variance M2 / n (what BatchNorm normalises with)."""
        self._need_values("variance")
        return self.m2 / self.count

    @property
    def unbiased_variance(self):
        """variance * n / max(n - 1, 1), TF's Bessel correction (n == 1 gives 0, not NaN)."""
        self._need_values("unbiased_variance")
        return self.variance * ref.bessel_factor(self.count)

    @property
    def std(self):
        return np.sqrt(self.variance)

    def sums(self):
        """(sum(x), sum(x^2)) per channel, in float64."""
        return _sums_from_moments(self.count, self.mean, self.m2)

    def _need_values(self, what):
        if self.count == 0:
            raise ValueError(f"{what}: undefined for the moments of no values (count 0)")

    # -- merging ----------------------------------------------------------------------
    def merge(self, other):
        """The moments of the union of both sets of values (Chan's formula, float64)."""
        if not isinstance(other, Moments):
            raise TypeError(f"other: expected a Moments, got {type(other).__name__}")
        if other.channels != self.channels:
            raise ValueError(f"other: expected {self.channels} channels, got {other.channels}")
        if other.count == 0:
            return self
        if self.count == 0:
            return other
        n, mean, m2 = chan_merge(float(self.count), self.mean, self.m2,
                                    float(other.count), other.mean, other.m2)
        return Moments(self.count + other.count, mean, np.maximum(m2, 0.0))

    __add__ = merge

    @staticmethod
    def merge_all(moments):
        """Merge any number of Moments pairwise (a balanced tree: round-off grows with log k)."""
        acc = MomentsAccumulator()
        for m in moments:
            acc.add_moments(m)
        return acc.result()

    def __repr__(self):
        with np.printoptions(precision=6, threshold=8):
            return f"Moments(count={self.count}, mean={self.mean}, m2={self.m2})"


class MomentsAccumulator:
    """Streaming, pairwise merge of Moments: ``add(x)`` or ``add_moments(m)``, then ``result()``.

    Keeps O(log k) partial results for k shards (a binary counter: equal-sized
    partials are merged as they appear), so the merge tree is balanced and the
    result does not depend on how the shards were computed, only on their order.
    """

    def __init__(self, axis=None, data_format=None, backend="numpy"):
        self.axis, self.data_format = axis, data_format
        self.backend = backend
        backends.get(backend)  # fail now on an unknown backend
        self._stack = []  # [(level, Moments)]
        self.shards = 0

    def add(self, x):
        """Add the values of one shard (an array laid out as given at construction)."""
        self.add_moments(Moments.from_array(x, self.axis, self.data_format, self.backend))

    def add_moments(self, m):
        if not isinstance(m, Moments):
            raise TypeError(f"moments: expected a Moments, got {type(m).__name__}")
        if self._stack and self._stack[0][1].channels != m.channels:
            raise ValueError(f"moments: expected {self._stack[0][1].channels} channels (as the shards "
                             f"before), got {m.channels}")
        level = 0
        while self._stack and self._stack[-1][0] == level:
            _, prev = self._stack.pop()
            m = prev.merge(m)
            level += 1
        self._stack.append((level, m))
        self.shards += 1

    def result(self):
        if not self._stack:
            raise ValueError("no shards were added")
        total = self._stack[-1][1]
        for _, m in reversed(self._stack[:-1]):
            total = m.merge(total)
        return total


def _layout(x, axis, data_format):
    shape = np.shape(x)
    if axis is not None and data_format is not None:
        raise ValueError(f"axis, data_format: expected one of them, got axis={axis!r} and "
                         f"data_format={data_format!r}")
    if data_format is not None:
        return Layout.from_data_format(shape, data_format)
    return Layout.from_axis(shape, -1 if axis is None else axis)


def moments(x, axis=None, data_format=None, backend="numpy"):
    """:meth:`Moments.from_array`: per-channel moments of x (channel axis ``axis``, default -1)."""
    return Moments.from_array(x, axis, data_format, backend)


def moments_of_shards(shards, axis=None, data_format=None, backend="numpy", workers=None):
    """Exact moments of a data set given shard by shard, in one streaming pass.

    ``shards`` is any iterable of arrays, or of zero-argument callables that load
    one (then the loading runs in the worker threads too).  Up to ``workers``
    shards (default: the CPU count) are reduced in parallel threads, and at
    most 2 * workers are in memory at once.  The merge is pairwise in the
    shards' order, so the result is the same for any number of workers.
    """
    workers = (os.cpu_count() or 1) if workers is None else _count(workers, "workers")
    if workers < 1:
        raise ValueError(f"workers: expected at least 1, got {workers}")
    acc = MomentsAccumulator(axis, data_format, backend)

    def one(shard):
        x = shard() if callable(shard) else shard
        return Moments.from_array(x, axis, data_format, backend)

    if workers == 1:
        for shard in shards:
            acc.add_moments(one(shard))
        return acc.result()
    pending = collections.deque()
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        try:
            for shard in shards:
                pending.append(pool.submit(one, shard))
                if len(pending) >= 2 * workers:
                    acc.add_moments(pending.popleft().result())
            while pending:
                acc.add_moments(pending.popleft().result())
        finally:
            for f in pending:
                f.cancel()
    return acc.result()


# --- the frameworks' cross-replica merges ----------------------------------------------------

@dataclass(frozen=True, eq=False)
class MergeResult:
    """One framework's merged batch statistics, and their error against a reference.

    ``mean`` and ``variance`` (biased, what the framework normalises with) hold
    the framework's values (in its dtype) as float64; ``reference`` is the exact
    merge unless another was given.  Errors are the worst channel's:
    ``mean_error`` = |mean - ref| / max(|ref mean|, ref std) and
    ``variance_error`` = |var - ref var| / ref var (NaN counts as infinite).
    """
    method: str
    dtype: str
    count: int
    mean: np.ndarray
    variance: np.ndarray
    reference: Moments

    @property
    def mean_error(self):
        ref = self.reference
        return _rel_error(self.mean, ref.mean, np.maximum(np.abs(ref.mean), ref.std))

    @property
    def variance_error(self):
        return _rel_error(self.variance, self.reference.variance, self.reference.variance)

    def __repr__(self):
        return (f"MergeResult({self.method}, {self.dtype}: mean error {self.mean_error:.3g}, "
                f"variance error {self.variance_error:.3g})")


def _rel_error(actual, expected, scale):
    diff = np.abs(np.asarray(actual, np.float64) - expected)
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(diff == 0, 0.0, diff / scale)
    rel = np.where(np.isnan(rel), np.inf, rel)
    return float(rel.max())


def _shard_list(shards):
    if isinstance(shards, Moments):
        raise TypeError("shards: expected a sequence of Moments (one per replica), got a single Moments")
    try:
        shards = list(shards)
    except TypeError:
        raise TypeError(f"shards: expected a sequence of Moments, got {type(shards).__name__}") from None
    if not shards:
        raise ValueError("shards: expected at least one replica's Moments, got none")
    for i, m in enumerate(shards):
        if not isinstance(m, Moments):
            raise TypeError(f"shards[{i}]: expected a Moments, got {type(m).__name__}")
        if m.channels != shards[0].channels:
            raise ValueError(f"shards[{i}]: expected {shards[0].channels} channels (as shards[0]), "
                             f"got {m.channels}")
    return shards


def _keras_sync(shards, dt, epsilon):
    """all-reduce SUM of (sum x, sum x^2, count) in dt, in replica order; E[x^2] - E[x]^2."""
    c = shards[0].channels
    total, total_sq, count = np.zeros(c, dt), np.zeros(c, dt), np.zeros(c, dt)
    for m in shards:
        s, s2 = m.sums()
        total, total_sq, count = total + s.astype(dt), total_sq + s2.astype(dt), count + dt.type(m.count)
    safe = np.where(count == 0, dt.type(1), count)  # tf.math.divide_no_nan
    mean, mean_sq = _mean_and_mean_square(safe, total, total_sq)
    mean, mean_sq = np.where(count == 0, dt.type(0), mean), np.where(count == 0, dt.type(0), mean_sq)
    return mean, _variance_from_mean_square(mean, mean_sq)


def _torch_sync(shards, dt, epsilon):
    """gather (mean, invstd, count); drop count-0 replicas; Chan's merge in dt, in replica order."""
    c = shards[0].channels
    eps = dt.type(epsilon)
    avg, var_n, n = np.zeros(c, dt), np.zeros(c, dt), 0
    for m in shards:
        if m.count < 1:
            continue
        mean = m.mean.astype(dt)
        # batch_norm_stats: invstd = 1 / sqrt(var + eps), var + eps formed in double, rounded to dt
        invstd = ref.inv_std(m.variance.astype(dt).astype(np.float64), epsilon).astype(dt)
        count = dt.type(m.count)
        m2 = _variance_from_inv_std(invstd, eps) * count
        _, avg, var_n = _chan_merge_as_torch(dt.type(n), avg, var_n, count, mean, m2)
        n += m.count
    with np.errstate(divide="ignore", invalid="ignore"):
        return avg, var_n / dt.type(n)


def _flax_pmean(shards, dt, epsilon):
    """pmean (psum in dt, then / replicas) of each replica's mean(x) and mean(x^2)."""
    c = shards[0].channels
    mu, mu2 = np.zeros(c, dt), np.zeros(c, dt)
    for m in shards:
        if m.count == 0:  # jnp.mean of no values
            local, local_sq = np.full(c, np.nan, dt), np.full(c, np.nan, dt)
        else:
            local, local_sq = _mean_and_mean_square(m.count, *m.sums())
        mu, mu2 = mu + local.astype(dt), mu2 + local_sq.astype(dt)
    r = dt.type(len(shards))
    mu, mu2 = mu / r, mu2 / r
    return mu, _variance_from_mean_square(mu, mu2)


def _exact(shards, dt, epsilon):
    total = Moments.merge_all(shards)
    if total.count == 0:
        return np.zeros(total.channels), np.full(total.channels, np.nan)
    return total.mean, total.variance


_EMULATIONS = {"exact": _exact, "keras_sync": _keras_sync, "torch_sync": _torch_sync,
               "flax_pmean": _flax_pmean}


def merge(shards, method="exact", dtype="float32", epsilon=1e-5, reference=None):
    """Merge the replicas' Moments as a framework does; returns a :class:`MergeResult`.

    ``shards``: one Moments per replica, in replica order.  ``method``: one of
    ``"exact"``, ``"keras_sync"``, ``"torch_sync"``, ``"flax_pmean"``.
    ``dtype``: the framework's statistics dtype, float32 (its choice for
    float16, bfloat16 and float32 inputs) or float64; ``"exact"`` is always
    float64.  ``epsilon``: BatchNorm's epsilon, used only by ``"torch_sync"``
    (its invstd round trip).  ``reference``: the Moments to judge against
    (default: the exact merge of ``shards``).
    """
    shards = _shard_list(shards)
    validate.choice(method, "method", METHODS)
    dt = dtypes.parse(dtype)
    if dt not in (dtypes.float32, dtypes.float64):
        raise ValueError(f"dtype: expected float32 or float64 (the frameworks' statistics dtypes), "
                         f"got {dt.name}")
    epsilon = validate.epsilon(epsilon)
    if reference is None:
        reference = Moments.merge_all(shards)
    elif not isinstance(reference, Moments):
        raise TypeError(f"reference: expected a Moments, got {type(reference).__name__}")
    elif reference.channels != shards[0].channels:
        raise ValueError(f"reference: expected {shards[0].channels} channels (as the shards), "
                         f"got {reference.channels}")
    if reference.count == 0:
        raise ValueError("shards: every replica is empty (count 0); the merged statistics of no "
                         "values are undefined, and there is no truth to judge them against")
    if method == "exact":
        dt = dtypes.float64
    mean, var = _EMULATIONS[method](shards, dt, epsilon)
    return MergeResult(method, dt.name, sum(m.count for m in shards),
                       np.asarray(mean, np.float64), np.asarray(var, np.float64), reference)


# --- the engines' arithmetic as their CPU runs do it (refbn verify --distributed) --------------

def torch_cpu_replica_stats(m, epsilon=1e-5):
    """One replica's float32 (mean, invstd) as PyTorch's CPU kernel makes them
    (``torch.native_batch_norm`` on an NCHW-contiguous float32 input, the statistics
    SyncBatchNorm gathers; read from ``aten/src/ATen/native/cpu/batch_norm_kernel.cpp``):
    the sum in double, mean32 = fl32(sum / n); the squares summed in double about mean32
    and stored in float32, var_sum = fl32(M2 + n * delta^2) with delta = mean - mean32;
    invstd = fl32(1 / sqrt(var_sum / n + eps)) in double.  Its variance is var + delta^2,
    not var: on N(1e4, 0.01^2) delta^2 reaches 2.4e-7, 2e-3 of the variance.  The double
    sums are modelled as exact (their error, ~n * 2^-53, is far below one float32 ulp)."""
    if not isinstance(m, Moments):
        raise TypeError(f"m: expected a Moments, got {type(m).__name__}")
    epsilon = validate.epsilon(epsilon)
    m._need_values("torch_cpu_replica_stats")
    mean32 = m.mean.astype(np.float32)
    delta = m.mean - mean32.astype(np.float64)
    var_sum = (m.m2 + m.count * delta * delta).astype(np.float32)
    invstd = ref.inv_std(var_sum.astype(np.float64) / m.count, epsilon).astype(np.float32)
    return mean32, invstd


def torch_gather_stats(means, invstds, counts, epsilon=1e-5):
    """``batch_norm_gather_stats_with_counts`` on gathered rows: the reduce of
    ``aten/src/ATen/native/cuda/Normalization.cuh`` in float32, replicas in order
    (rows with count 0 must be dropped first, as SyncBatchNorm does).  Each row's
    M2 comes back as ((1/invstd)^2 - eps) * count, then Chan's merge with an integer
    running count.  Returns float32 (mean, var_n, n): var_n is the merged M2, the
    biased variance is var_n / n and SyncBatchNorm normalises with 1/sqrt(var_n/n + eps)."""
    means, invstds = np.asarray(means, np.float32), np.asarray(invstds, np.float32)
    counts = [int(c) for c in np.asarray(counts).reshape(-1)]
    if means.ndim != 2 or invstds.shape != means.shape or len(counts) != means.shape[0]:
        raise ValueError(f"means, invstds, counts: expected (replicas, C), (replicas, C) and "
                         f"(replicas,), got {means.shape}, {invstds.shape} and {len(counts)}")
    if any(c < 1 for c in counts):
        raise ValueError(f"counts: expected >= 1 per row (drop empty replicas first), got {counts}")
    eps = np.float32(epsilon)
    avg, var_n, n = np.zeros(means.shape[1], np.float32), np.zeros(means.shape[1], np.float32), 0
    for mean, invstd, count in zip(means, invstds, counts):
        c = np.float32(count)
        m2 = _variance_from_inv_std(invstd, eps) * c
        _, avg, var_n = _chan_merge_as_torch(np.float32(n), avg, var_n, c, mean, m2)
        n += count
    return avg, var_n, n


def torch_sync_cpu(shards, epsilon=1e-5, reference=None):
    """PyTorch SyncBatchNorm's merge as a CPU (gloo) group computes it: per-replica
    statistics by :func:`torch_cpu_replica_stats`, empty replicas dropped, then
    :func:`torch_gather_stats`.  Unlike ``merge(..., "torch_sync")`` (correctly rounded
    per-replica statistics) this reproduces the engine's per-replica bias delta^2, so it
    is an emulation of the engine, not a lower bound of its error."""
    shards = _shard_list(shards)
    epsilon = validate.epsilon(epsilon)
    rows = [(torch_cpu_replica_stats(m, epsilon), m.count) for m in shards if m.count > 0]
    reference = Moments.merge_all(shards) if reference is None else reference
    if not rows:
        c = shards[0].channels
        return MergeResult("torch_sync_cpu", "float32", 0, np.zeros(c), np.full(c, np.nan), reference)
    mean, var_n, n = torch_gather_stats([r[0][0] for r in rows], [r[0][1] for r in rows],
                                        [r[1] for r in rows], epsilon)
    return MergeResult("torch_sync_cpu", "float32", n, mean.astype(np.float64),
                       (var_n / np.float32(n)).astype(np.float64), reference)


def flax_pmean_merge(shards, use_fast_variance=True, reference=None, mean=None):
    """Flax ``linen.BatchNorm(axis_name=...)``'s merge (``_compute_stats``), every device
    weighted equally whatever its count (a mask makes counts unequal), in float32.
    ``use_fast_variance=True`` (Flax's default): ``merge(shards, "flax_pmean")``, the pmean
    of mean(x) and mean(x^2), var = max(mu2 - mu^2, 0).  ``False``: mu = pmean(mean(x)),
    then var = pmean(mean((x - mu)^2)), each device's term m2/n + (mean - mu)^2 rounded once.
    A device with no values gives NaN (jnp.mean of nothing), and pmean spreads it.
    ``mean`` (two-pass only): the merged mean to centre the second pass on, e.g. the engine's
    own, whose float32 per-device sums are less accurate than the correctly rounded means
    modelled here; the second pass then depends on the data only through that mean."""
    shards = _shard_list(shards)
    if use_fast_variance:
        if mean is not None:
            raise ValueError("mean: only for use_fast_variance=False (the two-pass variance)")
        return merge(shards, "flax_pmean", dtype="float32", reference=reference)
    c, r = shards[0].channels, np.float32(len(shards))
    if mean is None:
        mu = np.zeros(c, np.float32)
        for m in shards:
            mu = mu + (m.mean.astype(np.float32) if m.count else np.full(c, np.nan, np.float32))
        mu = mu / r
    else:
        mu = _vector(mean, "mean").astype(np.float32)
        if mu.size != c:
            raise ValueError(f"mean: expected {c} values (one per channel), got {mu.size}")
    var = np.zeros(c, np.float32)
    for m in shards:
        if m.count:
            d = m.mean - mu.astype(np.float64)
            var = var + (m.m2 / m.count + d * d).astype(np.float32)
        else:
            var = var + np.full(c, np.nan, np.float32)
    var = var / r
    reference = Moments.merge_all(shards) if reference is None else reference
    return MergeResult("flax_pmean_two_pass", "float32", sum(m.count for m in shards),
                       mu.astype(np.float64), var.astype(np.float64), reference)


# --- the measurements in the README ----------------------------------------------------------

def _error_cases(rng):
    """(name, list of float32 shards of shape (n_i, C)) for the accuracy table."""
    c = 4

    def normal(loc, scale, *sizes):
        return [rng.normal(loc, scale, (n, c)).astype(np.float32) for n in sizes]

    return [
        ("N(0,1), 4 equal shards of 16384", normal(0.0, 1.0, 16384, 16384, 16384, 16384)),
        ("N(0,1), uneven shards: 1 + 1000", normal(0.0, 1.0, 1, 1000)),
        ("N(0,1), uneven: 3 + 5 + 0 (an empty replica)", normal(0.0, 1.0, 3, 5, 0)),
        ("N(1e4, 0.01^2), 4 equal shards of 16384", normal(1e4, 0.01, 16384, 16384, 16384, 16384)),
        ("N(1e6, 1), 4 equal shards of 16384", normal(1e6, 1.0, 16384, 16384, 16384, 16384)),
        ("N(0, 1e-4^2) (var 1e-8 << eps 1e-5), 4 x 16384",
         normal(0.0, 1e-4, 16384, 16384, 16384, 16384)),
    ]


def merge_error_table(seed=0, dtype="float32", epsilon=1e-5, backend="numpy"):
    """Each method's error against float64 two-pass moments of all the data, on the
    README's data sets.  Returns a list of dicts (case, counts, method, mean_error,
    variance_error)."""
    rng = np.random.default_rng(seed)
    rows = []
    for name, shards in _error_cases(rng):
        per = [Moments.from_array(s, axis=-1, backend=backend) for s in shards]
        truth = Moments.from_array(np.concatenate(shards), axis=-1, backend="numpy")
        for method in METHODS:
            r = merge(per, method, dtype=dtype, epsilon=epsilon, reference=truth)
            rows.append({"case": name, "counts": [m.count for m in per], "method": method,
                         "mean_error": r.mean_error, "variance_error": r.variance_error})
    return rows


def error_table(rows=None):
    """:func:`merge_error_table` as a rich Table (one row per data set, one column per method)."""
    from rich.table import Table

    rows = merge_error_table() if rows is None else rows
    t = Table(title="Cross-replica merges in float32: relative error of the merged variance (mean error "
                    "in brackets, in units of max(|mean|, std)) vs float64 moments of all the data")
    t.add_column("data (float32)")
    for m in METHODS:
        t.add_column(m, justify="right")
    for case in dict.fromkeys(r["case"] for r in rows):
        cells = {r["method"]: r for r in rows if r["case"] == case}
        t.add_row(case, *(f"{cells[m]['variance_error']:.1e} ({cells[m]['mean_error']:.0e})"
                          for m in METHODS))
    return t


def main(argv=None):
    """``python -m refbn.stats``: print the merge error table."""
    from rich.console import Console

    console = Console()
    if not console.is_terminal:
        console.width = max(console.width, 130)
    console.print(error_table())
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
