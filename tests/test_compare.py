"""refbn against TensorFlow's fused kernels (oneDNN and Eigen) and Keras, driven by the registry.

One harness run (two TF worker processes, one per kernel family) covers every
non-slow registered case for every available refbn backend; the tests then
judge its results.  The slow cases (ResNet-50 at batch 32, n = 2^24, the
[27,131,127,6] matrix entries) run with ``refbn verify`` or ``pytest -m slow``.
"""
import importlib.util

import numpy as np
import pytest

from refbn import backends
from refbn.compare import cases, divergences as dv, runner
from refbn.tolerances import tolerance

pytestmark = pytest.mark.tf

KERNELS = runner.KERNELS
BACKENDS = backends.available()
CI_CASES = cases.registry(include_slow=False)
HAVE_TORCH = importlib.util.find_spec("torch") is not None


def _run(case_list):
    return {(r.descriptor, r.kernel, r.backend): r
            for r in runner.verify(case_list, backend=BACKENDS, kernels=KERNELS)}


@pytest.fixture(scope="module")
def results():
    return _run(CI_CASES)


def _params(case_list):
    return [pytest.param(c, k, b, id=f"{c.descriptor()}-{k}-{b}")
            for c in case_list for k in KERNELS for b in BACKENDS]


def _explain(r):
    return "\n".join(r.failures + r.notes) + f"\nrepro: {r.repro()}"


def _check(r, case):
    assert r.verdict != "FAIL", _explain(r)
    if dv.empty_training(case) or dv.empty_inference(case):
        assert r.verdict == "divergence" and dv.EMPTY_BATCH_TRAINING.name in r.divergences, _explain(r)
    elif case.mode == "torch" and not HAVE_TORCH:
        assert r.verdict == "unsupported" and "torch is not installed" in " ".join(r.notes)
    elif r.verdict == "divergence":
        # only the documented, ill-conditioned cases may disagree with TF beyond tolerance
        assert dv.ill_conditioned(case), _explain(r)
        assert dv.ILL_CONDITIONED.name in r.divergences
    else:
        assert r.verdict in ("exact", "close"), _explain(r)
        assert all(o.refbn_vs_tf.passed for o in r.outputs), _explain(r)
    if case.kind == "op" and not dv.empty_training(case):
        assert r.outputs, "nothing was compared: " + _explain(r)
    for o in r.outputs:
        # refbn is within its own tolerance of the float64 truth, and no farther from it than TF
        assert o.refbn_vs_truth.passed, o.refbn_vs_truth.message("refbn vs float64 truth")
        if case.kind == "parity":
            continue  # both layers round float32 state every step: neither is always closer
        assert o.closer in ("refbn", "tie"), (
            f"{o.output}: TF is closer to the float64 truth (refbn {o.refbn_vs_truth.max_abs:.3g}, "
            f"TF {o.tf_vs_truth.max_abs:.3g}); repro: {r.repro()}")


@pytest.mark.parametrize("case,kernel,backend", _params(CI_CASES))
def test_case_matches_tf(results, case, kernel, backend):
    _check(results[(case.descriptor(), kernel, backend)], case)


@pytest.mark.slow
def test_slow_cases_match_tf():
    slow = [c for c in cases.registry() if c.slow]
    res = _run(slow)
    for c in slow:
        for k in KERNELS:
            for b in BACKENDS:
                _check(res[(c.descriptor(), k, b)], c)


# -- documented divergences, asserted as divergences ----------------------------------------
OFFSET = "n16h64w64c4:f32:NHWC:train:mean10000:std0.01"


@pytest.mark.parametrize("kernel", KERNELS)
def test_large_offset_tf_is_the_one_that_is_wrong(results, kernel):
    r = results[(OFFSET, kernel, "numpy")]
    assert r.verdict == "divergence" and dv.ILL_CONDITIONED.name in r.divergences
    var = next(o for o in r.outputs if o.output == "batch_variance")
    # TF's variance is off by more than its declared float32 tolerance, refbn is within 1 eps
    assert var.tf_vs_truth.max_ulps > var.tf_vs_truth.allowed_ulps
    assert var.tf_vs_truth.max_rel > 1e-3
    assert var.refbn_vs_truth.max_ulps <= tolerance("batch_variance", "f32").ulps
    assert var.closer == "refbn"


def test_5d_cases_run_in_ci(results):
    five = [c for c in CI_CASES if len(c.shape) == 5 and c.count > 0]
    assert five
    for c in five:
        for k in KERNELS:
            r = results[(c.descriptor(), k, "numpy")]
            assert r.verdict in ("exact", "close"), _explain(r)


def test_eigen_refuses_channels_first_inference_gradient(results):
    d = "n5c7h11w4:f32:NCHW:infer"
    eigen, onednn = results[(d, "eigen", "numpy")], results[(d, "onednn", "numpy")]
    assert dv.EIGEN_GRAD_NCHW_INFERENCE.name in eigen.divergences
    assert "x_backprop" not in {o.output for o in eigen.outputs}
    assert any("only support NHWC" in n for n in eigen.notes)
    assert "x_backprop" in {o.output for o in onednn.outputs}  # oneDNN computes it
    assert eigen.verdict in ("exact", "close")  # the forward pass is still judged


def test_inference_reserve_spaces_are_not_compared(results):
    r = results[("n1h1w6c2:f32:NHWC:infer", "eigen", "numpy")]
    assert dv.INFERENCE_RESERVE_SPACES.name in r.divergences
    assert not {"reserve_space_1", "reserve_space_2"} & {o.output for o in r.outputs}
    inp = cases.make_inputs(cases.parse("n1h1w6c2:f32:NHWC:infer"))
    from refbn import raw_ops
    out = raw_ops.FusedBatchNormV3(inp.x, inp.scale, inp.offset, inp.mean, inp.variance, is_training=False)
    np.testing.assert_array_equal(out.reserve_space_1, inp.mean)  # refbn's documented behaviour


@pytest.mark.parametrize("kernel", KERNELS)
def test_empty_batch_training_is_refused_by_refbn_only(results, kernel):
    r = results[("n0h131w127c6:f32:NHWC:train", kernel, "numpy")]
    assert r.verdict == "divergence"
    assert any("ValueError" in n for n in r.notes) and any("NaN" in n for n in r.notes)


# -- multi-step Keras parity ------------------------------------------------------------------
@pytest.mark.parametrize("desc", ["n16h4w4c8:f32:NHWC:keras:mean3:std2:k20",
                                  "n16h4w4c8:f32:NHWC:tf_fused:mean3:std2:k20:mom0.9",
                                  "n8h4w4c3:bf16:NHWC:keras:mean3:std2:k10"])
def test_multi_step_parity(results, desc):
    for k in KERNELS:
        r = results[(desc, k, "numpy")]
        assert r.verdict in ("exact", "close"), _explain(r)
        assert {o.output for o in r.outputs} == {"moving_mean", "moving_variance", "y_last_train", "y_infer"}
        mv = next(o for o in r.outputs if o.output == "moving_variance")
        assert mv.refbn_vs_tf.passed and mv.refbn_vs_tf.max_abs > 0 or mv.refbn_vs_tf.exact


def test_convention_gap_is_reported_as_a_fact(results):
    r = results[("n16h4w4c8:f32:NHWC:tf_fused:mean3:std2:k20", "onednn", "numpy")]
    assert r.verdict in ("exact", "close")
    assert len(r.facts) == 1 and "as documented" in r.facts[0] and "Bessel" in r.facts[0]
