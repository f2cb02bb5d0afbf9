"""Reports for ``refbn verify``: a rich table, plain lines, Markdown or JSON.

Every format gives, for every check, its case, kernel, verdict, worst output
and that output's errors; no field is cut or dropped to fit a width:

``table``
    rich tables sized to the console.  When the width is short the less
    important columns are left out first (TF↔truth, refbn↔truth, closer,
    notes, in that order; the caption names them) and the case and kernel
    cells wrap at ``:`` and ``->``; verdict, worst output and refbn↔TF
    eps / allowed are always there.
``plain``
    one record per check: space-separated fields in a fixed order, aligned,
    never cut.  A record wider than the console continues on an indented
    line, between fields (verdict, worst output and its errors come first).
``markdown``
    GitHub tables.
``json``
    the payload ``--json FILE`` writes (:func:`payload`).

Text that comes from results (descriptors, kernels, notes) is never read as
rich markup: ``[onednn]`` prints as ``[onednn]``.  Every report ends with one
plain line that starts with ``OK:`` or ``FAIL:`` (:func:`final_line`).
"""
import json
import platform
import re
import textwrap
from collections import Counter
from dataclasses import dataclass

from rich import box
from rich.cells import cell_len
from rich.console import Console
from rich.table import Table
from rich.text import Text

from . import divergences as div

FORMATS = ("table", "plain", "markdown", "json")
STYLE = {"exact": "bold green", "close": "green", "divergence": "yellow", "unsupported": "dim",
         "not installed": "dim", "FAIL": "bold red", "match": "green"}
VERDICTS = ("exact", "close", "divergence", "unsupported", "not installed", "FAIL")
_DIV_SHORT = {div.ILL_CONDITIONED.name: "TF sums ill-conditioned",
              div.EMPTY_BATCH_TRAINING.name: "N == 0",
              div.INFERENCE_RESERVE_SPACES.name: "reserve spaces not compared",
              div.EIGEN_GRAD_NCHW_INFERENCE.name: "grad unsupported by TF"}
TITLE = "refbn vs TensorFlow"
#: the title when other frameworks ran too (the kernel column then names the implementation)
TITLE_FRAMEWORKS = "refbn vs TensorFlow and the other frameworks (kernel: TF's kernel or the framework's implementation; TF: that one)"
JSON_WHERE = "each result's repro in the JSON"  # where a FAIL's repro command is, in JSON output


def fmt_eps(v):
    """An error in eps, in two significant digits."""
    if v == 0:
        return "0"
    return f"{v:.2g}" if v < 1e4 else f"{v:.1e}"


def ratio_text(cmp):
    """A comparison's error against what it is allowed, both in eps: '0.98/16'."""
    return f"{fmt_eps(cmp.max_ulps)}/{cmp.allowed_ulps:.4g}"


def _plural(n, word):
    return f"{n} {word}" + ("" if n == 1 else "s")


# -- what a report shows ---------------------------------------------------------------------
@dataclass(eq=False)
class Column:
    """One column of a report table; cells are plain strings (never markup)."""
    header: str
    cells: list
    plain: str = ""        # header in plain output (no spaces); default: header with '_' for ' '
    justify: str = "left"
    rank: int = 0          # 0: always shown; 1, 2, ...: the order in which the rest are kept
    breaks: str = ""       # a cell may wrap after these characters (rich tables); "": never wraps
    min_width: int = 0     # narrowest a wrapping column gets (longest unbreakable piece at least)
    comfort: int = 0       # a wrapping column's width before less important columns are added
    styles: list = None    # a rich style per cell
    tail: bool = False     # free text (plain: written after the fixed fields, not padded)

    @property
    def plain_header(self):
        return self.plain or self.header.replace(" ", "_")

    def cell_width(self):
        return max((cell_len(line) for c in self.cells for line in c.split("\n")), default=0)

    def floor(self):
        """The narrowest width at which no cell is cut and the header wraps between words."""
        head = max((cell_len(w) for w in self.header.split()), default=0)
        if not self.breaks:
            return max(head, self.cell_width())
        piece = max((cell_len(p) for c in self.cells for p in _pieces(c, self.breaks)), default=0)
        return max(head, min(self.cell_width(), max(self.min_width, piece)))


def kernel_label(r, show_backend=False):
    """The TF kernel that ran ('onednn->eigen': asked for oneDNN, TF ran Eigen), and the backend."""
    k = r.kernel_used if r.kernel_used in ("", r.kernel) else f"{r.kernel}->{r.kernel_used}"
    return f"{k or r.kernel} / {r.backend}" if show_backend else (k or r.kernel)


