"""Problem descriptors, the registry of cases, and their deterministic inputs.

A case is written as one string, benchdnn style::

    n27h131w127c6:f32:NHWC:train:eaf0.6
    n1d2h6w1c3:bf16:NCDHW:infer
    n16h64w64c4:f32:NHWC:train:mean1e4:std0.01
    n32h8w8c16:f32:NHWC:keras:k10:mom0.9

The first field is the shape, either with named dimensions (``n``, ``c``,
``d``, ``h``, ``w``, in any order) or physical (``27x131x127x6``, read in
the layout's axis order).  The other fields may come in any order:

=========================== =================================================
``f16`` ``bf16`` ``f32``    x's dtype (default f32; TF refuses f64 x)
``NHWC`` ``NCHW`` ...       layout: NHWC, NCHW, NDHWC, NCDHW (default
                            channels last)
``train`` ``infer``         one FusedBatchNormV3 call, then
                            FusedBatchNormGradV3 on the same problem
``keras`` ``tf_fused``      K training steps of a layer, then inference:
``torch`` ``flax``          multi-step parity of the moving statistics
``eaf<f>``                  exponential_avg_factor (train; default 1)
``eps<f>``                  epsilon (default: 1e-4 for ops as TF's raw op,
                            1e-3 for layers as Keras)
``mean<f>`` ``std<f>``      x ~ N(mean, std^2) (default N(0, 1))
``const``                   channel 0 of x is one constant value
``k<int>`` ``mom<f>``       steps and momentum of a parity case (default 5
                            and the convention's default)
``cumavg``                  torch parity with momentum=None (a cumulative
                            average, decay 1/t)
``seed<int>``               data seed (default 0)
=========================== =================================================

:func:`parse` and :meth:`Case.descriptor` round-trip: the descriptor is the
canonical form (dimensions in the layout's order, defaults left out).
Inputs are generated from the descriptor alone (:func:`make_inputs`), so the
TensorFlow worker process regenerates exactly the arrays refbn sees.
"""
import math
import zlib
from dataclasses import dataclass, field, replace

import numpy as np

from refbn import dtypes
from refbn.layout import parse_named_dims

OP_MODES = ("train", "infer")
PARITY_MODES = ("keras", "tf_fused", "torch", "flax")
MODES = OP_MODES + PARITY_MODES
LAYOUTS = {"NHWC": "nhwc", "NCHW": "nchw", "NDHWC": "ndhwc", "NCDHW": "ncdhw"}
DTYPES = ("f16", "bf16", "f32")
_DEFAULT_EPS = {"op": 1e-4, "parity": 1e-3}
_PARITY_MOMENTUM = {"keras": 0.99, "tf_fused": 0.99, "torch": 0.1, "flax": 0.99}


def _num(v):
    """Shortest text for a float that reads back to the same value."""
    s = f"{v:g}"
    if float(s) != v:
        s = repr(float(v))
    return s.replace("e+0", "e").replace("e+", "e").replace("e-0", "e-")


@dataclass(frozen=True)
class Case:
    dims: tuple            # ((letter, size), ...) in the layout's physical order
    dtype: str = "f32"
    layout: str = "NHWC"
    mode: str = "train"
    eaf: float = 1.0
    epsilon: float = None  # None: the mode's default
    mean: float = 0.0
    std: float = 1.0
    const: bool = False
    steps: int = 5
    momentum: float = None  # None: the convention's default
    cumulative: bool = False  # torch's momentum=None (cumulative average)
    seed: int = 0
    tags: frozenset = field(default=frozenset(), compare=False, hash=False)

    # -- derived ---------------------------------------------------------------
    @property
    def shape(self):
        return tuple(s for _, s in self.dims)

    @property
    def kind(self):
        return "op" if self.mode in OP_MODES else "parity"

    @property
    def is_training(self):
        return self.mode == "train"

    @property
    def eps(self):
        return _DEFAULT_EPS[self.kind] if self.epsilon is None else self.epsilon

    @property
    def mom(self):
        if self.cumulative:
            return None
        return _PARITY_MOMENTUM.get(self.mode) if self.momentum is None else self.momentum

    @property
    def channel_axis(self):
        return LAYOUTS[self.layout].index("c")

    @property
    def channels(self):
        return self.shape[self.channel_axis]

    @property
    def count(self):
        """n: values per channel."""
        return math.prod(self.shape) // max(self.channels, 1) if self.channels else 0

    @property
    def size(self):
        return math.prod(self.shape)

    @property
    def np_dtype(self):
        return dtypes.parse(self.dtype)

    @property
    def slow(self):
        return "slow" in self.tags

    def descriptor(self):
        parts = ["".join(f"{k}{v}" for k, v in self.dims), self.dtype, self.layout, self.mode]
        if self.eaf != 1.0:
            parts.append(f"eaf{_num(self.eaf)}")
        if self.epsilon is not None:
            parts.append(f"eps{_num(self.epsilon)}")
        if self.mean != 0.0:
            parts.append(f"mean{_num(self.mean)}")
        if self.std != 1.0:
            parts.append(f"std{_num(self.std)}")
        if self.const:
            parts.append("const")
        if self.kind == "parity":
            if self.steps != 5:
                parts.append(f"k{self.steps}")
            if self.momentum is not None:
                parts.append(f"mom{_num(self.momentum)}")
            if self.cumulative:
                parts.append("cumavg")
        if self.seed:
            parts.append(f"seed{self.seed}")
        return ":".join(parts)

    __str__ = descriptor

    def with_(self, **changes):
        return replace(self, **changes)


