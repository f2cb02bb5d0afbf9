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
    layer              a BatchNorm layer's moving statistic after t updates
                       against the closed form (1 - momentum**t) * value
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
    ("finite_difference", "*", "f64"): Tolerance(
        2.0 ** 22, "central differences with h ~ eps^(1/3) * |x| have truncation error ~h^2 and "
                   "round-off ~eps/h, i.e. ~eps^(2/3) ~ 2^-35 relative; 2^22 eps = 2^-30 leaves margin"),
    ("layer", "*", "f64"): Tolerance(
        2.0 ** 8, "one float64 rounding per update step; the tests run at most ~100 steps"),
}


def tolerance(output, dtype, context="reference"):
    """The declared :class:`Tolerance` for an output of a dtype in a context."""
    d = dtypes.short_name(dtypes.parse(dtype))
    for key in ((context, output, d), (context, "*", d), (context, output, "*"), (context, "*", "*")):
        if key in TOLERANCES:
            return TOLERANCES[key]
    raise KeyError(f"no tolerance declared for context={context!r}, output={output!r}, dtype={d}; "
                   f"add one to refbn/tolerances.py with its reason")
