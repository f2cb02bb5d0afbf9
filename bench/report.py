"""Tables (rich), the goals check and the plot (matplotlib) of a ``refbn bench`` result."""
from .cli import GOALS, HALF_GOAL, NCHW_VS_NHWC, PEER_GOAL, SMALL_GOAL, SMALL_VALUES

_ORDER = ("numpy", "numba", "torch", "jax", "tf_onednn", "tf_eigen")
_LABEL = {"numpy": "numpy", "numba": "numba", "torch": "torch", "jax": "JAX", "tf_onednn": "TF oneDNN",
          "tf_eigen": "TF Eigen"}
_FLOOR_NAME = {"train": "training forward vs its floor (read + copy)",
               "infer": "inference vs the multi-threaded copy floor",
               "bwd": "backward vs its floor (read x and dy, write dx)"}


def row_label(name, c=None):
    """A contender's row label; TF rows are named by the kernel TF reported, * = a worker process."""
    return _LABEL[name] + ("*" if c and c.get("process") == "worker" else "")


def _tf_line(m):
    parts = []
    tf = m.get("tf", {})
    if tf.get("process") == "this":
        parts.append(f"{_LABEL['tf_' + tf['kernel']]} in this process")
    parts += [f"{_LABEL['tf_' + k]} in a worker" for k in m.get("tf_workers", {})]
    return ", ".join(parts) or "no TF kernel"


def _fmt(v, spec=".2f"):
    return "" if v is None else format(v, spec)


def _peer_label(rec, name):
    if name == "torch":
        return "torch " + ("contiguous" if rec["data_format"] in ("NC", "NCW", "NCHW", "NCDHW") else "channels_last")
    return _LABEL.get(name, name)


def goals(records):
    """Every target of issue 4 the records can check: list of dicts with 'met'.  Each goal is
    named by what it measures."""
    out = []

    def add(rec, what, value, target):
        if value is not None:
            out.append({"shape": rec["shape"], "op": rec["op"], "dtype": rec.get("dtype", "float32"),
                        "goal": what, "value": value, "target": target, "met": value <= target})
    by_key = {(r["shape"], r["op"], r.get("dtype", "float32")): r for r in records}
    for rec in records:
        cs = rec["contenders"]
        nb = cs.get("numba", {})
        if not nb.get("median_ms"):
            continue
        small = rec.get("values", 0) < SMALL_VALUES
        dtype = rec.get("dtype", "float32")
        torch_ms = cs.get("torch", {}).get("median_ms")
        if dtype != "float32":
            if torch_ms and not small:
                add(rec, f"numba vs {_peer_label(rec, 'torch')}, {dtype} x", nb["median_ms"] / torch_ms, HALF_GOAL)
            continue
        if small:
            if torch_ms:
                add(rec, f"numba vs {_peer_label(rec, 'torch')} per call (small batch)", nb["median_ms"] / torch_ms,
                    SMALL_GOAL)
            continue
        if nb.get("x_fastest_peer") is not None:
            add(rec, f"numba vs the fastest peer ({_peer_label(rec, rec['fastest_peer'])})", nb["x_fastest_peer"],
                PEER_GOAL)
        add(rec, _FLOOR_NAME[rec["op"]], nb.get("x_floor"), GOALS[rec["op"]])
        if rec["data_format"] in ("NCHW", "NCDHW", "NCW"):
            from .specs import parse
            twin = str(parse(rec["shape"]).channels_last_twin)
            other = by_key.get((twin, rec["op"], dtype), {}).get("contenders", {}).get("numba", {})
            if other.get("median_ms"):
                add(rec, f"numba {rec['data_format']} vs its channels-last twin", nb["median_ms"] / other["median_ms"],
                    NCHW_VS_NHWC)
    return out


