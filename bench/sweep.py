"""``refbn bench --sweep``: GB/s against the size of x, from L2-resident to 10x the last-level cache.

For one channel count (``--sweep-channels``, default 256) and each layout (``--sweep-layouts``:
``NHWC``, x as (N, C) rows of C channels, NHWC's memory; ``NCHW``, (N, C, 16, 16)), x grows from
``--sweep-min`` (default 256 KiB) by doubling to ``--sweep-max`` (default 10x the last-level cache).
For each size, thread count (``--sweep-threads``, default 1 and all cores) and op, numba, torch and
the memory floor (the fastest of its methods: runner.floor_contenders) are validated against the
float64 truth and then timed alternating in this process (runner.time_group), as ``refbn bench``
times one shape.  GB/s is on the op's floor bytes (data.FLOOR_TRAFFIC: train 3, infer 2, bwd 3 times
the bytes of x), as in ``refbn bench``.

``--cache auto`` (the default here) times an x smaller than the last-level cache warm (no flush;
each sample the mean of back-to-back calls) and a bigger one cold (the caches flushed before every
call); ``warm`` / ``cold`` force one state.  Every row says which it ran.

``--repeats`` applies to every size; without it a size gets 9 rounds below the last-level cache,
5 below 4x it and 3 above, after 2 warm-up calls warm and 1 cold, so that the default sweep takes a
few minutes: most of it is the float64 truth and the validation of the biggest sizes.  A contender
whose outputs at a later thread count are bitwise those it gave, validated, at an earlier one
reuses that validation (numba's kernels do not depend on the thread count); any other is
validated again.
"""
import hashlib
import os
import re
import time

#: options of the sweep (argparse dests); each one needs --sweep
OPTIONS = ("sweep_min", "sweep_max", "sweep_channels", "sweep_threads", "sweep_layouts")
LAYOUTS = ("NHWC", "NCHW")
CONTENDERS = ("numpy", "numba", "torch")
DEFAULT_CONTENDERS = ("numba", "torch")
PLANE = 16                   # NCHW: 16x16 planes; N grows with the size
ITEMSIZE = 4                 # float32
#: peak bytes per value of x (measured 177): x, dy, the outputs and the float64 truth (64), then
#: one float64 check of a full-size output (refbn.testing.compare, ~113)
PEAK_BYTES_PER_VALUE = 180
SAMPLE_BYTES = 8 << 20       # warm: a sample is the mean of back-to-back calls moving >= this much x ...
MAX_CALLS = 20               # ... of at most this many calls
_LABEL = {"numpy": "numpy", "numba": "numba", "torch": "torch", "floor": "floor"}


def configure(p):
    g = p.add_argument_group("size sweep (--sweep; --ops, --contenders, --repeats, --warmup, --cache, --json, "
                             "--markdown and --plot apply to it, --shapes and --threads do not)")
    g.add_argument("--sweep", action="store_true",
                   help="time GB/s against the size of x (channel count fixed) instead of --shapes, for each "
                        "thread count: numba, torch and the memory floor, validated then alternating")
    g.add_argument("--sweep-min", metavar="SIZE", default=None,
                   help="smallest x in bytes, binary units: 262144, 256K, 64M, 1G, or a multiple of a cache "
                        "such as 0.25xL2 (default 256K)")
    g.add_argument("--sweep-max", metavar="SIZE", default=None,
                   help="largest x, as --sweep-min; sizes double from the smallest up to it "
                        "(default 10xLLC, the last-level cache of cpu0)")
    g.add_argument("--sweep-channels", metavar="C", type=int, default=None, help="channels of x (default 256)")
    g.add_argument("--sweep-threads", metavar="LIST", default=None,
                   help="comma-separated thread counts for numba, torch and the floors, or 'all' "
                        "(default 1,all: 1,%d here)" % (os.cpu_count() or 1))
    g.add_argument("--sweep-layouts", metavar="LIST", default=None,
                   help="comma-separated: NHWC (x as (N, C) rows), NCHW ((N, C, 16, 16)) (default NHWC)")


