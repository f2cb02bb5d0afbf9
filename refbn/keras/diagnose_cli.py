"""``refbn diagnose MODEL.keras DATA.npz``: which BatchNormalization layers hold stale statistics.

Exit code: 0 when every layer is healthy, 1 when any is not, 2 on bad arguments or files.
``--json FILE`` (or ``-`` for stdout) writes the full report; ``--recalibrated OUT.keras`` also
writes a copy of the model with exactly recalibrated statistics.

Arguments and files are checked before Keras (and TensorFlow, seconds to import) is
imported, so ``--help`` and mistakes are answered at once, each with one line
``refbn diagnose: error: ...``: the numbers and output paths; MODEL as a zip with a
readable config.json, weights and a BatchNormalization layer (or an HDF5 file holding a
model); DATA as a .npz whose x holds finite real numbers, one row per sample, of the input
shape the model's config declares, and whose labels (if any) are one per sample.  What only
Keras can tell (a model it cannot load, labels past the model's classes, data the model
refuses) is answered the same way after it loads.
"""
import importlib.util
import json
import os


def configure(p):
    p.add_argument("model", help="a Keras model file (.keras), loaded with keras.models.load_model")
    p.add_argument("data", help="a .npz file holding the inputs (key 'x') and optionally labels (key 'y')")
    p.add_argument("--x", default="x", help="key of the inputs in DATA.npz (default x)")
    p.add_argument("--y", default=None, help="key of the labels in DATA.npz (default: y, if DATA.npz has it)")
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
    from ..cli import fail
    return fail("diagnose", msg)


def missing_dependency(*more):
    """A message naming the first of Keras, its backend (KERAS_BACKEND, default tensorflow) and
    ``more`` ((module, refbn extra) pairs) that is not installed, or None; nothing is imported."""
    backend = os.environ.get("KERAS_BACKEND", "tensorflow")
    needed = [("keras", "tf")] + ([(backend, "tf")] if backend in ("tensorflow", "jax", "torch") else [])
    for module, extra in needed + list(more):
        if importlib.util.find_spec(module) is None:
            return f"needs {module}, which is not installed (pip install 'refbn[{extra}]')"
    return None


#: --steps at most this: the initial weight is a product over the steps (and momentum^t has
#: long underflowed by then for any momentum Keras trains with)
MAX_STEPS = 10_000_000
#: the suffixes keras.models.load_model reads (Keras 3: the .keras zip, or legacy HDF5)
MODEL_SUFFIXES = (".keras", ".h5", ".hdf5")
_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def _check_args(args):
    """An error message for the first bad argument or file, else None (cheap: no Keras)."""
    from ..cli import UsageError, check_number, check_output
    for path, what in ((args.model, "MODEL"), (args.data, "DATA")):
        if not os.path.exists(path):
            return f"{what}: no such file: {path}"
        if not os.path.isfile(path):
            return f"{what}: not a file: {path}"
        if os.path.getsize(path) == 0:
            return f"{what}: {path} is empty"
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
    try:
        if args.steps is not None:
            check_number("--steps", args.steps, 0, MAX_STEPS)
        check_number("--tolerance", args.tolerance, 0, low_open=True)
        check_output("--json", args.json, stdout_ok=True)
        check_output("--recalibrated", args.recalibrated, ("keras",))
        for option, path in (("--json", args.json), ("--recalibrated", args.recalibrated)):
            for what, given in (("MODEL", args.model), ("DATA", args.data)):
                if path and path != "-" and os.path.exists(path) and os.path.samefile(path, given):
                    raise UsageError(f"{option}: {path!r} is {what}; write the output to another file")
        args._model_config = check_model_file(args.model)
    except UsageError as e:
        return str(e)
    return missing_dependency()


