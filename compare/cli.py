"""``refbn verify``: refbn against TensorFlow's fused kernels and Keras, number for number.

    refbn verify                                  # the whole registry, both TF kernels
    refbn verify --fast                           # what CI runs (no slow cases)
    refbn verify 'n27h131w127c6:f32:NHWC:train:eaf0.6' --tf-kernel eigen
    refbn verify resnet50 --backend numba --json out.json
    refbn verify --list | --divergences
    refbn verify --distributed                    # synchronized BN: tf.distribute, torch gloo, Flax pmap
    refbn verify --fast > verify.log              # piped: --format plain, nothing cut

Output (--format): ``table`` (rich tables sized to the terminal; the default
on a terminal), ``plain`` (one aligned record per check, nothing cut; the
default when stdout is a file or a pipe), ``markdown`` or ``json`` (the
``--json FILE`` payload on stdout; everything else goes to stderr).  Every run
ends with one line that starts with ``OK:`` or ``FAIL:``.

Exit status: 0 when no case FAILs, 1 otherwise, 2 for a usage error or when
TensorFlow cannot be started.
"""
import sys

from rich.text import Text

from refbn import __version__, backends
from refbn.cli import fail

from . import cases as cases_mod
from . import report
from . import frameworks
from .runner import KERNELS, TFUnavailable, verify


def configure(p):
    p.add_argument("cases", nargs="*", metavar="CASE",
                   help="case descriptors (e.g. n27h131w127c6:f32:NHWC:train:eaf0.6) or suite names ("
                        + ", ".join(cases_mod.SUITES) + ", all); default: the whole registry")
    p.add_argument("--backend", default="numpy", choices=backends.NAMES + ("all",),
                   help="refbn backend under test; 'all': every available backend against the same TF run")
    p.add_argument("--framework", metavar="NAMES", default=None,
                   help="frameworks to compare with, comma-separated: " + ", ".join(frameworks.NAMES) +
                        " or all; default: every installed one (with explicit case descriptors: tf)")
    p.add_argument("--tf-kernel", default="both", choices=KERNELS + ("both",),
                   help="TF CPU kernel family: oneDNN (TF's default), Eigen (TF_ENABLE_ONEDNN_OPTS=0) or both")
    p.add_argument("--json", metavar="FILE", help="write every metric of every check to FILE")
    p.add_argument("--format", choices=report.FORMATS, default=None,
                   help="output: table (rich tables sized to the terminal), plain (aligned text records, "
                        "nothing cut), markdown, or json (the --json payload on stdout); default: table "
                        "when stdout is a terminal, plain otherwise")
    p.add_argument("--fast", action="store_true", help="leave out the slow cases (what CI runs)")
    p.add_argument("--seed", type=int, default=None, help="draw the data with this seed instead")
    p.add_argument("--detail", action="store_true", help="print every output's metrics for every case")
    p.add_argument("--list", action="store_true", help="print the registered cases and exit")
    p.add_argument("--divergences", action="store_true", help="explain the documented TF divergences and exit")
    p.add_argument("--distributed", action="store_true",
                   help="check refbn's synchronized-BN merges against the real engines and exit: Keras' "
                        "BatchNormalization(synchronized=True) on tf.distribute (MirroredStrategy, "
                        "MultiWorkerMirroredStrategy), PyTorch SyncBatchNorm's merge on a gloo group and "
                        "Flax BatchNorm(axis_name=...) under pmap")
    return p


def select(names, fast=False, seed=None, with_frameworks=False):
    """Cases for the CLI arguments: descriptors and suite names, in order, without duplicates
    (with_frameworks: 'all' includes the other frameworks' cases)."""
    names = list(names) or ["all"]
    out = []
    for name in names:
        if name == "all":
            out += cases_mod.registry(include_slow=not fast, frameworks=with_frameworks)
        elif name in cases_mod.SUITES:
            out += cases_mod.registry(include_slow=not fast, suite=name)
        else:
            out.append(cases_mod.lookup(name))
    if seed is not None:
        out = [c.with_(seed=seed) for c in out]
    return list(dict.fromkeys(out))


def output_format(args):
    """--format, or table when stdout is a terminal and plain otherwise."""
    if getattr(args, "format", None):
        return args.format
    try:
        return "table" if sys.stdout.isatty() else "plain"
    except (AttributeError, ValueError):
        return "plain"


def check_cases(selected):
    """UsageError for a case that parses but cannot run: a negative size, more memory than this
    machine has, or data N(mean, std^2) that overflow its dtype."""
    import math

    import numpy as np

    from refbn.cli import UsageError, check_memory
    for c in selected:
        bad = [f"{k}{v}" for k, v in c.dims if v < 0]
        if bad:
            raise UsageError(f"CASE {c.descriptor()!r}: expected sizes >= 0, got {', '.join(bad)}")
        # x and dy are drawn in float64 (and again by every TF worker): 16 bytes a value at least
        check_memory("CASE", f"{c.descriptor()!r}", 16 * math.prod(s for _, s in c.dims))
        top = float(np.finfo(c.np_dtype).max)
        if abs(c.mean) + 10 * c.std > top:
            raise UsageError(f"CASE {c.descriptor()!r}: x ~ N({c.mean:g}, {c.std:g}^2) overflows {c.dtype} "
                             f"(expected |mean| + 10 std <= {top:g})")