def check_fields(r, show_backend=False):
    """A check's fields as strings: case, kernel, verdict, worst output, its refbn↔TF error and
    allowance (eps), TF↔truth (eps, output), refbn↔truth (eps), closer and notes."""
    w = r.worst("refbn_vs_tf")
    if w is None:
        errors = ("-", "-", "-", "-", "-")
    else:
        wt, wr = r.worst("tf_vs_truth"), r.worst("refbn_vs_truth")
        errors = (w.output, ratio_text(w.refbn_vs_tf), f"{fmt_eps(wt.tf_vs_truth.max_ulps)} ({wt.output})",
                  fmt_eps(wr.refbn_vs_truth.max_ulps), w.closer)
    notes = [_DIV_SHORT.get(d, d) for d in r.divergences]
    notes += [n for n in r.notes if "not run" in n]
    return (r.descriptor, kernel_label(r, show_backend), r.verdict, *errors, "; ".join(dict.fromkeys(notes)))


def results_columns(results):
    show_backend = len({r.backend for r in results}) > 1
    rows = [check_fields(r, show_backend) for r in results]
    col = list(zip(*rows)) if rows else [()] * 9
    return [Column("case", list(col[0]), breaks=":", min_width=14, comfort=24),
            Column("kernel", list(col[1]), breaks="> "),
            Column("verdict", list(col[2]), styles=[STYLE.get(v, "") for v in col[2]]),
            Column("worst output", list(col[3]), plain="worst"),
            Column("refbn↔TF eps / allowed", list(col[4]), plain="refbn~TF", justify="right"),
            Column("TF↔truth eps", list(col[5]), plain="TF~truth", justify="right", rank=1, breaks=" "),
            Column("refbn↔truth eps", list(col[6]), plain="refbn~truth", justify="right", rank=2),
            Column("closer", list(col[7]), rank=3),
            Column("notes", list(col[8]), rank=4, breaks=" ", min_width=20, tail=True)]


def detail_title(r):
    used = r.kernel_used or r.kernel
    asked = "" if used == r.kernel else f" (asked for {r.kernel})"
    return f"{r.descriptor}  TF kernel {used}{asked}, refbn backend {r.backend}: {r.verdict}"


def detail_columns(r):
    o_ = r.outputs

    def col(header, fn, rank=0, plain=""):
        return Column(header, [fn(o) for o in o_], plain=plain, justify="right", rank=rank)

    return [Column("output", [o.output for o in o_]),
            Column("dtype", [o.dtype for o in o_], rank=1),
            col("refbn↔TF eps / allowed", lambda o: ratio_text(o.refbn_vs_tf), plain="refbn~TF"),
            col("refbn↔TF abs", lambda o: f"{o.refbn_vs_tf.max_abs:.3g}", 2, "refbn~TF:abs"),
            col("refbn↔TF rel", lambda o: f"{o.refbn_vs_tf.max_rel:.3g}", 4, "refbn~TF:rel"),
            col("refbn↔TF ulps", lambda o: str(o.refbn_vs_tf.max_ulp_distance), 3, "refbn~TF:ulps"),
            col("TF↔truth eps", lambda o: fmt_eps(o.tf_vs_truth.max_ulps), plain="TF~truth"),
            col("TF↔truth abs", lambda o: f"{o.tf_vs_truth.max_abs:.3g}", 2, "TF~truth:abs"),
            col("TF↔truth rel", lambda o: f"{o.tf_vs_truth.max_rel:.3g}", 4, "TF~truth:rel"),
            col("TF↔truth ulps", lambda o: str(o.tf_vs_truth.max_ulp_distance), 3, "TF~truth:ulps"),
            col("refbn↔truth eps", lambda o: fmt_eps(o.refbn_vs_truth.max_ulps), plain="refbn~truth"),
            col("refbn↔truth abs", lambda o: f"{o.refbn_vs_truth.max_abs:.3g}", 2, "refbn~truth:abs"),
            col("refbn↔truth ulps", lambda o: str(o.refbn_vs_truth.max_ulp_distance), 3, "refbn~truth:ulps"),
            Column("closer", [o.closer for o in o_])]


GAP_TITLE = "TF oneDNN vs TF Eigen (same inputs)"


