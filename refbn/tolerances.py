"""Every tolerance refbn's tests and its verify harness use, declared once.

A tolerance is a multiple of the machine epsilon of the dtype being checked
(``ulps`` below), applied to the error normalised by the expected value's
magnitude: ``|actual - expected| <= ulps * eps(dtype) * max(|expected|, scale)``
where ``scale`` defaults to the root-mean-square of the expected array (so
values that cancel to near zero are judged against the array's own size).
Tests import :func:`tolerance`; they never write a literal tolerance.

Keys are (context, output, dtype); ``"*"`` matches any output or dtype.
Contexts:
    reference          a refbn result (computed in float64, rounded once to
                       the output dtype) against an independent float64
                       closed form
    finite_difference  an analytic float64 gradient against central
                       differences of the float64 forward pass
    numba              the numba backend's result against the same float64 closed forms
    numba_moments      the numba kernels' float64 moments against a float64 two-pass truth
    layer              a BatchNorm layer's moving statistic after t updates
                       against the closed form (1 - momentum**t) * value
    merge              refbn.stats: merged Moments against the moments of all
                       the values; a framework's float32 merge emulation
                       against the same arithmetic done independently
    distributed        TF's synchronized BatchNormalization (MirroredStrategy,
                       MultiWorkerMirroredStrategy) against refbn's replay
    torch_cpu          refbn.compare.frameworks: refbn against PyTorch's / ONNX Runtime's
    onnxruntime_cpu    CPU BatchNorm kernels (and each against the float64 truth)
    jax_cpu            refbn bench: BatchNorm written in jax.numpy, jitted on XLA's CPU
                       backend, against the float64 truth
    flax_parity        refbn.BatchNorm(convention="flax") against flax.linen / flax.nnx
    tf_onednn          refbn.compare: refbn against TF's oneDNN CPU kernel (and TF
    tf_eigen           against the float64 truth), resp. TF's Eigen kernel
    keras_parity       refbn.BatchNorm against Keras 3 / tf-keras fused / torch
    tf_fused_parity    after K training steps on the same batches
    torch_parity
    refbn_layer        refbn.BatchNorm (float32 state) against its float64 twin
    closer_than_tf     slack when judging "refbn is no farther from the truth than TF"
    debias             refbn.BatchNorm(debias=True) statistics after t steps on constant
                       data against the batch statistics
    keras_recalibrate  refbn.keras.recalibrate's moving statistics (float32 variables)
                       against the float64 statistics of the captured layer inputs
    keras_debias       refbn.keras.debias on a Keras model trained on constant data
                       against the float64 batch statistics of the captured inputs
"""
from dataclasses import dataclass

from . import dtypes


@dataclass(frozen=True)
class Tolerance:
    ulps: float
    reason: str
    #: extra allowance per value reduced (n per channel), in eps: ``ulps + ulps_per_n * min(n, max_n)``
    #: (max_n 0: no cap).  Used by refbn.compare for outputs of float32 sums
    #: (compare.metrics.with_reduction applies it).
    ulps_per_n: float = 0.0
    max_n: int = 0


_ROUNDED_ONCE = Tolerance(
    1.0, "computed in float64 and rounded once to the output dtype: at most 0.5 ulp of rounding, "
         "plus float64 noise far below one ulp of any narrower dtype")