def refuse_outside(args):
    """UsageError for a sweep option without --sweep (refbn bench over --shapes)."""
    from refbn.cli import UsageError
    for dest in OPTIONS:
        if getattr(args, dest, None) is not None:
            raise UsageError(f"--{dest.replace('_', '-')}: only with --sweep, got {getattr(args, dest)!r}")
    if getattr(args, "cache", None) == "auto":
        raise UsageError("--cache: auto (warm below the last-level cache, cold above) is for --sweep; "
                         "expected cold or warm")


def caches():
    """Cache sizes of cpu0 in bytes: 'L1d', 'L2', 'L3' ... as sysfs lists them (instruction caches left
    out), and 'LLC' = floors.last_level_cache_bytes() (what the flush and the bench use)."""
    from . import floors
    base = "/sys/devices/system/cpu/cpu0/cache"
    out = {}
    try:
        entries = sorted(e for e in os.listdir(base) if e.startswith("index"))
    except OSError:
        entries = []
    for e in entries:
        try:
            fields = {}
            for key in ("level", "type", "size"):
                with open(os.path.join(base, e, key)) as f:
                    fields[key] = f.read().strip()
            size = _sysfs_size(fields["size"])
        except (OSError, ValueError):
            continue
        if fields["type"] == "Instruction":
            continue
        name = f"L{fields['level']}" + ("d" if fields["type"] == "Data" else "")
        out[name] = max(out.get(name, 0), size)
    out["LLC"] = floors.last_level_cache_bytes()
    return out


def _sysfs_size(text):
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:].upper(), 1)
    return int(text.rstrip("KMGkmg")) * mult


_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(?:x\s*(llc|l1d|l2|l3)|([kmgt]?)(?:i?b)?)\s*$", re.IGNORECASE)


def parse_size(option, text, cache):
    """Bytes from ``262144``, ``256K``, ``256KiB``, ``320M``, ``1G`` (binary units) or ``10xLLC`` /
    ``0.25xL2`` (multiples of a cache in ``cache``), else UsageError naming ``option``."""
    from refbn.cli import UsageError
    m = _SIZE.match(text) if isinstance(text, str) else None
    if not m:
        raise UsageError(f"{option}: expected a size of x in bytes such as 262144, 256K, 320M, 1G (binary units) "
                         f"or 10xLLC, got {text!r}")
    value = float(m[1])
    if m[2]:
        name = {"llc": "LLC", "l1d": "L1d", "l2": "L2", "l3": "L3"}[m[2].lower()]
        if name not in cache:
            raise UsageError(f"{option}: this machine reports no {name} cache (it has "
                             f"{', '.join(sorted(cache))}), got {text!r}")
        nbytes = value * cache[name]
    else:
        nbytes = value * 1024 ** "_kmgt".index((m[3] or "_").lower())
    if nbytes < 1:
        raise UsageError(f"{option}: expected a size of at least 1 byte, got {text!r}")
    return int(nbytes)


def sizes(lo, hi):
    """lo, 2 lo, 4 lo, ... below hi, then hi; a doubling within 1.5x of hi gives way to hi."""
    out = []
    s = lo
    while s < hi:
        out.append(s)
        s *= 2
    if out and out[-1] * 1.5 > hi and len(out) > 1:
        out.pop()
    return out + [hi] if not out or out[-1] != hi else out


def spec_for(nbytes, channels, layout):
    """The shape of x nearest ``nbytes`` of float32: (N, C) rows for NHWC, (N, C, 16, 16) for NCHW."""
    from .specs import ShapeSpec
    if layout == "NHWC":
        return ShapeSpec((max(1, round(nbytes / (ITEMSIZE * channels))), channels), "NC")
    return ShapeSpec((max(1, round(nbytes / (ITEMSIZE * channels * PLANE * PLANE))), channels, PLANE, PLANE), "NCHW")