def print_all(console, result):
    from rich.table import Table

    m = result["machine"]
    cfg = result["config"]
    console.print(f"[bold]refbn bench[/bold]  {m['cpu']}, {m['cores']} cores, {m['threads']} threads; "
                  f"numpy {m['numpy']}, numba {m['numba']} ({m.get('numba_threading_layer')}), "
                  f"torch {m.get('torch', {}).get('torch_version', '-')}, "
                  f"JAX {m.get('jax', {}).get('jax_version', '-')}, "
                  f"TF {m.get('tf', {}).get('tf_version', '-')} ({_tf_line(m)}); "
                  f"{', '.join(cfg.get('dtypes', ['float32']))}, cache {cfg['cache']}, "
                  f"{cfg['repeats']} rounds; load average {_load(m)}")
    t = Table(title="Times (median and min of alternating rounds); GB/s and x floor on the floor's bytes",
              caption="floor: train = read + copy, infer = copy, bwd = read x, dy + write dx, each the "
                      "fastest of its methods (named in brackets: numpy one thread, numpy-threads, numba, "
                      "numba-chunks, torch).  torch: channels_last for a channels-last layout, contiguous "
                      "for channels first.  TF rows are named by the kernel TF reports.  * ran in a "
                      "worker process (TF: TF_ENABLE_ONEDNN_OPTS forced for it; JAX: always), alternating "
                      "with numba there, numba's ratio to it taken from those runs; its x floor is against "
                      "that process's floor.")
    for col, just in (("shape", "left"), ("op", "left"), ("contender", "left"), ("median ms", "right"),
                      ("min ms", "right"), ("GB/s", "right"), ("x floor", "right"), ("x fastest peer", "right"),
                      ("check (max/allowed eps)", "right")):
        t.add_column(col, justify=just)
    for rec in result["records"]:
        cs = rec["contenders"]
        parts = " + ".join(f"{k} {v['by'].split(':')[1]}" for k, v in rec["floor_parts"].items())
        shape = rec["shape"] + ("" if rec.get("dtype", "float32") == "float32" else f" {rec['dtype']}")
        t.add_row(shape, rec["op"], f"floor ({parts})", _fmt(rec["floor_ms"]), "",
                  _fmt(rec["floor_bytes"] / (rec["floor_ms"] * 1e6), ".1f"), "1.00", "", "", style="dim")
        for name in _ORDER:
            c = cs.get(name)
            if c is None:
                continue
            worst = max(c["checks"], key=lambda k: k["max_ulps"] / max(k["allowed_ulps"], 1e-300),
                        default=None)
            check = "" if worst is None else f"{worst['max_ulps']:.2g}/{worst['allowed_ulps']:.3g}"
            if c.get("refused"):
                t.add_row("", "", row_label(name, c), "REFUSED", "", "", "", "", check, style="red")
                continue
            t.add_row("", "", row_label(name, c), _fmt(c.get("median_ms")), _fmt(c.get("min_ms")), _fmt(c.get("gbps"), ".1f"),
                      _fmt(c.get("x_floor")), _fmt(c.get("x_fastest_peer")) if name in ("numba", "numpy") else
                      ("fastest" if name == rec.get("fastest_peer") else ""), check,
                      style="bold" if name == "numba" else None)
        t.add_section()
    console.print(t)
    g = result["goals"]
    if g:
        gt = Table(title="Issue 4 goals (medians of alternating rounds)")
        for col in ("shape", "op", "goal", "value", "target", ""):
            gt.add_column(col, justify="left" if col in ("shape", "op", "goal") else "right")
        for row in g:
            shape = row["shape"] + ("" if row.get("dtype", "float32") == "float32" else f" {row['dtype']}")
            gt.add_row(shape, row["op"], row["goal"], f"{row['value']:.2f}", f"<= {row['target']:.2f}",
                       "[green]met[/green]" if row["met"] else "[red]missed[/red]")
        console.print(gt)
        console.print(f"goals met: {sum(r['met'] for r in g)} of {len(g)}")
    jit = result["jit"]
    if jit.get("first_call_s"):
        worst = max(jit["first_call_s"].values())
        console.print(f"numba first call in this process (compile or cache load, then one run): "
                      f"up to {worst:.2f} s; kernels: " + ", ".join(
                          f"{k} {v['cache_hits']} cached/{v['cache_misses']} compiled"
                          for k, v in jit["this_process"].items()))
    fresh = jit.get("fresh_processes")
    if fresh:
        for label in ("cold", "warm"):
            r = fresh.get(label, {})
            if "error" in r:
                console.print(f"numba {label}: failed: {r['error']}")
            elif r:
                console.print(f"numba {label} start: import {r['import_s']:.2f} s, first calls of 3 ops x 2 layouts "
                              f"x 2 builds {sum(r['first_call_s'].values()):.2f} s (max {max(r['first_call_s'].values()):.2f} s)")
    print_refusals_and_notes(console, result)


