"""Where TensorFlow and refbn are known to differ, each with its reason.

The harness never hides a difference: a documented divergence is still
checked (the stated TF behaviour must be what TF does, and refbn must be
the one closer to the float64 truth), and it is reported as such rather
than as a failure.  Facts come from ../shared/FACTS.md and were re-measured
with ``refbn verify``.
"""
from dataclasses import dataclass

#: |mean| / std at or above which float32 accumulation is ill-conditioned (see FACTS.md)
OFFSET_RATIO = 100.0
#: values per channel at or above which float32 running sums lose digits (2^22)
LARGE_N = 1 << 22


@dataclass(frozen=True)
class Divergence:
    name: str
    summary: str
    reason: str


ILL_CONDITIONED = Divergence(
    "ill_conditioned_sums",
    "large mean offset (|mean| >= 100 std), a constant channel, or a large reduction (n >= 2^22): "
    "TF's float32 sums lose accuracy",
    "Both TF CPU kernels accumulate per-channel sums in float32 (oneDNN per thread chunk, Eigen "
    "sequentially or in 4 interleaved sums). With x ~ N(1e4, 0.01^2) the variance's relative error "
    "reaches 19 (oneDNN), with N(1e6, 1) 3e4-4e4, and with n = 2^24 values of N(100, 1) 3e2 "
    "(FACTS.md). refbn sums in float64 and rounds once; there TF is the one that is wrong. Verdict: "
    "refbn must be within its own tolerance of the float64 truth and closer to it than TF. A constant "
    "channel is the extreme offset (std 0): TF's float32 mean misses the constant by a rounding error "
    "d, and y = d * scale / sqrt(0 + epsilon) + offset magnifies d by 1/sqrt(epsilon) (100 for the "
    "default 1e-4), so TF's y is off by up to ~1e3 float32 eps where refbn gives y == offset.")

EMPTY_BATCH_TRAINING = Divergence(
    "empty_batch",
    "N == 0: in training TF returns NaN statistics where refbn raises ValueError; in inference TF "
    "returns NaN for batch_mean/batch_variance where refbn passes mean/variance through",
    "With no values per channel the batch mean and variance are undefined. TF's forward op returns "
    "NaN for them (Keras 3 then writes NaN into its moving statistics for good) and its gradient "
    "returns zeros; refbn refuses the training call with a ValueError naming x and its shape. In "
    "inference TF also writes NaN into outputs 1-2 (it passes mean/variance through for N > 0); refbn "
    "passes them through; y and the gradient (empty, zeros) are compared as usual. Checked: refbn "
    "raises, TF's outputs are NaN.")

INFERENCE_RESERVE_SPACES = Divergence(
    "inference_reserve_spaces",
    "inference: reserve_space_1/2 are not compared",
    "In inference mode TF's Eigen kernel leaves reserve_space_1/2 uninitialised (arbitrary memory, "
    "NaN included); oneDNN passes mean/variance through. No consumer reads them (the gradient in "
    "inference takes the population statistics). refbn returns copies of mean/variance; checked.")

EIGEN_GRAD_NCHW_INFERENCE = Divergence(
    "eigen_grad_channels_first_inference",
    "Eigen: FusedBatchNormGradV3 refuses channels-first layouts in inference mode",
    "TF's Eigen gradient kernel raises InvalidArgumentError ('only support NHWC tensor format') for "
    "is_training=False with NCHW/NCDHW; refbn and oneDNN compute it. Reported as unsupported by TF, "
    "and checked: TF still refuses.")

# Bad input (tests/test_compare_divergences.py asserts each against TF in-process).
EPSILON_NOT_CLAMPED = Divergence(
    "epsilon_not_clamped",
    "epsilon <= 0: TF 2.21 accepts it unclamped, refbn raises ValueError",
    "Older TF clamped epsilon to 1.001e-5; TF 2.21 takes 0 and negative values as given, so "
    "variance + epsilon can be 0 or negative (Inf/NaN in y). refbn requires a finite epsilon > 0.")

NONFINITE_X = Divergence(
    "nonfinite_x",
    "NaN/Inf in x (training): the same in TF and refbn ops; refbn's layer refuses by default",
    "TF and refbn.raw_ops both make that channel's y and statistics NaN/Inf and leave the other "
    "channels alone (checked as agreement). refbn.BatchNorm raises by default rather than writing NaN "
    "into its moving statistics for good, as Keras does.")

NEGATIVE_VARIANCE = Divergence(
    "negative_variance_inference",
    "negative variance in inference: TF returns NaN/garbage, refbn raises ValueError",
    "TF does not check the population variance; rsqrt(var + eps) of a negative number is NaN. refbn "
    "raises a ValueError naming variance and the bad channels.")

FACTOR_OUTSIDE_UNIT = Divergence(
    "exponential_avg_factor_outside_0_1",
    "exponential_avg_factor outside [0, 1] or NaN: TF extrapolates, refbn raises ValueError",
    "TF computes (1-f)*old + f*new for any f, so f = 2 extrapolates (a running variance of -846 was "
    "seen); refbn requires 0 <= f <= 1.")

ALL = (ILL_CONDITIONED, EMPTY_BATCH_TRAINING, INFERENCE_RESERVE_SPACES, EIGEN_GRAD_NCHW_INFERENCE,
       EPSILON_NOT_CLAMPED, NONFINITE_X, NEGATIVE_VARIANCE, FACTOR_OUTSIDE_UNIT)


def ill_conditioned(case):
    """Whether a case's float32 sums are ill-conditioned (documented TF inaccuracy)."""
    offset = case.mean != 0 and (case.std == 0 or abs(case.mean) >= OFFSET_RATIO * case.std)
    return offset or case.const or case.count >= LARGE_N


def empty_training(case):
    return case.is_training and case.count == 0


def empty_inference(case):
    return case.mode == "infer" and case.count == 0


def eigen_grad_refused(case, kernel, tf_error=""):
    """The Eigen gradient's refusal of channels-first inference (also hit by the oneDNN build,
    which falls back to Eigen for 5-D and half-precision gradients)."""
    if case.mode != "infer" or case.layout not in ("NCHW", "NCDHW"):
        return False
    return kernel == "eigen" or "only support NHWC" in (tf_error or "")