def _available_memory():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_args(args):
    """The sweep's plan from the arguments, or UsageError for the first bad one; nothing is timed before."""
    from refbn.cli import UsageError, check_memory, check_number, _size

    from . import data
    from .cli import _parse_list
    if args.shapes is not None:
        raise UsageError(f"--shapes: not with --sweep (it makes its own shapes: --sweep-min, --sweep-max, "
                         f"--sweep-channels, --sweep-layouts), got {args.shapes!r}")
    if args.threads is not None:
        raise UsageError(f"--threads: with --sweep, give the thread counts to --sweep-threads, got {args.threads!r}")
    if args.jit:
        raise UsageError("--jit: not with --sweep (refbn bench --jit measures the compile)")
    if [d.strip() for d in args.dtypes.split(",") if d.strip()] != ["float32"]:
        raise UsageError(f"--dtypes: the sweep times float32 only, got {args.dtypes!r}")
    ops = _parse_list(args.ops, data.OPS, "--ops")
    contenders = _parse_list(args.contenders or ",".join(DEFAULT_CONTENDERS), CONTENDERS, "--contenders (with --sweep)")
    layouts = _parse_list((args.sweep_layouts or "NHWC").upper(), LAYOUTS, "--sweep-layouts")
    channels = check_number("--sweep-channels", 256 if args.sweep_channels is None else args.sweep_channels, 1)
    cores = os.cpu_count() or 1
    threads = []
    text = args.sweep_threads or "1,all"
    for t in (t.strip() for t in text.split(",")):
        if not t:
            continue
        if t.lower() == "all":
            threads.append(cores)
            continue
        try:
            k = int(t)
        except ValueError:
            raise UsageError(f"--sweep-threads: expected comma-separated thread counts in [1, {cores}] or 'all', "
                             f"got {text!r}") from None
        threads.append(check_number("--sweep-threads", k, 1, cores))
    if not threads:
        raise UsageError(f"--sweep-threads: expected comma-separated thread counts or 'all', got {text!r}")
    threads = list(dict.fromkeys(threads))
    cache = caches()
    lo = parse_size("--sweep-min", args.sweep_min or "256K", cache)
    hi = parse_size("--sweep-max", args.sweep_max or "10xLLC", cache)
    if lo > hi:
        raise UsageError(f"--sweep-min: {_size(lo)} is above --sweep-max {_size(hi)}; expected at most that")
    least = {"NHWC": ITEMSIZE * channels, "NCHW": ITEMSIZE * channels * PLANE * PLANE}
    for layout in layouts:
        if lo < least[layout]:
            raise UsageError(f"--sweep-min: {layout} x with {channels} channels needs at least {least[layout]} bytes "
                             f"(one {'row' if layout == 'NHWC' else f'{PLANE}x{PLANE} image'}), got {lo}")
    specs = {layout: list(dict.fromkeys(spec_for(s, channels, layout) for s in sizes(lo, hi))) for layout in layouts}
    biggest = max(s.size for ss in specs.values() for s in ss)
    need = PEAK_BYTES_PER_VALUE * biggest
    what = f"x of {_size(ITEMSIZE * biggest)} (x, dy, outputs, the float64 truth and its check)"
    check_memory("--sweep-max", what, need)
    avail = _available_memory()
    if avail is not None and need > avail:
        raise UsageError(f"--sweep-max: {what} needs about {_size(need)} of memory; {_size(avail)} is available now")
    from .cli import check_timing_and_outputs
    check_timing_and_outputs(args)
    return {"ops": ops, "contenders": contenders, "layouts": layouts, "channels": channels, "threads": threads,
            "caches": cache, "specs": specs, "cache": args.cache or "auto", "min_bytes": lo, "max_bytes": hi}