TOLERANCES = {
    ("reference", "*", "f16"): _ROUNDED_ONCE,
    ("reference", "*", "bf16"): _ROUNDED_ONCE,
    ("reference", "*", "f32"): _ROUNDED_ONCE,
    ("reference", "*", "f64"): Tolerance(
        2.0 ** 10, "both sides are float64 but sum in different orders and arrange the formula "
                   "differently; the error grows with log(n) to sqrt(n), well under 2^10 eps for n <= 1e6"),
    # Exception: dx sums three terms of size ~scale*inv_std*|dy| that cancel
    # to a small result; the cancellation magnifies float64 round-off.
    ("reference", "x_backprop", "f64"): Tolerance(
        2.0 ** 14, "dx = a*dy + b*(x-mean) + c cancels terms of size ~scale*inv_std*|dy| (up to "
                   "~1e3 x the rms of dx in the tests), magnifying float64 round-off accordingly"),
    # The numba backend (context "numba"): it widens every value to float64, sums in float64
    # (blocked partial sums; one shifted pass for the moments), evaluates the same
    # equations in float64 and rounds once, so narrow outputs get the reference's allowance.
    ("numba", "*", "f32"): _ROUNDED_ONCE,
    ("numba", "*", "f16"): Tolerance(
        1.0, "computed in float64 as the reference is; the float64 -> float16 cast goes via float32 "
             "(two roundings), which can add 2^-24 relative to the 0.5 ulp of rounding: still < 1 ulp"),
    ("numba", "*", "bf16"): Tolerance(
        1.0, "computed in float64 as the reference is; the float64 -> bfloat16 cast goes via float32 "
             "(two roundings), which can add 2^-24 relative to the 0.5 ulp of rounding: still < 1 ulp"),
    ("numba", "*", "f64"): Tolerance(
        2.0 ** 10, "float64 against float64 in another summation order; the one-pass moments about the "
                   "channel's first value cancel by 1 + (mean - x0)^2 / var, ~2 on the tests' data"),
    ("numba", "x_backprop", "f64"): Tolerance(
        2.0 ** 14, "as the reference: dx = a*dy + b*(x-mean) + c cancels terms up to ~1e3 x the rms of "
                   "dx in the tests, magnifying float64 round-off accordingly"),
    # The numba kernels' float64 moments (before rounding to float32) against a float64 two-pass
    # truth with pairwise sums: the issue-4 accuracy goals on offset data and at n = 2^24.
    ("numba_moments", "*", "f64"): Tolerance(
        2.0 ** 8, "one pass about the channel's first value x0, float64 partial sums over 64K-value blocks: "
                  "error ~ (1 + (mean - x0)^2 / var) * (a few eps of summation); the factor is ~2 on "
                  "ordinary and offset data (measured <= 18 eps at n = 2^24 and on N(1e6, 1))"),
    ("numba_moments", "variance_outlier_first", "f64"): Tolerance(
        2.0 ** 18, "when the first value is an outlier the cancellation factor 1 + (mean - x0)^2 / var "
                   "reaches its bound n (5e4 in the test; measured 7e4 eps): still ~1e-11 relative"),
    ("finite_difference", "*", "f64"): Tolerance(
        2.0 ** 22, "central differences with h ~ eps^(1/3) * |x| have truncation error ~h^2 and "
                   "round-off ~eps/h, i.e. ~eps^(2/3) ~ 2^-35 relative; 2^22 eps = 2^-30 leaves margin"),
    ("layer", "*", "f64"): Tolerance(
        2.0 ** 8, "one float64 rounding per update step; the tests run at most ~100 steps"),
    # refbn.stats: merged Moments against single-device moments of all the values
    ("merge", "mean", "f64"): Tolerance(
        2.0 ** 5, "each Chan merge rounds mean_a + delta*w a few times and the pairwise tree has "
                  "log2(k) levels (k <= 64 shards); judged on the scale of the data's std"),
    ("merge", "variance", "f64"): Tolerance(
        2.0 ** 5, "the merge's cross term delta^2*n_a*n_b/n carries each shard mean's rounding "
                  "(~eps*|mean|) times the spread of the means (~std), so it is judged on the scale "
                  "std*max(|mean|, std); the tree adds log2(k) levels of a few eps each"),
    ("merge", "*", "f32"): Tolerance(
        4.0, "a float32 emulation fed float64 sums that are within float64 round-off of exact: "
             "rounded to float32 they differ by at most 1 ulp (double rounding); E[x^2]-E[x]^2 is "
             "judged on the scale of E[x^2], the size of the terms it cancels"),
    # refbn.stats.merge: the relative error (variance_error, mean_error) a framework's merge
    # reports against the exact merge, on well-conditioned data (|mean| ~ std)
    ("merge_error", "*", "f32"): Tolerance(
        2.0 ** 4, "a float32 merge of correctly rounded per-replica statistics rounds E[x], E[x^2] "
                  "and their difference a few times, ~eps each; measured <= 1.2e-7 (1 eps)"),
    ("merge_error", "*", "f64"): Tolerance(
        2.0 ** 6, "the same merges evaluated in float64; measured <= 4.7e-16 (2 eps)"),
    # Exception: PyTorch sends float32 means, so on N(1e6, 1) each replica's mean is off by
    # up to eps*1e6/2 ~ 0.03 std, which the merge's cross term turns into variance error.
    ("merge_error", "torch_sync_offset", "f32"): Tolerance(
        2.0 ** 13, "torch_sync on N(1e6, 1): float32 replica means carry ~eps*|mean| = 0.06 std of "
                   "rounding into Chan's cross term; measured 1.8e-4 relative (1.5e3 eps)"),
    # refbn.compare.distributed: TF's synchronized BatchNormalization (float32) against refbn's
    # keras_sync replay; the data of its cases are N(2, 3^2) in batches of <= 300 values per channel
    ("distributed", "batch_mean", "f32"): Tolerance(
        2.0 ** 4, "TF sums x in float32 (reduce_sum, then the all-reduce over <= 4 replicas) where "
                  "refbn rounds exact sums once; each float32 addition adds <= 0.5 eps of the partial "
                  "sum, judged on the scale sqrt(E[x^2])"),
    ("distributed", "batch_variance", "f32"): Tolerance(
        2.0 ** 4, "E[x^2] - E[x]^2 from float32 sums ordered differently (as batch_mean), judged on "
                  "the scale of E[x^2], the size of the terms that cancel"),
    ("distributed", "y", "f32"): Tolerance(
        2.0 ** 5, "TF's y = x*a + (beta - mean*a) rounds terms up to ~4x |y| (|x - mean|/std <= ~4 "
                  "here) and inherits half the variance's relative error (16 eps * E[x^2]/var, "
                  "E[x^2]/var = 1.4 for N(2, 3^2))"),
    ("distributed", "moving_mean", "f32"): Tolerance(
        2.0 ** 4, "a few float32 moving-average updates of batch statistics that are within "
                  "their own tolerance"),
    ("distributed", "moving_variance", "f32"): Tolerance(
        2.0 ** 4, "a few float32 moving-average updates of batch statistics that are within "
                  "their own tolerance"),
    ("distributed", "gamma", "f32"): Tolerance(
        2.0 ** 6, "SGD steps on float32 gradient sums of ~300 terms dy*x_hat that partly cancel "
                  "(dy = sin(x)), all-reduced over <= 4 replicas"),
    ("distributed", "beta", "f32"): Tolerance(
        2.0 ** 6, "SGD steps on float32 sums of ~300 terms dy = sin(x) that cancel to ~sqrt(n) of "
                  "their size, all-reduced over <= 4 replicas; beta starts at 0"),
}
# refbn.compare.distributed: PyTorch's and Flax's synchronized BatchNorm (float32) against
# refbn.stats' emulations of their merges (torch_sync_cpu, flax_pmean_merge) fed exact
# per-replica moments; the cases hold <= 300 values per channel per replica
TOLERANCES.update({
    ("sync_torch", "*", "f32"): Tolerance(
        4.0, "torch's CPU per-replica statistics are double sums rounded once to float32, as the "
             "emulation rounds exact ones (0.5 ulp, and double rounding at worst 1 ulp); the gather's "
             "float32 reduce is the same arithmetic in the same order, so only those input ulps "
             "propagate (through (1/invstd)^2 - eps and Chan's cross term, a few ulps)"),
    ("sync_flax", "*", "f32"): Tolerance(
        2.0 ** 4, "XLA sums each device's x and x^2 in float32 (<= 300 values), then psum-s 4 devices, "
                  "where the emulation rounds exact per-device means once: a few eps of the sums' size; "
                  "the mean judged on the scale sqrt(E[x^2]), the variance on the scale of E[x^2], the "
                  "size of the terms that E[x^2] - E[x]^2 cancels"),
})