def kernel_gap_columns(results):
    """How far TF's two CPU kernels are from each other, per output (cases where both ran)."""
    per = {}
    seen = set()
    for r in results:
        if not r.kernel_gap or r.descriptor in seen or r.case.dtype == "f16":
            continue  # float16 runs Eigen in both processes: nothing to compare
        seen.add(r.descriptor)
        for o, (ulps, dist) in r.kernel_gap.items():
            p = per.setdefault(o, {"n": 0, "same": 0, "max": 0.0, "dist": 0, "worst": ""})
            p["n"] += 1
            p["same"] += dist == 0
            if ulps > p["max"]:
                p["max"], p["worst"] = ulps, r.descriptor
            p["dist"] = max(p["dist"], dist)
    if not per:
        return None
    ps = list(per.values())
    return [Column("output", list(per)),
            Column("cases", [str(p["n"]) for p in ps], justify="right"),
            Column("bit-identical", [str(p["same"]) for p in ps], justify="right"),
            Column("max diff eps", [fmt_eps(p["max"]) for p in ps], justify="right"),
            Column("max ulps apart", [str(p["dist"]) for p in ps], justify="right", rank=1),
            Column("worst case", [p["worst"] or "-" for p in ps], breaks=":", min_width=14, comfort=18,
                   rank=2)]


def summary(results):
    return Counter(r.verdict for r in results)


def counts_line(results):
    counts = summary(results)
    line = ", ".join(f"{counts[v]} {v}" for v in VERDICTS if counts[v])
    return f"{_plural(len(results), 'check')} ({line})"


def final_line(results, where="the repro lines above"):
    """The run's last line: ``OK: ...`` when no check FAILs, else ``FAIL: ...``; unsupported
    checks (nothing compared) are counted either way."""
    n, counts = len(results), summary(results)
    if counts["FAIL"]:
        line = f"FAIL: {counts['FAIL']} of {_plural(n, 'check')} failed (see {where})"
    else:
        line = f"OK: {_plural(n, 'check')}, refbn within tolerance everywhere"
        if counts["divergence"]:
            line += (f"; {_plural(counts['divergence'], 'documented divergence')} where TF is the one "
                     f"that is off (refbn verify --divergences)")
    missing = [n for r in results if r.verdict == "not installed" for n in r.notes]
    if missing:
        line += "; " + "; ".join(dict.fromkeys(missing))
    unsupported = [r for r in results if r.verdict == "unsupported"]
    if unsupported:
        why = list(dict.fromkeys(n for r in unsupported for n in r.notes if "not run" in n))
        line += f"; {len(unsupported)} unsupported here, not compared" + (f" ({'; '.join(why)})" if why else "")
    return line


# -- laying columns out ---------------------------------------------------------------------
def _pieces(text, breaks):
    """text cut after each break character (the places a wrapped cell may end a line)."""
    out = []
    for line in text.split("\n"):
        out += [p for p in re.split(f"(?<=[{re.escape(breaks)}])", line) if p] or [""]
    return out


def _wrap(text, width, breaks):
    """Lines of at most width cells, ending after a break character where possible."""
    lines = []
    for para in text.split("\n"):
        cur = ""
        for p in _pieces(para, breaks):
            if cur and cell_len(cur + p.rstrip()) > width:
                lines.append(cur.rstrip())
                cur = ""
            while cell_len(p.rstrip()) > width:  # an unbreakable piece wider than the column: folded
                lines.append(p[:width])
                p = p[width:]
            cur += p
        lines.append(cur.rstrip())
    return lines


def _header_width(header, lines):
    """The narrowest width at which header wraps (between words) into at most lines lines."""
    w = max((cell_len(x) for x in header.split()), default=0)
    while len(textwrap.wrap(header, w)) > lines:
        w += 1
    return w


def fit(cols, width, gap):
    """The columns a table of at most width cells shows and their widths.

    Every rank-0 column is shown; the others follow in rank order while they fit (with
    the wrapping columns at their comfortable width), and the first that does not fit
    ends the list.  The spare width goes to wrapping columns up to their comfortable
    width, to headers so they take at most two lines, to wrapping columns up to their
    cells' width, then to headers so they need not wrap.
    """
    floor = {c: c.floor() for c in cols}
    comfort = {c: max(floor[c], min(c.cell_width(), c.comfort)) if c.breaks else floor[c] for c in cols}

    def total(cs, w):
        return sum(w[c] for c in cs) + gap * max(len(cs) - 1, 0)

    shown = [c for c in cols if c.rank == 0]
    for c in sorted((c for c in cols if c.rank), key=lambda c: c.rank):
        if total(shown + [c], comfort) > width:
            break
        shown.append(c)
    shown = [c for c in cols if c in shown]
    widths = {c: floor[c] for c in shown}
    spare = width - total(shown, widths)
    for want in (lambda c: comfort[c], lambda c: _header_width(c.header, 2),
                 lambda c: c.cell_width() if c.breaks else 0, lambda c: cell_len(c.header)):
        for c in shown:
            add = max(0, min(spare, want(c) - widths[c]))
            widths[c] += add
            spare -= add
    return shown, widths, [c for c in cols if c not in shown]


