"""The "tf_eigen" backend: TensorFlow's Eigen CPU kernel of FusedBatchNormV3, float32 step by step.

Not a reference: this backend reproduces the bits of ``tf.raw_ops.FusedBatchNormV3`` as
TF's own CPU kernel computes them (``TF_ENABLE_ONEDNN_OPTS=0``; float16 always runs it), so
that a test can say exactly which float32 operations TF performed.  Each step below is named
after ``tensorflow/core/kernels/fused_batch_norm_op.cc`` (``FusedBatchNorm<CPUDevice, T, U,
is_training>``) and the Eigen code it instantiates; it was worked out from that source and
then confirmed bit for bit against TF 2.21 (tests/test_tf_eigen.py).

What TF does, with U = float32 and every operation rounded to float32 (no FMA: TF's x86 wheel
is built for AVX, whose Eigen packets are 8 floats wide and whose ``pmadd`` is a multiply, then
an add):

- channels-first x is transposed to channels last (``DoTranspose``): the rows of the
  (rest_size, depth) view are then in (n, d, h, w) order.  x is cast to U.
- ``rest_size_inv = 1.0f / rest_size``; ``batch_mean = x.sum(reduce_dims) * rest_size_inv``.
  The sum is Eigen's reduction over the outer dimension, preserving the inner (channel) one:
  the first 8*floor(C/8) channels are reduced 8 at a time as packets
  (``InnerMostDimPreserver``): with >= 16 rows, row j goes to accumulator j % 4 for the
  rows before 4*floor(n/4), the accumulators are added as ((a0 + a1) + a2) + a3, then the
  last n % 4 rows are added; with fewer rows, in order.  The C % 8 tail channels are reduced
  one coefficient at a time, in order.
- ``batch_variance = (x - batch_mean).square().sum(reduce_dims) * rest_size_inv``, the same
  reduction over fl(fl(x - mean)^2).
- ``scaling_factor = (batch_variance + epsilon).rsqrt() * scale``, evaluated over the C
  channels: the first 8*floor(C/8) with the packet ``prsqrt`` (the CPU's ``vrsqrtps``
  estimate refined by one Newton step, ``generic_rsqrt_newton_step``), the tail with the
  scalar 1 / sqrt.  ``vrsqrtps``' bits are the CPU's own (they differ between vendors), so
  this backend runs that instruction (through an LLVM intrinsic in numba), not a model of it.
- ``y = ((x - mean) * scaling_factor + offset).cast<T>()``: rounded to T once, to nearest even.
- ``rest_size_adjust = float(n) / float(max(n - 1, 1))``; the batch_variance output is
  ``batch_variance * rest_size_adjust`` and, when exponential_avg_factor f != 1,
  ``(1 - f) * old + (f * rest_size_adjust) * batch_variance`` and
  ``(1 - f) * old_mean + f * batch_mean`` (see :func:`running_statistics`, the hook
  :func:`refbn.raw_ops.FusedBatchNormV3` calls so that these outputs are TF's float32 ones).

Inference is the same y with the given mean and variance.  The four backend ops take and
return what :mod:`refbn.backends` describes: per-channel vectors are float64 (holding these
float32 values exactly).  Machine dependence: only ``vrsqrtps`` (the packet channels' y); the
sums do not depend on TF's thread count (Eigen gives each channel's sum to one thread).
"""
import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from .. import dtypes

F32 = np.float32
PACKET = 8            # Eigen's Packet8f: TF's x86 wheel is compiled for AVX
UNROLL_MIN_ROWS = 16  # InnerMostDimPreserver unrolls into 4 accumulators from 16 rows on
_AXIS = 1


# -- the CPU's approximate reciprocal square root (AVX vrsqrtps), run, not modelled ----------
@intrinsic
def _vrsqrtps(typingctx, a0, a1, a2, a3, a4, a5, a6, a7):
    sig = types.UniTuple(types.float32, PACKET)(*([types.float32] * PACKET))

    def codegen(context, builder, signature, args):
        vec = ir.VectorType(ir.FloatType(), PACKET)
        v = ir.Constant(vec, ir.Undefined)
        for i, a in enumerate(args):
            v = builder.insert_element(v, a, ir.Constant(ir.IntType(32), i))
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vec, [vec]),
                                            "llvm.x86.avx.rsqrt.ps.256")
        r = builder.call(fn, [v])
        lanes = [builder.extract_element(r, ir.Constant(ir.IntType(32), i)) for i in range(PACKET)]
        return context.make_tuple(builder, signature.return_type, lanes)
    return sig, codegen


