"""Which dtypes refbn accepts, and which dtype each output takes (as in TF).

x may be float16, bfloat16 (ml_dtypes), float32 or float64.  Statistics are
float32 for every x dtype except float64 (TF computes them in float32 for
half-precision inputs; TF refuses float64 x, refbn keeps it as float64).
"""
import numpy as np

float16 = np.dtype(np.float16)
float32 = np.dtype(np.float32)
float64 = np.dtype(np.float64)

SUPPORTED_NAMES = "float16, bfloat16, float32 or float64"
_SHORT = {"float16": "f16", "bfloat16": "bf16", "float32": "f32", "float64": "f64"}
_BY_NAME = {"f16": "float16", "float16": "float16", "half": "float16", "bf16": "bfloat16",
            "bfloat16": "bfloat16", "f32": "float32", "float32": "float32", "f64": "float64",
            "float64": "float64"}


def __getattr__(name):
    """``bfloat16`` and ``SUPPORTED`` load ml_dtypes on first use (it costs ~1 s to import, and
    ``import refbn`` should not pay for it: an array that is bfloat16 already loaded it)."""
    if name == "bfloat16":
        import ml_dtypes
        globals()["bfloat16"] = np.dtype(ml_dtypes.bfloat16)
        return globals()["bfloat16"]
    if name == "SUPPORTED":
        return (float16, __getattr__("bfloat16"), float32, float64)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def is_supported(dtype):
    """Whether x may have this dtype (checked by name: no ml_dtypes import for the common case)."""
    dtype = np.dtype(dtype)
    return dtype.name in _SHORT and (dtype.name != "bfloat16" or dtype.type.__module__.startswith("ml_dtypes"))


def parse(name):
    """A dtype from a short or long name (``f32``, ``bfloat16``) or a dtype."""
    if isinstance(name, str):
        try:
            long = _BY_NAME[name.lower()]
        except KeyError:
            raise ValueError(f"dtype: expected one of {sorted(_BY_NAME)}, got {name!r}") from None
        return __getattr__("bfloat16") if long == "bfloat16" else np.dtype(long)
    return np.dtype(name)


def short_name(dtype):
    """'f16', 'bf16', 'f32' or 'f64' for a dtype or any of its names."""
    if isinstance(dtype, str) and dtype.lower() in _BY_NAME:
        return _SHORT[_BY_NAME[dtype.lower()]]
    return _SHORT[np.dtype(dtype).name]


def stats_dtype(x_dtype):
    """dtype of mean/variance/scale/offset and their gradients for a given x dtype."""
    return float64 if np.dtype(x_dtype) == float64 else float32


def machine_epsilon(dtype):
    """Distance from 1.0 to the next representable number (2**-10 for float16, ...)."""
    dtype = np.dtype(dtype)
    if dtype.name == "bfloat16":
        return 2.0 ** -7
    return float(np.finfo(dtype).eps)


def store(dst, src):
    """Write float64 values into ``dst`` (any supported dtype), rounded once to nearest-even.

    numpy rounds float64 to float32 and float16 directly, but ml_dtypes before 0.7
    converts float64 to bfloat16 through float32, rounding twice: 1 + 2**-8 + 2**-30
    becomes 1 instead of 1 + 2**-7 (0.7 rounds once).  refbn does not rely on either.  For bfloat16 the intermediate float32 is therefore
    rounded to odd (truncate toward zero, then set the last bit when inexact),
    which makes the second rounding exact (float32 keeps 16 more bits than
    bfloat16, far more than the 2 that round-to-odd needs).
    """
    if dst.dtype.name != "bfloat16":
        with np.errstate(over="ignore"):  # a float16 y may overflow to Inf, as TF's cast does
            dst[...] = src
        return dst
    src = np.asarray(src, dtype=np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        f = src.astype(np.float32)
        f = np.where(np.abs(f.astype(np.float64)) > np.abs(src), np.nextafter(f, np.float32(0)), f)
        inexact = (f.astype(np.float64) != src) & ~np.isnan(src)
        odd = (f.view(np.uint32) | inexact.astype(np.uint32)).view(np.float32)
    dst[...] = odd.astype(dst.dtype)
    return dst
