"""``refbn bench``: time refbn's kernels against TensorFlow and the memory floor.

For every shape and op (train = training forward, infer = inference
forward, bwd = training backward), float32:

1. every contender runs once and is checked against the float64 truth with
   its declared tolerance; a wrong contender is refused, never timed;
2. refbn numpy, refbn numba, one TF kernel family (this process) and the
   memory floors are timed alternating, with warm-up, each call after a cache
   flush (``--cache cold``) and a short pause.  This process runs TF oneDNN
   when it is asked for (``TF_ENABLE_ONEDNN_OPTS=1`` is set before TF loads,
   unless the variable is already set or TF already loaded); every other TF
   kernel runs in a worker process with the variable forced for it, timed
   against that process's own floors.  Each TF row is labelled by the kernel
   TF reports (``IsMklEnabled``), never by the one asked for: on a CPU where
   TF's default is Eigen (no AVX-512), oneDNN is forced, not skipped.  JAX
   (if installed) always runs in a worker, after TF's.  Every worker also
   times numba alternating with its framework: numba's ratio to a worker's
   framework is taken from those runs (``numba_alternating_ms``);
3. a table gives median/min ms, GB/s on the floor's bytes, and the ratios
   to the floor and to TF; a goals table checks the targets of issue 4;
4. ``--json`` writes every time and check, ``--plot`` a PNG of the ratios.

numba's JIT cost is reported apart: the first call of each op in this
process (compile or cache load), and with ``--jit`` a cold compile and a
warm start measured in fresh processes.
"""
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np

#: issue 4's targets (as issue 14 restated them), each named by what it measures
#: numba vs its floor, per op: train = read + copy, infer = the multi-threaded copy, bwd = x + dy -> dx
GOALS = {"train": 1.25, "infer": 1.15, "bwd": 1.20}
PEER_GOAL = 0.90        # numba vs the fastest peer of the same layout (ResNet-50 shapes, 2048x1024)
SMALL_GOAL = 1.00       # numba vs torch per call on small batches, both layouts
HALF_GOAL = 0.90        # numba vs torch with float16 / bfloat16 x (ResNet-50 shapes)
SMALL_VALUES = 1 << 20  # a batch of fewer values is "small": its time is mostly per-call cost
SMALL_CALLS = 20        # ... and each of its samples is the mean of this many back-to-back calls (warm)
NCHW_VS_NHWC = 1.20     # refbn's channels-first within 1.2x of its channels-last
CONTENDERS = ("numpy", "numba", "torch", "jax", "tf_onednn", "tf_eigen")
DTYPES = ("float32", "float16", "bfloat16")
TF_KERNELS = ("onednn", "eigen")      # TF_ENABLE_ONEDNN_OPTS=1 / 0
ALIASES = {"tf": ("tf_onednn", "tf_eigen")}



def _have_jax():
    """Whether jax is installed (asked of the import system; jax is not imported)."""
    import importlib.util
    return importlib.util.find_spec("jax") is not None


