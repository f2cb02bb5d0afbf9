"""``refbn trace``: a worked example of training vs inference BatchNorm, with the numbers.

It walks through one training step (``_fused_batch_norm_training`` and the moving-average
update with ``update_delta``), runs ``--steps`` training steps on the same tensor, then one
inference step (``_fused_batch_norm_inference``) with the moving statistics, and shows how
far inference lands from training: step by step, for other momenta and step counts, and with
bias-corrected statistics.  ``--backward`` continues each traced step into its gradient,
``FusedBatchNormGradV3`` in training mode and in inference mode ("frozen BN"), with TF's
names for each step and a finite-difference check.  ``--plot FILE.png`` draws the gap,
``--json FILE`` saves the numbers.  Everything is computed by :class:`refbn.BatchNorm` and
:mod:`refbn.raw_ops`; TensorFlow is not imported.
"""
import json
import math

import numpy as np

from . import convergence as conv, raw_ops, reference
from .layer import CONVENTIONS, BatchNorm

SWEEP_STEPS = (1, 5, 20, 100, 500)
SWEEP_MOMENTA = {"keras": (0.9, 0.99, 0.999), "tf_fused": (0.9, 0.99, 0.999), "torch": (0.1, 0.01, 0.001)}


def configure(p):
    p.add_argument("--shape", default="4x3", help="x's shape, channels last, e.g. 4x3 or 2x2x2x3 (default 4x3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=5, help="training steps before inference (default 5)")
    p.add_argument("--momentum", type=float, default=None,
                   help="momentum (default: the convention's, 0.99 for keras; torch: 0.1)")
    p.add_argument("--mean", type=float, default=3.0, help="mean of the generated data (default 3)")
    p.add_argument("--std", type=float, default=2.0, help="standard deviation of the generated data (default 2)")
    p.add_argument("--convention", default="keras", choices=CONVENTIONS)
    p.add_argument("--tolerance", type=float, default=0.01,
                   help="initial weight considered converged (default 0.01)")
    p.add_argument("--backward", action="store_true",
                   help="also trace the gradient (FusedBatchNormGradV3) of the training step and of the "
                        "inference step, with dy ~ N(0, 1) and a finite-difference check")
    p.add_argument("--plot", metavar="FILE.png", help="write a plot of the gap against the step count")
    p.add_argument("--json", metavar="FILE", help="write the traces and gaps as JSON")


def _fail(msg):
    import sys
    print(f"refbn trace: error: {msg}", file=sys.stderr)
    return 2


def _layer(args, momentum, debias=False, channels=None):
    kw = {} if momentum is None else {"momentum": momentum}
    return BatchNorm(convention=args.convention, debias=debias, channels=channels, **kw)


def _gap(y_train, y_infer):
    return float(np.max(np.abs(np.asarray(y_train, np.float64) - np.asarray(y_infer, np.float64))))


def run_steps(args, x, momentum, checkpoints):
    """Train a BatchNorm on x for max(checkpoints) steps; at each checkpoint record the gap
    max|y_train - y_infer| with the moving statistics and with the debiased ones."""
    C = x.shape[-1]
    bn, bn_d = _layer(args, momentum, channels=C), _layer(args, momentum, debias=True, channels=C)
    y_train = _layer(args, momentum)(x, training=True)  # the same every step: gamma, beta fixed
    out, want = [], set(checkpoints)

    def record(step):
        out.append(dict(step=step, moving_mean=bn.moving_mean.tolist(),
                        moving_variance=bn.moving_variance.tolist(), initial_weight=bn.initial_weight,
                        gap=_gap(y_train, bn(x, training=False)),
                        debiased_gap=_gap(y_train, bn_d(x, training=False))))

    if 0 in want:
        record(0)
    for step in range(1, max(checkpoints, default=0) + 1):
        bn(x, training=True)
        bn_d(x, training=True)
        if step in want:
            record(step)
    return bn, out


def _table(title, columns, rows):
    from rich.table import Table
    t = Table(title=title, title_justify="left")
    for c in columns:
        t.add_column(c, justify="right")
    for r in rows:
        t.add_row(*r)
    return t


def _console():
    from rich.console import Console
    c = Console()
    return c if c.is_terminal else Console(width=110)


#: --steps at most this: every step is a layer call, repeated for each momentum of the sweep
#: (20000 steps took 45 s here)
MAX_STEPS = 100_000


def _check_args(args, shape):
    """UsageError for the first bad number or output file (the shape's syntax is checked already)."""
    from .cli import UsageError, check_memory, check_number, check_output, check_plot
    # float64 draws and the float32 x: 12 bytes a value at the very least
    check_memory("--shape", f"x of shape {args.shape!r}", 12 * math.prod(shape))
    check_number("--steps", args.steps, 0, MAX_STEPS)
    check_number("--seed", args.seed, 0)
    check_number("--mean", args.mean)
    check_number("--std", args.std, 0)
    if abs(args.mean) + 10 * args.std > float(np.finfo(np.float32).max):
        raise UsageError(f"--mean {args.mean:g} / --std {args.std:g}: x ~ N(mean, std^2) overflows float32 "
                         f"(expected |mean| + 10 std <= {float(np.finfo(np.float32).max):.4g})")
    check_number("--tolerance", args.tolerance, 0, 1, low_open=True, high_open=True)
    check_plot("--plot", args.plot)
    check_output("--json", args.json)


def main(args):
    try:
        shape = tuple(int(s) for s in args.shape.lower().split("x"))
    except ValueError:
        return _fail(f"--shape: expected dimensions joined by 'x' (e.g. 4x3), got {args.shape!r}")
    if not shape or min(shape) < 1 or math.prod(shape[:-1]) < 2:
        return _fail(f"--shape: expected positive dimensions with at least 2 values per channel, got {args.shape!r}")
    _check_args(args, shape)
    try:
        bn = _layer(args, args.momentum)
    except (ValueError, TypeError) as e:
        return _fail(f"--momentum {args.momentum!r} with --convention {args.convention}: {e}")
    m = bn.momentum
    decay = bn.decay()
    con = _console()
    rng = np.random.default_rng(args.seed)
    x = (args.mean + args.std * rng.standard_normal(shape)).astype(np.float32)
    print(f"x: float32{list(shape)}, drawn from N({args.mean:g}, {args.std:g}^2) with seed {args.seed}, "
          f"channels on the last axis.\nConvention {args.convention!r}: momentum {m}, so every training step "
          f"moves the moving statistics {decay:g} of the way to the batch's (decay = {decay:g}).\n")
    print("Step 1 -- a training step: y uses the batch's own statistics, then the moving averages are "
          "updated with update_delta.\n")
    y_train, tr = bn(x, training=True, trace=True)
    print(tr.explain())
    if args.backward:
        dy = rng.standard_normal(shape).astype(np.float32)
        bwd_train = _backward(x, dy, bn.gamma, tr["batch_mean"], tr["biased_variance"], bn.epsilon, True)
    if args.steps == 0:  # inference before any training step: a layer with the initial values
        bn = _layer(args, args.momentum, channels=shape[-1])
    for _ in range(1, args.steps):
        bn(x, training=True)
    y_inf, tr_inf = bn(x, training=False, trace=True)
    bn.debias = True
    y_inf_debiased = bn(x, training=False)
    bn.debias = False
    print(f"\nAfter {args.steps} training step(s) on the same x -- an inference step: y uses the moving "
          "statistics, not x's.\n")
    print(tr_inf.explain())
    if args.backward:
        bwd_infer = _backward(x, dy, bn.gamma, bn.moving_mean, bn.moving_variance, bn.epsilon, False)
        gap = float(np.max(np.abs(bwd_train[0].astype(np.float64) - bwd_infer[0])))
        print(f"\nThe same dy gives max |dx_train - dx_infer| = {gap:.4g}: in training mode the batch "
              "statistics depend on x, so dx loses the parts of dy that shift every value of a channel "
              "(mean(dy)) or stretch them (mean(dy * x_hat)); frozen BN passes dy through, scaled.")

    checkpoints = list(range(0, args.steps + 1)) if args.steps <= 12 else sorted(
        {0, 1, 2, 3, 5, args.steps} | set(np.unique(np.geomspace(1, args.steps, 8).astype(int)).tolist()))
    _, rows = run_steps(args, x, args.momentum, checkpoints)
    print(f"\nThe training/inference gap, max |y_train - y_infer| on the same x (momentum {m}):")
    con.print(_table(
        None,
        ("step", "moving_mean[0]", "moving_variance[0]", "initial weight", "gap", "gap, debiased"),
        [(str(r["step"]), f"{r['moving_mean'][0]:.6g}", f"{r['moving_variance'][0]:.6g}",
          f"{r['initial_weight']:.4f}",
          f"{r['gap']:.4g}", f"{r['debiased_gap']:.3g}") for r in rows]), highlight=False)
    final = rows[-1]
    if args.convention == "keras":
        why = ("debiased = (moving - w * initial) / (1 - w), w the initial weight, recovers the batch "
               "statistics of constant data exactly: what is left is the float32 rounding of the stored "
               "moving statistics, magnified by 1 / (1 - w)")
    else:
        why = (f"with convention {args.convention!r} the moving variance averages the Bessel-corrected "
               "variance while training normalises with the biased one, so even debiased statistics leave "
               "a gap")
    print(f"The initial values (mean 0, variance 1) still weigh {final['initial_weight']:.4g} after "
          f"{args.steps} step(s); {why}.")
    if args.convention != "torch" and 0 < m < 1:
        need = conv.steps_to_converge(m, args.tolerance)
        print(f"momentum^t = {m}^t falls under {args.tolerance:g} after {need} steps.")

    momenta = sorted(set(SWEEP_MOMENTA[args.convention]) | ({m} if m is not None else set()),
                     reverse=args.convention != "torch")
    steps_list = sorted(set(SWEEP_STEPS) | {args.steps} - {0})
    sweep = {}
    for mo in momenta:
        _, r = run_steps(args, x, mo, steps_list)
        sweep[mo] = {row["step"]: row["gap"] for row in r}
    print("\nThe gap after t steps shrinks with more steps and grows with the momentum (same x every step):")
    con.print(_table(None,
                     ["momentum \\ steps"] + [str(s) for s in steps_list],
                     [[f"{mo:g}"] + [f"{sweep[mo][s]:.3g}" for s in steps_list] for mo in momenta]),
              highlight=False)
    if args.plot:
        _plot(args.plot, x, args, momenta, m)
        print(f"plot: {args.plot}")
    if args.json:
        doc = {"x": x.tolist(), "convention": args.convention, "momentum": m, "steps": args.steps,
               "training_step_1": _jsonable(tr.as_dict()), "inference": _jsonable(tr_inf.as_dict()),
               "gap_by_step": rows,
               "gap_sweep": {f"{mo:g}": {str(s): g for s, g in sweep[mo].items()} for mo in momenta},
               "y_train": np.asarray(y_train).tolist(), "y_infer": np.asarray(y_inf).tolist(),
               "y_infer_debiased": np.asarray(y_inf_debiased).tolist()}
        if args.backward:
            doc["backward"] = {"dy": dy.tolist(), "training": _jsonable(bwd_train[-1].as_dict()),
                               "inference": _jsonable(bwd_infer[-1].as_dict()),
                               "finite_difference_error": bwd_train[-2]}
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
        print(f"json: {args.json}")
    return 0


# refbn's backward trace names -> TF's CPU kernel (fused_batch_norm_op.cc): FusedBatchNormGrad in
# training mode, FusedBatchNormFreezeGrad in inference mode (names read from TF's source)
TF_GRAD_NAMES = {
    "dy": ("y_backprop", "y_backprop"),
    "inv_std": ("coef0 = rsqrt(variance + epsilon)", "rsqrt(pop_variance + epsilon)"),
    "sum_dy": ("y_backprop_sum = offset_backprop", "offset_backprop"),
    "sum_dy_x_hat": ("scale_backprop = sum(y_backprop * x_scaled)", "scale_backprop"),
    "dx_term_dy": ("coef1 * y_backprop, coef1 = scale * coef0", "x_backprop (the only term)"),
    "dx_term_mean_dy": ("-coef1 * y_backprop_mean (in y_backprop_centered)", "- (no gradient through the mean)"),
    "dx_term_x_hat": ("-coef1 * x_centered * coef2, coef2 = coef0^2 * y_backprop_centered_mean",
                      "- (no gradient through the variance)"),
    "dx": ("x_backprop = coef1 * (y_backprop_centered - x_centered * coef2)", "x_backprop"),
    "dgamma": ("scale_backprop", "scale_backprop"),
    "dbeta": ("offset_backprop", "offset_backprop"),
}


def _data_format(ndim):
    return {2: "NC", 3: "NWC", 4: "NHWC", 5: "NDHWC"}.get(ndim)


def _backward(x, dy, scale, mean, variance, epsilon, is_training):
    """Trace FusedBatchNormGradV3 for the forward step that used (mean, variance); print it with
    TF's names and check dx (training: against central differences of the float64 forward).
    Returns (dx, finite-difference error or None, trace)."""
    fmt = _data_format(x.ndim)
    x4, dy4 = (x, dy) if fmt else (x.reshape(-1, x.shape[-1]), dy.reshape(-1, x.shape[-1]))
    f32 = np.float32
    r = raw_ops.FusedBatchNormGradV3(
        y_backprop=dy4, x=x4, scale=scale, reserve_space_1=np.asarray(mean, f32),
        reserve_space_2=np.asarray(variance, f32), reserve_space_3=np.zeros(0, f32), epsilon=epsilon,
        data_format=fmt or "NC", is_training=is_training, trace=True)
    tr = r.trace
    mode = "training" if is_training else "inference"
    kernel = "FusedBatchNormGrad" if is_training else "FusedBatchNormFreezeGrad"
    args_ = ("reserve_space_1 = batch_mean, reserve_space_2 = biased_variance (what y used)" if is_training
             else "reserve_space_1 = moving_mean, reserve_space_2 = moving_variance (constants)")
    print(f"\nThe gradient of this {mode} step: FusedBatchNormGradV3(y_backprop = dy ~ N(0, 1), x, scale, "
          f"{args_}, is_training={is_training}).\n")
    print(tr.explain())
    from rich.table import Table
    t = Table(title=f"The same steps in TF's CPU kernel ({kernel}, fused_batch_norm_op.cc)", title_justify="left")
    t.add_column("refbn trace name")
    t.add_column("TF's name")
    for name in tr.names():
        if name in TF_GRAD_NAMES:
            t.add_row(name, TF_GRAD_NAMES[name][0 if is_training else 1])
    _console().print(t, highlight=False)
    terms = tr["dx_term_dy"] + tr["dx_term_mean_dy"] + tr["dx_term_x_hat"]
    print(f"dx_term_dy + dx_term_mean_dy + dx_term_x_hat - dx: max {np.max(np.abs(terms - r.x_backprop)):.2g} "
          "(dx is rounded to float32)")
    fd_error = None
    if is_training:
        fd_error = _finite_difference_error(x4, dy4, scale, epsilon)
        print(f"check: central finite differences of sum(dy * y) through refbn.reference.forward_training "
              f"agree with refbn.reference.backward to {fd_error:.2g} (float64, max error relative to max |dx|)")
    return r.x_backprop.reshape(x.shape), fd_error, tr


def _finite_difference_error(x, dy, scale, epsilon, limit=24):
    """max |fd - dx| / max |dx| over the first ``limit`` elements of x, all in float64: dx from
    refbn.reference.backward with x's own statistics, fd from central differences of
    sum(dy * y) through refbn.reference.forward_training."""
    x64, dy64, s64 = (np.asarray(a, np.float64) for a in (x, dy, scale))
    zeros = np.zeros_like(s64)
    axis = x64.ndim - 1
    mean, var = reference.moments(x64, axis)
    dx = reference.backward(dy64, x64, s64, mean, var, epsilon, True, axis)[0]

    def loss(z):
        return float(np.sum(dy64 * reference.forward_training(z, s64, zeros, epsilon, axis)[0]))

    flat = x64.ravel()
    worst = 0.0
    for i in range(min(limit, flat.size)):
        h = 1e-5 * max(1.0, abs(flat[i]))
        up, down = flat.copy(), flat.copy()
        up[i] += h
        down[i] -= h
        fd = (loss(up.reshape(x64.shape)) - loss(down.reshape(x64.shape))) / (2 * h)
        worst = max(worst, abs(fd - float(dx.ravel()[i])))
    return worst / max(float(np.max(np.abs(dx))), 1e-300)


def _jsonable(d):
    out = {}
    for k, v in d.items():
        if isinstance(v, np.ndarray):
            out[k] = v.tolist()
        elif isinstance(v, (np.floating, np.integer)):
            out[k] = v.item()
        elif isinstance(v, tuple):
            out[k] = list(v)
        else:
            out[k] = v
    return out


def _plot(path, x, args, momenta, m):
    # a Figure of its own, drawn by Agg: no pyplot state, so a notebook's inline backend is left alone
    from matplotlib.figure import Figure
    horizon = max(args.steps, 1000)
    steps = sorted(set(np.unique(np.geomspace(1, horizon, 60).astype(int)).tolist()) | {args.steps} - {0})
    fig = Figure(figsize=(8, 4.5))
    ax = fig.subplots()
    for mo in momenta:
        _, rows = run_steps(args, x, mo, steps)
        ax.loglog([r["step"] for r in rows], [max(r["gap"], 1e-17) for r in rows],
                  lw=2.5 if mo == m else 1.2, label=f"momentum {mo:g}")
    if args.steps > 0:
        ax.axvline(args.steps, color="k", ls=":", lw=1, label=f"the traced inference step (--steps {args.steps})")
    ax.set_xlabel("training steps on the same x (log scale)")
    ax.set_ylabel("max |y_train - y_infer|\n(units of y: batch std, gamma = 1, beta = 0)")
    ax.set_title(f"Training vs inference gap ({args.convention} convention, x ~ N({args.mean:g}, {args.std:g}^2))")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