def print_refusals_and_notes(console, result, where=lambda rec: f"{rec['shape']} {rec['op']}"):
    """Every contender refused by its validation (never timed), then the run's notes."""
    for rec in result["records"]:
        for name, c in rec["contenders"].items():
            if c.get("refused"):
                console.print(f"[red]refused[/red] {where(rec)} {name}: {c['refused']}")
    for note in result.get("notes", []):
        console.print(f"note: {note}")


def _load(m):
    a, b = m.get("load_average_start"), m.get("load_average_end")
    f = lambda v: "-" if not v else f"{v[0]:.2f}"   # noqa: E731
    return f"{f(a)} at start, {f(b)} at end" if b else f(a)


def plot(result, path):
    # a Figure of its own, drawn by Agg: no pyplot state, so a notebook's inline backend is left alone
    import numpy as np
    from matplotlib.figure import Figure

    records = result["records"]
    ops = [op for op in ("train", "infer", "bwd") if any(r["op"] == op for r in records)]
    fig = Figure(figsize=(max(7, 1.1 * len(records) / max(1, len(ops)) + 3), 3.2 * len(ops)))
    axes = fig.subplots(len(ops), 1, squeeze=False)
    colors = {"numpy": "#999999", "numba": "#1f77b4", "torch": "#2ca02c", "jax": "#9467bd", "tf_onednn": "#ff7f0e",
              "tf_eigen": "#d62728"}
    legend = {}  # label -> handle, in order of first appearance
    for ax, op in zip(axes[:, 0], ops):
        recs = [r for r in records if r["op"] == op and r.get("dtype", "float32") == "float32"]
        names = [n for n in _ORDER if any(n in r["contenders"] for r in recs)]
        width = 0.8 / max(1, len(names))
        xs = np.arange(len(recs))
        for i, n in enumerate(names):
            vals = [r["contenders"].get(n, {}).get("x_floor") or np.nan for r in recs]
            ax.bar(xs + (i - (len(names) - 1) / 2) * width, vals, width, color=colors[n],
                   label=row_label(n, next((r["contenders"][n] for r in recs if n in r["contenders"]), None)))
        ax.axhline(1.0, color="k", lw=0.8, label="multi-threaded memory floor (1x)")
        ax.axhline(GOALS[op], color=colors["numba"], lw=0.8, ls="--", label="numba's floor goal (see title)")
        ax.set_yscale("log")
        ax.set_xticks(xs)
        ax.set_xticklabels([r["shape"] + "\nfloor: " + " + ".join(v["by"].split(":")[1] for v in r["floor_parts"].values())
                            for r in recs], rotation=20, ha="right", fontsize=7)
        ax.set_ylabel("median time / memory floor\n(x, log scale)", fontsize=9)
        ax.set_title(f"{op}: median time over the floor ({_FLOOR_NAME[op]}: goal {GOALS[op]}x)", fontsize=10)
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    axes[-1, 0].set_xlabel("shape (refbn descriptor; channels last unless :NCHW)", fontsize=9)
    m = result["machine"]
    star = any(label.endswith("*") for label in legend)
    fig.suptitle(f"refbn bench, float32, {m['cpu']}, {m['threads']} threads"
                 + ("  (* = TF or JAX in a worker process, against that process's own floor)" if star else ""),
                 fontsize=10)
    # one legend for every panel, above them, so that it never covers a bar
    fig.legend(list(legend.values()), list(legend), loc="upper center", ncol=len(legend), fontsize=8,
               bbox_to_anchor=(0.5, 0.965), frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    fig.savefig(path, dpi=110)


def markdown(result):
    """The result as Markdown tables (what bench/RESULTS.md records)."""
    m, cfg = result["machine"], result["config"]
    tf = m.get("tf", {})
    lines = [
        f"- CPU: {m['cpu']} ({', '.join(f'{k} {v}' for k, v in m.get('cpu_detail', {}).items())}), "
        f"{m['cores']} cores, {m['threads']} threads used",
        f"- numpy {m['numpy']}, numba {m['numba']} (threading layer {m.get('numba_threading_layer')}), "
        f"TensorFlow {tf.get('tf_version', '-')} ({_tf_line(m)}, as TF reports; intra-op threads "
        f"{tf.get('intra_op_threads', '-')}), Python {m['python']}",
        f"- torch {m.get('torch', {}).get('torch_version', '-')} (threads {m.get('torch', {}).get('threads', '-')}; "
        "channels_last for channels-last layouts, contiguous for channels first); "
        f"JAX {m.get('jax', {}).get('jax_version', '-')} (threads {m.get('jax', {}).get('threads', '-')}, "
        "a worker process; numba's ratios to TF and JAX workers from numba timed alternating in them)",
        f"- {', '.join(cfg.get('dtypes', ['float32']))}, epsilon {cfg['epsilon']}, cache {cfg['cache']}, "
        f"{cfg['repeats']} alternating rounds after "
        f"{cfg['warmup']} warm-up calls, pause {cfg['gap_ms']} ms; load average {_load(m)}; "
        f"run took {m.get('wall_s', 0):.0f} s on {m['time']}",
        "",
        "| shape | op | floor ms (method) | numba ms (min) | torch ms (min) | JAX ms | TF oneDNN ms | TF Eigen ms "
        "| numpy ms | numba GB/s | numba x floor | numba x torch | numba x fastest peer |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["records"]:
        cs = r["contenders"]

        def g(name, key, spec=".2f"):
            v = cs.get(name, {}).get(key)
            if cs.get(name, {}).get("refused"):
                return "refused"
            return "-" if v is None else format(v, spec)
        how = " + ".join(v["by"].split(":")[1] for v in r["floor_parts"].values())
        shape = r["shape"] + ("" if r.get("dtype", "float32") == "float32" else f" {r['dtype']}")
        lines.append(
            f"| {shape} | {r['op']} | {r['floor_ms']:.3f} ({how}) | {g('numba', 'median_ms', '.3f')} "
            f"({g('numba', 'min_ms', '.3f')}) | {g('torch', 'median_ms', '.3f')} ({g('torch', 'min_ms', '.3f')}) | "
            f"{g('jax', 'median_ms', '.3f')} | {g('tf_onednn', 'median_ms')} | {g('tf_eigen', 'median_ms')} | "
            f"{g('numpy', 'median_ms')} | "
            f"{g('numba', 'gbps', '.1f')} | {g('numba', 'x_floor')} | {g('numba', 'x_torch')} | "
            f"{g('numba', 'x_fastest_peer')} |")
    for kernel in m.get("tf_workers", {}):
        lines += ["", f"{_LABEL['tf_' + kernel]} ran in a worker process (TF_ENABLE_ONEDNN_OPTS="
                  f"{'1' if kernel == 'onednn' else '0'}); its floor there: "
                  + ", ".join(f"{r['shape']} {r['op']} {r['worker_floor_ms'][kernel]:.2f}"
                              for r in result["records"] if kernel in r.get("worker_floor_ms", {})) + " ms."]
    lines.append("")
    g = result["goals"]
    if g:
        lines += [f"Goals: {sum(x['met'] for x in g)} of {len(g)} met.", "",
                  "| shape | op | goal | value | target | |", "|---|---|---|---|---|---|"]
        lines += [f"| {x['shape']}{'' if x.get('dtype', 'float32') == 'float32' else ' ' + x['dtype']} | {x['op']} | "
                  f"{x['goal']} | {x['value']:.2f} | <= {x['target']:.2f} | "
                  f"{'met' if x['met'] else '**missed**'} |" for x in g]
    lines.append("")
    checks = [(r["shape"], r["op"], n, k) for r in result["records"] for n, c in r["contenders"].items()
              for k in c.get("checks", [])]
    if checks:
        worst = {}
        for shape, op, n, k in checks:
            ratio = k["max_ulps"] / max(k["allowed_ulps"], 1e-300)
            if ratio >= worst.get(n, (-1,))[0]:
                worst[n] = (ratio, shape, op, k)
        lines += ["Validation before timing (worst output per contender, error / allowed, in eps):", ""]
        for n, (ratio, shape, op, k) in sorted(worst.items()):
            lines.append(f"- {n}: {k['max_ulps']:.3g} of {k['allowed_ulps']:.3g} ({k['output']}, {shape} {op}, "
                         f"context {k['context']})")
        lines.append("")
    jit = result.get("jit", {})
    fresh = jit.get("fresh_processes") or {}
    for label in ("cold", "warm"):
        r = fresh.get(label)
        if r and "first_call_s" in r:
            lines.append(f"- numba {label} start (fresh process, {'empty' if label == 'cold' else 'filled'} cache): "
                         f"import {r['import_s']:.2f} s; first calls "
                         + ", ".join(f"{k} {v:.2f} s" for k, v in r["first_call_s"].items())
                         + f"; total {sum(r['first_call_s'].values()):.2f} s")
    return "\n".join(lines) + "\n"