# rich tables: no outer edge, one cell of right padding and a (blank) divider between columns
_GAP = 2


def hidden_note(hidden):
    return (f"not shown at this width: {', '.join(c.header for c in hidden)} "
            "(a wider terminal or --format plain shows every column)") if hidden else ""


def rich_table(title, cols, width, say_hidden=True):
    """A rich table of at most width cells (see :func:`fit`); its caption names the columns left
    out, unless say_hidden is false."""
    shown, widths, hidden = fit(cols, width, _GAP)
    caption = Text(hidden_note(hidden), style="dim") if hidden and say_hidden else None
    t = Table(title=Text(title) if title else None, title_justify="left", caption=caption,
              caption_justify="left", box=box.SIMPLE_HEAVY, show_edge=False, pad_edge=False,
              padding=(0, 1, 0, 0))
    for c in shown:
        t.add_column(Text(c.header), justify=c.justify, width=widths[c], overflow="fold")
    for i in range(len(cols[0].cells) if cols else 0):
        t.add_row(*(Text("\n".join(_wrap(c.cells[i], widths[c], c.breaks)) if c.breaks else c.cells[i],
                         style=(c.styles[i] if c.styles else "")) for c in shown))
    return t


def plain_lines(cols, width, indent=4):
    """Aligned space-separated fields, one record per row, a header record first.  A record
    wider than width continues on lines indented by indent, between fields: the fields
    are the same on every row, so are the breaks."""
    fixed = [c for c in cols if not c.tail]
    tails = [c for c in cols if c.tail]
    cells = [[(x.replace(" ", "") or "-") for x in c.cells] for c in fixed]
    widths = [max([cell_len(c.plain_header)] + [cell_len(x) for x in cs]) for c, cs in zip(fixed, cells)]
    groups, cur, used = [], [], 0
    for i, w in enumerate(widths):
        start = 0 if not groups else indent
        if cur and start + used + 1 + w > width:
            groups.append(cur)
            cur, used = [], 0
        used += w + (1 if cur else 0)
        cur.append(i)
    if cur:
        groups.append(cur)

    def record(vals, tail):
        lines = []
        for g, idx in enumerate(groups):
            pad = [vals[i].rjust(widths[i]) if fixed[i].justify == "right" else vals[i].ljust(widths[i])
                   for i in idx]
            lines.append((" " * indent if g else "") + " ".join(pad).rstrip())
        if tail:
            if cell_len(lines[-1]) + 2 + cell_len(tail) <= width:
                lines[-1] += "  " + tail
            else:
                lines += textwrap.wrap(tail, width, initial_indent=" " * indent, subsequent_indent=" " * indent,
                                       break_long_words=False, break_on_hyphens=False)
        return lines

    out = record([c.plain_header for c in fixed], " ".join(c.plain_header for c in tails))
    for r in range(len(fixed[0].cells) if fixed else 0):
        out += record([cs[r] for cs in cells], "  ".join(c.cells[r] for c in tails if c.cells[r]))
    return out


def plain_blocks(cols, width):
    """An aligned table; wider than width, it is cut into blocks of columns (the most important
    first), each block repeating the first column, so no field is cut or dropped."""
    cols = [cols[0]] + sorted(cols[1:], key=lambda c: c.rank)
    cells = [[(x.replace(" ", "") or "-") for x in c.cells] for c in cols]
    widths = [max([cell_len(c.plain_header)] + [cell_len(x) for x in cs]) for c, cs in zip(cols, cells)]
    blocks, cur = [], [0]
    for i in range(1, len(cols)):
        if len(cur) > 1 and sum(widths[j] + 1 for j in cur) + widths[i] > width:
            blocks.append(cur)
            cur = [0]
        cur.append(i)
    blocks.append(cur)
    out = []
    for b, idx in enumerate(blocks):
        if b:
            out.append("")
        for vals in [[c.plain_header for c in cols]] + [list(row) for row in zip(*cells)]:
            out.append(" ".join(vals[i].rjust(widths[i]) if cols[i].justify == "right"
                                else vals[i].ljust(widths[i]) for i in idx).rstrip())
    return out