# refbn.compare: TF's CPU kernels (float32 arithmetic, float32 sums) against refbn.  refbn is
# within 0.5 ulp of the float64 truth, so refbn-vs-TF measures TF's own error.  Measured on the
# registry (refbn verify, TF 2.21, both kernels, n <= 449,199 values per channel; see the
# README): variance/y errors grow with n (Eigen sums its C % 8 tail channels strictly in order: up to
# 1.9e3 eps at n = 449,199, i.e. 0.0042*n; oneDNN up to 876 eps), everything else stays < 5 eps.
_TF_SUMS = (
    "TF sums the n values of a channel in float32 (Eigen: 4 interleaved sums for the first "
    "8*floor(C/8) channels when n >= 16, the C % 8 tail in order, as refbn.backends.tf_eigen "
    "reproduces bit for bit; oneDNN: per-thread chunks, then the chunks); the worst case of recursive "
    "summation is (n-1)*eps relative, the measured worst 0.0042*n eps (Eigen, n = 449,199). "
    "Allowed: 8 eps for the final roundings plus n/32 eps, a 7x margin at the largest n and "
    "tight for small n (a Bessel-factor slip, 1/n relative, still fails for n < 16,000). The "
    "growth stops at n = 2^19 (the measured range, 2e-3 relative): beyond it TF's error is a "
    "documented divergence (n >= 2^22: 3e-2 relative at 2^24), not a tolerance")