# -- parsing -------------------------------------------------------------------------
class DescriptorError(ValueError):
    pass


def _parse_dims(text):
    """'n27h131w127c6' -> {'n': 27, ...}; '27x131x127x6' -> [27, 131, 127, 6]."""
    t = text.strip().lower()
    if t and t[0].isdigit():
        try:
            return [int(s) for s in t.split("x")]
        except ValueError:
            raise DescriptorError(f"shape {text!r}: expected sizes joined by 'x', e.g. 27x131x127x6") from None
    try:
        return parse_named_dims(t)
    except ValueError as e:
        raise DescriptorError(str(e)) from None


def _float(token, prefix):
    try:
        v = float(token[len(prefix):])
    except ValueError:
        raise DescriptorError(f"option {token!r}: expected {prefix}<number>") from None
    if not math.isfinite(v):
        raise DescriptorError(f"option {token!r}: expected a finite number")
    return v


def _token_kind(low, tok):
    """Which field a descriptor token sets (so that a field given twice is refused, not
    silently overwritten by the last one)."""
    if low in DTYPES or low in ("float16", "bfloat16", "float32", "half", "f64", "float64"):
        return "dtype"
    if tok.upper() in LAYOUTS:
        return "layout"
    if low in MODES:
        return "mode"
    for prefix in ("eaf", "eps", "mean", "std", "mom", "seed"):
        if low.startswith(prefix):
            return prefix
    if low.startswith("k") and low[1:].isdigit():
        return "k"
    return low


def parse(text):
    """A :class:`Case` from its descriptor (see the module docstring)."""
    if isinstance(text, Case):
        return text
    if not isinstance(text, str) or not text.strip():
        raise DescriptorError(f"case: expected a descriptor such as 'n27h131w127c6:f32:NHWC:train', got {text!r}")
    fields = [f for f in text.strip().split(":")]
    dims = _parse_dims(fields[0])
    kw, layout = {}, None
    seen = {}
    for tok in fields[1:]:
        low = tok.lower()
        kind = _token_kind(low, tok)
        if kind in seen:
            raise DescriptorError(f"case {text!r}: {kind} given twice ({seen[kind]!r} and {tok!r})")
        seen[kind] = tok
        if low in DTYPES or low in ("float16", "bfloat16", "float32", "half"):
            kw["dtype"] = dtypes.short_name(low)
        elif low in ("f64", "float64"):
            raise DescriptorError(f"dtype {tok!r}: TensorFlow refuses float64 x; use f16, bf16 or f32")
        elif tok.upper() in LAYOUTS:
            layout = tok.upper()
        elif low in MODES:
            kw["mode"] = low
        elif low == "const":
            kw["const"] = True
        elif low == "cumavg":
            kw["cumulative"] = True
        elif low.startswith("eaf"):
            kw["eaf"] = _float(low, "eaf")
        elif low.startswith("eps"):
            kw["epsilon"] = _float(low, "eps")
        elif low.startswith("mean"):
            kw["mean"] = _float(low, "mean")
        elif low.startswith("std"):
            kw["std"] = _float(low, "std")
        elif low.startswith("mom"):
            kw["momentum"] = _float(low, "mom")
        elif low.startswith("seed") and low[4:].isdigit():
            kw["seed"] = int(low[4:])
        elif low.startswith("k") and low[1:].isdigit():
            kw["steps"] = int(low[1:])
        else:
            raise DescriptorError(
                f"option {tok!r} in {text!r}: expected a dtype ({', '.join(DTYPES)}), a layout "
                f"({', '.join(LAYOUTS)}), a mode ({', '.join(MODES)}) or one of eaf<f>, eps<f>, "
                f"mean<f>, std<f>, const, k<steps>, mom<f>, cumavg, seed<int>")
    if isinstance(dims, list):
        rank = len(dims)
        if layout is None:
            layout = {4: "NHWC", 5: "NDHWC"}.get(rank)
        if layout is None or len(LAYOUTS[layout]) != rank:
            raise DescriptorError(f"shape {fields[0]!r}: rank {rank} does not fit layout {layout}; "
                                  f"TensorFlow's fused kernels take 4-D (NHWC, NCHW) or 5-D (NDHWC, NCDHW)")
        ordered = tuple(zip(LAYOUTS[layout], dims))
    else:
        if layout is None:
            layout = "NDHWC" if "d" in dims else "NHWC"
        letters = LAYOUTS[layout]
        if set(dims) != set(letters):
            raise DescriptorError(f"shape {fields[0]!r}: layout {layout} needs dimensions "
                                  f"{', '.join(letters)}, got {', '.join(sorted(dims)) or 'none'}")
        ordered = tuple((k, dims[k]) for k in letters)
    case = Case(dims=ordered, layout=layout, **kw)
    _check(case, text)
    return case


