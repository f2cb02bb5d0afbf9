"""``refbn explain CASE``: where TF's batch_variance error comes from, step by step.

    refbn explain 'n16h64w64c4:f32:NHWC:train:mean1e4:std0.01'
    refbn explain 'n256h256w256c1:f32:NHWC:train:mean100' --channel 0

CASE is a descriptor of ``refbn verify``'s registry (``refbn verify --list``), in training
mode.  Its inputs are the ones verify gives TF (compare.cases.make_inputs).  TF's result is
the ``tf_eigen`` backend's, which ``refbn verify --backend tf_eigen`` proves bit-identical to
TF's Eigen kernel case by case; each step is then made exact in float64 on its own
(:mod:`refbn.explain`).  TensorFlow is not imported.  Exit status: 0, or 2 for a bad CASE or
option (refbn/cli.py's contract).
"""
from .cli import UsageError


def configure(p):
    p.add_argument("case", metavar="CASE", help="a training-mode case descriptor, e.g. "
                                                "n16h64w64c4:f32:NHWC:train:mean1e4:std0.01")
    p.add_argument("--channel", type=int, default=None,
                   help="the channel to explain (default: the one where TF is furthest from the truth)")


def main(args):
    import numpy as np

    from . import explain
    from .compare import cases as cases_mod
    from .compare.cli import check_cases
    try:
        case = cases_mod.lookup(args.case)
    except cases_mod.DescriptorError as e:
        raise UsageError(f"CASE: {e}") from None
    if not case.is_training or case.mode not in cases_mod.OP_MODES:
        raise UsageError(f"CASE: expected a training-mode op case (':train'), got {case.descriptor()!r}")
    if case.count == 0:
        raise UsageError(f"CASE: expected a non-empty batch, got {case.descriptor()!r}")
    check_cases([case])
    if args.channel is not None and not 0 <= args.channel < case.channels:
        raise UsageError(f"--channel: expected an int in [0, {case.channels - 1}], got {args.channel}")
    x = cases_mod.make_inputs(case).x
    s = explain.split(explain.rows_of(x, case.layout), args.channel)
    print(f"refbn explain {case.descriptor()}: batch_variance (Bessel-corrected, TF's output 2"
          f"{'' if case.eaf == 1 else ' before its moving average'}) through TF's Eigen kernel, one step "
          "at a time made exact in float64")
    for line in s.lines():
        print(line)
    return 0
