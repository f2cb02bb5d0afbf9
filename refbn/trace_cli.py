"""``refbn trace``: a worked example of training vs inference BatchNorm, with the numbers.

It walks through one training step (``_fused_batch_norm_training`` and the moving-average
update with ``update_delta``), runs ``--steps`` training steps on the same tensor, then one
inference step (``_fused_batch_norm_inference``) with the moving statistics, and shows how
far inference lands from training: step by step, for other momenta and step counts, and with
bias-corrected statistics.  ``--plot FILE.png`` draws the gap, ``--json FILE`` saves the
numbers.  Everything is computed by :class:`refbn.BatchNorm`; TensorFlow is not imported.
"""
import json

import numpy as np

from . import convergence as conv
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


def main(args):
    try:
        shape = tuple(int(s) for s in args.shape.lower().split("x"))
    except ValueError:
        return _fail(f"--shape: expected dimensions joined by 'x' (e.g. 4x3), got {args.shape!r}")
    if not shape or min(shape) < 1 or np.prod(shape[:-1]) < 2:
        return _fail(f"--shape: expected positive dimensions with at least 2 values per channel, got {args.shape!r}")
    if args.steps < 0:
        return _fail(f"--steps: expected a non-negative int, got {args.steps}")
    if not 0.0 < args.tolerance < 1.0:
        return _fail(f"--tolerance: expected a value in (0, 1), got {args.tolerance}")
    try:
        bn = _layer(args, args.momentum)
    except (ValueError, TypeError) as e:
        return _fail(str(e))
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
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
        print(f"json: {args.json}")
    return 0


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
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    horizon = max(args.steps, 1000)
    steps = sorted(set(np.unique(np.geomspace(1, horizon, 60).astype(int)).tolist()) | {args.steps} - {0})
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for mo in momenta:
        _, rows = run_steps(args, x, mo, steps)
        ax.loglog([r["step"] for r in rows], [max(r["gap"], 1e-17) for r in rows],
                  lw=2.5 if mo == m else 1.2, label=f"momentum {mo:g}")
    if args.steps > 0:
        ax.axvline(args.steps, color="k", ls=":", lw=1, label=f"--steps {args.steps}")
    ax.set_xlabel("training steps on the same x")
    ax.set_ylabel("max |y_train - y_infer|")
    ax.set_title(f"Training vs inference gap ({args.convention} convention, x ~ N({args.mean:g}, {args.std:g}^2))")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