_N_CAP = 1 << 19
_TF_16BIT = ("TF computes in float32 and rounds once to the 16-bit dtype, refbn rounds the float64 "
             "value once: they differ by at most 1 ulp where the float32 value sits next to a "
             "rounding boundary (measured <= 1.0 eps over the registry)")
for _ctx in ("tf_onednn", "tf_eigen"):
    TOLERANCES.update({
        (_ctx, "y", "f32"): Tolerance(8.0, "y: " + _TF_SUMS + "; y = (x-mean)*scale*rsqrt(var+eps) "
                                      "+ offset inherits half the variance's relative error "
                                      "(inference: no sums, measured <= 2.9 eps); in training judged against "
                                      "|scale*inv_std|*mean(|x|), as the float32 mean's error is "
                                      "relative to mean(|x|)", ulps_per_n=1 / 32, max_n=_N_CAP),
        (_ctx, "batch_mean", "f32"): Tolerance(8.0, "mean, judged against mean(|x|): " + _TF_SUMS,
                                               ulps_per_n=1 / 32, max_n=_N_CAP),
        (_ctx, "reserve_space_1", "f32"): Tolerance(8.0, "mean, judged against mean(|x|): " + _TF_SUMS,
                                                    ulps_per_n=1 / 32, max_n=_N_CAP),
        (_ctx, "batch_variance", "f32"): Tolerance(8.0, "variance: " + _TF_SUMS, ulps_per_n=1 / 32,
                                                   max_n=_N_CAP),
        (_ctx, "reserve_space_2", "f32"): Tolerance(8.0, "variance: " + _TF_SUMS, ulps_per_n=1 / 32,
                                                    max_n=_N_CAP),
        (_ctx, "x_backprop", "f32"): Tolerance(
            16.0, "dx = a*(dy - mean(dy) - x_hat*mean(dy*x_hat)) in float32, judged against "
                  "|a|*rms(dy), the size of the terms that cancel; the means are sums whose error "
                  "is relative to their own (small) size; measured <= 4.7 eps"),
        (_ctx, "scale_backprop", "f32"): Tolerance(
            8.0, "sum(dy * x_hat) in float32, judged against sum(|dy * x_hat|), the sum's own "
                 "condition; terms of both signs keep the error near sqrt(n); measured <= 1.8 eps"),
        (_ctx, "offset_backprop", "f32"): Tolerance(
            8.0, "sum(dy) in float32, judged against sum(|dy|); measured <= 1.5 eps"),
        (_ctx, "*", "bf16"): Tolerance(2.0, _TF_16BIT),
        (_ctx, "*", "f16"): Tolerance(2.0, _TF_16BIT),
    })
# refbn.compare.frameworks: PyTorch's and ONNX Runtime's CPU kernels (float32 x) against the
# float64 truth, and refbn against them (refbn verify --framework torch,onnxruntime).  Measured on
# the CI registry (torch 2.13.0, onnxruntime 1.32): on well-conditioned data (|mean| < 100 std,
# no constant channel) statistics <= 8.4 eps, y <= 5.6 eps, dx <= 2.1 eps, dscale/doffset <= 1.2
# eps; on the whole registry torch's NHWC variance reaches 1.3e3 eps at n = 449,199 and its y
# 1.7e3 eps at 32x112x112x64 (allowed 8 + n/32 = 1.4e4 / 1.3e4), dx 5.0 eps; torch's NHWC (channels_last) kernel sums in float32 (batch_mean 2.4e3 eps on N(1e4, 0.01^2)),
# its y = x*alpha + (bias - mean*alpha) cancels (49 eps on a constant channel): documented
# divergences, where refbn is the one within tolerance of the truth.
_FW_SUMS = ("the framework's CPU kernel reduces the n values of a channel in float32 or float64 "
            "(torch: double accumulators for NCHW, float32 for channels_last; ORT: float32) and "
            "rounds its statistics to float32; as for TF's sums: 8 eps of final roundings plus n/32 "
            "eps for float32 accumulation, capped at n = 2^19")
