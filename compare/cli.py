"""``refbn verify``: refbn against TensorFlow's fused kernels and Keras, number for number.

    refbn verify                                  # the whole registry, both TF kernels
    refbn verify --fast                           # what CI runs (no slow cases)
    refbn verify 'n27h131w127c6:f32:NHWC:train:eaf0.6' --tf-kernel eigen
    refbn verify resnet50 --backend numba --json out.json
    refbn verify --list | --divergences
    refbn verify --distributed                    # synchronized BN on tf.distribute

Exit status: 0 when no case FAILs, 1 otherwise, 2 for a usage error or when
TensorFlow cannot be started.
"""
import sys

from refbn import __version__, backends

from . import cases as cases_mod
from . import report
from .runner import KERNELS, TFUnavailable, verify


def configure(p):
    p.add_argument("cases", nargs="*", metavar="CASE",
                   help="case descriptors (e.g. n27h131w127c6:f32:NHWC:train:eaf0.6) or suite names ("
                        + ", ".join(cases_mod.SUITES) + ", all); default: the whole registry")
    p.add_argument("--backend", default="numpy", choices=backends.NAMES + ("all",),
                   help="refbn backend under test; 'all': every available backend against the same TF run")
    p.add_argument("--tf-kernel", default="both", choices=KERNELS + ("both",),
                   help="TF CPU kernel family: oneDNN (TF's default), Eigen (TF_ENABLE_ONEDNN_OPTS=0) or both")
    p.add_argument("--json", metavar="FILE", help="write every metric of every check to FILE")
    p.add_argument("--fast", action="store_true", help="leave out the slow cases (what CI runs)")
    p.add_argument("--seed", type=int, default=None, help="draw the data with this seed instead")
    p.add_argument("--detail", action="store_true", help="print every output's metrics for every case")
    p.add_argument("--list", action="store_true", help="print the registered cases and exit")
    p.add_argument("--divergences", action="store_true", help="explain the documented TF divergences and exit")
    p.add_argument("--distributed", action="store_true",
                   help="check refbn's synchronized-BN merge against Keras' BatchNormalization(synchronized=True) "
                        "on tf.distribute (MirroredStrategy, MultiWorkerMirroredStrategy) and exit")
    return p


def select(names, fast=False, seed=None):
    """Cases for the CLI arguments: descriptors and suite names, in order, without duplicates."""
    names = list(names) or ["all"]
    out = []
    for name in names:
        if name == "all":
            out += cases_mod.registry(include_slow=not fast)
        elif name in cases_mod.SUITES:
            out += cases_mod.registry(include_slow=not fast, suite=name)
        else:
            out.append(cases_mod.lookup(name))
    if seed is not None:
        out = [c.with_(seed=seed) for c in out]
    return list(dict.fromkeys(out))


def main(args):
    con = report.console()
    if args.divergences:
        con.print(report.divergences_table())
        return 0
    if getattr(args, "distributed", False):
        from . import distributed
        return distributed.main(args)
    try:
        selected = select(args.cases, args.fast, args.seed)
    except cases_mod.DescriptorError as e:
        report.console(stderr=True).print(f"refbn verify: {e}", markup=False)
        return 2
    if args.list:
        for c in selected:
            con.print(f"{c.descriptor():56s} {' '.join(sorted(c.tags))}", markup=False)
        con.print(f"{len(selected)} cases")
        return 0
    kernels = KERNELS if args.tf_kernel == "both" else (args.tf_kernel,)
    names = backends.available() if args.backend == "all" else args.backend
    meta = {"refbn": __version__, "backend": args.backend, "tf_kernels": list(kernels),
            "cases": [c.descriptor() for c in selected]}
    results = []
    err = report.console(stderr=True)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    try:
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=err, transient=True) as prog:
            n_backends = 1 if isinstance(names, str) else len(names)
            task = prog.add_task("starting TensorFlow", total=len(selected) * len(kernels) * n_backends)

            def started(hello):
                meta["tf"] = hello
                prog.update(task, description="verifying")

            for r in verify(selected, backend=names, kernels=kernels, on_start=started):
                results.append(r)
                prog.update(task, advance=1, description=r.descriptor[:40])
    except TFUnavailable as e:
        hint = ("\nInstall it with: pip install -e \".[tf]\"  (tensorflow-cpu and keras)"
                if not results else f"\n(after {len(results)} check(s); the last case sent may have crashed it)")
        err.print(f"refbn verify: TensorFlow failed: {e}{hint}", markup=False)
        return 2
    except ImportError as e:
        err.print(f"refbn verify: --backend {args.backend} is not available here: {e}", markup=False)
        return 2
    if "tf" in meta:
        v = next(iter(meta["tf"].values())).get("tf_version", "?")
        con.print(f"refbn {__version__} (backend {args.backend}) vs TensorFlow {v}: "
                  f"{len(selected)} case(s), kernel(s) {', '.join(kernels)}")
    report.print_report(con, results, detail=args.detail or len(results) <= 2)
    if args.json:
        report.write_json(args.json, results, meta)
        con.print(f"metrics written to {args.json}")
    return 1 if any(r.verdict == "FAIL" for r in results) else 0


if __name__ == "__main__":  # python -m refbn.compare.cli
    import argparse

    parser = configure(argparse.ArgumentParser(prog="refbn verify"))
    sys.exit(main(parser.parse_args()))
