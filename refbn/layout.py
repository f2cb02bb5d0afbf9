"""Layouts: the one place that knows where the channel axis is.

Every backend works on a canonical 3-D view ``(outer, C, inner)`` of x:
channels-last layouts (NC, NHWC, NDHWC) become ``(N*H*W, C, 1)`` and
channels-first layouts (NCHW, NCDHW) become ``(N, C, H*W)``.  Both are plain
reshapes of a C-contiguous array, so no transpose is ever made.  Statistics
reduce over axes 0 and 2 of the view; per-channel vectors broadcast as
``v[None, :, None]``.
"""
from dataclasses import dataclass
from functools import cached_property
from math import prod

import numpy as np

#: data_format -> (rank, channel axis)
DATA_FORMATS = {
    "NC": (2, 1),
    "NWC": (3, 2),
    "NCW": (3, 1),
    "NHWC": (4, 3),
    "NCHW": (4, 1),
    "NDHWC": (5, 4),
    "NCDHW": (5, 1),
}
_BY_RANK_CHANNELS_LAST = {2: "NC", 3: "NWC", 4: "NHWC", 5: "NDHWC"}


def channel_axis(data_format, ndim, x_name="x"):
    """The channel axis of a ``data_format``, checking the rank of x against it."""
    if isinstance(data_format, bytes):
        try:
            data_format = data_format.decode("ascii")
        except UnicodeDecodeError:
            raise ValueError(f"data_format: expected one of {', '.join(DATA_FORMATS)}, "
                             f"got the non-ASCII bytes {data_format!r}") from None
    if not isinstance(data_format, str) or data_format not in DATA_FORMATS:
        raise ValueError(
            f"data_format: expected one of {', '.join(DATA_FORMATS)}, got {data_format!r}")
    rank, axis = DATA_FORMATS[data_format]
    if ndim != rank:
        hint = ""
        if ndim in _BY_RANK_CHANNELS_LAST:
            hint = f"; for rank-{ndim} input use data_format={_BY_RANK_CHANNELS_LAST[ndim]!r}"
            if ndim >= 3:
                hint += " (channels last) or the channels-first form"
        raise ValueError(
            f"{x_name}: data_format={data_format!r} expects a rank-{rank} tensor, "
            f"got rank {ndim}{hint}")
    return axis


_RECENT = {}        # (shape, data_format, x_name) -> Layout, for the validated ones
_RECENT_MAX = 256


@dataclass(frozen=True)
class Layout:
    """Shape bookkeeping for one call: original shape and channel axis."""
    shape: tuple
    axis: int

    def __post_init__(self):
        if self.shape[self.axis] == 0:
            raise ValueError(f"x: expected at least 1 channel on axis {self.axis}, got shape {self.shape} "
                             f"(0 channels: there is nothing to normalise)")

    @classmethod
    def from_data_format(cls, shape, data_format, x_name="x"):
        key = (shape, data_format, x_name)
        try:
            return _RECENT[key]   # a frozen Layout per shape: a training loop asks for the same ones
        except (KeyError, TypeError):   # TypeError: an unhashable data_format, refused below
            pass
        layout = cls(tuple(shape), channel_axis(data_format, len(shape), x_name))
        if len(_RECENT) >= _RECENT_MAX:
            _RECENT.clear()
        if type(shape) is tuple:
            _RECENT[key] = layout
        return layout

    @classmethod
    def from_axis(cls, shape, axis):
        shape = tuple(shape)
        if not isinstance(axis, (int, np.integer)) or isinstance(axis, bool):
            raise TypeError(f"axis: expected an int, got {type(axis).__name__}")
        if len(shape) < 1 or not -len(shape) <= axis < len(shape):
            raise ValueError(f"axis: expected an axis of a rank-{len(shape)} input, got {axis}")
        return cls(shape, int(axis) % len(shape))

    @property
    def channels(self):
        return self.shape[self.axis]

    # cached (computed once per call's Layout: they are asked for many times per call)
    @cached_property
    def outer(self):
        return prod(self.shape[:self.axis])

    @cached_property
    def inner(self):
        return prod(self.shape[self.axis + 1:])

    @cached_property
    def count(self):
        """n: how many values each channel's statistics reduce over."""
        return self.outer * self.inner

    @property
    def reduction_axes(self):
        return tuple(i for i in range(len(self.shape)) if i != self.axis)

    @cached_property
    def shape3(self):
        return (self.outer, self.channels, self.inner)

    def to3(self, a):
        """Canonical (outer, C, inner) view of a (C-contiguous copy if needed)."""
        if type(a) is np.ndarray and a.flags.c_contiguous:
            return a.reshape(self.shape3)
        return np.ascontiguousarray(a).reshape(self.shape3)

    def from3(self, a3):
        return a3.reshape(self.shape)

    def broadcastable(self, v):
        """Reshape a per-channel vector so that it broadcasts against x."""
        shape = [1] * len(self.shape)
        shape[self.axis] = self.channels
        return np.asarray(v).reshape(shape)

    def describe(self):
        return "x".join(map(str, self.shape)) + f" (channel axis {self.axis})"


DIMENSION_LETTERS = "ncdhw"


def parse_named_dims(text):
    """Sizes from a benchdnn-style shape, 'n32h56w56c64' -> {'n': 32, 'h': 56, 'w': 56, 'c': 64}.

    Letters are n, c, d, h, w in any order, each followed by its size; the
    caller places them in a layout (channels last or first).
    """
    body = text.strip().lower()
    named, i = {}, 0
    while i < len(body):
        letter, j = body[i], i + 1
        while j < len(body) and body[j].isdecimal() and body[j].isascii():
            j += 1
        if letter not in DIMENSION_LETTERS or j == i + 1:
            raise ValueError(f"shape {text!r}: expected letters n, c, d, h, w each followed by a size, "
                             f"e.g. n32h56w56c64")
        if letter in named:
            raise ValueError(f"shape {text!r}: dimension {letter!r} given twice")
        named[letter] = int(body[i + 1:j])
        i = j
    return named
