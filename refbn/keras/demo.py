"""``refbn demo``: the 100%-train / 33%-predict failure, reproduced, explained layer by layer, fixed.

A real Keras model (ResNet50 with random weights, or a tiny conv net) is trained on a few
synthetic images, one batch per epoch.  ``fit`` reports accuracy 1.0 while ``predict`` on the
same images puts them all in one class.  The demo then

1. captures every BatchNormalization layer's actual input in training mode (what ``fit`` saw)
   and in inference mode (what ``predict`` sees), and runs refbn's float64 reference on it:
   batch vs moving statistics, the output distortion they cause, the weight the initial
   values still hold (momentum**t) and the steps needed to get within a tolerance, where the
   distortion starts and how it compounds;
2. plots the moving statistics approaching the batch statistics, and the per-layer distortion;
3. applies each remedy to the same trained model and measures predict accuracy: more steps,
   a lower momentum, bias-corrected statistics, exact recalibration, batch statistics at
   inference (batch of all images, and batch of 1).
"""
import csv
import os
import sys
import time

import numpy as np

from .. import convergence as conv, reference as ref
from ..layer import BatchNorm
from .diagnose_cli import missing_dependency

# Keras and TensorFlow take seconds to import: the functions that need them import them
# (``from ._backend import keras``, the refbn.keras helpers), so ``refbn demo --help`` and
# argument errors are answered without them.

MODELS = ("resnet50", "tiny")