def _check(case, text):
    if case.channels < 1:
        raise DescriptorError(f"{text!r}: expected at least one channel, got c{case.channels}")
    if case.eps <= 0:
        raise DescriptorError(f"{text!r}: epsilon must be > 0 (TF does not clamp it; refbn refuses 0)")
    if not 0.0 <= case.eaf <= 1.0:
        raise DescriptorError(f"{text!r}: eaf must lie in [0, 1]")
    if case.eaf != 1.0 and case.mode != "train":
        raise DescriptorError(f"{text!r}: eaf applies to mode 'train' only")
    if case.std < 0:
        raise DescriptorError(f"{text!r}: std must be >= 0")
    if case.kind == "parity":
        if case.steps < 1:
            raise DescriptorError(f"{text!r}: k must be >= 1")
        if case.count < 2:
            raise DescriptorError(f"{text!r}: a parity case needs at least 2 values per channel")
        if case.momentum is not None and not 0.0 <= case.momentum <= 1.0:
            raise DescriptorError(f"{text!r}: mom must lie in [0, 1]")
        if case.cumulative and (case.mode != "torch" or case.momentum is not None):
            raise DescriptorError(f"{text!r}: cumavg (momentum=None) applies to torch parity only, "
                                  f"without mom<f>")
    elif case.momentum is not None or case.steps != 5 or case.cumulative:
        raise DescriptorError(f"{text!r}: k and mom apply to parity modes ({', '.join(PARITY_MODES)}) only")


# -- inputs --------------------------------------------------------------------------
@dataclass
class OpInputs:
    x: np.ndarray            # x's dtype
    scale: np.ndarray        # float32
    offset: np.ndarray
    mean: np.ndarray         # running mean fed to the op (empty when ignored)
    variance: np.ndarray
    dy: np.ndarray           # x's dtype
    grad_mean: np.ndarray    # reserve_space_1 fed to the gradient (float32)
    grad_variance: np.ndarray  # reserve_space_2 fed to the gradient (float32)


def rng_for(case, stream=0):
    """A generator seeded by the descriptor and seed: identical in every process."""
    return np.random.default_rng([case.seed, zlib.crc32(case.descriptor().encode()), stream])


def _draw_x(case, rng, shape=None):
    shape = case.shape if shape is None else shape
    x = case.mean + case.std * rng.standard_normal(shape)
    if case.const and x.size:
        idx = [slice(None)] * len(shape)
        idx[case.channel_axis] = 0
        x[tuple(idx)] = case.mean + 0.3 * max(case.std, 1.0)
    return x.astype(case.np_dtype)


def channel_moments64(x, channel_axis):
    """float64 per-channel mean and biased variance (refbn.reference)."""
    from refbn import reference
    from refbn.layout import Layout

    layout = Layout.from_axis(x.shape, channel_axis)
    if layout.count == 0:
        c = layout.channels
        return np.full(c, np.nan), np.full(c, np.nan)
    return reference.moments(layout.to3(x), 1)