def cpu_model():
    """The CPU's model name (/proc/cpuinfo), else what platform knows."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return model

def configure(p):
    p.add_argument("--shapes", default=None,
                   help="a shape list in bench/shapes (resnet50, mlp, smoke), a file, or descriptors "
                        "such as 32x56x56x64,n32c64h56w56:NCHW,2048x1024 (default: resnet50)")
    p.add_argument("--ops", default="train,infer,bwd", help="comma-separated: train, infer, bwd")
    p.add_argument("--dtypes", default="float32",
                   help="comma-separated x dtypes: float32, float16, bfloat16 (default float32; TF runs float32 "
                        "only, the 16-bit ones race numba against torch)")
    p.add_argument("--contenders", default=None,
                   help="comma-separated: numpy, numba, torch, jax, tf_onednn, tf_eigen, or tf for both TF "
                        "kernels (default: all; jax if it is installed; with --sweep numba,torch).  torch runs in "
                        "this process, alternating with refbn, and TF then in worker processes (without torch TF "
                        "oneDNN runs here and Eigen in a worker); JAX always in a worker, after TF's; each worker "
                        "times numba alternating with its framework")
    p.add_argument("--threads", type=int, default=None,
                   help="threads for numba and TF (default: all cores, %d here)" % (os.cpu_count() or 1))
    p.add_argument("--repeats", type=int, default=None,
                   help="timed rounds per shape and op (default 15; with --sweep 9 to 3, fewer for bigger x)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed calls per contender first (default 2; with --sweep 1 for a cold x)")
    p.add_argument("--cache", choices=("cold", "warm", "auto"), default=None,
                   help="cold: evict the caches before every timed call (default); warm: don't; auto (--sweep's "
                        "default): warm for an x smaller than the last-level cache, cold for a bigger one")
    p.add_argument("--gap-ms", type=float, default=None,
                   help="pause before every timed call, so the previous contender's spinning threads sleep "
                        "(default 0 with --cache cold, whose flush already separates the calls; 2 with warm)")
    p.add_argument("--numba-layer", default="omp", choices=("omp", "workqueue", "tbb", "default"),
                   help="numba threading layer for this run (default omp, numba's own first choice here: its "
                        "threads spin briefly after a pass, so a launch costs ~5-50 us against ~130-200 us for "
                        "workqueue, whose threads sleep; on a loaded machine workqueue degrades more gracefully, "
                        "see bench/RESULTS.md 'Threads'; 'default' keeps numba's choice or NUMBA_THREADING_LAYER)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jit", action="store_true",
                   help="also measure numba's cold compile and warm start in fresh processes")
    p.add_argument("--json", metavar="FILE", help="write every time, check and ratio as JSON")
    p.add_argument("--plot", metavar="FILE.png", help="plot each contender's time over the floor per shape")
    p.add_argument("--markdown", metavar="FILE.md", help="write the tables as Markdown (as in bench/RESULTS.md)")
    from . import sweep
    sweep.configure(p)


def _parse_list(text, allowed, name, aliases=None):
    items = []
    for t in (t.strip() for t in text.split(",")):
        if t:
            items += (aliases or {}).get(t, (t,))
    bad = [t for t in items if t not in allowed]
    if bad or not items:
        from refbn.cli import UsageError
        extra = f" (or {', '.join(aliases)})" if aliases else ""
        raise UsageError(f"{name}: expected a comma-separated subset of "
                         f"{', '.join(allowed)}{extra}, got {text!r}")
    return list(dict.fromkeys(items))


#: bytes a value of x that a shape needs at the very least: x and dy (float32), the float64 copy
#: of x and the float64 truth of y
BYTES_PER_VALUE = 24


def check_args(args):
    """(specs, ops, contenders) from the arguments, or UsageError for the first bad one: nothing
    heavy is imported and nothing is timed before every argument and output path is checked."""
    from refbn.cli import UsageError, check_memory, check_number

    from . import data, specs, sweep
    sweep.refuse_outside(args)    # the --sweep-* options (and --cache auto) need --sweep
    args.shapes = "resnet50" if args.shapes is None else args.shapes
    if args.contenders is None:
        args.contenders = ",".join(c for c in CONTENDERS if c != "jax" or _have_jax())
    args.repeats = 15 if args.repeats is None else args.repeats
    args.warmup = 2 if args.warmup is None else args.warmup
    args.cache = args.cache or "cold"
    try:
        shapes = specs.load(args.shapes)
    except ValueError as e:
        raise UsageError(str(e)) from None
    for spec in shapes:
        check_memory("--shapes", f"shape {spec}", BYTES_PER_VALUE * spec.size)
    ops = _parse_list(args.ops, data.OPS, "--ops")
    contenders = _parse_list(args.contenders, CONTENDERS, "--contenders", ALIASES)
    args.dtype_list = _parse_list(args.dtypes, DTYPES, "--dtypes")
    if args.threads is not None:
        check_number("--threads", args.threads, 1)
    check_timing_and_outputs(args)
    if args.jit and "numba" not in contenders:
        raise UsageError(f"--jit: measures numba's compile, but --contenders {args.contenders!r} has no numba")
    return shapes, ops, contenders


def check_timing_and_outputs(args):
    """The options ``refbn bench`` and ``--sweep`` share: rounds, pauses, seed and output paths
    (a repeats/warmup of None is the sweep's "chosen per size")."""
    from refbn.cli import check_number, check_output, check_plot
    if args.repeats is not None:
        check_number("--repeats", args.repeats, 1)
    if args.warmup is not None:
        check_number("--warmup", args.warmup, 0)
    if args.gap_ms is not None:
        check_number("--gap-ms", args.gap_ms, 0, 60_000)
    check_number("--seed", args.seed, 0)
    check_output("--json", args.json)
    check_output("--markdown", args.markdown)
    check_plot("--plot", args.plot)


def add_run_info(info, torch_module):
    """What a run learns only once it has run: numba's threading layer (chosen at its first
    parallel launch) and torch's threads; the bench and --sweep record the same."""
    import numba
    try:
        info["numba_threading_layer"] = numba.threading_layer()
    except ValueError:
        info["numba_threading_layer"] = None
    if torch_module is not None:
        info["torch"] = torch_module.info()


def write_outputs(console, args, result, markdown, plot):
    """--json, --markdown and --plot of a finished run (the bench's or the sweep's)."""
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1, default=float)
        console.print(f"JSON written to {args.json}")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(markdown(result))
        console.print(f"Markdown written to {args.markdown}")
    if args.plot:
        plot(result, args.plot)
        console.print(f"plot written to {args.plot}")


