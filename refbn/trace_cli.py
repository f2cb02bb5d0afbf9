"""``refbn trace``: a worked example of training vs inference BatchNorm."""
import numpy as np

from . import equations as eq
from .layer import BatchNorm


def configure(p):
    p.add_argument("--shape", default="4x3", help="x's shape, channels last, e.g. 4x3 or 2x2x2x3")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=5, help="training steps before inference")
    p.add_argument("--momentum", type=float, default=0.99)
    p.add_argument("--mean", type=float, default=3.0, help="mean of the generated data")
    p.add_argument("--std", type=float, default=2.0, help="standard deviation of the generated data")
    p.add_argument("--convention", default="keras", choices=["keras", "tf_fused", "torch"])


def main(args):
    try:
        shape = tuple(int(s) for s in args.shape.lower().split("x"))
    except ValueError:
        raise SystemExit(f"--shape: expected dimensions joined by 'x' (e.g. 4x3), got {args.shape!r}")
    rng = np.random.default_rng(args.seed)
    x = (args.mean + args.std * rng.standard_normal(shape)).astype(np.float32)
    bn = BatchNorm(momentum=args.momentum, convention=args.convention)
    print(f"x: float32{list(shape)}, drawn from N({args.mean}, {args.std}^2), channels on the last axis\n")
    gaps = []
    for step in range(1, args.steps + 1):
        y_train, tr = bn(x, training=True, trace=True)
        if step == 1:
            print(tr.explain())
            print()
        y_inf = bn(x, training=False)
        gaps.append((step, bn.moving_mean.copy(), bn.moving_variance.copy(),
                     float(np.abs(y_train.astype(np.float64) - y_inf).max())))
    _, tr_inf = bn(x, training=False, trace=True)
    print(f"After {args.steps} training step(s), inference on the same x:")
    print(tr_inf.explain())
    print(f"\nThe training/inference gap, step by step (same x every step; decay = {bn.decay():g}):")
    print(f"{'step':>4}  {'moving_mean[0]':>14}  {'moving_variance[0]':>18}  {'initial weight':>14}  "
          f"{'max |y_train - y_infer|':>23}")
    w = 1.0
    for step, mm, mv, gap in gaps:
        w *= 1.0 - (1.0 - args.momentum if args.convention != "torch" else args.momentum)
        print(f"{step:>4}  {mm[0]:>14.6g}  {mv[0]:>18.6g}  {w:>14.4f}  {gap:>23.6g}")
    if args.convention != "torch" and 0 < args.momentum < 1:
        need = eq.steps_to_converge(args.momentum, 0.01)
        print(f"\nThe initial values (mean 0, variance 1) still weigh momentum^t = "
              f"{args.momentum}^{args.steps} = {args.momentum ** args.steps:.4f}; "
              f"{need} steps bring that under 1%.")
    return 0