def make_inputs(case):
    """The arrays of an op case (train/infer), the same in every process."""
    rng = rng_for(case)
    C = case.channels
    x = _draw_x(case, rng)
    scale = rng.uniform(0.5, 1.5, C).astype(np.float32)
    offset = (0.5 * rng.standard_normal(C)).astype(np.float32)
    run_mean = (case.mean + 0.1 * case.std * rng.standard_normal(C)).astype(np.float32)
    run_var = (max(case.std, 1e-3) ** 2 * rng.uniform(0.5, 1.5, C)).astype(np.float32)
    dy = rng.standard_normal(case.shape).astype(case.np_dtype)
    if case.mode == "train":
        if case.eaf == 1.0:  # TF ignores them; pass empty vectors as Keras/TF do
            mean_in, var_in = np.zeros(0, np.float32), np.zeros(0, np.float32)
        else:
            mean_in, var_in = run_mean, run_var
        # the gradient gets the forward statistics of the float64 truth, rounded to float32,
        # so that TF and refbn see identical arguments
        m64, v64 = channel_moments64(np.asarray(x, np.float64), case.channel_axis)
        if case.count == 0:
            m64, v64 = np.zeros(C), np.ones(C)
        g_mean, g_var = m64.astype(np.float32), v64.astype(np.float32)
    else:
        mean_in, var_in = run_mean, run_var
        g_mean, g_var = run_mean, run_var
    return OpInputs(x, scale, offset, mean_in, var_in, dy, g_mean, g_var)


def parity_batches(case):
    """K training batches and one inference batch of a parity case (x's dtype)."""
    rng = rng_for(case)
    batches = [_draw_x(case, rng) for _ in range(case.steps)]
    return batches, _draw_x(case, rng)


# -- the registry ---------------------------------------------------------------------
def _c(text, *tags):
    return parse(text).with_(tags=frozenset(tags))


def _physical(shape, layout, dtype, mode, *opts):
    dims = "x".join(map(str, shape))
    return ":".join([dims, dtype, layout, mode, *opts])


def _tf_matrix():
    """TF's own test matrix (nn_fused_batchnorm_test.py): the shapes are physical."""
    out = []
    fwd4 = [(1, 1, 6, 1), (1, 1, 6, 2), (1, 2, 1, 6), (27, 131, 127, 6), (0, 131, 127, 6), (1, 1, 1, 1)]
    fwd5 = [(1, 2, 6, 1, 3)]
    for shapes, layouts in ((fwd4, ("NHWC", "NCHW")), (fwd5, ("NDHWC", "NCDHW"))):
        for shape in shapes:
            for layout in layouts:
                for dt in DTYPES:
                    for mode, opts in (("train", ()), ("train", ("eaf0.6",)), ("infer", ())):
                        big = math.prod(shape) > 1_000_000
                        out.append(_c(_physical(shape, layout, dt, mode, *opts), "tf_matrix",
                                      *(("slow",) if big else ())))
    for shape in [(5, 7, 11, 4), (0, 7, 11, 4)]:  # gradient shapes
        for layout in ("NHWC", "NCHW"):
            for dt in DTYPES:
                for mode in ("train", "infer"):
                    out.append(_c(_physical(shape, layout, dt, mode), "tf_matrix", "grad_shape"))
    return out


#: BatchNorm activations of ResNet-50 (H, W, C) at 224x224.  Keras' ResNet50
#: (v1) strides in the first 1x1 convolution of a stage; torchvision's v1.5
#: strides in the 3x3, which adds the three 'v1.5' shapes.
RESNET50_BN_SHAPES = [
    (112, 112, 64, "conv1"),
    (56, 56, 64, "conv2 1x1/3x3"), (56, 56, 256, "conv2 out"),
    (28, 28, 128, "conv3 1x1/3x3"), (28, 28, 512, "conv3 out"),
    (14, 14, 256, "conv4 1x1/3x3"), (14, 14, 1024, "conv4 out"),
    (7, 7, 512, "conv5 1x1/3x3"), (7, 7, 2048, "conv5 out"),
    (56, 56, 128, "v1.5 conv3 first 1x1"), (28, 28, 256, "v1.5 conv4 first 1x1"),
    (14, 14, 512, "v1.5 conv5 first 1x1"),
]


def _resnet50(batch=32):
    out = []
    for h, w, c, _ in RESNET50_BN_SHAPES:
        for mode in ("train", "infer"):
            out.append(_c(f"n{batch}h{h}w{w}c{c}:f32:NHWC:{mode}", "resnet50", "slow"))
    return out


