"""Rich tables and JSON for ``refbn verify``."""
import json
import platform
from collections import Counter

from rich import box
from rich.console import Console
from rich.table import Table

from . import divergences as div

STYLE = {"exact": "bold green", "close": "green", "divergence": "yellow", "unsupported": "dim",
         "FAIL": "bold red"}
_DIV_SHORT = {div.ILL_CONDITIONED.name: "TF sums ill-conditioned",
              div.EMPTY_BATCH_TRAINING.name: "N == 0",
              div.INFERENCE_RESERVE_SPACES.name: "reserve spaces not compared",
              div.EIGEN_GRAD_NCHW_INFERENCE.name: "grad unsupported by TF"}


def _eps(v):
    if v == 0:
        return "0"
    return f"{v:.2g}" if v < 1e4 else f"{v:.1e}"


def case_row(r, show_backend=False):
    w = r.worst("refbn_vs_tf")
    if w is None:
        cells = ("-", "-", "-", "-", "-")
    else:
        wt = r.worst("tf_vs_truth")
        wr = r.worst("refbn_vs_truth")
        cells = (w.output, _eps(w.refbn_vs_tf.max_ulps) + f" / {w.refbn_vs_tf.allowed_ulps:.4g}",
                 f"{_eps(wt.tf_vs_truth.max_ulps)} ({wt.output})", _eps(wr.refbn_vs_truth.max_ulps),
                 w.closer)
    notes = [_DIV_SHORT.get(d, d) for d in r.divergences]
    if any("not run" in n for n in r.notes):
        notes += [n for n in r.notes if "not run" in n]
    kernel = r.kernel_used if r.kernel_used == r.kernel else f"{r.kernel}->{r.kernel_used}"
    if show_backend:
        kernel += f" / {r.backend}"
    return (r.descriptor, kernel,
            f"[{STYLE[r.verdict]}]{r.verdict}[/]", *cells, "; ".join(dict.fromkeys(notes)))


def results_table(results, title="refbn vs TensorFlow"):
    t = Table(title=title, box=box.SIMPLE_HEAVY, show_lines=False)
    for name, kw in (("case", {"no_wrap": True}), ("kernel", {"no_wrap": True}), ("verdict", {}),
                     ("worst output", {}), ("refbn↔TF eps / allowed", {"justify": "right"}),
                     ("TF↔truth eps", {"justify": "right"}), ("refbn↔truth eps", {"justify": "right"}),
                     ("closer", {}), ("notes", {"overflow": "fold"})):
        t.add_column(name, **kw)
    show_backend = len({r.backend for r in results}) > 1
    for r in results:
        t.add_row(*case_row(r, show_backend))
    return t


def detail_table(r):
    t = Table(title=f"{r.descriptor}  [{r.kernel_used}]  {r.verdict}", box=box.SIMPLE, title_justify="left")
    for name in ("output", "dtype", "refbn↔TF abs", "rel", "ulps", "eps/allowed",
                 "TF↔truth abs", "rel", "ulps", "refbn↔truth abs", "ulps", "closer"):
        t.add_column(name, justify="right" if name not in ("output", "dtype", "closer") else "left")
    for o in r.outputs:
        a, b, c = o.refbn_vs_tf, o.tf_vs_truth, o.refbn_vs_truth
        t.add_row(o.output, o.dtype, f"{a.max_abs:.3g}", f"{a.max_rel:.3g}", str(a.max_ulp_distance),
                  f"{_eps(a.max_ulps)}/{a.allowed_ulps:.4g}", f"{b.max_abs:.3g}", f"{b.max_rel:.3g}",
                  str(b.max_ulp_distance), f"{c.max_abs:.3g}", str(c.max_ulp_distance), o.closer)
    return t


def summary(results):
    return Counter(r.verdict for r in results)


def print_report(console, results, detail=False):
    console.print(results_table(results))
    for r in results:
        if detail or r.verdict == "FAIL":
            if r.outputs:
                console.print(detail_table(r))
            for n in r.notes:
                console.print(f"  note: {n}", markup=False, highlight=False)
    facts = [(r, f) for r in results for f in r.facts]
    if facts:
        console.print("\n[bold]Convention gaps (facts, not failures)[/]")
        for r, f in facts:
            console.print(f"  {r.descriptor} [{r.kernel_used}]: {f}", markup=False, highlight=False)
    gaps = kernel_gap_table(results)
    if gaps is not None:
        console.print(gaps)
    seen = sorted({d for r in results for d in r.divergences})
    if seen:
        console.print("\n[bold]Documented divergences seen[/] (refbn verify --divergences explains each)")
        by_name = {d.name: d for d in div.ALL}
        for name in seen:
            console.print(f"  {name}: {by_name[name].summary}", markup=False, highlight=False)
    fails = [r for r in results if r.verdict == "FAIL"]
    if fails:
        console.print(f"\n[bold red]{len(fails)} FAIL[/]")
        for r in fails:
            console.print(f"[red]FAIL[/] {r.descriptor} [{r.kernel_used}]", highlight=False)
            for f in r.failures:
                console.print("  " + f.replace("\n", "\n  "), markup=False, highlight=False)
            console.print(f"  repro: {r.repro()}", markup=False, highlight=False)
    counts = summary(results)
    line = ", ".join(f"{counts[v]} {v}" for v in ("exact", "close", "divergence", "unsupported", "FAIL")
                     if counts[v])
    console.print(f"\n[bold]{len(results)} checks[/] ({line})")


def kernel_gap_table(results):
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
    t = Table(title="TF oneDNN vs TF Eigen (same inputs)", box=box.SIMPLE_HEAVY)
    for name in ("output", "cases", "bit-identical", "max diff eps", "max ulps apart", "worst case"):
        t.add_column(name, justify="left" if name in ("output", "worst case") else "right")
    for o, p in per.items():
        t.add_row(o, str(p["n"]), str(p["same"]), _eps(p["max"]), str(p["dist"]), p["worst"])
    return t


def divergences_table():
    t = Table(title="Documented TF divergences", box=box.SIMPLE_HEAVY, show_lines=True)
    t.add_column("name")
    t.add_column("what", overflow="fold")
    t.add_column("why / how it is checked", overflow="fold")
    for d in div.ALL:
        t.add_row(d.name, d.summary, d.reason)
    return t


def write_json(path, results, meta):
    payload = {"meta": dict(meta, python=platform.python_version()),
               "summary": dict(summary(results)), "results": [r.as_dict() for r in results]}
    with open(path, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=1, default=float)


def console(stderr=False):
    return Console(stderr=stderr, highlight=False, emoji=False)