def _dtype(name):
    from refbn import dtypes
    return dtypes.parse(name)


def start_tf_in_process(wanted):
    """Import TF here for the first wanted kernel it can run; returns (module, kernel TF reports).

    TF picks its kernel family when it is imported, from ``TF_ENABLE_ONEDNN_OPTS``.  Unless the
    variable is already set or TF is already loaded, it is set for the first wanted kernel, so
    that kernel alternates with refbn in this process.  Which kernel then runs is asked of TF.
    """
    if "tensorflow" not in sys.modules and "TF_ENABLE_ONEDNN_OPTS" not in os.environ:
        os.environ["TF_ENABLE_ONEDNN_OPTS"] = "1" if wanted[0] == "onednn" else "0"
    from refbn.compare import tf_bench
    return tf_bench, tf_bench.info()["kernel"]


def plan_tf(wanted, in_process):
    """Which TF kernels run in this process and which in workers.

    ``wanted``: kernel names asked for, in order; ``in_process``: the kernel TF reports in this
    process (None if TF could not load).  Returns (run here: bool, [kernels for workers]).
    """
    here = in_process in wanted
    return here, [k for k in wanted if k != in_process]


def machine_info(threads):
    import numba

    from . import floors
    cpu = cpu_model()
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        fam = {k.strip(): v.strip() for k, v in (ln.split(":", 1) for ln in lscpu.splitlines() if ":" in ln)}
        cpu_detail = {k: fam[k] for k in ("Model name", "CPU family", "Model", "Thread(s) per core",
                                          "L2 cache", "L3 cache", "Hypervisor vendor") if k in fam}
    except (OSError, subprocess.SubprocessError):
        cpu_detail = {}
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {"cpu": cpu, "cpu_detail": cpu_detail, "cores": os.cpu_count(), "threads": threads,
            "last_level_cache_bytes": floors.last_level_cache_bytes(), "python": platform.python_version(),
            "numpy": np.__version__, "numba": numba.__version__, "load_average_start": load,
            "time": time.strftime("%Y-%m-%d %H:%M:%S %z")}