def check_model_file(path):
    """UsageError unless ``path`` looks like a file keras.models.load_model reads: a .keras zip
    with a readable config.json and weights, or an HDF5 file.  Returns the model's config (a
    dict) for a .keras file, else None.  Reads the file only: no Keras."""
    import zipfile

    from ..cli import UsageError
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in MODEL_SUFFIXES:
        raise UsageError(f"MODEL: expected a Keras model file ending in {', '.join(MODEL_SUFFIXES)} "
                         f"(what keras.models.load_model reads), got {path!r}")
    if suffix != ".keras":
        with open(path, "rb") as f:
            head = f.read(2056)
        if not any(head[k:k + 8] == _HDF5_SIGNATURE for k in (0, 512, 1024, 2048)):
            raise UsageError(f"MODEL: {path} is not an HDF5 file (no HDF5 signature); expected a model saved "
                             "with model.save")
        if importlib.util.find_spec("h5py") is not None:   # what Keras reads it with; no TF
            import h5py
            try:
                with h5py.File(path, "r") as f:
                    has_config = "model_config" in f.attrs
            except Exception as e:  # noqa: BLE001 - h5py raises OSError and others for corrupt files
                raise UsageError(f"MODEL: {path} is a corrupt HDF5 file ({type(e).__name__}: {e})") from None
            if not has_config:
                raise UsageError(f"MODEL: {path} holds no model (no model_config; saved weights only?); "
                                 "expected a model saved with model.save")
        return None
    if not zipfile.is_zipfile(path):
        raise UsageError(f"MODEL: {path} is not a .keras archive (a .keras file is a zip; this one is not, "
                         "or it is truncated)")
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
            if "config.json" not in names:
                raise UsageError(f"MODEL: {path} has no config.json (it holds {', '.join(names[:5]) or 'nothing'}); "
                                 "expected a model saved with model.save")
            if not any(n.startswith("model.weights") for n in names):
                raise UsageError(f"MODEL: {path} has no weights (model.weights.*); expected a model saved with "
                                 "model.save")
            bad = z.testzip()
            if bad is not None:
                raise UsageError(f"MODEL: {path} is corrupt: the checksum of {bad!r} does not match")
            config = json.loads(z.read("config.json").decode("utf-8"))
    except UsageError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, UnicodeDecodeError, ValueError) as e:
        raise UsageError(f"MODEL: {path} is a corrupt .keras archive ({type(e).__name__}: {e})") from None
    if not isinstance(config, dict) or "class_name" not in config:
        raise UsageError(f"MODEL: {path}'s config.json is not a Keras model config (no class_name)")
    if "BatchNormalization" not in json.dumps(config):
        raise UsageError(f"MODEL: {path} ({config.get('class_name')}) has no BatchNormalization layers: "
                         "nothing to diagnose")
    return config


def model_input_shape(config):
    """The batch shape (a tuple with None for any size) of a single-input model's config, or
    None where the config does not say plainly (several inputs, an unknown form)."""
    if not isinstance(config, dict):
        return None
    layers = (config.get("config") or {}).get("layers") or []
    inputs = [ly for ly in layers if isinstance(ly, dict) and ly.get("class_name") == "InputLayer"]
    if len(inputs) != 1:
        return None
    c = inputs[0].get("config") or {}
    shape = c.get("batch_shape") or c.get("batch_input_shape")
    if not isinstance(shape, list) or not all(d is None or isinstance(d, int) for d in shape):
        return None
    return tuple(shape)


