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

Inference is the same y with the given mean and variance.

The gradient, ``FusedBatchNormGradV3`` (:func:`backward`), is a different kernel with a
different reduction.  Training mode is ``FusedBatchNormGrad<CPUDevice, T, U>``, inference
``FusedBatchNormFreezeGrad<CPUDevice, T, U>``; both materialise each term to be summed in a
(rest_size, depth) float32 scratch tensor and sum it with TF's own
``functor::ReduceOuterDimensions`` (``tensorflow/core/kernels/redux_functor.h``), not with
Eigen's reduction: every channel is summed row after row in order, but when
depth <= 32 * threads the rows are first cut into contiguous blocks, one per parallelFor
task, whose sums are then added in block order (:func:`reduce_outer_dimensions`).  How many
blocks depends on TF's intra-op thread count and Eigen's cost model, so the gradient's sums
(and hence every output of it) depend on the thread count: :func:`intra_op_threads`.
``rsqrt(variance + epsilon)`` is again the packet ``prsqrt`` for the first 8*floor(C/8)
channels and 1 / sqrt for the tail (measured: it holds inside the broadcast expressions too).

The four backend ops take and return what :mod:`refbn.backends` describes: per-channel vectors
are float64 (holding these float32 values exactly).  Machine dependence: ``vrsqrtps`` (the
packet channels' y, dx and scale_backprop); TF's intra-op thread count (the gradient's sums
only: the forward's sums do not depend on it, Eigen gives each channel's sum to one thread).
"""
import os

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


def rsqrt_of(variance, epsilon):
    """``(variance + epsilon).rsqrt()`` over the C channels: the packet ``prsqrt`` for the first
    8*floor(C/8), the scalar 1 / sqrt for the tail."""
    a = np.asarray(variance, F32) + F32(epsilon)
    v = _vector_channels(a.size)
    r = np.empty_like(a)
    r[:v] = packet_rsqrt(a[:v])
    r[v:] = scalar_rsqrt(a[v:])
    return r


def scaling_factor(variance, epsilon, scale):
    """``((variance + epsilon).rsqrt() * scale).eval()``: packets, then the scalar tail."""
    return rsqrt_of(variance, epsilon) * np.asarray(scale, F32)


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


# -- FusedBatchNormGradV3: TF's ReduceOuterDimensions (redux_functor.h) -------------------------
_override_threads = None


def intra_op_threads():
    """The intra-op thread count whose reduction blocks :func:`backward` reproduces.

    TF's default in a process started from this one: ``TF_NUM_INTRAOP_THREADS`` when set (> 0),
    else the CPUs this process may run on (TF's ``port::MaxParallelism``).
    :func:`set_intra_op_threads` overrides it (for a TF configured with
    ``tf.config.threading.set_intra_op_parallelism_threads``)."""
    if _override_threads is not None:
        return _override_threads
    env = os.environ.get("TF_NUM_INTRAOP_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):   # pragma: no cover - not Linux
        return os.cpu_count() or 1


def set_intra_op_threads(n):
    """Emulate TF with ``n`` intra-op threads (None: back to :func:`intra_op_threads`' default).
    Returns the previous override."""
    global _override_threads
    if n is not None and (isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1):
        raise ValueError(f"n: expected a thread count >= 1 or None, got {n!r}")
    previous, _override_threads = _override_threads, (None if n is None else int(n))
    return previous


def _divup(a, b):
    return -(-a // b)


def _cost_model_total(size, bytes_loaded, compute_cycles):
    """Eigen's ``TensorCostModel<ThreadPoolDevice>::totalCost`` (11/64 cycles per byte)."""
    return size * (bytes_loaded * 11.0 / 64 + compute_cycles)


def _cost_model_threads(n, bytes_loaded, compute_cycles, threads):
    """``TensorCostModel::numThreads``: startup 100000 cycles, 100000 per extra thread."""
    t = (_cost_model_total(n, bytes_loaded, compute_cycles) - 100000) / 100000 + 0.9
    return min(threads, max(1, int(t)))


def _parallel_for_block_size(n, bytes_loaded, compute_cycles, threads):
    """``ThreadPoolDevice::CalculateParallelForBlock``: tasks of 40000 cycles, at most 4 per
    thread, grown while the parallel efficiency does not drop."""
    block_size_f = 40000 / _cost_model_total(1, bytes_loaded, compute_cycles)
    block_size = min(n, max(_divup(n, 4 * threads), int(block_size_f)))
    max_block_size = min(n, 2 * block_size)
    block_count = _divup(n, block_size)
    max_efficiency = block_count / (_divup(block_count, threads) * threads)
    prev_block_count = block_count
    while max_efficiency < 1.0 and prev_block_count > 1:
        coarser_block_size = _divup(n, prev_block_count - 1)
        if coarser_block_size > max_block_size:
            break
        coarser_block_count = _divup(n, coarser_block_size)
        prev_block_count = coarser_block_count
        coarser_efficiency = coarser_block_count / (_divup(coarser_block_count, threads) * threads)
        if coarser_efficiency + 0.01 >= max_efficiency:
            block_size, block_count = coarser_block_size, coarser_block_count
            max_efficiency = max(max_efficiency, coarser_efficiency)
    return block_size


def _parallel_for_ranges(n, granularity):
    """``handleRange``: [0, n) halved (the midpoint rounded up to the granularity) until each
    range is at most one block; the ranges, in index order."""
    out = []
    stack = [(0, n)]
    while stack:
        first, last = stack.pop()
        while last - first > granularity:
            mid = first + _divup((last - first) // 2, granularity) * granularity
            stack.append((mid, last))
            last = mid
        out.append((first, last))
    return sorted(out)


def reduction_row_blocks(rows, depth, threads, itemsize=4):
    """The contiguous row ranges that ``ReduceOuterDimensions`` sums separately, in the order
    their sums are added.  ``itemsize`` is sizeof(InputT) (it enters Eigen's cost model)."""
    if rows <= 1 or depth > threads * 32:    # pass-through / blocks along the channels instead
        return [(0, rows)]
    min_block_size = _divup(2000, depth)     # min_block_workload = 2000 values
    num_blocks = min(rows, _divup(rows * depth, min_block_size), threads)
    outer_block_size = _divup(rows, num_blocks)
    bytes_loaded, compute_cycles = outer_block_size * depth * itemsize, outer_block_size * depth
    if (num_blocks == 1 or threads == 1
            or _cost_model_threads(num_blocks, bytes_loaded, compute_cycles, threads) == 1):
        tasks = [(0, num_blocks)]            # parallelFor runs f(0, n) in the caller
    else:
        tasks = _parallel_for_ranges(num_blocks, _parallel_for_block_size(
            num_blocks, bytes_loaded, compute_cycles, threads))
    # task [start, limit) sums rows [start * outer_block_size, limit * outer_block_size) into
    # buffer block `start`; the other blocks of the buffer stay zero
    return [(a * outer_block_size, min(rows, b * outer_block_size)) for a, b in tasks]


@njit(cache=True)
def _sum_rows_in_order(t, start, stop):
    """buf = buf + row, for rows start..stop-1: per channel, a float32 sum strictly in order."""
    acc = np.zeros(t.shape[1], np.float32)
    for j in range(start, stop):
        for c in range(t.shape[1]):
            acc[c] += t[j, c]
    return acc


def reduce_outer_dimensions(terms, threads=None, itemsize=4):
    """``functor::ReduceOuterDimensions<InputT, float, float, scalar_sum_op>`` of (rest_size,
    depth) terms: each row block summed in order, then ``buf0 = buf0 + buf_i`` in block order."""
    t = np.ascontiguousarray(terms, F32)
    rows, depth = t.shape
    if rows == 1:                            # outer_dim == 1: "nothing to do but passing input"
        return t[0].copy()
    total = np.zeros(depth, F32)
    for start, stop in reduction_row_blocks(rows, depth, threads or intra_op_threads(), itemsize):
        total = total + _sum_rows_in_order(t, start, stop)
    return total


def fused_batch_norm_grad(y_backprop, x, scale, mean, variance, epsilon, threads=None, itemsize=4):
    """``FusedBatchNormGrad<CPUDevice, T, U>`` (training) on (rest_size, depth) float32 rows:
    (x_backprop before the cast to T, scale_backprop, offset_backprop)."""
    rest_size = x.shape[0]
    x_centered = x - np.asarray(mean, F32)
    coef0 = rsqrt_of(variance, epsilon)                          # (variance + epsilon).rsqrt()
    x_scaled = x_centered * coef0
    # scale_backprop = sum(y_backprop * x_scaled), through the scratch tensor
    scale_backprop = reduce_outer_dimensions(y_backprop * x_scaled, threads)
    del x_scaled
    # offset_backprop = sum(y_backprop), redux_sum_t straight from T
    offset_backprop = reduce_outer_dimensions(y_backprop, threads, itemsize)
    y_backprop_mean = offset_backprop * rest_size_inv(rest_size)
    # y_backprop_centered_mean = sum(y_backprop * x_centered) / rest_size (a division)
    y_backprop_centered_mean = reduce_outer_dimensions(y_backprop * x_centered, threads) / F32(rest_size)
    coef1 = np.asarray(scale, F32) * coef0
    coef2 = (coef0 * coef0) * y_backprop_centered_mean            # coef0.square() * ...
    y_backprop_centered = y_backprop - y_backprop_mean
    x_backprop = coef1 * (y_backprop_centered - x_centered * coef2)
    return x_backprop, scale_backprop, offset_backprop


def fused_batch_norm_freeze_grad(y_backprop, x, scale, pop_mean, pop_variance, epsilon, threads=None,
                                 itemsize=4):
    """``FusedBatchNormFreezeGrad<CPUDevice, T, U>`` (inference) on (rest_size, depth) float32
    rows: (x_backprop before the cast to T, scale_backprop, offset_backprop)."""
    offset_backprop = reduce_outer_dimensions(y_backprop, threads, itemsize)   # sum(y_backprop)
    scratch1 = rsqrt_of(pop_variance, epsilon)                   # rsqrt(pop_var + epsilon)
    scratch2 = reduce_outer_dimensions(y_backprop * (x - np.asarray(pop_mean, F32)), threads)
    x_backprop = y_backprop * (scratch1 * np.asarray(scale, F32))
    scale_backprop = scratch2 * scratch1
    return x_backprop, scale_backprop, offset_backprop


def check_backward(layout, is_training):
    """What TF's Eigen kernel refuses and refbn's other backends accept: the inference-mode
    gradient of channels-first data ("only support NHWC tensor format for now").  Called by
    :func:`refbn.raw_ops.FusedBatchNormGradV3` before anything is computed."""
    if not is_training and layout.axis != len(layout.shape) - 1:
        raise ValueError("data_format: backend 'tf_eigen' emulates TF's Eigen kernel, whose "
                         "FusedBatchNormGradV3 with is_training=False takes channels-last data only "
                         "(NHWC, NDHWC), got channels on axis "
                         f"{layout.axis} of {len(layout.shape)} (use backend 'numpy' or 'numba')")


@_quiet
def backward(dy3, x3, scale, mean, variance, epsilon, is_training, out3=None):
    _float32_only(x3)
    rows_dy, rows_x = _rows(dy3), _rows(x3)
    if rows_x.shape[0] == 0:     # nothing to sum: zero sums, an empty dx
        zeros = np.zeros(x3.shape[1])
        return _store(rows_x, x3, out3), zeros, zeros.copy()
    grad = fused_batch_norm_grad if is_training else fused_batch_norm_freeze_grad
    dx, dscale, doffset = grad(rows_dy, rows_x, scale, mean, variance, epsilon,
                               itemsize=dy3.dtype.itemsize)
    return _store(dx, x3, out3), dscale.astype(np.float64), doffset.astype(np.float64)
