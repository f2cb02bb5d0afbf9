"""``refbn bench``: time refbn's kernels against TensorFlow and the memory floor.

For every shape and op (train = training forward, infer = inference
forward, bwd = training backward), float32:

1. every contender runs once and is checked against the float64 truth with
   its declared tolerance; a wrong contender is refused, never timed;
2. refbn numpy, refbn numba, TF oneDNN (this process) and the memory floors
   are timed alternating, with warm-up, each call after a cache flush
   (``--cache cold``) and a short pause; TF Eigen runs in a subprocess with
   ``TF_ENABLE_ONEDNN_OPTS=0`` against that process's own floors;
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

#: issue 4's targets: op -> (max numba/TF oneDNN, max numba/floor)
GOALS = {"train": (0.70, 1.25), "infer": (0.60, 1.05), "bwd": (0.85, 1.20)}
NUMPY_VS_TF = 5.0       # the numpy reference within 5x of TF
NCHW_VS_NHWC = 1.20     # refbn's channels-first within 1.2x of its channels-last
CONTENDERS = ("numpy", "numba", "tf", "tf_eigen")


def configure(p):
    p.add_argument("--shapes", default="resnet50",
                   help="a shape list in bench/shapes (resnet50, mlp, smoke), a file, or descriptors "
                        "such as 32x56x56x64,n32c64h56w56:NCHW,2048x1024 (default: resnet50)")
    p.add_argument("--ops", default="train,infer,bwd", help="comma-separated: train, infer, bwd")
    p.add_argument("--contenders", default=",".join(CONTENDERS),
                   help="comma-separated: numpy, numba, tf (oneDNN, in process), tf_eigen (subprocess)")
    p.add_argument("--threads", type=int, default=None,
                   help="threads for numba and TF (default: all cores, %d here)" % (os.cpu_count() or 1))
    p.add_argument("--repeats", type=int, default=15, help="timed rounds per shape and op (default 15)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls per contender first (default 2)")
    p.add_argument("--cache", choices=("cold", "warm"), default="cold",
                   help="cold: evict the caches before every timed call (default); warm: don't")
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


def _parse_list(text, allowed, name):
    items = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in items if t not in allowed]
    if bad or not items:
        raise SystemExit(f"refbn bench: {name}: expected a comma-separated subset of "
                         f"{', '.join(allowed)}, got {text!r}")
    return items


def machine_info(threads):
    import numba

    from . import floors
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
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


def _run_eigen(args, shapes, ops, threads, on_line):
    req = {"shapes": [str(s) for s in shapes], "ops": ops, "threads": threads, "repeats": args.repeats,
           "warmup": args.warmup, "cache": args.cache, "gap_ms": args.gap_ms, "seed": args.seed}
    with tempfile.TemporaryDirectory(prefix="refbn-bench-") as tmp:
        req_path, out_path = os.path.join(tmp, "req.json"), os.path.join(tmp, "out.json")
        with open(req_path, "w") as f:
            json.dump(req, f)
        env = dict(os.environ, TF_ENABLE_ONEDNN_OPTS="0", TF_CPP_MIN_LOG_LEVEL="2")
        proc = subprocess.Popen([sys.executable, "-m", "refbn.bench.eigen_worker", req_path, out_path],
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
        elif isinstance(k, Dispatcher) and k not in dispatchers.values():   # the compiled glue and drivers
            dispatchers[name] = k
    stats = {}
    for name, d in dispatchers.items():
        if d.signatures:
            s = d.stats
            stats[name] = {"signatures": len(d.signatures), "cache_hits": sum(s.cache_hits.values()),
                           "cache_misses": sum(s.cache_misses.values())}
    return stats


def main(args):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from . import data, floors, report, runner, specs

    console = Console()
    if not console.is_terminal:
        console = Console(width=150)
    try:
        shapes = specs.load(args.shapes)
    except ValueError as e:
        console.print(f"refbn bench: {e}")
        return 2
    ops = _parse_list(args.ops, data.OPS, "--ops")
    contenders = _parse_list(args.contenders, CONTENDERS, "--contenders")
    if args.gap_ms is None:
        args.gap_ms = 0.0 if args.cache == "cold" else 2.0
    if args.repeats < 1 or args.warmup < 0:
        console.print("refbn bench: --repeats must be >= 1 and --warmup >= 0")
        return 2
    threads = args.threads or os.cpu_count() or 1
    import numba
    if args.numba_layer == "omp" and not _omp_available():
        console.print("refbn bench: numba's OpenMP layer cannot load here (no libgomp?); using workqueue")
        args.numba_layer = "workqueue"
    if args.numba_layer != "default":
        numba.config.THREADING_LAYER = args.numba_layer   # read at numba's first parallel launch
        os.environ["NUMBA_THREADING_LAYER"] = args.numba_layer   # and by the worker processes
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    backends = [b for b in ("numpy", "numba") if b in contenders]
    tf_module, tf_kernel, notes = None, None, []
    if "tf" in contenders:
        try:
            from refbn.compare import tf_bench as tf_module
            tf_module.configure_threads(threads)
            tf_kernel = tf_module.info()["kernel"]
        except ImportError as e:
            notes.append(f"TF contenders skipped: {e}")
            tf_module = None
    info = machine_info(threads)
    flush = floors.Flusher(args.cache == "cold")
    records = []
    groups = len(shapes) * len(ops)
    t_start = time.perf_counter()
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as progress:
        task = progress.add_task("benchmarking", total=groups * args.repeats)
        for spec in shapes:
            progress.update(task, description=f"{spec}: inputs and float64 truth")
            inp = data.add_truth(data.make(spec, seed=args.seed), ops)
            scales = data.scales(inp, "train")
            buffers = {}
            for op in ops:
                progress.update(task, description=f"{spec} {op}: validating")
                cs = runner.refbn_contenders(inp, op, backends, buffers)
                if tf_module is not None:
                    cs += runner.tf_contenders(inp, op, tf_module, tf_kernel)
                for c in cs:
                    runner.validate(c, inp, op, scales)
                cs += runner.floor_contenders(inp, op, buffers)
                progress.update(task, description=f"{spec} {op}: timing")
                runner.time_group(cs, args.repeats, args.warmup, flush, args.gap_ms / 1e3,
                                  tick=lambda: progress.advance(task))
                records.append(runner.summarize(cs, inp, op))
            del inp, buffers
        eigen = None
        if "tf_eigen" in contenders:
            t2 = progress.add_task("TF Eigen (subprocess)", total=groups)
            eigen, err = _run_eigen(args, shapes, ops, threads, lambda _: progress.advance(t2))
            if eigen is None:
                notes.append("TF Eigen worker failed: " + " | ".join(err or []))
        jit = None
        if args.jit and "numba" in contenders:
            progress.add_task("numba cold compile / warm start (subprocesses)", total=None)
            jit = _run_jit()
    if eigen:
        by_key = {(r["shape"], r["op"]): r for r in eigen["records"]}
        for rec in records:
            e = by_key.get((rec["shape"], rec["op"]))
            if e:
                rec["contenders"].update({k: dict(v, process="eigen worker") for k, v in e["contenders"].items()
                                          if v["family"] == "tf"})
                rec["eigen_worker_floor_ms"] = e["floor_ms"]
                for v in rec["contenders"].values():
                    if v.get("process") == "eigen worker" and v.get("median_ms"):
                        v["x_floor"] = v["median_ms"] / e["floor_ms"]
    for rec in records:
        runner.add_ratios(rec)
    try:
        import numba as _nb
        info["numba_threading_layer"] = _nb.threading_layer()
    except ValueError:
        info["numba_threading_layer"] = None
    if tf_module is not None:
        info["tf"] = tf_module.info()
    if eigen:
        info["tf_eigen"] = eigen["info"]
    info["load_average_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    info["wall_s"] = time.perf_counter() - t_start
    config = {"shapes": [str(s) for s in shapes], "ops": ops, "contenders": contenders, "repeats": args.repeats,
              "warmup": args.warmup, "cache": args.cache, "gap_ms": args.gap_ms, "seed": args.seed,
              "numba_layer": args.numba_layer, "dtype": "float32", "epsilon": data.EPSILON}
    result = {"machine": info, "config": config, "records": records, "goals": report.goals(records),
              "jit": {"this_process": _jit_stats() if "numba" in backends else {},
                      "first_call_s": {f"{r['shape']} {r['op']}": r["contenders"]["numba"]["first_call_s"]
                                       for r in records if "numba" in r["contenders"]},
                      "fresh_processes": jit},
              "notes": notes}
    report.print_all(console, result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1, default=float)
        console.print(f"JSON written to {args.json}")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(report.markdown(result))
        console.print(f"Markdown written to {args.markdown}")
    if args.plot:
        report.plot(result, args.plot)
        console.print(f"plot written to {args.plot}")
    refused = [(r["shape"], r["op"], n) for r in records for n, c in r["contenders"].items() if c.get("refused")]
    return 1 if refused else 0
