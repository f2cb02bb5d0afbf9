"""Benchmark shapes: descriptors, their canonical text, and named shape lists.

A descriptor is a shape and an optional layout, in either of two forms:

    32x56x56x64           sizes in memory order; the layout defaults by rank
    32x64x56x56:NCHW      (2-D: NC, 3-D: NWC, 4-D: NHWC, 5-D: NDHWC)
    n32h56w56c64          sizes named by dimension letter (n, c, d, h, w);
    n32c64h56w56:NCHW     the layout orders them (default NHWC / NDHWC / NC)

:func:`format_spec` writes the canonical letter form (``n32h56w56c64``,
``n32c64h56w56:NCHW``) and :func:`parse` reads it back to the same spec.
Files in ``bench/shapes/`` hold one descriptor per line; ``#`` starts a
comment.
"""
import os
from dataclasses import dataclass
from math import prod

from refbn.layout import DATA_FORMATS, parse_named_dims

SHAPES_DIR = os.path.join(os.path.dirname(__file__), "shapes")
_DEFAULT_BY_RANK = {2: "NC", 3: "NWC", 4: "NHWC", 5: "NDHWC"}


@dataclass(frozen=True)
class ShapeSpec:
    shape: tuple
    data_format: str

    @property
    def channels(self):
        return self.shape[DATA_FORMATS[self.data_format][1]]

    @property
    def size(self):
        return prod(self.shape)

    @property
    def channels_last_twin(self):
        """The same logical tensor in the channels-last layout of its rank."""
        if self.data_format.endswith("C") or self.data_format == "NC":
            return self
        dims = dict(zip(self.data_format.lower(), self.shape))
        fmt = _DEFAULT_BY_RANK[len(self.shape)]
        return ShapeSpec(tuple(dims[k] for k in fmt.lower()), fmt)

    def __str__(self):
        return format_spec(self)


def format_spec(spec):
    """Canonical text: letters in the layout's order, the layout only when not the default."""
    letters = "".join(f"{k}{v}" for k, v in zip(spec.data_format.lower(), spec.shape))
    default = _default_for_letters(set(spec.data_format.lower()))
    return letters if spec.data_format == default else f"{letters}:{spec.data_format}"


def _default_for_letters(letters):
    return {2: "NC", 3: "NWC", 4: "NHWC", 5: "NDHWC"}.get(len(letters))


def parse(text):
    """A :class:`ShapeSpec` from a descriptor (see the module docstring)."""
    if isinstance(text, ShapeSpec):
        return text
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"shape: expected a descriptor such as 32x56x56x64 or n32h56w56c64:NHWC, got {text!r}")
    body, _, layout = text.strip().partition(":")
    layout = layout.strip().upper() or None
    if layout is not None and layout not in DATA_FORMATS:
        raise ValueError(f"shape {text!r}: layout {layout!r} is not one of {', '.join(DATA_FORMATS)}")
    body = body.strip().lower()
    if body[:1].isdigit():
        try:
            sizes = tuple(int(s) for s in body.split("x"))
        except ValueError:
            raise ValueError(f"shape {text!r}: expected sizes joined by 'x', e.g. 32x56x56x64") from None
        layout = layout or _DEFAULT_BY_RANK.get(len(sizes))
        if layout is None or len(layout) != len(sizes):
            raise ValueError(f"shape {text!r}: {len(sizes)} sizes do not fit layout {layout}")
        shape = sizes
    else:
        named = parse_named_dims(body)
        layout = layout or _default_for_letters(set(named))
        if layout is None or set(layout.lower()) != set(named):
            raise ValueError(f"shape {text!r}: layout {layout} needs the dimensions "
                             f"{', '.join((layout or '').lower()) or '(none)'}, got {', '.join(named)}")
        shape = tuple(named[k] for k in layout.lower())
    if any(s < 1 for s in shape):
        raise ValueError(f"shape {text!r}: every size must be >= 1")
    return ShapeSpec(shape, layout)


def named_lists():
    """Names of the shape lists in bench/shapes/ (file names without .txt)."""
    return sorted(f[:-4] for f in os.listdir(SHAPES_DIR) if f.endswith(".txt"))


def load(source):
    """Specs from a shape-list name (``resnet50``), a file path, or comma-separated descriptors;
    list names and descriptors may be mixed (``resnet50,small``, ``small,2048x1024``)."""
    items = [t.strip() for t in source.split(",")] if isinstance(source, str) else []
    if len(items) > 1 and any(t in named_lists() for t in items):
        return [s for t in items if t for s in load(t)]
    path = None
    if os.path.isdir(source):
        raise ValueError(f"--shapes: expected a shape list ({', '.join(named_lists())}), a file or descriptors, "
                         f"got the folder {source!r}")
    if os.path.isfile(source):
        path = source
    elif os.path.isfile(os.path.join(SHAPES_DIR, f"{source}.txt")):
        path = os.path.join(SHAPES_DIR, f"{source}.txt")
    if path is None:
        try:
            found = [parse(t) for t in source.split(",") if t.strip()]
        except ValueError as e:
            raise ValueError(f"--shapes: {source!r} is neither a shape list ({', '.join(named_lists())}), "
                             f"a file, nor descriptors such as 32x56x56x64,2048x1024 ({e})") from None
        if not found:
            raise ValueError(f"--shapes: expected at least one shape, got {source!r}")
        return found
    specs = []
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except UnicodeDecodeError as e:
        raise ValueError(f"--shapes: {path} is not UTF-8 text (byte {e.start}: {e.object[e.start:e.start + 1]!r}); "
                         "expected one descriptor per line") from None
    except OSError as e:
        raise ValueError(f"--shapes: cannot read {path} ({e.strerror})") from None
    for number, line in enumerate(lines, 1):
        line = line.split("#", 1)[0].strip()
        if line:
            try:
                specs.append(parse(line))
            except ValueError as e:
                raise ValueError(f"--shapes: {path}, line {number}: {e}") from None
    if not specs:
        raise ValueError(f"--shapes: {path} lists no shapes")
    return specs
