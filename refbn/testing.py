"""Error metrics and self-explaining assertions, for tests and the verify harness."""
from dataclasses import dataclass

import numpy as np

from . import dtypes
from .tolerances import tolerance


def ulp_distance(a, b, dtype):
    """Number of representable ``dtype`` values between a and b (elementwise, int64)."""
    dt = dtypes.parse(dtype)
    width = {2: np.int16, 4: np.int32, 8: np.int64}[dt.itemsize]
    ai = np.asarray(a, dtype=np.float64).astype(dt).view(width).astype(np.int64)
    bi = np.asarray(b, dtype=np.float64).astype(dt).view(width).astype(np.int64)
    sign_bit = np.int64(1) << (8 * dt.itemsize - 1)
    # map the sign-magnitude bit patterns onto a monotone integer line
    ai = np.where(ai < 0, -(ai + sign_bit), ai)
    bi = np.where(bi < 0, -(bi + sign_bit), bi)
    return np.abs(ai - bi)


@dataclass
class Comparison:
    output: str
    dtype: str
    context: str
    max_abs: float
    max_rel: float
    max_ulps: float       # max of |a - e| / (eps * max(|e|, scale)), the tolerance's metric
    max_ulp_distance: int  # representable values between a and e in the dtype
    allowed_ulps: float
    reason: str
    worst_index: tuple
    worst_actual: float
    worst_expected: float
    scale: float
    mismatched_nonfinite: int

    @property
    def passed(self):
        return self.mismatched_nonfinite == 0 and self.max_ulps <= self.allowed_ulps

    @property
    def exact(self):
        return self.mismatched_nonfinite == 0 and self.max_abs == 0.0

    def message(self, what=""):
        head = f"{what + ': ' if what else ''}{self.output} ({self.dtype}, {self.context})"
        if self.mismatched_nonfinite:
            return f"{head}: {self.mismatched_nonfinite} value(s) differ in NaN/Inf placement"
        return (f"{head}: error {self.max_ulps:.3g} eps > allowed {self.allowed_ulps:g} eps "
                f"(eps = {dtypes.machine_epsilon(dtypes.parse(self.dtype)):.3g}, scale = {self.scale:.3g}).\n"
                f"  worst at index {self.worst_index}: actual {self.worst_actual!r}, "
                f"expected {self.worst_expected!r}; max abs {self.max_abs:.3g}, max rel {self.max_rel:.3g}, "
                f"{self.max_ulp_distance} ulp apart in {self.dtype}.\n"
                f"  tolerance reason: {self.reason}")


def compare(actual, expected, output, dtype, context="reference", scale=None):
    """Compare an output against its expected (float64) values under the declared tolerance."""
    dt = dtypes.parse(dtype)
    tol = tolerance(output, dt, context)
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    if a.shape != e.shape:
        raise AssertionError(f"{output}: shape {a.shape} != expected shape {e.shape}")
    fin = np.isfinite(e)
    same_nonfinite = (np.isnan(a) & np.isnan(e)) | (a == e)
    mismatched = int((~fin & ~same_nonfinite).sum() + (fin & ~np.isfinite(a)).sum())
    keep = fin & np.isfinite(a)
    ef, af = e[keep], a[keep]
    if scale is None:
        scale = float(np.sqrt(np.mean(ef * ef))) if ef.size else 0.0
    elif np.ndim(scale):   # a scale per value (e.g. per channel): filtered like the values
        scale = np.broadcast_to(np.asarray(scale, np.float64), e.shape)[keep]
    eps = dtypes.machine_epsilon(dt)
    if ef.size == 0:
        return Comparison(output, dtypes.short_name(dt), context, 0.0, 0.0, 0.0, 0, tol.ulps, tol.reason,
                          (), float("nan"), float("nan"), float(np.max(scale, initial=0.0)), mismatched)
    diff = np.abs(af - ef)
    denom = np.maximum(np.abs(ef), scale)
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(diff == 0, 0.0, diff / np.where(np.abs(ef) > 0, np.abs(ef), np.inf))
        norm = np.where(diff == 0, 0.0, diff / (eps * np.where(denom > 0, denom, np.inf)))
    norm = np.where(np.isnan(norm), np.inf, norm)
    k = int(np.argmax(norm))
    full_idx = np.argwhere(fin & np.isfinite(a))[k]
    return Comparison(output, dtypes.short_name(dt), context, float(diff.max()), float(rel.max()),
                      float(norm.max()), int(ulp_distance(af, ef, dt).max()), tol.ulps, tol.reason,
                      tuple(int(i) for i in full_idx), float(af[k]), float(ef[k]),
                      float(scale[k] if np.ndim(scale) else scale), mismatched)


def assert_close(actual, expected, output, dtype, context="reference", scale=None, what=""):
    c = compare(actual, expected, output, dtype, context, scale)
    if not c.passed:
        raise AssertionError(c.message(what))
    return c
