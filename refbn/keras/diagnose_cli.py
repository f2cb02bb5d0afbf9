"""``refbn diagnose MODEL.keras DATA.npz``: which BatchNormalization layers hold stale statistics.

Exit code: 0 when every layer is healthy, 1 when any is not, 2 on bad arguments or files.
``--json FILE`` (or ``-`` for stdout) writes the full report; ``--recalibrated OUT.keras`` also
writes a copy of the model with exactly recalibrated statistics.

Arguments and files are checked before Keras (and TensorFlow, seconds to import) is
imported, so ``--help`` and mistakes are answered at once.
"""
import importlib.util
import json
import os
import sys


def configure(p):
    p.add_argument("model", help="a Keras model file (.keras), loaded with keras.models.load_model")
    p.add_argument("data", help="a .npz file holding the inputs (key 'x') and optionally labels (key 'y')")
    p.add_argument("--x", default="x", help="key of the inputs in DATA.npz (default x)")
    p.add_argument("--y", default="y", help="key of the labels in DATA.npz, if present (default y)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=None,
                   help="training steps the BN layers saw (default: the saved optimizer's iterations)")
    p.add_argument("--tolerance", type=float, default=0.1,
                   help="healthy when a layer's output is within this many std of exact (default 0.1)")
    p.add_argument("--convergence", type=float, default=0.01,
                   help="'not converged' when the initial values still weigh more than this (default 0.01)")
    p.add_argument("--json", metavar="FILE", help="write the report as JSON to FILE ('-' for stdout)")
    p.add_argument("--recalibrated", metavar="OUT", help="also save a recalibrated copy of the model to OUT")


def _fail(msg):
    print(f"refbn diagnose: error: {msg}", file=sys.stderr)
    return 2


def missing_dependency(*more):
    """A message naming the first of Keras, its backend (KERAS_BACKEND, default tensorflow) and
    ``more`` ((module, refbn extra) pairs) that is not installed, or None; nothing is imported."""
    backend = os.environ.get("KERAS_BACKEND", "tensorflow")
    needed = [("keras", "tf")] + ([(backend, "tf")] if backend in ("tensorflow", "jax", "torch") else [])
    for module, extra in needed + list(more):
        if importlib.util.find_spec(module) is None:
            return f"needs {module}, which is not installed (pip install 'refbn[{extra}]')"
    return None


def _check_args(args):
    """An error message for the first bad argument or file, else None (cheap: no Keras)."""
    for path, what in ((args.model, "MODEL"), (args.data, "DATA")):
        if not os.path.exists(path):
            return f"{what}: no such file: {path}"
        if not os.path.isfile(path):
            return f"{what}: not a file: {path}"
    if args.batch_size < 1:
        return f"--batch-size: expected a positive int, got {args.batch_size}"
    if args.steps is not None and args.steps < 0:
        return f"--steps: expected a non-negative int, got {args.steps}"
    if not args.tolerance > 0:
        return f"--tolerance: expected a positive number of standard deviations, got {args.tolerance}"
    if not 0 < args.convergence < 1:
        return f"--convergence: expected a weight in (0, 1), got {args.convergence}"
    for option, path in (("--json", None if args.json == "-" else args.json), ("--recalibrated", args.recalibrated)):
        if path:
            folder = os.path.dirname(os.path.abspath(path))
            if not os.path.isdir(folder):
                return f"{option}: no such folder: {folder}"
    return missing_dependency()


def main(args):
    error = _check_args(args)
    if error:
        return _fail(error)
    import numpy as np
    from rich.console import Console

    try:
        with np.load(args.data, allow_pickle=False) as npz:
            keys = list(npz.keys())
            if args.x not in keys:
                return _fail(f"DATA: {args.data} has no array {args.x!r} (it has: {', '.join(keys) or 'none'}); "
                             "use --x KEY")
            x = npz[args.x]
            y = npz[args.y] if args.y in keys else None
    except (OSError, ValueError) as e:
        return _fail(f"DATA: cannot read {args.data} as a .npz file ({e})")

    from ._backend import keras
    from .diagnose import diagnose
    from .recalibrate import recalibrate

    try:
        model = keras.models.load_model(args.model)
    except Exception as e:  # noqa: BLE001 - report any loading problem plainly
        try:
            model = keras.models.load_model(args.model, compile=False)
        except Exception:
            return _fail(f"MODEL: cannot load {args.model} with keras.models.load_model ({e})")
    to_stdout = args.json == "-"
    console = Console(stderr=to_stdout)
    if not console.is_terminal:
        console = Console(stderr=to_stdout, width=130)
    try:
        report = diagnose(model, x, y=y, batch_size=args.batch_size, steps=args.steps,
                          tolerance=args.tolerance, convergence=args.convergence)
    except (ValueError, TypeError) as e:
        return _fail(str(e))
    console.print(f"{args.model}: {len(report.layers)} BatchNormalization layers, {report.samples} samples "
                  f"from {args.data}; steps: {report.steps if report.steps is not None else 'unknown'} "
                  f"({report.steps_source})", highlight=False)
    report.print(console)
    if args.json:
        text = json.dumps(report.as_dict(), indent=2)
        if to_stdout:
            print(text)
        else:
            with open(args.json, "w") as f:
                f.write(text + "\n")
            console.print(f"report written to {args.json}", highlight=False)
    if args.recalibrated:
        rec = recalibrate(model, x, batch_size=args.batch_size)
        model.save(args.recalibrated)
        console.print(f"{rec.summary()}; saved to {args.recalibrated}", highlight=False)
    elif not report.healthy:
        console.print(f"To fix: refbn diagnose {args.model} {args.data} --recalibrated FIXED.keras "
                      "(or refbn.keras.recalibrate(model, x) in Python)", highlight=False)
    return 0 if report.healthy else 1