@njit(cache=True)
def _rsqrt_estimate_kernel(a):
    out = np.empty_like(a)
    b = np.ones(PACKET, np.float32)
    for i in range(0, a.size, PACKET):
        m = min(PACKET, a.size - i)
        b[:] = 1.0
        b[:m] = a[i:i + m]
        r = _vrsqrtps(b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7])
        for j in range(m):
            out[i + j] = r[j]
    return out


def rsqrt_estimate(a):
    """The CPU's ``vrsqrtps`` of each float32 value (about 12 correct bits)."""
    return _rsqrt_estimate_kernel(np.ascontiguousarray(a, F32))


# -- Eigen's reductions over the rows, per channel (float32 accumulators) ---------------------
@njit(cache=True)
def _sum_rows(rows, center, squared, vector_channels):
    """sum over rows of t = rows (or fl(fl(rows - center)^2) when squared), per channel, in
    Eigen's order (see the module docstring)."""
    n, C = rows.shape
    acc = np.zeros((4, C), np.float32)
    unrolled = (n // 4) * 4 if n >= UNROLL_MIN_ROWS else 0
    for j in range(n):
        for c in range(C):
            t = rows[j, c]
            if squared:
                d = t - center[c]
                t = d * d
            if c < vector_channels and j < unrolled:
                acc[j % 4, c] += t
            else:
                acc[0, c] += t
        if j + 1 == unrolled:   # reducePacket(accum1..3, accum0), before the n % 4 last rows
            for c in range(vector_channels):
                acc[0, c] = ((acc[0, c] + acc[1, c]) + acc[2, c]) + acc[3, c]
    return acc[0].copy()


def _vector_channels(C):
    return (C // PACKET) * PACKET


def channel_sum(rows, center=None):
    """Eigen's ``sum(reduce_dims)`` of the (rest_size, depth) float32 rows (or of their squared
    deviations from ``center``)."""
    C = rows.shape[1]
    c = np.zeros(C, F32) if center is None else np.asarray(center, F32)
    return _sum_rows(np.ascontiguousarray(rows, F32), c, center is not None, _vector_channels(C))


# -- the per-channel steps ---------------------------------------------------------------------
def rest_size_inv(n):
    """``static_cast<U>(1.0f / static_cast<U>(rest_size))``."""
    return F32(1.0) / F32(n)


def rest_size_adjust(n):
    """Bessel's factor as TF computes it: float(n) / float(max(n - 1, 1)) in float32."""
    return F32(n) / F32(max(n - 1, 1))


def packet_rsqrt(a):
    """Eigen's ``prsqrt<Packet8f>``: the estimate and one ``generic_rsqrt_newton_step``
    (pmadd = multiply, then add, without FMA)."""
    e = rsqrt_estimate(a)
    r2 = a * e                                   # pmul(a, inv_sqrt)
    half_r = e * F32(-0.5)                       # pmul(inv_sqrt, -1/2)
    h_n = r2 * e - F32(1.0)                      # pmadd(r2, inv_sqrt, -1)
    refined = half_r * h_n + e                   # pmadd(half_r, h_n, inv_sqrt)
    # Eigen keeps the estimate where the step gives NaN (0 * inf: a = 0 or inf)
    return np.where(np.isnan(refined) & ~np.isnan(a), e, refined)


def scalar_rsqrt(a):
    """``numext::rsqrt`` on one float: 1 / sqrt(a), each rounded."""
    return F32(1.0) / np.sqrt(a)


def scaling_factor(variance, epsilon, scale):
    """``((variance + epsilon).rsqrt() * scale).eval()``: packets, then the scalar tail."""
    a = np.asarray(variance, F32) + F32(epsilon)
    v = _vector_channels(a.size)
    r = np.empty_like(a)
    r[:v] = packet_rsqrt(a[:v])
    r[v:] = scalar_rsqrt(a[v:])
    return r * np.asarray(scale, F32)


def batch_moments(rows):
    """(batch_mean, batch_variance (biased)) in float32, as TF's training kernel."""
    inv = rest_size_inv(rows.shape[0])
    mean = channel_sum(rows) * inv
    variance = channel_sum(rows, mean) * inv
    return mean, variance


def normalise(rows, mean, k, offset):
    """``(x_centered * scaling_factor + offset)`` in float32, before the cast to T."""
    return (rows - mean) * k + np.asarray(offset, F32)


def running_statistics(batch_mean, batch_variance, n, factor, old_mean=None, old_variance=None):
    """TF's outputs 1 and 2 (batch_mean, batch_variance) from its float32 batch statistics.

    factor == 1: (mean, variance * rest_size_adjust); otherwise the moving averages
    ``one_minus_factor * old + (factor * rest_size_adjust) * variance`` and
    ``one_minus_factor * old_mean + factor * mean``.  float64 vectors in and out (the hook
    :func:`refbn.raw_ops.FusedBatchNormV3` calls)."""
    m, v = np.asarray(batch_mean, F32), np.asarray(batch_variance, F32)
    adjust = rest_size_adjust(n)
    if factor == 1.0:
        return m.astype(np.float64), (v * adjust).astype(np.float64)
    f = F32(factor)
    one_minus_factor = F32(1.0) - f
    new_var = one_minus_factor * np.asarray(old_variance, F32) + (f * adjust) * v
    new_mean = one_minus_factor * np.asarray(old_mean, F32) + f * m
    return new_mean.astype(np.float64), new_var.astype(np.float64)


# -- the backend's whole ops on the canonical (outer, C, inner) view ----------------------------
def _rows(x3):
    """TF's (rest_size, depth) float32 view: channels-first data transposed to channels last."""
    outer, C, inner = x3.shape
    a = x3 if inner == 1 else np.transpose(x3, (0, 2, 1))
    return np.ascontiguousarray(a, dtype=F32).reshape(-1, C)


def _store(y_rows, x3, out3):
    outer, C, inner = x3.shape
    y = y_rows.reshape(outer, inner, C)
    y = y if inner == 1 else np.transpose(y, (0, 2, 1))
    out = np.empty(x3.shape, x3.dtype) if out3 is None else out3
    with np.errstate(over="ignore"):
        out[...] = y.reshape(x3.shape).astype(x3.dtype)   # cast<T>: round to nearest even
    return out


def _float32_only(x3):
    if x3.dtype == dtypes.float64:
        raise TypeError("x: backend 'tf_eigen' emulates TF's kernel, which takes float16, bfloat16 "
                        "or float32 x, got float64")


def _quiet(fn):
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            return fn(*args, **kwargs)
    return wrapper


@_quiet
def moments(x3):
    _float32_only(x3)
    mean, var = batch_moments(_rows(x3))
    return mean.astype(np.float64), var.astype(np.float64)


@_quiet
def forward_training(x3, scale, offset, epsilon, out3=None):
    _float32_only(x3)
    rows = _rows(x3)
    mean, var = batch_moments(rows)
    y = normalise(rows, mean, scaling_factor(var, epsilon, scale), offset)
    return _store(y, x3, out3), mean.astype(np.float64), var.astype(np.float64)


@_quiet
def forward_inference(x3, scale, offset, mean, variance, epsilon, out3=None):
    _float32_only(x3)
    rows = _rows(x3)
    m = np.asarray(mean, F32)
    y = normalise(rows, m, scaling_factor(variance, epsilon, scale), offset)
    return _store(y, x3, out3)


def backward(dy3, x3, scale, mean, variance, epsilon, is_training, out3=None):
    raise ValueError("backend: 'tf_eigen' emulates FusedBatchNormV3 only; FusedBatchNormGradV3 is not "
                     "emulated yet (use 'numpy' or 'numba')")