def _edge():
    e = [
        # N*H*W == 1: the unbiased variance is 0 (TF: n / max(n-1, 1)), y == offset
        ("n1h1w1c8:f32:NHWC:train", ()), ("n1h1w1c8:f32:NHWC:train:eaf0.6", ()),
        ("n1c8h1w1:bf16:NCHW:train", ()), ("n1d1h1w1c8:f16:NDHWC:train", ()),
        # a constant channel (variance 0 in channel 0)
        ("n4h8w8c6:f32:NHWC:train:const", ()), ("n4h8w8c6:bf16:NHWC:train:const", ()),
        ("n4c6h8w8:f16:NCHW:train:const", ()), ("n4h8w8c6:f32:NHWC:train:const:mean3", ()),
        # large mean offsets (FACTS: TF's variance error up to 19 / 4e4 relative)
        ("n16h64w64c4:f32:NHWC:train:mean1e4:std0.01", ("offset",)),
        ("n16h64w64c4:f32:NHWC:train:mean1e6", ("offset", "slow")),
        ("n16h64w64c4:f32:NHWC:infer:mean1e4:std0.01", ("offset", "slow")),
        ("n4h16w16c8:f32:NHWC:train:mean100", ("offset",)),
        # a large reduction: n = 2^24 values in one channel
        ("n256h256w256c1:f32:NHWC:train", ("large_n", "slow")),
        ("n256h256w256c1:f32:NHWC:train:mean100", ("large_n", "offset", "slow")),
        # other epsilons
        ("n2h3w4c5:f32:NHWC:train:eps1e-3", ()), ("n2h3w4c5:f32:NHWC:train:eps1e-6:std0.001", ()),
        ("n2h3w4c5:f32:NHWC:infer:eps1e-6", ()),
    ]
    return [_c(d, "edge", *t) for d, t in e]


def _parity():
    p = [
        ("n16h4w4c8:f32:NHWC:keras:k20:mean3:std2", ()),
        ("n16h4w4c8:f32:NHWC:keras:k20:mom0.9:mean3:std2", ()),
        ("n16h4w4c8:f32:NHWC:tf_fused:k20:mean3:std2", ()),
        ("n16h4w4c8:f32:NHWC:tf_fused:k20:mom0.9:mean3:std2", ()),
        ("n16c8h4w4:f32:NCHW:torch:k20:mean3:std2", ()),
        ("n8h4w4c3:bf16:NHWC:keras:k10:mean3:std2", ()),
        ("n64h14w14c32:f32:NHWC:keras:k50:mean3:std2", ("slow",)),
        ("n64h14w14c32:f32:NHWC:tf_fused:k50:mean3:std2", ("slow",)),
    ]
    return [_c(d, "parity", *t) for d, t in p]


def _frameworks():
    """Parity cases of the other frameworks (refbn verify --framework; compare/frameworks.py)."""
    p = [
        ("n16c8h1w4:f32:NCHW:torch:k20:mean3:std2", ()),          # nn.BatchNorm1d on (N, C, W)
        ("n4c3d2h4w4:f32:NCDHW:torch:k10:mean3:std2", ()),        # nn.BatchNorm3d
        ("n16c8h4w4:f32:NCHW:torch:k20:cumavg:mean3:std2", ()),   # momentum=None
        ("n16h4w4c8:f32:NHWC:flax:k20:eps1e-5:mean3:std2", ()),
        ("n16h4w4c8:f32:NHWC:flax:k20:mom0.9:eps1e-5:mean3:std2", ()),
        ("n16c8h4w4:f32:NCHW:keras:k20:mean3:std2", ()),
    ]
    return [_c(d, "frameworks", *t) for d, t in p]


def _build_registry():
    cases, seen = [], set()
    for c in _tf_matrix() + _resnet50() + _edge() + _parity():
        key = c.descriptor()
        if key in seen:
            continue
        seen.add(key)
        cases.append(c)
    return cases


REGISTRY = _build_registry()
#: cases only ``refbn verify --framework`` adds (TF runs those of its modes too)
FRAMEWORK_CASES = [c for c in _frameworks() if c not in REGISTRY]
SUITES = ("tf_matrix", "grad_shape", "resnet50", "edge", "offset", "large_n", "parity", "frameworks")


def registry(include_slow=True, suite=None, frameworks=False):
    """The registered cases (optionally without the slow ones, or one suite's); frameworks:
    with the cases of the other frameworks (the 'frameworks' suite) after TF's."""
    out = []
    for c in REGISTRY + (FRAMEWORK_CASES if frameworks or suite == "frameworks" else []):
        if not include_slow and c.slow:
            continue
        if suite is not None and suite not in c.tags:
            continue
        out.append(c)
    return out


def lookup(text):
    """A registered case (with its tags) for a descriptor, or a new untagged case."""
    case = parse(text)
    for c in REGISTRY + FRAMEWORK_CASES:
        if c == case:
            return c
    return case