def _md(text):
    return text.replace("|", "\\|").replace("\n", "<br>") or " "


def markdown_lines(title, cols):
    out = [f"**{_md(title)}**", ""] if title else []
    out.append("| " + " | ".join(_md(c.header) for c in cols) + " |")
    out.append("|" + "|".join("---:" if c.justify == "right" else "---" for c in cols) + "|")
    for i in range(len(cols[0].cells) if cols else 0):
        out.append("| " + " | ".join(_md(c.cells[i]) for c in cols) + " |")
    return out


# -- writers: one per format ------------------------------------------------------------------
def _filled(text, width, indent):
    """text (possibly several lines) wrapped between words, continuation lines indented further."""
    out = []
    for line in text.split("\n"):
        lead = " " * (indent + len(line) - len(line.lstrip()))
        out += textwrap.wrap(line.strip(), max(width, 20), initial_indent=lead, subsequent_indent=lead + "  ",
                             break_long_words=False, break_on_hyphens=False) or [lead]
    return out


class _Writer:
    """Prints Text only (never markup), each line as it is (soft_wrap: rich neither wraps nor crops)."""
    styled = False

    def __init__(self, console):
        self.con = console
        self._blank = True  # no blank line first

    def _print(self, text="", style=""):
        if not text and self._blank:
            return  # one blank line between sections, never two
        self._blank = not text
        self.con.print(Text(text, style=style if self.styled else ""), soft_wrap=True)

    def heading(self, text, style="bold"):
        self._print()
        self._print(text, style)

    def line(self, text, style=""):
        for ln in _filled(text, self.con.width, 0):
            self._print(ln, style)

    def item(self, text, wrap=True, code=False):
        for ln in (_filled(text, self.con.width, 2) if wrap else ["  " + text]):
            self._print(ln)

    def blank(self):
        self._print()

    def final(self, text, ok, blank=True):
        self._blank = not blank
        self._print()
        self._print(text, "bold green" if ok else "bold red")


class TableWriter(_Writer):
    styled = True

    def __init__(self, console):
        super().__init__(console)
        self._said = set()

    def table(self, title, cols):
        """A rich table; which columns it leaves out is said once per kind of table."""
        note = hidden_note(fit(cols, self.con.width, _GAP)[2])
        self._print()
        self.con.print(rich_table(title, cols, self.con.width, say_hidden=note not in self._said))
        self._said.add(note)
        self._blank = False

    checks = table


class PlainWriter(_Writer):
    def table(self, title, cols):
        self._print()
        self.line(title)
        for ln in plain_blocks(cols, self.con.width):
            self._print(ln)

    def checks(self, title, cols):
        self._print()
        self.line(f"{title} (errors in eps; refbn~TF: error/allowed)")
        for ln in plain_lines(cols, self.con.width):
            self._print(ln)


class MarkdownWriter(_Writer):
    def heading(self, text, style=""):
        self._print()
        self._print(f"### {text}")
        self._print()

    def item(self, text, wrap=True, code=False):
        first, *rest = text.split("\n")
        if code:  # "label: command": the command as code
            label, _, cmd = first.partition(": ")
            first = f"{label}: `{cmd}`"
        self._print(f"- {first}")
        for ln in rest:
            self._print("  " + ln.strip())

    def table(self, title, cols):
        self._print()
        for ln in markdown_lines(title, cols):
            self._print(ln)
        self._print()

    checks = table


WRITERS = {"table": TableWriter, "plain": PlainWriter, "markdown": MarkdownWriter}


# -- the report -------------------------------------------------------------------------------
def results_table(results, title=TITLE, width=80):
    return rich_table(title, results_columns(results), width)


def detail_table(r, width=80):
    return rich_table(detail_title(r), detail_columns(r), width)


def kernel_gap_table(results, width=80):
    cols = kernel_gap_columns(results)
    return None if cols is None else rich_table(GAP_TITLE, cols, width)