def schedule(xbytes, llc, args, cache="auto"):
    """(cache state, repeats, warm-up calls, calls per sample, pause ms) for an x of ``xbytes``."""
    state = cache if cache in ("warm", "cold") else ("warm" if xbytes < llc else "cold")
    repeats = args.repeats if args.repeats is not None else 9 if xbytes < llc else 5 if xbytes < 4 * llc else 3
    warmup = args.warmup if args.warmup is not None else 2 if state == "warm" else 1
    calls = max(1, min(MAX_CALLS, SAMPLE_BYTES // xbytes)) if state == "warm" else 1
    gap_ms = args.gap_ms if args.gap_ms is not None else 2.0 if state == "warm" else 0.0
    return state, repeats, warmup, calls, gap_ms


def _digest(outs):
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(outs):
        a = outs[name]
        h.update(name.encode())
        h.update(memoryview(a.reshape(-1).view("u1")) if a.flags.c_contiguous else a.tobytes())
    return h.hexdigest()


def validate(c, inp, op, scales, seen, threads):
    """runner.validate, unless ``c`` gave bitwise these outputs at an earlier thread count and passed
    there: then its checks are those, marked ``reused_from_threads``.  ``seen``: (name, op) ->
    (digest, checks, threads) of the validated runs of this size."""
    from . import runner
    key = (c.name, op)
    if key in seen:
        digest, checks, at = seen[key]
        t0 = time.perf_counter()
        try:
            outs = c.outputs()
        except Exception:   # noqa: BLE001 - runner.validate refuses it, with the reason
            outs = None
        if outs is not None and _digest(outs) == digest:
            c.first_call_s = time.perf_counter() - t0
            c.checks = [dict(k, reused_from_threads=at) for k in checks]
            return True
        del outs
    captured = {}
    outputs = c.outputs
    c.outputs = lambda: captured.setdefault("outs", outputs())
    try:
        ok = runner.validate(c, inp, op, scales)
    finally:
        c.outputs = outputs
    if ok:
        seen[key] = (_digest(captured["outs"]), list(c.checks), threads)
    return ok


def main(args):
    plan = check_args(args)
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from . import data, floors, runner
    from .cli import machine_info, set_numba_layer

    console = Console()
    if not console.is_terminal:
        console = Console(width=160)
    numba = set_numba_layer(args, console)
    notes = []
    torch_module = None
    if "torch" in plan["contenders"]:
        try:
            from . import torch_bench as torch_module
        except ImportError as e:
            notes.append(f"torch contender skipped: {e}")
    backends = [b for b in ("numpy", "numba") if b in plan["contenders"]]
    llc = plan["caches"]["LLC"]
    ops, threads = plan["ops"], plan["threads"]
    todo = [(layout, spec) for layout in plan["layouts"] for spec in plan["specs"][layout]]
    sched = {spec: schedule(spec.size * ITEMSIZE, llc, args, plan["cache"]) for _, spec in todo}
    flush = floors.Flusher(True) if any(s[0] == "cold" for s in sched.values()) else None
    info = machine_info(max(threads))
    info["threads"] = threads
    records, reused, full = [], 0, 0
    console.print(f"refbn bench --sweep: {len(todo)} sizes of x ({', '.join(plan['layouts'])}, C={plan['channels']}) "
                  f"from {_human(todo[0][1].size * ITEMSIZE)} to "
                  f"{_human(max(s.size for _, s in todo) * ITEMSIZE)}, threads {', '.join(map(str, threads))}, "
                  f"ops {', '.join(ops)}; caches {_cache_line(plan['caches'])}")
    t_start = time.perf_counter()
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as progress:
        task = progress.add_task("sweep", total=sum(sched[s][1] for _, s in todo) * len(threads) * len(ops))
        for layout, spec in todo:
            state, repeats, warmup, calls, gap_ms = sched[spec]
            xbytes = spec.size * ITEMSIZE
            progress.update(task, description=f"{_human(xbytes)} {layout}: inputs and float64 truth")
            inp = data.add_truth(data.make(spec, seed=args.seed), ops)
            scales = data.scales(inp, "train")
            buffers, seen = {}, {}
            for k in threads:
                numba.set_num_threads(min(k, numba.config.NUMBA_NUM_THREADS))
                if torch_module is not None:
                    torch_module.configure_threads(k)
                for op in ops:
                    progress.update(task, description=f"{_human(xbytes)} {layout} {k}t {op}: validating")
                    cs = runner.refbn_contenders(inp, op, backends, buffers)
                    if torch_module is not None:
                        cs += runner.torch_contenders(inp, op, torch_module)
                    for c in cs:
                        validate(c, inp, op, scales, seen, k)
                        if c.checks and "reused_from_threads" in c.checks[0]:
                            reused += 1
                        else:
                            full += 1
                    cs += runner.floor_contenders(inp, op, buffers, k, torch_module)
                    progress.update(task, description=f"{_human(xbytes)} {layout} {k}t {op}: timing ({state})")
                    runner.time_group(cs, repeats, warmup, flush if state == "cold" else (lambda: None),
                                      gap_ms / 1e3, tick=lambda: progress.advance(task), calls=calls)
                    rec = runner.add_ratios(runner.summarize(cs, inp, op))
                    rec.update(layout=layout, threads=k, x_bytes=xbytes, cache=state, repeats=repeats,
                               warmup=warmup, calls_per_sample=calls, gap_ms=gap_ms,
                               floor_gbps=rec["floor_bytes"] / (rec["floor_ms"] * 1e6))
                    records.append(rec)
            del inp, scales, buffers, seen
    from .cli import add_run_info
    add_run_info(info, torch_module)
    info["load_average_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    info["wall_s"] = time.perf_counter() - t_start
    config = {"sweep": True, "ops": ops, "contenders": plan["contenders"], "layouts": plan["layouts"],
              "channels": plan["channels"], "threads": threads, "min_bytes": plan["min_bytes"],
              "max_bytes": plan["max_bytes"], "cache": plan["cache"], "repeats": args.repeats, "warmup": args.warmup,
              "seed": args.seed, "numba_layer": args.numba_layer, "dtypes": ["float32"], "epsilon": data.EPSILON,
              "floor_traffic": data.FLOOR_TRAFFIC}
    result = {"machine": info, "caches": plan["caches"], "config": config, "records": records,
              "validations": {"full": full, "reused": reused}, "notes": notes}
    print_tables(console, result)
    from .cli import write_outputs
    write_outputs(console, args, result, markdown, plot)
    refused = [r for r in records for c in r["contenders"].values() if c.get("refused")]
    return 1 if refused else 0


# ---- output ---------------------------------------------------------------------------------------------

def _human(nbytes):
    for unit, k in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= k:
            v = nbytes / k
            return f"{v:.0f} {unit}" if abs(v - round(v)) < 0.05 else f"{v:.1f} {unit}"
    return f"{nbytes:.0f} B"


def _cache_line(cache):
    return ", ".join(f"{k} {_human(v)}" for k, v in cache.items())


def _names(result):
    return [n for n in CONTENDERS if any(n in r["contenders"] for r in result["records"])]


def _cell(rec, name, markup=True):
    if name == "floor":
        return f"{rec['floor_gbps']:.1f}"
    c = rec["contenders"].get(name)
    if c is None:
        return "-"
    if c.get("refused"):
        return "[red]REFUSED[/red]" if markup else "refused"
    return f"{c['gbps']:.1f}" if c.get("gbps") else "-"


def _table_rows(result, layout, op):
    """[(x_bytes, shape, cache, rounds, {threads: record})] of one panel, by size."""
    by = {}
    for r in result["records"]:
        if r["layout"] == layout and r["op"] == op:
            by.setdefault(r["x_bytes"], {})[r["threads"]] = r
    return [(x, next(iter(v.values()))["shape"], next(iter(v.values()))["cache"],
             next(iter(v.values()))["repeats"], v) for x, v in sorted(by.items())]


def _header(result):
    m, cfg = result["machine"], result["config"]
    torch_v = m.get("torch", {}).get("torch_version", "-")
    v = result["validations"]
    return (f"{m['cpu']}, {m['cores']} cores; caches {_cache_line(result['caches'])}; numpy {m['numpy']}, "
            f"numba {m['numba']} ({m.get('numba_threading_layer')}), torch {torch_v}; float32, C={cfg['channels']}; "
            f"cache {cfg['cache']} (warm = no flush, a sample the mean of back-to-back calls; cold = caches flushed "
            f"before every call); load average {_load(m)}; {v['full']} validations against the float64 truth, "
            f"{v['reused']} reused (bitwise the outputs validated at another thread count); "
            f"sweep took {m.get('wall_s', 0):.0f} s on {m['time']}")


def _load(m):
    """The 1-minute load average at the start and at the end."""
    return " -> ".join("-" if not v else f"{v[0]:.2f}"
                       for v in (m.get("load_average_start"), m.get("load_average_end")))


def _threads_label(k):
    return f"{k} thread" + ("s" if k > 1 else "")


def print_tables(console, result):
    from rich.table import Table

    from . import report
    cfg = result["config"]
    names = _names(result) + ["floor"]
    console.print("[bold]refbn bench --sweep[/bold]  " + _header(result))
    for layout in cfg["layouts"]:
        for op in cfg["ops"]:
            t = Table(title=f"{op}, {layout} C={cfg['channels']}: GB/s on the floor's bytes "
                            f"({cfg['floor_traffic'][op]} x the bytes of x), median of alternating rounds",
                      caption="floor: the fastest of its methods per pass (train = read + copy, infer = copy, "
                              "bwd = read x, dy + write dx); x floor = numba's time over the floor's")
            for col in ("x", "shape", "cache", "rounds"):
                t.add_column(col, justify="left" if col in ("shape", "cache") else "right")
            for k in cfg["threads"]:
                for n in names:
                    t.add_column(f"{_LABEL[n]}\n{k}t", justify="right", style="bold" if n == "numba" else
                                 "dim" if n == "floor" else None)
                if "numba" in names:
                    t.add_column(f"numba\nx floor {k}t", justify="right")
            for x, shape, cache, rounds, by in _table_rows(result, layout, op):
                cells = [_human(x), shape, cache, str(rounds)]
                for k in cfg["threads"]:
                    r = by.get(k)
                    cells += [_cell(r, n) if r else "" for n in names]
                    if "numba" in names:
                        xf = r and r["contenders"].get("numba", {}).get("x_floor")
                        cells.append(f"{xf:.2f}" if xf else "")
                t.add_row(*cells)
            console.print(t)
    report.print_refusals_and_notes(console, result, lambda r: f"{r['shape']} {r['op']} {r['threads']}t")


def markdown(result):
    """The sweep as Markdown: one table per layout and op (GB/s per contender and thread count)."""
    cfg = result["config"]
    names = _names(result) + ["floor"]
    lines = [f"- {_header(result)}", ""]
    for layout in cfg["layouts"]:
        for op in cfg["ops"]:
            lines += [f"**{op}**, {layout} C={cfg['channels']}: GB/s on the floor's bytes "
                      f"({cfg['floor_traffic'][op]} x the bytes of x), median of alternating rounds", ""]
            head = ["x", "shape", "cache", "rounds"]
            for k in cfg["threads"]:
                head += [f"{_LABEL[n]} {k}t" for n in names] + (["numba x floor " f"{k}t"] if "numba" in names else [])
            lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            for x, shape, cache, rounds, by in _table_rows(result, layout, op):
                cells = [_human(x), shape, cache, str(rounds)]
                for k in cfg["threads"]:
                    r = by.get(k)
                    cells += [_cell(r, n, markup=False) if r else "" for n in names]
                    if "numba" in names:
                        xf = r and r["contenders"].get("numba", {}).get("x_floor")
                        cells.append(f"{xf:.2f}" if xf else "")
                lines.append("| " + " | ".join(cells) + " |")
            lines.append("")
    lines.append("floor: the fastest of its methods per pass (numpy one thread, numpy-threads, numba, numba-chunks, "
                 "torch); train = read + copy, infer = copy, bwd = read x and dy, write dx.")
    return "\n".join(lines) + "\n"


def plot(result, path):
    """GB/s against the bytes of x (log x), a panel per op (and layout), a line per contender and thread
    count, the L2 and L3 sizes marked, the cold (flushed) sizes shaded."""
    import math

    from matplotlib.figure import Figure
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    cfg, cache = result["config"], result["caches"]
    names = _names(result) + ["floor"]
    colors = {"numpy": "#999999", "numba": "#1f77b4", "torch": "#2ca02c", "floor": "#000000"}
    styles = ["-", "--", ":", "-."]
    threads = sorted(cfg["threads"], reverse=True)
    layouts, ops = cfg["layouts"], cfg["ops"]
    height = 3.8 * len(layouts) + 1.0
    fig = Figure(figsize=(4.8 * len(ops), height))
    axes = fig.subplots(len(layouts), len(ops), squeeze=False)
    xs_all = sorted({r["x_bytes"] for r in result["records"]})
    ticks = [2 ** e for e in range(int(math.ceil(math.log2(xs_all[0]))), int(math.floor(math.log2(xs_all[-1]))) + 1)]
    ends = (xs_all[0], xs_all[-1])              # labelled too (e.g. 320 MiB), without a crowding neighbour
    ticks = sorted({t for t in ticks if all(t == e or not 1 / 1.5 < t / e < 1.5 for e in ends)} | set(ends))
    legend = {}
    for i, layout in enumerate(layouts):
        for j, op in enumerate(ops):
            ax = axes[i, j]
            rows = sorted((r for r in result["records"] if r["layout"] == layout and r["op"] == op),
                          key=lambda r: r["x_bytes"])
            cold = [r["x_bytes"] for r in rows if r["cache"] == "cold"]
            if cold:
                ax.axvspan(min(cold) / 2 ** 0.25, max(cold) * 2 ** 0.25, color="#eeeeee", zorder=0,
                           label="cold: caches flushed before every call")
            for n in names:
                for s, k in enumerate(threads):
                    rs = [r for r in rows if r["threads"] == k]
                    ys = [r["floor_gbps"] if n == "floor" else
                          (r["contenders"].get(n, {}).get("gbps") or float("nan")) for r in rs]
                    ax.plot([r["x_bytes"] for r in rs], ys, color=colors[n], ls=styles[s % len(styles)], lw=1.4,
                            marker="o", ms=3, label=f"{_LABEL[n]}, {_threads_label(k)}")
            for cname, color in (("L2", "#d62728"), ("L3", "#9467bd")):
                if cname in cache:
                    ax.axvline(cache[cname], color=color, lw=0.9, ls="--", label=f"{cname} {_human(cache[cname])}")
            ax.set_xscale("log", base=2)
            ax.xaxis.set_major_locator(FixedLocator(ticks))
            ax.xaxis.set_minor_locator(NullLocator())
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: _human(v).replace(" ", "")))
            ax.tick_params(axis="x", labelsize=7, labelrotation=45)
            ax.set_ylim(bottom=0)
            ax.grid(True, alpha=0.3)
            ax.set_title(f"{op} ({layout}, C={cfg['channels']}): {cfg['floor_traffic'][op]} x bytes of x moved",
                         fontsize=10)
            if j == 0:
                ax.set_ylabel("GB/s on the floor's bytes", fontsize=9)
            if i == len(layouts) - 1:
                ax.set_xlabel("bytes of x (float32)", fontsize=9)
            for handle, label in zip(*ax.get_legend_handles_labels()):
                legend.setdefault(label, handle)
    m = result["machine"]
    fig.suptitle(f"refbn bench --sweep: {m['cpu']}, {m['cores']} cores, float32; median of alternating rounds, each "
                 f"contender validated first; load average {_load(m)}", fontsize=10)
    # one legend for every panel, above them (inches converted to figure fractions)
    ncol = min(len(legend), 6)
    fig.legend(list(legend.values()), list(legend), loc="upper center", ncol=ncol, fontsize=8,
               bbox_to_anchor=(0.5, 1 - 0.3 / height), frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 1 - (0.3 + 0.17 * -(-len(legend) // ncol)) / height))
    fig.savefig(path, dpi=110)