def main(args):
    from refbn.cli import check_number, check_output
    check_output("--json", args.json)
    if args.seed is not None:
        check_number("--seed", args.seed, 0)
    con = report.console()
    if args.divergences:
        con.print(report.divergences_table())
        return 0
    if getattr(args, "distributed", False):
        from . import distributed
        return distributed.main(args)
    explicit = any(c != "all" and c not in cases_mod.SUITES for c in args.cases)
    try:
        if getattr(args, "framework", None) is not None:
            wanted = frameworks.parse_list(args.framework)
        else:
            wanted = ["tf"] if explicit else frameworks.installed()
    except ValueError as e:
        return fail("verify", e)
    fw_names = [f for f in wanted if not frameworks.missing(f)]
    try:
        selected = select(args.cases, args.fast, args.seed, with_frameworks=fw_names != ["tf"])
    except cases_mod.DescriptorError as e:
        return fail("verify", f"CASE: {e}")
    check_cases(selected)
    if args.list:
        for c in selected:
            con.print(f"{c.descriptor():56s} {' '.join(sorted(c.tags))}", markup=False)
        con.print(f"{len(selected)} cases")
        return 0
    if args.backend == "tf_eigen":   # bit-identity with TF's Eigen kernel, not a tolerance
        from . import tf_eigen_check
        return tf_eigen_check.main(args, selected, con)
    fmt = output_format(args)
    kernels = KERNELS if args.tf_kernel == "both" else (args.tf_kernel,)
    if "tf" not in fw_names:
        kernels = ()
    names = backends.available() if args.backend == "all" else args.backend
    meta = {"refbn": __version__, "backend": args.backend, "tf_kernels": list(kernels), "frameworks": fw_names,
            "cases": [c.descriptor() for c in selected]}
    total = len(selected) * len(kernels) * (1 if isinstance(names, str) else len(names))
    results = [frameworks.not_installed_result(f, args.backend) for f in wanted if frameworks.missing(f)]
    conventions = [] if fw_names != ["tf"] or getattr(args, "framework", None) else None
    err = report.console(stderr=True)
    text = err if fmt == "json" else con  # where everything but the JSON goes
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    try:
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=err, transient=True) as prog:
            task = prog.add_task("starting TensorFlow", total=total)

            def started(hello):
                meta["tf"] = hello
                prog.update(task, description="verifying")

            extra = {} if fw_names == ["tf"] and conventions is None else {
                "frameworks": fw_names, "conventions": conventions}
            for r in verify(selected, backend=names, kernels=kernels, on_start=started, **extra):
                results.append(r)
                prog.update(task, advance=1, description=r.descriptor[:40])
    except TFUnavailable as e:
        hint = ("\nInstall it with: pip install -e \".[tf]\"  (tensorflow-cpu and keras)"
                if not results else f"\n(after {len(results)} check(s); the last case sent may have crashed it)")
        err.print(f"refbn verify: TensorFlow failed: {e}{hint}", markup=False)
        _abort(text, f"FAIL: TensorFlow failed after {len(results)} of {total} check(s); see the error above")
        return 2
    except ImportError as e:
        err.print(f"refbn verify: --backend {args.backend} is not available here: {e}", markup=False)
        _abort(text, f"FAIL: --backend {args.backend} is not available here; nothing was verified")
        return 2
    if meta.get("tf"):
        v = next(iter(meta["tf"].values())).get("tf_version", "?")
        text.print(Text(f"refbn {__version__} (backend {args.backend}) vs TensorFlow {v} "
                        f"({'/'.join(kernels)}): {len(selected)} case(s)"))
    if conventions:
        results += frameworks.convention_failures(conventions, args.backend)
    if fmt == "json":
        con.file.write(report.dumps(results, meta, conventions) + "\n")
        con.file.flush()
    else:
        report.print_report(con, results, detail=args.detail or len(results) <= 2, fmt=fmt, final=False)
        report.print_conventions(con, conventions, fmt)
    if args.json:
        report.write_json(args.json, results, meta, conventions)
        text.print(Text(f"metrics written to {args.json}"))
    report.print_final(text, results, fmt, where=report.JSON_WHERE if fmt == "json" else "the repro lines above")
    return 1 if any(r.verdict == "FAIL" for r in results) else 0


def _abort(console, line):
    """The last line of a run that could not finish."""
    console.print()
    console.print(Text(line), soft_wrap=True)


if __name__ == "__main__":  # python -m refbn.compare.cli: the same as refbn verify (one-line errors)
    from refbn import cli as refbn_cli
    sys.exit(refbn_cli.main(["verify", *sys.argv[1:]]))