def print_report(console, results, detail=False, fmt="table", final=True):
    """The whole report in one format (table, plain or markdown); final: end with
    :func:`final_line` (the CLI prints it itself, after its own last messages)."""
    w = WRITERS[fmt](console)
    other = any(getattr(r, "framework", "tf") != "tf" for r in results)
    w.checks(TITLE_FRAMEWORKS if other else TITLE, results_columns(results))
    for r in results:
        if detail or r.verdict == "FAIL":
            if r.outputs:
                w.table(detail_title(r), detail_columns(r))
            else:
                w.heading(detail_title(r), style="")
            for n in r.notes:
                w.item(f"note: {n}")
    facts = [(r, f) for r in results for f in r.facts]
    if facts:
        w.heading("Convention gaps (facts, not failures)")
        for r, f in facts:
            w.item(f"{r.descriptor} [{kernel_label(r)}]: {f}")
    gaps = kernel_gap_columns(results)
    if gaps is not None:
        w.table(GAP_TITLE, gaps)
    seen = sorted({d for r in results for d in r.divergences})
    if seen:
        w.heading("Documented divergences seen (refbn verify --divergences explains each)")
        by_name = {d.name: d for d in div.ALL}
        for name in seen:
            w.item(f"{name}: {by_name[name].summary}")
    fails = [r for r in results if r.verdict == "FAIL"]
    if fails:
        w.heading(f"{len(fails)} FAIL", style="bold red")
        for r in fails:
            w.line(f"FAIL {r.descriptor} [{kernel_label(r)}] backend {r.backend}", style="red")
            for f in r.failures:
                w.item(f)
            w.item(f"repro: {r.repro()}", wrap=False, code=True)
    w.blank()
    w.line(counts_line(results), style="bold")
    if final:
        print_final(console, results, fmt)


def print_final(console, results, fmt="table", where="the repro lines above"):
    """The run's last line (:func:`final_line`), after a blank line unless fmt is json."""
    WRITERS.get(fmt, _Writer)(console).final(final_line(results, where), not summary(results)["FAIL"],
                                              blank=fmt != "json")


CONVENTIONS_TITLE = ("Conventions, measured (refbn verify's probe: one training step on a 2x3x2x2 batch, "
                     "n = 8 per channel; then 1x3x1x1, 0x3x2x2, and N(1e4, 0.01^2) with full weight on "
                     "the new value)")


def conventions_columns(rows):
    from .frameworks import COLUMNS
    cols = [Column("framework", [r.framework for r in rows]),
            Column("implementation", [r.implementation for r in rows], breaks=" ", min_width=12)]
    for i, name in enumerate(COLUMNS):
        cols.append(Column(name, [r.cells.get(name, "-") for r in rows], breaks=" ,", min_width=10,
                           rank=0 if i < 5 else 1))
    cols.append(Column("refbn.BatchNorm", [r.refbn or "-" for r in rows], breaks=" ,", min_width=12, rank=2))
    cols.append(Column("verdict", [r.verdict for r in rows], styles=[STYLE.get(r.verdict, "") for r in rows]))
    return cols


def print_conventions(console, rows, fmt="table"):
    """The conventions table (every cell measured by the probe) and its failures."""
    if not rows or fmt == "json":
        return
    w = WRITERS[fmt](console)
    w.table(CONVENTIONS_TITLE, conventions_columns(rows))
    for r in rows:
        for f in r.failures:
            w.item(f"FAIL conventions {r.implementation}: {f}")


def divergences_table():
    t = Table(title="Documented TF divergences", box=box.SIMPLE_HEAVY, show_lines=True)
    t.add_column("name")
    t.add_column("what", overflow="fold")
    t.add_column("why / how it is checked", overflow="fold")
    for d in div.ALL:
        t.add_row(d.name, d.summary, d.reason)
    return t


def payload(results, meta, conventions=None):
    """What ``--json FILE`` and ``--format json`` write: meta, summary, every metric of every check
    (and the measured conventions, when the probe ran)."""
    out = {"meta": dict(meta, python=platform.python_version()), "summary": dict(summary(results)),
           "final": final_line(results, JSON_WHERE), "results": [r.as_dict() for r in results]}
    if conventions:
        out["conventions"] = [{"framework": r.framework, "implementation": r.implementation, **r.cells,
                               "refbn": r.refbn, "verdict": r.verdict, "failures": r.failures}
                              for r in conventions]
    return out


def dumps(results, meta, conventions=None):
    return json.dumps(payload(results, meta, conventions), indent=1, default=float)


def write_json(path, results, meta, conventions=None):
    with open(path, "w", encoding="utf-8") as f:
        f.write(dumps(results, meta, conventions))


def console(stderr=False):
    return Console(stderr=stderr, highlight=False, emoji=False)
