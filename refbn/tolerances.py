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
    layer              a BatchNorm layer's moving statistic after t updates
                       against the closed form (1 - momentum**t) * value
    merge              refbn.stats: merged Moments against the moments of all
                       the values; a framework's float32 merge emulation
                       against the same arithmetic done independently
    distributed        TF's synchronized BatchNormalization (MirroredStrategy,
                       MultiWorkerMirroredStrategy) against refbn's replay
"""
from dataclasses import dataclass

from . import dtypes


@dataclass(frozen=True)
class Tolerance:
    ulps: float
    reason: str


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


def tolerance(output, dtype, context="reference"):
    """The declared :class:`Tolerance` for an output of a dtype in a context."""
    d = dtypes.short_name(dtypes.parse(dtype))
    for key in ((context, output, d), (context, "*", d), (context, output, "*"), (context, "*", "*")):
        if key in TOLERANCES:
            return TOLERANCES[key]
    raise KeyError(f"no tolerance declared for context={context!r}, output={output!r}, dtype={d}; "
                   f"add one to refbn/tolerances.py with its reason")
