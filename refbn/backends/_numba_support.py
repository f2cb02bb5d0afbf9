"""What the numba kernels need beyond numba: half-precision values and a prefetch hint.

float16 / bfloat16 inside numba kernels, which support neither type.

Half-precision arrays reach the kernels as uint16 views of their bits, with
a ``kind`` flag (BF16 or F16).  ``decode`` turns one stored value (a float,
or the bits of a half) into float64; ``encode`` rounds a float64 to the
array's storage type:

* bfloat16 -> float32 is the bits shifted left by 16; float32 -> bfloat16
  rounds to nearest even on the dropped 16 bits (NaN stays NaN).
* float16 <-> float32 goes through LLVM's ``half`` type: the CPU's own
  conversion instructions (F16C on x86-64, which every AVX2 CPU has), exact
  one way and rounded to nearest even the other, vectorised with the loops.
  (An integer emulation ran 3-6x slower than torch's float16 kernels.)

float64 -> half goes through float32, i.e. it rounds twice; the second
rounding can differ from a single rounding only on exact ties of the half
format, by one half-ulp (covered by the numba tolerances).
"""
import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

NATIVE, BF16, F16 = 0, 1, 2


@intrinsic
def _f32_from_bits(typingctx, bits):
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, sig, args):      # the low 32 bits, reinterpreted
        low = args[0]
        if bits.bitwidth != 32:
            low = builder.trunc(low, ir.IntType(32))
        return builder.bitcast(low, ir.FloatType())
    return types.float32(bits), codegen


@intrinsic
def _bits_from_f32(typingctx, value):
    if value != types.float32:
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.IntType(32))
    return types.uint32(value), codegen


@intrinsic
def _f32_from_f16_bits(typingctx, bits):
    """float16 bits -> float32 through LLVM's ``half`` type: one hardware conversion (F16C's
    VCVTPH2PS on x86-64, FCVT on aarch64), which LLVM vectorises; exact, subnormals included."""
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        low = args[0]
        if bits.bitwidth != 16:
            low = builder.trunc(low, ir.IntType(16))
        return builder.fpext(builder.bitcast(low, ir.HalfType()), ir.FloatType())
    return types.float32(bits), codegen


@intrinsic
def _f16_bits_from_f32(typingctx, value):
    """float32 -> float16 bits, rounded to nearest even with overflow to Inf (VCVTPS2PH)."""
    if value != types.float32:
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))
    return types.uint16(value), codegen


@njit(inline="always")
def _f32_to_bf16(value):
    f = _bits_from_f32(value)
    if (f & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):       # NaN: keep it quiet
        return np.uint16((f >> np.uint32(16)) | np.uint32(0x40))
    return np.uint16((f + np.uint32(0x7FFF) + ((f >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))


def decode(value, kind):
    """float64 of a stored value (a float, or the bits of a half of the given kind)."""


@overload(decode)
def _decode(value, kind):
    if isinstance(value, types.Integer):
        def impl(value, kind):
            if kind == BF16:
                return np.float64(_f32_from_bits(np.uint32(value) << np.uint32(16)))
            return np.float64(_f32_from_f16_bits(value))
        return impl
    if isinstance(value, types.Float):
        return lambda value, kind: np.float64(value)
    return None


def encode(value, like, kind):
    """A float64 rounded to the element type of the array ``like``."""


@overload(encode)
def _encode(value, like, kind):
    dt = like.dtype
    if isinstance(dt, types.Integer):
        def impl(value, like, kind):
            if kind == BF16:
                return _f32_to_bf16(np.float32(value))
            return _f16_bits_from_f32(np.float32(value))
        return impl
    if dt == types.float32:
        return lambda value, like, kind: np.float32(value)
    if dt == types.float64:
        return lambda value, like, kind: np.float64(value)
    return None


def folds(a):
    """True (a compile-time constant) where the elementwise passes evaluate the folded forms of
    refbn.reference (one operation fewer per value): arrays stored narrower than float64."""


@overload(folds)
def _folds(a):
    narrow = a.dtype != types.float64
    return lambda a: narrow


def storage(a):
    """(array the kernels can take, kind): half arrays become uint16 views."""
    if a.dtype.itemsize == 2:
        return a.view(np.uint16), (F16 if a.dtype == np.float16 else BF16)
    return a, NATIVE


@intrinsic
def prefetch(typingctx, array, offset):
    """Hint the cache to fetch array's element ``offset`` (flat, in elements) for reading.

    A prefetch never faults, so offsets past the end are harmless; LLVM
    emits PREFETCHT0 on x86 (nothing where the target has no prefetch)."""
    if not isinstance(array, types.Array) or not isinstance(offset, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        ary = context.make_array(sig.args[0])(context, builder, args[0])
        ptr = builder.bitcast(builder.gep(ary.data, [args[1]]), ir.IntType(8).as_pointer())
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [ir.IntType(8).as_pointer(), i32, i32, i32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0i8")
        builder.call(fn, [ptr, ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()
    return types.void(array, offset), codegen


# -- the compiled cache follows the maths ------------------------------------------------------
def maths_stamp(modules):
    """A hash of the source files of ``modules``: those the kernels compile from besides their
    own file (whose stamp numba already checks): refbn.reference and this module."""
    import hashlib
    h = hashlib.sha256()
    for m in modules:
        with open(m.__file__, "rb") as f:
            h.update(f.read())
    return h.hexdigest()


def install_cache_locator(kernel_file, stamp):
    """Make numba's on-disk cache of functions defined in ``kernel_file`` depend on ``stamp``.

    numba checks a cached function against its own source file's modification time and size
    only, so an edit of refbn/reference.py (whose functions the kernels inline) would leave a
    warm cache with the old maths.  This locator wraps numba's usual ones for that file and adds
    the hash of every module the kernels compile from to the stamp numba compares: any edit
    there makes the cache stale, and numba recompiles.
    """
    import os

    from numba.core import caching

    kernel_file = os.path.realpath(kernel_file)

    class MathsStampLocator(caching._CacheLocator):
        @classmethod
        def from_function(cls, py_func, py_file):
            if os.path.realpath(py_file) != kernel_file:
                return None
            for other in caching.CacheImpl._locator_classes:
                if other is cls:
                    continue
                loc = other.from_function(py_func, py_file)
                if loc is not None:
                    base = loc.get_source_stamp
                    loc.get_source_stamp = lambda: (base(), stamp)
                    return loc
            return None

        def ensure_cache_path(self):  # pragma: no cover - instances are the wrapped locators
            raise NotImplementedError

        def get_cache_path(self):  # pragma: no cover
            raise NotImplementedError

        def get_source_stamp(self):  # pragma: no cover
            raise NotImplementedError

        def get_disambiguator(self):  # pragma: no cover
            raise NotImplementedError

    classes = caching.CacheImpl._locator_classes
    classes[:] = [c for c in classes if getattr(c, "__name__", "") != "MathsStampLocator"]
    classes.insert(0, MathsStampLocator)