def configure(p):
    p.add_argument("--model", choices=MODELS, default="resnet50",
                   help="keras.applications.ResNet50(weights=None) (default), or a tiny conv net (seconds)")
    p.add_argument("--images", type=int, default=3, help="number of training images (default 3)")
    p.add_argument("--classes", type=int, default=None, help="number of classes (default: = images)")
    p.add_argument("--size", type=int, default=None, help="image side in pixels (default 64; tiny: 16)")
    p.add_argument("--epochs", type=int, default=None,
                   help="epochs = training steps, one batch each (default 5; tiny: 10)")
    p.add_argument("--extra-steps", type=int, default=None,
                   help="'more steps' remedy: steps added to the trained model (default 45; tiny: 90)")
    p.add_argument("--lr", type=float, default=None, help="Adam learning rate (default 1e-3; tiny: 1e-2)")
    p.add_argument("--low-momentum", type=float, default=0.5, help="'lower momentum' remedy (default 0.5)")
    p.add_argument("--tolerance", type=float, default=0.01,
                   help="convergence tolerance: initial weight momentum^t, and moving statistics within "
                        "this many std of the batch's (default 0.01)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="refbn-demo", help="folder for the PNG plots and layers.csv")
    p.add_argument("--save", action="store_true",
                   help="also save the trained (failing) model and the images as OUT/model.keras and "
                        "OUT/data.npz, to try 'refbn diagnose' on them")
    p.add_argument("--rows", type=int, default=14, help="layer rows to print (all rows go to layers.csv)")


# -- model and data ---------------------------------------------------------------------
def make_data(images, classes, size, seed):
    """Synthetic 'raw' grey images (values 0..255, as loaded from files), one pattern per image."""
    rng = np.random.default_rng(seed)
    x = (rng.random((images, size, size, 1)) * 255.0).astype(np.float32)
    y = np.arange(images) % classes
    return x, y


def build_model(kind, size, classes):
    from ._backend import keras
    if kind == "resnet50":
        return keras.applications.ResNet50(weights=None, input_shape=(size, size, 1), classes=classes)
    L = keras.layers
    i = keras.Input((size, size, 1))
    h = L.Conv2D(8, 3, padding="same", use_bias=False)(i)
    h = L.ReLU()(L.BatchNormalization()(h))
    h = L.Conv2D(16, 3, strides=2, padding="same", use_bias=False)(h)
    h = L.ReLU()(L.BatchNormalization()(h))
    h = L.Conv2D(16, 3, padding="same", use_bias=False)(h)
    h = L.ReLU()(L.BatchNormalization()(h))
    h = L.GlobalAveragePooling2D()(h)
    return keras.Model(i, L.Dense(classes, activation="softmax")(h), name="tiny_convnet")


def _compile(model, learning_rate, run_eagerly=False):
    from ._backend import keras
    model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"], run_eagerly=run_eagerly)


def stat_recorder(layers):
    """A Keras callback recording the channel-averaged moving statistics of every BN layer in
    ``layers`` after each training step (``.history``: one list of (mean, variance) per step,
    the first before training)."""
    from . import capture as cap
    from ._backend import keras

    class StatRecorder(keras.callbacks.Callback):
        def __init__(self, layers):
            super().__init__()
            self.layers = layers
            self.history = [self._now()]

        def _now(self):
            return [(float(np.mean(cap.to_numpy(layer.moving_mean))),
                     float(np.mean(cap.to_numpy(layer.moving_variance)))) for layer in self.layers]

        def on_train_batch_end(self, batch, logs=None):
            # The JAX backend keeps the training state outside the variables during fit
            # (their buffers are donated); a callback that reads them must sync them first.
            sync = getattr(self.model, "jax_state_sync", None)
            if sync is not None:
                sync()
            self.history.append(self._now())

    return StatRecorder(layers)


def predict_accuracy(model, x, y, training=False, batch_size=None):
    """Accuracy of an eager forward pass (same arithmetic as predict); statistics preserved."""
    from . import capture as cap
    from .diagnose import accuracy
    batch_size = batch_size or len(x)
    with cap.preserved_statistics(model):
        pred = np.concatenate([cap.run(model, x[i:i + batch_size], training=training)
                               for i in range(0, len(x), batch_size)])
    return accuracy(pred, y), pred.argmax(-1)


# -- layer-by-layer explanation -----------------------------------------------------------
def explain_layers(model, layers, x, tolerance):
    """Per-layer rows computed with refbn's reference on the inputs the Keras layers received."""
    from . import capture as cap
    from .recalibrate import initial_values
    with cap.preserved_statistics(layers):
        _, train_io = cap.capture(model, x, layers, training=True, outputs=True)
    _, infer_io = cap.capture(model, x, layers, training=False, outputs=True)
    rows, max_check = [], 0.0
    for k, layer in enumerate(layers):
        xt, kt = train_io[layer][0]
        xi, ki = infer_io[layer][0]
        gamma, beta, mm, mv = (cap.to_numpy(w).astype(np.float64) for w in
                               (layer.gamma, layer.beta, layer.moving_mean, layer.moving_variance))
        m, eps = float(layer.momentum), float(layer.epsilon)
        C = mm.shape[0]
        ones, zeros = np.ones(C), np.zeros(C)
        # what fit computed: batch statistics of the training-mode input
        ref = BatchNorm(axis=layer.axis, momentum=m, epsilon=eps, channels=C, dtype="float64")
        ref.set_weights([ones, zeros, mm, mv])
        xhat_train, tr = ref(xt, training=True, trace=True)
        bmean, bvar = tr["batch_mean"], tr["biased_variance"]
        ref.set_weights([ones, zeros, mm, mv])
        xhat_infer_same = ref(xt, training=False)     # same input, moving statistics
        local = float(np.sqrt(np.mean((xhat_infer_same - xhat_train) ** 2)))
        closed = float(np.sqrt(np.mean(conv.normalized_error_ms(bmean, bvar, mm, mv, eps))))
        # refbn reproduces Keras' own outputs in both modes
        chk = BatchNorm(axis=layer.axis, momentum=m, epsilon=eps, channels=C, dtype="float64")
        chk.set_weights([gamma, beta, mm, mv])
        y_inf = chk(xi, training=False)
        y_tr = chk(xt, training=True)
        for ours, theirs in ((y_tr, kt), (y_inf, ki)):
            scale = float(np.max(np.abs(ours))) or 1.0
            max_check = max(max_check, float(np.max(np.abs(ours - theirs))) / scale)
        rms_t = float(np.sqrt(np.mean(xt.astype(np.float64) ** 2))) or 1.0
        drift = float(np.sqrt(np.mean((xi.astype(np.float64) - xt) ** 2))) / rms_t
        init_mean, init_var = initial_values(layer)
        std = np.sqrt(bvar + eps)
        need = max(float(np.max(conv.steps_to_within(m, init_mean, bmean, tolerance * std))),
                   float(np.max(conv.steps_to_within(m, init_var, bvar, tolerance * (bvar + eps)))))
        rows.append(dict(index=k, name=layer.name, channels=C, n=int(np.asarray(xt).size // C),
                         batch_mean=float(np.mean(bmean)), moving_mean=float(np.mean(mm)),
                         batch_var=float(np.median(bvar)), moving_var=float(np.median(mv)),
                         var_ratio=float(np.median((mv + eps) / (bvar + eps))),
                         mean_offset=float(np.max(np.abs(mm - bmean) / std)),
                         output_error=local, output_error_closed_form=closed, input_drift=drift,
                         steps_needed=need, momentum=m, batch_mean_vec=bmean, batch_var_vec=bvar))
    return rows, max_check


# -- plots ------------------------------------------------------------------------------
def plot_moving(path, rows, layers, recorder, steps, tolerance):
    from .recalibrate import initial_values
    # a Figure of its own, drawn by Agg: no pyplot state, so a notebook's inline backend is left alone
    from matplotlib.figure import Figure
    picks = sorted({0, len(rows) // 2, len(rows) - 1})
    fig = Figure(figsize=(4.6 * len(picks), 7))
    axes = fig.subplots(2, len(picks), squeeze=False)
    m = rows[0]["momentum"]
    horizon = int(max(conv.steps_to_converge(m, tolerance) * 1.5, 50)) if 0 < m < 1 else 50
    t = np.arange(0, horizon + 1)
    for col, k in enumerate(picks):
        layer, r = layers[k], rows[k]
        init_mean, init_var = initial_values(layer)
        mk = float(layer.momentum)
        for row, (init, target, label, rec_i) in enumerate((
                (init_mean, r["batch_mean_vec"], "moving mean (channel average)", 0),
                (init_var, r["batch_var_vec"], "moving variance (channel average)", 1))):
            # refbn's moving-average update, step after step, fed the batch statistic
            v = np.full_like(target, init)
            traj = [float(np.mean(v))]
            for _ in t[1:]:
                v = ref.moving_average(v, target, 1.0 - mk)
                traj.append(float(np.mean(v)))
            ax = axes[row][col]
            ax.plot(t[1:], traj[1:], label=f"refbn: momentum {mk:g}, fed the final batch statistic")
            ax.axhline(float(np.mean(target)), color="k", ls="--", lw=1, label="batch statistic")
            kt = [h[k][rec_i] for h in recorder.history[1:]]
            ax.plot(np.arange(1, len(kt) + 1), kt, "o", color="C3",
                    label="Keras during fit (its batches changed as the weights did)")
            ax.axvline(steps, color="C3", lw=1, ls=":", label=f"fit stopped (step {steps})")
            need = conv.steps_to_converge(mk, tolerance)
            if np.isfinite(need):
                ax.axvline(need, color="C2", lw=1, ls=":",
                           label=f"initial weight {mk:g}^t < {tolerance:g} from step {need}")
            ax.set_xscale("log")
            ax.set_xlabel("training steps (log scale)")
            ax.set_ylabel("moving mean (units of the layer's input)" if row == 0 else
                          "moving variance (squared input units)", fontsize=8)
            ax.set_title(f"{layer.name}: {label}", fontsize=9)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8)
    fig.suptitle(f"Moving statistics approach the batch statistics as 1 - {m:g}^t "
                 f"(fit stopped at step {steps})")
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=110)


def plot_distortion(path, rows, tolerance_std=0.1):
    """Two panels, one unit each, against the named BN layers in call order: the layer's own
    output error (in standard deviations) and the compounded input drift (a ratio)."""
    # a Figure of its own, drawn by Agg: no pyplot state, so a notebook's inline backend is left alone
    from matplotlib.figure import Figure
    k = np.arange(len(rows))
    names = [r["name"] for r in rows]
    fig = Figure(figsize=(max(8.0, 2.0 + 0.2 * len(rows)), 7.5))
    top, bottom = fig.subplots(2, 1, sharex=True)
    own = [r["output_error"] if r["output_error"] > 0 else np.nan for r in rows]
    top.semilogy(k, own, "o-", ms=4, color="C0",
                 label="output with moving statistics - with batch statistics, same input (RMS)")
    top.axhline(tolerance_std, color="k", ls=":", lw=1,
                label=f"'healthy' threshold of refbn diagnose ({tolerance_std:g} std)")
    top.set_ylabel("layer's own output error\n(standard deviations)")
    top.set_title("Where the distortion starts: each layer fed the very input fit saw", fontsize=10)
    top.legend(fontsize=8, loc="best")
    bottom.plot(k, [r["input_drift"] for r in rows], "s-", ms=4, color="C1",
                label="RMS(input in predict - input in fit) / RMS(input in fit); 0: the same input")
    bottom.set_ylim(bottom=0)
    bottom.set_ylabel("input drift, predict vs fit\n(ratio of RMS values, no unit)")
    bottom.set_title("How it compounds: each layer receives the earlier layers' distorted output", fontsize=10)
    bottom.legend(fontsize=8, loc="best")
    bottom.set_xticks(k)
    bottom.set_xticklabels(names, rotation=90 if len(rows) > 6 else 0, fontsize=7 if len(rows) > 20 else 9)
    bottom.set_xlabel("BatchNormalization layer, in call order")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# -- main -------------------------------------------------------------------------------
def _defaults(args):
    """Fill in the model-dependent defaults; return an error message for a bad argument, else None."""
    tiny = args.model == "tiny"
    args.size = args.size if args.size is not None else (16 if tiny else 64)
    args.epochs = args.epochs if args.epochs is not None else (10 if tiny else 5)
    args.extra_steps = args.extra_steps if args.extra_steps is not None else (90 if tiny else 45)
    args.classes = args.classes if args.classes is not None else args.images
    args.lr = args.lr if args.lr is not None else (1e-2 if tiny else 1e-3)
    for name in ("images", "size", "classes", "epochs"):
        if getattr(args, name) < 1:
            return f"--{name}: expected a positive int, got {getattr(args, name)}"
    if not tiny and args.size < 32:
        return f"--size: keras.applications.ResNet50 needs images of at least 32x32, got {args.size}"
    if args.extra_steps < 0:
        return f"--extra-steps: expected a non-negative int, got {args.extra_steps}"
    if not args.lr > 0:
        return f"--lr: expected a positive learning rate, got {args.lr}"
    if not 0.0 <= args.low_momentum < 1.0:
        return f"--low-momentum: expected a value in [0, 1), got {args.low_momentum}"
    if not 0.0 < args.tolerance < 1.0:
        return f"--tolerance: expected a value in (0, 1), got {args.tolerance}"
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        return f"--out: {args.out} exists and is not a folder"
    try:
        _check_limits(args)
    except ValueError as e:   # refbn.cli.UsageError
        return str(e)
    return missing_dependency(("matplotlib", "plot"))


#: --epochs / --extra-steps at most this (each is one fit step; 460 steps of ResNet50 took 175 s)
MAX_STEPS = 1_000_000


def _check_limits(args):
    """UsageError for numbers that pass the checks above but cannot run: a single class, more
    classes than images, step counts and sizes past what fit or this machine's memory takes, a
    seed Keras refuses, an --out folder that cannot be made."""
    from ..cli import UsageError, check_memory, check_number
    check_number("--images", args.images, 2)
    check_number("--classes", args.classes, 2, args.images)
    check_number("--epochs", args.epochs, 1, MAX_STEPS)
    check_number("--extra-steps", args.extra_steps, 0, MAX_STEPS)
    check_number("--lr", args.lr, 0, low_open=True)
    check_number("--rows", args.rows, 1)
    check_number("--seed", args.seed, 0, 2 ** 32 - 1)   # keras.utils.set_random_seed -> np.random.seed
    # the float32 images and the first convolution's float32 output (tiny: 8 channels at full size;
    # ResNet50: 64 at half size), at the very least
    per_pixel = 4 + (32 if args.model == "tiny" else 64)
    check_memory("--images/--size", f"{args.model} on {args.images} images of {args.size}x{args.size}",
                 per_pixel * args.images * args.size ** 2)
    if not args.out.strip():
        raise UsageError(f"--out: expected a folder name, got {args.out!r}")
    parent = os.path.abspath(args.out)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UsageError(f"--out: cannot make the folder {args.out!r}: {parent!r} is a file")
    if not os.access(parent, os.W_OK):
        raise UsageError(f"--out: cannot write in {parent!r}")


def _fail(msg):
    print(f"refbn demo: error: {msg}", file=sys.stderr)
    return 2


def _console():
    from rich.console import Console
    c = Console()
    return c if c.is_terminal else Console(width=118)


def main(args):
    """Run the demo; 0 when done, 2 (before Keras is imported) for a bad argument."""
    error = _defaults(args)
    if error:
        return _fail(error)
    from rich.table import Table

    from . import capture as cap
    from ._backend import keras
    from .diagnose import accuracy
    from .recalibrate import Moments, average_of_batch_moments, debias, recalibrate

    con = _console()
    say = con.print
    t_start = time.perf_counter()
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:
        return _fail(f"--out: cannot make the folder {args.out!r} ({e.strerror})")
    keras.utils.set_random_seed(args.seed)
    x, y = make_data(args.images, args.classes, args.size, args.seed)
    model = build_model(args.model, args.size, args.classes)
    layers = cap.bn_layers(model)
    initial = model.get_weights()
    say(f"[bold]The 100%-train / {100 / args.classes:.0f}%-predict failure[/bold]: "
        f"{model.name} ({len(layers)} BatchNormalization layers, {model.count_params():,} weights), "
        f"{args.images} synthetic {args.size}x{args.size}x1 images (pixel values 0..255), "
        f"{args.classes} classes, batch size {args.images}, {args.epochs} epochs = {args.epochs} steps.",
        highlight=False)

    # 1. reproduce ------------------------------------------------------------------
    _compile(model, args.lr)
    rec = stat_recorder(layers)
    t0 = time.perf_counter()
    hist = model.fit(x, y, epochs=args.epochs, batch_size=args.images, verbose=0, callbacks=[rec])
    t_fit = time.perf_counter() - t0
    fit_acc = float(hist.history["accuracy"][-1])
    ev_loss, ev_acc = model.evaluate(x, y, batch_size=args.images, verbose=0)
    pred = model.predict(x, batch_size=args.images, verbose=0)
    pred_acc = accuracy(pred, y)
    with cap.preserved_statistics(layers) as _:
        before = cap.statistics(layers)
        out = cap.run(model, x, training=True)
        moved = max(float(np.max(np.abs(cap.to_numpy(layer.moving_variance) - before[layer][1])
                                 / np.maximum(before[layer][1], 1e-30))) for layer in layers)
    train_acc, train_cls = accuracy(out, y), out.argmax(-1)
    steps = int(cap.to_numpy(model.optimizer.iterations))
    trained = model.get_weights()
    if args.save:
        model.save(os.path.join(args.out, "model.keras"))
        np.savez(os.path.join(args.out, "data.npz"), x=x, y=y)
    say(f"\nfit ({t_fit:.1f} s): accuracy {fit_acc:.2f} in the last epoch", highlight=False)
    say(f"evaluate: accuracy {ev_acc:.2f}   predict: accuracy {pred_acc:.2f}, classes "
        f"{pred.argmax(-1).tolist()} (labels {y.tolist()})", highlight=False)
    say(f"model(x, training=True): accuracy {train_acc:.2f}, classes {train_cls.tolist()}", highlight=False)
    say(f"(careful: that training=True call also updated the moving statistics, the variances by up to "
        f"{100 * moved:.3g}%; the demo puts them back)", highlight=False)

    # 2. explain --------------------------------------------------------------------
    m = float(layers[0].momentum)
    w = conv.initial_weight_after([1.0 - m] * steps)
    need = conv.steps_to_converge(m, args.tolerance)
    say(f"\n[bold]Why[/bold]: in training mode each BatchNormalization layer normalises with the batch's own "
        f"statistics; predict/evaluate use moving_mean/moving_variance, which started at 0 and 1 and "
        f"moved {1 - m:g} of the way to the batch statistic per step. After {steps} steps the initial values "
        f"still weigh momentum^t = {m:g}^{steps} = {w:.3f}; {need} steps bring that under {args.tolerance:g}.",
        highlight=False)
    rows, check = explain_layers(model, layers, x, args.tolerance)
    closed_gap = max(abs(r["output_error"] - r["output_error_closed_form"]) / max(r["output_error"], 1e-300)
                     for r in rows)
    say(f"refbn's float64 reference, run on each layer's captured input, reproduces Keras' BN outputs to "
        f"{check:.2g} (max error relative to the output's largest value, both modes); its closed-form "
        f"output error agrees with the elementwise one to {closed_gap:.1g}.", highlight=False)
    t = Table(title=f"Each BatchNormalization layer on its own input (batch of {args.images}): "
                    "batch vs moving statistics")
    for col in ("#", "layer", "C", "batch\nmean", "moving\nmean", "batch\nvar", "moving\nvar", "var\nratio",
                "output\nerror (std)", "input\ndrift", f"steps to\n±{args.tolerance:g} std"):
        t.add_column(col, justify="left" if col == "layer" else "right", no_wrap=True)
    n = len(rows)
    show = sorted(set(range(min(5, n))) | set(range(n - 3, n)) |
                  set(np.linspace(0, n - 1, max(args.rows - 8, 0)).astype(int).tolist())) if n > args.rows \
        else list(range(n))
    last = -1
    for k in show:
        if k != last + 1:
            t.add_row("...", *[""] * 10)
        r = rows[k]
        t.add_row(str(k), r["name"], str(r["channels"]), f"{r['batch_mean']:.3g}", f"{r['moving_mean']:.3g}",
                  f"{r['batch_var']:.3g}", f"{r['moving_var']:.3g}", f"{r['var_ratio']:.3g}",
                  f"{r['output_error']:.3g}", f"{r['input_drift']:.3g}", f"{r['steps_needed']:.0f}")
        last = k
    say(t)
    csv_path = os.path.join(args.out, "layers.csv")
    with open(csv_path, "w", newline="") as f:
        keys = [k for k in rows[0] if not k.endswith("_vec")]
        wr = csv.DictWriter(f, fieldnames=keys)
        wr.writeheader()
        for r in rows:
            wr.writerow({k: r[k] for k in keys})
    first_bad = next((r for r in rows if r["output_error"] > 0.1), None)
    if first_bad is not None:
        k0 = first_bad["index"]
        say(f"The distortion starts at layer #{k0} {first_bad['name']!r}: fed the very input fit saw, its "
            f"moving statistics put the output {first_bad['output_error']:.3g} std away from fit's "
            f"(moving variance {first_bad['var_ratio']:.3g}x the batch's).", highlight=False)
    marks = sorted({0, n // 4, n // 2, 3 * n // 4, n - 1})
    say("It compounds: each layer receives the previous layers' distorted output. Input drift (predict vs fit, "
        "relative RMS) at layers " + ", ".join(f"#{k}: {rows[k]['input_drift']:.3g}" for k in marks) + ".",
        highlight=False)
    say("[dim]columns: output error = RMS of (normalised output with moving statistics - with batch "
        "statistics) on the same input, in std; input drift = RMS(input in predict - input in fit) / "
        "RMS(input in fit); mean = channel average, var = median over channels; steps = training steps on "
        "this batch until both moving statistics are within "
        f"{args.tolerance:g} std of it. All {n} rows: {csv_path}[/dim]")

    p1 = os.path.join(args.out, "moving_statistics.png")
    p2 = os.path.join(args.out, "distortion.png")
    plot_moving(p1, rows, layers, rec, steps, args.tolerance)
    plot_distortion(p2, rows)
    say(f"plots: {p1}, {p2}", highlight=False)

    # 3. remedies -------------------------------------------------------------------
    results = [("as trained", f"{steps} steps, momentum {m:g}", pred_acc, None)]

    def timed(fn):
        t0 = time.perf_counter()
        out = fn()
        return out, time.perf_counter() - t0

    # bias correction
    model.set_weights(trained)
    deb, dt = timed(lambda: debias(model, steps=steps))
    results.append(("debiased moving statistics",
                    f"(moving - {m:g}^{steps}*initial) / (1 - {m:g}^{steps})",
                    predict_accuracy(model, x, y)[0], dt))
    # exact recalibration, two batch sizes
    model.set_weights(trained)
    rc1, dt = timed(lambda: recalibrate(model, x, batch_size=args.images))
    results.append(("exact recalibration (precise BN)", f"refbn.keras.recalibrate, batch_size={args.images}",
                    predict_accuracy(model, x, y)[0], dt))
    recal_weights = model.get_weights()
    # batch statistics at inference
    model.set_weights(trained)
    results.append(("batch statistics at inference", f"model(x, training=True), batch of {args.images}",
                    predict_accuracy(model, x, y, training=True)[0], None))
    results.append(("batch statistics at inference", "model(x, training=True), batch of 1",
                    predict_accuracy(model, x, y, training=True, batch_size=1)[0], None))
    # more steps on the same model
    model.set_weights(trained)
    t0 = time.perf_counter()
    model.fit(x, y, epochs=args.extra_steps, batch_size=args.images, verbose=0)
    dt = time.perf_counter() - t0
    total = steps + args.extra_steps
    results.append(("more steps", f"{total} steps: {m:g}^{total} = {m ** total:.3g}",
                    predict_accuracy(model, x, y)[0], dt))
    # lower momentum: the same training from the same initial weights
    model.set_weights(initial)
    for layer in layers:
        layer.momentum = args.low_momentum
    _compile(model, args.lr, run_eagerly=True)   # a new momentum needs a new train function; eager is quicker for a few steps
    t0 = time.perf_counter()
    model.fit(x, y, epochs=args.epochs, batch_size=args.images, verbose=0)
    dt = time.perf_counter() - t0
    lm = args.low_momentum
    results.append(("lower momentum", f"{args.epochs} steps, momentum {lm:g}: {lm:g}^{args.epochs} = "
                    f"{lm ** args.epochs:.3g}", predict_accuracy(model, x, y)[0], dt))
    for layer in layers:
        layer.momentum = m
    model.set_weights(recal_weights)

    t = Table(title=f"Remedies, each applied to the trained model (fit accuracy {fit_acc:.2f})")
    for col in ("remedy", "how", "predict accuracy", "time (s)"):
        t.add_column(col, justify="right" if col in ("predict accuracy", "time (s)") else "left")
    for name, how, acc, dt in results:
        style = "green" if acc >= fit_acc else None
        t.add_row(name, how, f"{acc:.2f}", "-" if dt is None else f"{dt:.1f}", style=style)
    say(t)
    # Chan's exact merge vs averaging per-batch variances, on the first layer at batch size 1
    first = layers[0]
    with cap.preserved_statistics(model):
        model.set_weights(trained)
        _, io = cap.capture(model, x, [first], training=False)
        xin = io[first][0]
    each = [Moments.from_array(xin[i:i + 1], axis=first.axis) for i in range(len(xin))]
    exact = Moments.from_array(xin, axis=first.axis)
    merged = each[0]
    for mo in each[1:]:
        merged = merged.merge(mo)
    _, avg_var = average_of_batch_moments(each)
    say(f"recalibrate keeps (count, mean, M2) per batch and merges them exactly (Chan et al.), so the batch "
        f"size does not change its result. On {first.name!r} with one image per batch: merged variance "
        f"{np.median(merged.variance):.6g}, all images at once {np.median(exact.variance):.6g} (median over "
        f"channels); averaging the per-image variances, as most precise-BN tools do, gives "
        f"{np.median(avg_var):.6g}, because it drops the spread between the images' means.", highlight=False)
    n_stat = rows[-1]["n"] // args.images
    say(f"training=True at inference is a trap: it needs the whole batch, makes each prediction depend on "
        f"the other images in it, and updates the moving statistics as a side effect. With a batch of 1 "
        f"every layer normalises one image by its own statistics ({n_stat} value(s) per channel in the "
        f"last layer; with 1 value the variance is 0 and the output is beta, whatever the input).",
        highlight=False)
    say(f"\nThe model now holds the recalibrated statistics. Total time {time.perf_counter() - t_start:.0f} s.",
        highlight=False)
    if args.save:
        m_path, d_path = os.path.join(args.out, "model.keras"), os.path.join(args.out, "data.npz")
        say(f"Saved the trained model (before any remedy) and the images: refbn diagnose {m_path} {d_path}",
            highlight=False)
    return 0