for _ctx in ("torch_cpu", "onnxruntime_cpu"):
    TOLERANCES.update({
        (_ctx, "*", "f32"): Tolerance(8.0, _FW_SUMS, ulps_per_n=1 / 32, max_n=_N_CAP),
        (_ctx, "y", "f32"): Tolerance(
            24.0, "torch's y = x*alpha + (bias - mean*alpha) in float32: each rounding is relative to "
                  "|x*alpha| or |mean*alpha|, up to ~5x rms(y) at the tails of normal data, on top of "
                  "the float32 statistics (" + _FW_SUMS + "); measured 16.8 eps at n = 256 "
                  "(refbn bench --sweep, 1 thread)", ulps_per_n=1 / 32, max_n=_N_CAP),
        (_ctx, "x_backprop", "f32"): Tolerance(
            16.0, "dx = a*(dy - mean(dy) - x_hat*mean(dy*x_hat)) in float32 from torch's float32 "
                  "save_invstd, judged against |a|*rms(dy); measured <= 2.1 eps"),
        (_ctx, "scale_backprop", "f32"): Tolerance(
            8.0, "sum(dy * x_hat), judged against sum(|dy * x_hat|); measured <= 1.2 eps"),
        (_ctx, "offset_backprop", "f32"): Tolerance(
            8.0, "sum(dy), judged against sum(|dy|); measured <= 0.7 eps"),
        # refbn bench --dtypes float16,bfloat16: torch's CPU kernel computes half-precision x in
        # float32 and rounds y / dx once to the 16-bit dtype, as TF does
        (_ctx, "*", "bf16"): Tolerance(2.0, _TF_16BIT),
        (_ctx, "*", "f16"): Tolerance(2.0, _TF_16BIT),
    })
# refbn bench: batch normalization written in jax.numpy (refbn.bench.jax_bench), jitted by XLA's CPU
# backend, float32 throughout: two-pass mean and biased variance, y = (x-mean)*rsqrt(var+eps)*scale
# + offset, and jax.vjp of that for the backward.  Measured (jax 0.10.2; bench smoke shapes, 32x28x28x64,
# 8x64x28x28:NCHW, 32x56x56x64 both layouts, 2048x1024; n <= 100,352): statistics <= 1.4 eps, y <= 4.2
# eps (training) / 3.2 eps (inference), dx <= 3.2 eps, dscale <= 0.94 eps, doffset <= 0.48 eps.
_JAX_SUMS = ("XLA's CPU reduce sums the n values of a channel in float32 (vectorised partial sums; "
             "measured <= 1.4 eps on the statistics, y <= 4.2 eps, n <= 100,352); mean = sum/n, "
             "var = mean((x-mean)^2) two-pass, so the mean's error enters the variance only squared; "
             "as for TF's and torch's sums, allowed 8 eps of final roundings plus n/32 eps for float32 "
             "accumulation (a recursive float32 sum's worst case grows with n), capped at n = 2^19")
TOLERANCES.update({
    ("jax_cpu", "*", "f32"): Tolerance(8.0, _JAX_SUMS, ulps_per_n=1 / 32, max_n=_N_CAP),
    ("jax_cpu", "x_backprop", "f32"): Tolerance(
        16.0, "jax.vjp of the float32 forward: dx sums three terms (through y, the mean and the "
              "variance) that cancel, judged against |a|*rms(dy) as TF's dx; the sums of dy and "
              "dy*(x-mean) have errors relative to their own small size; measured <= 3.2 eps"),
    ("jax_cpu", "scale_backprop", "f32"): Tolerance(
        8.0, "sum(dy * x_hat) in float32, judged against sum(|dy * x_hat|); measured <= 0.94 eps"),
    ("jax_cpu", "offset_backprop", "f32"): Tolerance(
        8.0, "sum(dy) in float32, judged against sum(|dy|); measured <= 0.48 eps"),
})
_PARITY = ("K float32 training steps: batch statistics from float32 sums (Keras 3: "
           "E[x^2] - E[x]^2, cancelling by (mean^2 + var)/var = 3.25 on N(3, 2^2) data; tf-keras "
           "fused: FusedBatchNormV3), then moving = moving*m + batch*(1-m) rounded each step; old "
           "rounding errors decay by m per step. Measured <= 37 eps (y of the last training step, "
           "n = 12,544), <= 5.5 eps for the moving statistics. Allowed: 16 eps plus n/32 as for TF's sums")