def _run_worker(framework, kernel, args, shapes, ops, threads, on_line, numba=True):
    """``framework`` ("tf": with TF_ENABLE_ONEDNN_OPTS forced for ``kernel``; "jax") in a worker, timed
    alternating with numba (unless ``numba`` is false): (result, error lines)."""
    req = {"shapes": [str(s) for s in shapes], "ops": ops, "threads": threads, "repeats": args.repeats,
           "warmup": args.warmup, "cache": args.cache, "gap_ms": args.gap_ms, "seed": args.seed,
           "framework": framework, "numba": numba,
           "kernel_requested": kernel, "small_values": SMALL_VALUES, "small_calls": SMALL_CALLS}
    with tempfile.TemporaryDirectory(prefix="refbn-bench-") as tmp:
        req_path, out_path = os.path.join(tmp, "req.json"), os.path.join(tmp, "out.json")
        with open(req_path, "w") as f:
            json.dump(req, f)
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
        if framework == "tf":
            env["TF_ENABLE_ONEDNN_OPTS"] = "1" if kernel == "onednn" else "0"
        proc = subprocess.Popen([sys.executable, "-m", "refbn.bench.tf_worker", req_path, out_path],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for line in proc.stdout:
            if line.startswith("{"):
                on_line(json.loads(line))
        err = proc.stderr.read()
        if proc.wait() != 0 or not os.path.exists(out_path):
            return None, err.strip().splitlines()[-5:]
        with open(out_path) as f:
            return json.load(f), None


def _run_jit():
    """Cold compile, then warm start, each in a fresh process with its own numba cache."""
    out = {}
    with tempfile.TemporaryDirectory(prefix="refbn-jit-") as tmp:
        env = dict(os.environ, NUMBA_CACHE_DIR=tmp)
        for label in ("cold", "warm"):
            t = time.perf_counter()
            r = subprocess.run([sys.executable, "-m", "refbn.bench.jit_probe"], capture_output=True, text=True,
                               env=env)
            if r.returncode != 0:
                out[label] = {"error": r.stderr.strip().splitlines()[-3:]}
                continue
            out[label] = json.loads(r.stdout.strip().splitlines()[-1])
            out[label]["process_s"] = time.perf_counter() - t
    return out


def _omp_available():
    try:
        import numba.np.ufunc.omppool  # noqa: F401  (the OpenMP threading layer's library)
    except ImportError:
        return False
    return True


def _jit_stats():
    """Per numba kernel: signatures compiled or loaded in this process, cache hits and misses."""
    from numba.core.dispatcher import Dispatcher
    from refbn.backends import numba_kernels as nk
    dispatchers = {}
    for name, k in vars(nk).items():
        if isinstance(k, nk._Kernel):
            dispatchers.update({f"{name}.serial": k.serial, f"{name}.parallel": k.parallel})
        elif isinstance(k, Dispatcher) and k not in dispatchers.values():   # the compiled helpers
            dispatchers[name] = k
    for (op, family, build), d in nk.OPS.items():                           # the drivers of the ops
        dispatchers[f"{op}.{family}.{build}"] = d
    stats = {}
    for name, d in dispatchers.items():
        if d.signatures:
            s = d.stats
            stats[name] = {"signatures": len(d.signatures), "cache_hits": sum(s.cache_hits.values()),
                           "cache_misses": sum(s.cache_misses.values())}
    return stats


def set_numba_layer(args, console):
    """numba's threading layer from --numba-layer (omp falls back to workqueue where libgomp cannot
    load), set before its first parallel launch and for the worker processes; returns numba."""
    import numba
    if args.numba_layer == "omp" and not _omp_available():
        console.print("refbn bench: numba's OpenMP layer cannot load here (no libgomp?); using workqueue")
        args.numba_layer = "workqueue"
    if args.numba_layer != "default":
        numba.config.THREADING_LAYER = args.numba_layer   # read at numba's first parallel launch
        os.environ["NUMBA_THREADING_LAYER"] = args.numba_layer   # and by the worker processes
    return numba


def main(args):
    if getattr(args, "sweep", False):
        from . import sweep
        return sweep.main(args)
    shapes, ops, contenders = check_args(args)
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from . import data, floors, report, runner

    console = Console()
    if not console.is_terminal:
        console = Console(width=150)
    if args.gap_ms is None:
        args.gap_ms = 0.0 if args.cache == "cold" else 2.0
    threads = args.threads or os.cpu_count() or 1
    numba = set_numba_layer(args, console)
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    backends = [b for b in ("numpy", "numba") if b in contenders]
    tf_module, tf_kernel, notes = None, None, []
    tf_wanted = [k for k in TF_KERNELS if f"tf_{k}" in contenders]
    workers = []
    run_jax = "jax" in contenders and _have_jax()      # in a worker, after TF's
    if "jax" in contenders and not run_jax:
        notes.append("jax contender skipped: not installed")
    torch_module = None
    if "torch" in contenders:
        # torch alternates with refbn here; TF then runs in workers (one framework per process)
        try:
            from . import torch_bench as torch_module
            torch_module.configure_threads(threads)
        except ImportError as e:
            notes.append(f"torch contender skipped: {e}")
            torch_module = None
    if tf_wanted and torch_module is not None:
        workers = list(tf_wanted)
    elif tf_wanted:
        try:
            tf_module, tf_kernel = start_tf_in_process(tf_wanted)
            tf_module.configure_threads(threads)
        except ImportError as e:
            notes.append(f"TF contenders skipped: {e}")
            tf_wanted = []
        here, workers = plan_tf(tf_wanted, tf_kernel)
        if not here:
            tf_module = None       # TF loaded here with a kernel nobody asked for: not timed
    info = machine_info(threads)
    flush = floors.Flusher(args.cache == "cold")
    records = []
    groups = len(shapes) * len(ops) * len(args.dtype_list)
    t_start = time.perf_counter()
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as progress:
        task = progress.add_task("benchmarking", total=groups * args.repeats)
        for dtype, spec in ((d, s) for d in args.dtype_list for s in shapes):
            progress.update(task, description=f"{spec} {dtype}: inputs and float64 truth")
            inp = data.add_truth(data.make(spec, seed=args.seed, dtype=_dtype(dtype)), ops)
            scales = data.scales(inp, "train")
            buffers = {}
            for op in ops:
                progress.update(task, description=f"{spec} {op}: validating")
                cs = runner.refbn_contenders(inp, op, backends, buffers)
                if torch_module is not None:
                    cs += runner.torch_contenders(inp, op, torch_module)
                if tf_module is not None and dtype == "float32":
                    cs += runner.tf_contenders(inp, op, tf_module, tf_kernel)
                for c in cs:
                    runner.validate(c, inp, op, scales)
                cs += runner.floor_contenders(inp, op, buffers, threads, torch_module)
                progress.update(task, description=f"{spec} {op}: timing")
                calls = SMALL_CALLS if spec.size < SMALL_VALUES else 1
                runner.time_group(cs, args.repeats, args.warmup, flush, args.gap_ms / 1e3,
                                  tick=lambda: progress.advance(task), calls=calls)
                records.append(dict(runner.summarize(cs, inp, op), calls_per_sample=calls))
            del inp, buffers
        worker_results = {}
        jax_result = None
        for kernel in workers + (["jax"] if run_jax else []):
            framework = "jax" if kernel == "jax" else "tf"
            t2 = progress.add_task(f"{'JAX' if kernel == 'jax' else 'TF ' + kernel} (worker process)",
                                   total=len(shapes) * len(ops))
            res, err = _run_worker(framework, kernel, args, shapes, ops, threads, lambda _: progress.advance(t2),
                                   numba="numba" in contenders)
            if res is None:
                notes.append(f"{'JAX worker' if kernel == 'jax' else 'TF worker for ' + kernel} failed: "
                             + " | ".join(err or []))
                continue
            if framework == "jax":
                jax_result = res
                continue
            got = res["info"]["kernel"]
            if got != kernel:
                notes.append(f"TF was forced to {kernel} (TF_ENABLE_ONEDNN_OPTS="
                             f"{'1' if kernel == 'onednn' else '0'}) but reports {got}: "
                             f"{'oneDNN cannot run on this CPU' if kernel == 'onednn' else 'Eigen was not selected'}")
            if got == tf_kernel and tf_module is not None or got in worker_results:
                notes.append(f"TF {got} from the {kernel} worker dropped: that kernel is already timed")
                continue
            worker_results[got] = res
        jit = None
        if args.jit and "numba" in contenders:
            progress.add_task("numba cold compile / warm start (subprocesses)", total=None)
            jit = _run_jit()
    for kernel, res in list(worker_results.items()) + ([("jax", jax_result)] if jax_result else []):
        by_key = {(r["shape"], r["op"], r["dtype"]): r for r in res["records"]}
        for rec in records:
            e = by_key.get((rec["shape"], rec["op"], rec["dtype"]))
            if e:
                tf_rows = {k: dict(v, process="worker") for k, v in e["contenders"].items()
                           if v["family"] in ("tf", "jax")}
                rec["contenders"].update(tf_rows)
                rec.setdefault("worker_floor_ms", {})[kernel] = e["floor_ms"]
                numba_ms = e["contenders"].get("numba", {}).get("median_ms")   # alternating with the peer
                for v in tf_rows.values():
                    if v.get("median_ms"):
                        v["x_floor"] = v["median_ms"] / e["floor_ms"]
                    if numba_ms:
                        v["numba_alternating_ms"] = numba_ms
    if tf_module is not None:
        for rec in records:
            for v in rec["contenders"].values():
                if v["family"] == "tf" and "process" not in v:
                    v["process"] = "this"
    for rec in records:
        runner.add_ratios(rec)
    add_run_info(info, torch_module)
    if tf_module is not None:
        info["tf"] = dict(tf_module.info(), process="this")
    info["tf_workers"] = {k: r["info"] for k, r in worker_results.items()}
    if jax_result:
        info["jax"] = dict(jax_result["info"], process="worker")
    if "tf" not in info and worker_results:
        info["tf"] = dict(next(iter(worker_results.values()))["info"], process="worker")
    info["load_average_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    info["wall_s"] = time.perf_counter() - t_start
    config = {"shapes": [str(s) for s in shapes], "ops": ops, "contenders": contenders, "repeats": args.repeats,
              "warmup": args.warmup, "cache": args.cache, "gap_ms": args.gap_ms, "seed": args.seed,
              "numba_layer": args.numba_layer, "dtypes": args.dtype_list, "epsilon": data.EPSILON}
    result = {"machine": info, "config": config, "records": records, "goals": report.goals(records),
              "jit": {"this_process": _jit_stats() if "numba" in backends else {},
                      "first_call_s": {f"{r['shape']} {r['op']} {r['dtype']}": r["contenders"]["numba"]["first_call_s"]
                                       for r in records if "numba" in r["contenders"]},
                      "fresh_processes": jit},
              "notes": notes}
    report.print_all(console, result)
    write_outputs(console, args, result, report.markdown, report.plot)
    refused = [(r["shape"], r["op"], n) for r in records for n, c in r["contenders"].items() if c.get("refused")]
    return 1 if refused else 0
