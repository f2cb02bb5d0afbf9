"""Which dtypes refbn accepts, and which dtype each output takes (as in TF).

x may be float16, bfloat16 (ml_dtypes), float32 or float64.  Statistics are
float32 for every x dtype except float64 (TF computes them in float32 for
half-precision inputs; TF refuses float64 x, refbn keeps it as float64).
"""
import ml_dtypes
import numpy as np

bfloat16 = np.dtype(ml_dtypes.bfloat16)
float16 = np.dtype(np.float16)
float32 = np.dtype(np.float32)
float64 = np.dtype(np.float64)

SUPPORTED = (float16, bfloat16, float32, float64)
SUPPORTED_NAMES = "float16, bfloat16, float32 or float64"

_BY_NAME = {"f16": float16, "float16": float16, "half": float16,
            "bf16": bfloat16, "bfloat16": bfloat16,
            "f32": float32, "float32": float32,
            "f64": float64, "float64": float64}


def parse(name):
    """A dtype from a short or long name (``f32``, ``bfloat16``) or a dtype."""
    if isinstance(name, str):
        try:
            return _BY_NAME[name.lower()]
        except KeyError:
            raise ValueError(f"dtype: expected one of {sorted(_BY_NAME)}, got {name!r}") from None
    return np.dtype(name)


def short_name(dtype):
    return {float16: "f16", bfloat16: "bf16", float32: "f32", float64: "f64"}[np.dtype(dtype)]


def stats_dtype(x_dtype):
    """dtype of mean/variance/scale/offset and their gradients for a given x dtype."""
    return float64 if np.dtype(x_dtype) == float64 else float32


def machine_epsilon(dtype):
    """Distance from 1.0 to the next representable number (2**-10 for float16, ...)."""
    return float(ml_dtypes.finfo(np.dtype(dtype)).eps)