def load_data(args, config=None):
    """(x, y) from DATA, or UsageError: a readable .npz holding numbers x (finite, one row per
    sample, of the model's input shape where its config says) and labels y (one per sample)."""
    import numpy as np

    import zipfile

    from ..cli import UsageError
    with open(args.data, "rb") as f:
        magic = f.read(6)
    if magic == b"\x93NUMPY":
        raise UsageError(f"DATA: {args.data} holds one array (a .npy file); expected a .npz archive: "
                         "np.savez(DATA, x=inputs, y=labels)")
    if not magic.startswith(b"PK"):
        raise UsageError(f"DATA: {args.data} is not a .npz archive (np.savez writes a zip; this file is not one)")
    if not zipfile.is_zipfile(args.data):
        raise UsageError(f"DATA: {args.data} is a truncated or corrupt .npz archive (no zip directory at its end)")
    try:
        npz = np.load(args.data, allow_pickle=False)
    except Exception as e:  # noqa: BLE001 - np.load raises many types for bad files
        raise UsageError(f"DATA: cannot read {args.data} as a .npz file ({type(e).__name__}: {e})") from None
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise UsageError(f"DATA: {args.data} holds one array (a .npy file); expected a .npz archive: "
                         "np.savez(DATA, x=inputs, y=labels)")
    with npz:
        keys = list(npz.keys())
        if args.x not in keys:
            raise UsageError(f"DATA: {args.data} has no array {args.x!r} (it has: {', '.join(keys) or 'none'}); "
                             "use --x KEY")
        if args.y is not None and args.y not in keys:
            raise UsageError(f"--y: {args.data} has no array {args.y!r} (it has: {', '.join(keys) or 'none'})")
        y_key = args.y if args.y is not None else ("y" if "y" in keys else None)
        arrays = {}
        for option, key in (("--x", args.x), ("--y", y_key)):
            if key is None:
                continue
            try:
                arrays[key] = npz[key]
            except Exception as e:  # noqa: BLE001 - a truncated member, an object array, ...
                why = "it holds Python objects (saved with dtype object)" if "allow_pickle" in str(e) else \
                    f"{type(e).__name__}: {e}"
                raise UsageError(f"DATA: cannot read array {key!r} of {args.data} ({why}); expected numbers "
                                 f"({option})") from None
    x, y = arrays[args.x], arrays.get(y_key)
    name = f"DATA: {args.data}[{args.x!r}]"
    if x.dtype.kind not in "biuf":
        raise UsageError(f"{name}: expected real numbers, got dtype {x.dtype}")
    if x.ndim < 2:
        raise UsageError(f"{name}: expected one row per sample (at least 2-D), got shape {x.shape}")
    if len(x) == 0:
        raise UsageError(f"{name}: expected at least one sample, got shape {x.shape}")
    if x.dtype.kind == "f":
        bad = int(np.count_nonzero(~np.isfinite(x)))
        if bad:
            first = tuple(int(i) for i in np.argwhere(~np.isfinite(x))[0])
            raise UsageError(f"{name}: expected finite values, got {bad} NaN/Inf (the first at index {first}); "
                             "the statistics of every layer they reach would be NaN")
    want = model_input_shape(config)
    if want is not None and (len(want) != x.ndim or any(w is not None and w != d for w, d in zip(want[1:], x.shape[1:]))):
        raise UsageError(f"{name}: has shape {x.shape}, but MODEL takes inputs of shape "
                         f"({', '.join('None' if d is None else str(d) for d in want)})")
    if y is not None:
        yname = f"DATA: {args.data}[{y_key!r}]"
        if y.dtype.kind not in "biuf":
            raise UsageError(f"{yname}: expected numeric labels, got dtype {y.dtype}")
        if y.ndim not in (1, 2) or len(y) != len(x):
            raise UsageError(f"{yname}: expected one label per sample ({len(x)}, or one-hot {len(x)} x classes), "
                             f"got shape {y.shape}")
        if y.dtype.kind == "f" and not np.isfinite(y).all():
            raise UsageError(f"{yname}: expected finite labels, got NaN/Inf")
        if y.ndim == 1 and (np.any(y < 0) or np.any(y != np.round(y))):
            raise UsageError(f"{yname}: expected class indices (integers >= 0), got values such as "
                             f"{y[(y < 0) | (y != np.round(y))][0].item()!r}")
    return x, y


def _check_labels(model, y, data, key):
    """An error message when 1-D labels name classes the model does not output, else None."""
    import numpy as np
    try:
        classes = int(model.outputs[0].shape[-1]) if len(model.outputs) == 1 else None
    except (AttributeError, TypeError, IndexError):
        return None
    if y is None or y.ndim != 1 or not classes or classes < 2:
        return None
    if np.max(y) >= classes:
        return f"DATA: {data}[{key!r}]: expected class indices below {classes} (MODEL's outputs), got {np.max(y).item()!r}"
    return None


def main(args):
    error = _check_args(args)
    if error:
        return _fail(error)
    from rich.console import Console

    from ..cli import UsageError
    try:
        x, y = load_data(args, getattr(args, "_model_config", None))
    except UsageError as e:
        return _fail(e)

    from ._backend import keras
    from .diagnose import diagnose
    from .recalibrate import recalibrate

    try:
        model = keras.models.load_model(args.model)
    except Exception as e:  # noqa: BLE001 - report any loading problem plainly
        try:
            model = keras.models.load_model(args.model, compile=False)
        except Exception:
            return _fail(f"MODEL: cannot load {args.model} with keras.models.load_model ({type(e).__name__}: {e})")
    error = _check_labels(model, y, args.data, args.y or "y")
    if error:
        return _fail(error)
    to_stdout = args.json == "-"
    console = Console(stderr=to_stdout)
    if not console.is_terminal:
        console = Console(stderr=to_stdout, width=130)
    try:
        report = diagnose(model, x, y=y, batch_size=args.batch_size, steps=args.steps,
                          tolerance=args.tolerance, convergence=args.convergence)
    except (ValueError, TypeError) as e:
        return _fail(str(e))
    except Exception as e:  # noqa: BLE001 - TF's own errors (InvalidArgumentError, ...) for x the model refuses
        return _fail(f"MODEL refuses DATA: running {args.model} on {args.data}[{args.x!r}] of shape {x.shape} "
                     f"failed ({type(e).__name__}: {e})")
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