for _ctx in ("keras_parity", "tf_fused_parity", "torch_parity", "flax_parity"):
    TOLERANCES[(_ctx, "*", "f32")] = Tolerance(16.0, _PARITY, ulps_per_n=1 / 32, max_n=_N_CAP)
    TOLERANCES[(_ctx, "*", "bf16")] = Tolerance(2.0, "mixed precision: " + _TF_16BIT)
    TOLERANCES[(_ctx, "*", "f16")] = Tolerance(2.0, "mixed precision: " + _TF_16BIT)
TOLERANCES.update({
    ("refbn_layer", "*", "f32"): Tolerance(
        16.0, "refbn.BatchNorm computes each step in float64 but stores its moving statistics in "
              "float32: one 0.5-ulp rounding per step, decaying by momentum m, so at most "
              "0.5/(1-m) ulp (50 for m = 0.99) in the worst case; measured <= 2.4 eps over 50 steps"),
    ("refbn_layer", "*", "bf16"): _ROUNDED_ONCE,
    ("refbn_layer", "*", "f16"): _ROUNDED_ONCE,
    ("closer_than_tf", "*", "bf16"): Tolerance(
        2.0 ** -15, "a backend that reaches bfloat16 through float32 (two roundings; the numba "
                    "kernels) can miss the correctly rounded value by 2^-24 relative (2^-17 bf16 eps) "
                    "where TF's float32 value happens to round the other way; the numpy reference "
                    "rounds once (refbn.dtypes.store), so for it this slack is never used"),
    ("closer_than_tf", "*", "f16"): Tolerance(
        2.0 ** -13, "a backend that casts float64 -> float16 through float32 (numba) rounds twice "
                    "and can miss the correctly rounded value by 2^-24 relative (2^-14 f16 eps)"),
    ("closer_than_tf", "*", "*"): Tolerance(
        0.0, "refbn rounds the float64 truth once (correctly for float16/float32), so no value of "
             "the output dtype is closer to the truth than refbn's"),
})

# refbn.keras (recalibrate, debias) and refbn.BatchNorm(debias=True).
TOLERANCES.update({
    ("debias", "*", "f64"): Tolerance(
        2.0 ** 10, "debiasing divides by 1 - momentum^t (0.01 after one step at momentum 0.99), "
                   "magnifying the float64 rounding of the moving statistic (and of 1 - (1 - decay)) "
                   "by up to 100 < 2^7; 2^10 leaves margin"),
    ("debias", "*", "f32"): Tolerance(
        2.0 ** 8, "refbn.BatchNorm stores float32 moving statistics (0.5 ulp of rounding per step); "
                  "debiasing divides by 1 - momentum^t (>= 0.01 after one step at momentum 0.99), "
                  "magnifying that up to 100x ~ 2^6.6, and y = (x - mean) * inv_std inherits it"),
    ("keras_recalibrate", "*", "f32"): Tolerance(
        1.0, "the pooled statistics are computed in float64 from the same float32 inputs (exact "
             "Chan merge of per-batch float64 moments) and written once into float32 variables: "
             "0.5 ulp of rounding plus float64 noise"),
    ("keras_debias", "*", "f32"): Tolerance(
        2.0 ** 7, "judged against max(|statistic|, rms, initial value): Keras updates in float32 "
                  "(moving*0.99f + batch*0.01f, momentum rounded to float32, 1e-8 off) and stores "
                  "~0.99*initial + 0.01*batch with 0.5 ulp of rounding; debiasing divides by "
                  "1 - 0.99 = 0.01, magnifying both ~100x (measured <= 30 eps); TF's float32 "
                  "batch moments add a few eps"),
})


def tolerance(output, dtype, context="reference"):
    """The declared :class:`Tolerance` for an output of a dtype in a context."""
    d = dtypes.short_name(dtypes.parse(dtype))
    for key in ((context, output, d), (context, "*", d), (context, output, "*"), (context, "*", "*")):
        if key in TOLERANCES:
            return TOLERANCES[key]
    raise KeyError(f"no tolerance declared for context={context!r}, output={output!r}, dtype={d}; "
                   f"add one to refbn/tolerances.py with its reason")
