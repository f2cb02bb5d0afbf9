"""Where TF's batch_variance error comes from, step by step (``refbn explain``).

TF's Eigen kernel computes the Bessel-corrected batch variance (FusedBatchNormV3's output 2,
training mode) in seven float32 steps, reproduced bit for bit by the ``tf_eigen`` backend
(:mod:`refbn.backends.tf_eigen`; ``refbn verify --backend tf_eigen`` proves it per case):

    sum_x      sum(x) with float32 accumulators, in Eigen's order
    mean       sum_x * fl(1/n)
    center     x - mean
    square     (x - mean)^2
    sum_sq     sum of the squares with float32 accumulators, in Eigen's order
    variance   sum_sq * fl(1/n)
    bessel     variance * fl(fl(n) / fl(n - 1))

:func:`split` runs that chain with every step in float32 (TF's result), with every step exact
in float64 (the truth), and once per step with that one step made exact and all others
float32.  A step's share of the error is how much the error shrinks when that step alone is
exact; what the shares do not add up to is the steps' interaction, reported as such.

An emulated step takes its inputs as they are (float32, or float64 where an earlier step was
exact), does its operation exactly and rounds the result to float32 once.  On float32 inputs
that is float32 arithmetic itself (a float64 result rounded to float32 is the correctly
rounded float32 result for +, -, * and /, as 53 >= 2*24 + 2), so the all-float32 chain is TF's.
Errors are relative to the truth, in units of float32's machine epsilon (2^-23).
"""
from dataclasses import dataclass

import numpy as np
from numba import njit

from .backends import tf_eigen

EPS32 = float(np.finfo(np.float32).eps)
STEPS = (
    ("sum_x", "summing the n float32 values of x (float32 accumulators, Eigen's order)"),
    ("mean", "rounding the mean (sum * fl(1/n), with 1/n rounded too)"),
    ("center", "rounding x - mean"),
    ("square", "rounding (x - mean)^2"),
    ("sum_sq", "summing the n float32 squares (float32 accumulators, Eigen's order)"),
    ("variance", "rounding the biased variance (sum * fl(1/n))"),
    ("bessel", "the Bessel correction (fl(n / (n - 1)), then the product, each rounded)"),
)
STEP_NAMES = tuple(s for s, _ in STEPS)


@njit(cache=True)
def _eigen_order_sum(terms, vector_channels):
    """tf_eigen's channel sum (same order), of float64 terms, each addition rounded to float32."""
    n, C = terms.shape
    acc = np.zeros((4, C), np.float32)
    unrolled = (n // 4) * 4 if n >= tf_eigen.UNROLL_MIN_ROWS else 0
    for j in range(n):
        for c in range(C):
            q = j % 4 if (c < vector_channels and j < unrolled) else 0
            acc[q, c] = np.float32(np.float64(acc[q, c]) + terms[j, c])
        if j + 1 == unrolled:
            for c in range(vector_channels):
                acc[0, c] = ((acc[0, c] + acc[1, c]) + acc[2, c]) + acc[3, c]
    return acc[0].astype(np.float64)


def _f32(a):
    return np.asarray(a, np.float64).astype(np.float32).astype(np.float64)


def chain(rows, exact=()):
    """The seven steps on (n, C) rows; the steps named in ``exact`` in float64, the others as TF.
    Returns the Bessel-corrected variance per channel (float64 holding each step's result)."""
    rows = np.asarray(rows, np.float64)
    n, C = rows.shape
    vec = (C // tf_eigen.PACKET) * tf_eigen.PACKET

    def total(t, name):
        if name in exact:
            return np.sum(np.ascontiguousarray(t.T), axis=1)   # contiguous rows: numpy sums pairwise
        return _eigen_order_sum(np.ascontiguousarray(t), vec)

    def scaled(s, name):
        return s / n if name in exact else _f32(s * float(tf_eigen.rest_size_inv(n)))

    def rounded(v, name):
        return v if name in exact else _f32(v)

    mean = scaled(total(rows, "sum_x"), "mean")
    d = rounded(rows - mean, "center")
    sq = rounded(d * d, "square")
    var = scaled(total(sq, "sum_sq"), "variance")
    if "bessel" in exact:
        return var * (n / max(n - 1, 1))
    return _f32(var * float(tf_eigen.rest_size_adjust(n)))


@dataclass
class Split:
    channel: int
    n: int
    truth: float
    tf: float
    total_eps: float          # (tf - truth) / truth / eps32, signed
    shares: dict              # step -> eps it adds (signed)
    interaction: float

    def lines(self):
        out = [f"channel {self.channel}, n = {self.n:,}: TF's batch_variance {self.tf!r} vs the float64 truth "
               f"{self.truth!r}: {self.total_eps:+,.2f} eps (float32 eps = 2^-23, relative)"]
        width = len("(interaction)")
        for name, what in STEPS:
            out.append(f"  {name:<{width}}  {self.shares[name]:+20,.2f} eps   {what}")
        out.append(f"  {'(interaction)':<{width}}  {self.interaction:+20,.2f} eps   what the steps do together "
                   "beyond their separate shares")
        big = sorted(STEP_NAMES, key=lambda s: -abs(self.shares[s]))
        parts = [f"{_fmt(self.shares[s])} from {dict(STEPS)[s].split(' (')[0]}" for s in big[:3]
                 if abs(self.shares[s]) >= 0.005]
        out.append(f"of TF's {_fmt(self.total_eps)} eps in batch_variance, " + (", ".join(parts) or
                                                                                  "none come from one step alone"))
        return out


def _fmt(v):
    return f"{v:,.0f}" if abs(v) >= 10 else f"{v:,.2f}"


def _rel(v, truth):
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(truth != 0, (v - truth) / np.abs(truth), np.where(v == truth, 0.0, np.inf)) / EPS32


def split(rows, channel=None):
    """The :class:`Split` of one channel (default: the one where TF is furthest off)."""
    rows = np.asarray(rows)
    truth = chain(rows, exact=STEP_NAMES)
    tf = chain(rows)
    err = _rel(tf, truth)
    c = int(np.argmax(np.abs(err))) if channel is None else int(channel)
    shares = {}
    for name in STEP_NAMES:
        shares[name] = float(err[c] - _rel(chain(rows, exact=(name,)), truth)[c])
    total = float(err[c])
    return Split(c, rows.shape[0], float(truth[c]), float(tf[c]), total, shares, total - sum(shares.values()))


def rows_of(x, data_format):
    """TF's (rest_size, depth) rows of x (channels-first data transposed to channels last)."""
    from .layout import Layout
    layout = Layout.from_data_format(np.shape(x), data_format)
    return tf_eigen._rows(layout.to3(np.asarray(x)))
