"""backend="tf_eigen" against TensorFlow's Eigen CPU kernel itself, bit for bit, and refbn explain.

TF runs in its own process with TF_ENABLE_ONEDNN_OPTS=0 (compare/runner.py's TFWorker, through
compare/tf_eigen_check.py): once for the module with the default intra-op thread count, once more
with one thread for the gradient's thread dependence.  The truth of every bit test is TF's output
(forward and gradient, both modes).  Skipped where TensorFlow is not installed.  Budget: under
60 s (about 30 s here, most of it the two TF starts).
"""
import importlib.util
from fractions import Fraction

import numpy as np
import pytest

import refbn
from refbn import explain
from refbn.compare import cases as cases_mod
from refbn.compare import tf_eigen_check

CASES = [
    "n4h5w5c8:f32:NHWC:train:mean3:std2",        # C % 8 == 0: 4 interleaved sums, packet rsqrt
    "n4h5w5c13:f32:NHWC:train:mean3:std2",       # 8 packet channels + a scalar tail of 5
    "n3h6w6c3:f32:NHWC:train:mean3:std2",        # C < 8: all scalar, sums in order
    "n2h3w3c37:f32:NHWC:train",                  # 18 rows: the 4-sum unrolling starts at 16
    "n2h2w3c16:f32:NHWC:train",                  # 12 rows: packet channels summed in order
    "n2c64h7w9:f32:NCHW:train:mean3:std2",       # channels first: TF transposes
    "n2h7w9c24:f32:NHWC:infer:mean3:std2",
    "n2c13h7w9:f32:NCHW:infer",
    "n5h7w11c16:f32:NHWC:train:eaf0.6:mean3:std2",
    "n1h1w1c8:f32:NHWC:train:eaf0.6",            # n == 1: Bessel factor 1/max(0, 1)
    "n2d2h3w4c9:f16:NDHWC:train",
    "n2c9d2h3w4:bf16:NCDHW:train:eaf0.3",
    "n3h4w5c16:f16:NHWC:infer",
    "n4h16w16c8:f32:NHWC:train:mean1e4:std0.01",  # offset data: TF 1e11 eps off the truth
    "n16h64w64c4:f32:NHWC:train:mean1e4:std0.01",
    "n8h56w56c64:f32:NHWC:train",                 # ResNet-50 conv2 (batch 8)
    "n2h3w4c5:f32:NHWC:train:eps1e-6:std0.001",
    # the gradient (every case above checks it too; these add what it does differently)
    "n2h3w3c37:f32:NHWC:infer",                   # FreezeGrad, C % 8 != 0, 18 rows
    "n1c16h3w4:f32:NCHW:train",                   # 12 rows, channels first
    "n4h6w6c12:f16:NHWC:train:mean3:std2",        # float16 dy summed from T (sizeof 2 in the cost model)
    "n2h5w5c11:bf16:NHWC:infer",
    "n4h16w16c8:f32:NHWC:infer:mean1e4:std0.01",  # offset data, inference
    "n8h7w7c2048:f32:NHWC:train",                 # ResNet-50 res5 (batch 8): C > 32 * threads, in order
    "n8h14w14c1024:f32:NHWC:infer",               # ResNet-50 res4 (batch 8)
    "n1h1w1c3:f32:NHWC:train",                    # one row: ReduceOuterDimensions passes it through
]
#: the gradient's sums depend on TF's thread count here: C <= 32 threads, enough rows for 2 blocks
THREAD_CASES = ["n8h56w56c64:f32:NHWC:train", "n16h64w64c4:f32:NHWC:infer:mean3:std2"]

need_tf = pytest.mark.skipif(importlib.util.find_spec("tensorflow") is None, reason="TensorFlow is not installed")


@pytest.fixture(scope="module")
def tf_results():
    return {c.descriptor(): res for c, res in tf_eigen_check.run([cases_mod.parse(d) for d in CASES])}


@need_tf
@pytest.mark.parametrize("descriptor", CASES)
def test_bit_identical_to_tf_eigen(tf_results, descriptor):
    case = cases_mod.parse(descriptor)
    res = tf_results[case.descriptor()]
    assert res["error"] == ""
    assert res["outputs"], "nothing compared"
    assert {k: v for k, v in res["outputs"].items() if v[0] != 0} == {}
    channels_first_inference = not case.is_training and case.layout in ("NCHW", "NCDHW")
    if channels_first_inference:     # TF's Eigen gradient refuses it, and so does refbn's emulation
        assert "refused by TF and by refbn" in res["note"]
        assert "x_backprop" not in res["outputs"]
    else:
        assert set(tf_eigen_check.GRAD_OUTPUTS) <= set(res["outputs"])
    assert res["verdict"] == "exact"


@need_tf
@pytest.mark.parametrize("threads", [1, 2])
def test_gradient_follows_tf_thread_count(threads):
    from refbn.backends import tf_eigen
    cases = [cases_mod.parse(d) for d in THREAD_CASES]
    for case, res in tf_eigen_check.run(cases, threads=threads):
        assert res["threads"] == threads
        assert res["error"] == "" and {k: v for k, v in res["outputs"].items() if v[0] != 0} == {}
        assert res["verdict"] == "exact", case.descriptor()
    # not vacuous: the emulated sums of these cases do differ between 1 and 2 threads
    for case in cases:
        got = []
        for t in (1, 2):
            before = tf_eigen.set_intra_op_threads(t)
            try:
                got.append(tf_eigen_check.emulate_grad(case)["scale_backprop"])
            finally:
                tf_eigen.set_intra_op_threads(before)
        assert not np.array_equal(got[0], got[1]), case.descriptor()


def test_reduction_blocks_by_hand():
    # redux_functor.h with 2 threads, 65536 rows x 4 channels: min_block_size = ceil(2000/4) = 500,
    # num_blocks = min(65536, ceil(262144/500), 2) = 2 of 32768 rows; Eigen's cost model gives the
    # 2 tasks 2 threads (2 * 32768 * 4 * (4 * 11/64 + 1) cycles >> 210000), so 2 row blocks
    from refbn.backends.tf_eigen import reduction_row_blocks
    assert reduction_row_blocks(65536, 4, 2) == [(0, 32768), (32768, 65536)]
    assert reduction_row_blocks(65536, 4, 1) == [(0, 65536)]          # one thread: in order
    assert reduction_row_blocks(65536, 65, 2) == [(0, 65536)]         # C > 32 * threads: in order
    assert reduction_row_blocks(100, 13, 2) == [(0, 100)]             # 1300 values: one block
    # 2 tasks of 200 rows x 13 = 2600 values: 2 * 2600 * 1.6875 = 8775 cycles, one thread
    assert reduction_row_blocks(400, 13, 2) == [(0, 400)]
    assert reduction_row_blocks(65536, 4, 3) == [(0, 21846), (21846, 43692), (43692, 65536)]


def test_gradient_refusals_and_inputs_left_alone():
    rng = np.random.default_rng(0)
    x, dy = (rng.normal(size=(2, 5, 3, 5)).astype(np.float32) for _ in range(2))   # C = 5 either way
    args = (np.ones(5, np.float32), np.zeros(5, np.float32), np.ones(5, np.float32), [])
    with pytest.raises(ValueError, match="data_format: .*is_training=False.*channels-last"):
        refbn.raw_ops.FusedBatchNormGradV3(dy, x, *args, data_format="NCHW", is_training=False,
                                           backend="tf_eigen")
    with pytest.raises(TypeError, match="x: .*float64"):
        refbn.raw_ops.FusedBatchNormGradV3(dy.astype(np.float64), x.astype(np.float64), *args,
                                           backend="tf_eigen")
    before = x.copy(), dy.copy()
    for fmt, training in (("NCHW", True), ("NHWC", False), ("NHWC", True)):
        refbn.raw_ops.FusedBatchNormGradV3(dy, x, *args, data_format=fmt, is_training=training,
                                           backend="tf_eigen")
    assert np.array_equal(x, before[0]) and np.array_equal(dy, before[1])


def test_refuses_float64_x_and_leaves_inputs_alone():
    x = np.random.default_rng(0).normal(size=(2, 3, 3, 8))
    with pytest.raises(TypeError, match="x: .*float64"):
        refbn.raw_ops.FusedBatchNormV3(x, np.ones(8), np.zeros(8), [], [], backend="tf_eigen")
    x32, before = x.astype(np.float32), x.astype(np.float32).copy()
    refbn.raw_ops.FusedBatchNormV3(x32, np.ones(8), np.zeros(8), [], [], backend="tf_eigen")
    assert np.array_equal(x32, before)


def test_explain_bessel_only_case_by_hand():
    # x = [0, 0, 2, 2] in one channel: sum 4, fl(1/4) = 1/4, mean 1, squares 1, variance 1: all exact in
    # float32.  Only the Bessel factor rounds: fl(4/3) = 11184811 / 2^23, so TF's batch_variance is that,
    # and its relative error is (3 * 11184811 - 2^25) / 4 = 1/4 eps, all of it the Bessel step's.
    x = np.array([0, 0, 2, 2], np.float32).reshape(1, 1, 4, 1)
    s = explain.split(explain.rows_of(x, "NHWC"))
    assert Fraction(s.tf) == Fraction(11184811, 2 ** 23)
    tf = Fraction(11184811, 2 ** 23)
    assert (tf - Fraction(4, 3)) / Fraction(4, 3) * 2 ** 23 == Fraction(1, 4)   # against the exact 4/3
    # refbn's truth is float64's 4/3: tf - truth is exact (Sterbenz), the division rounds once
    truth = Fraction(4 / 3)
    assert s.truth == 4 / 3
    assert s.total_eps == float((tf - truth) / truth * 2 ** 23)
    assert s.shares == {"sum_x": 0.0, "mean": 0.0, "center": 0.0, "square": 0.0, "sum_sq": 0.0,
                        "variance": 0.0, "bessel": s.total_eps}
    assert s.interaction == 0.0
    r = refbn.raw_ops.FusedBatchNormV3(x, [1.0], [0.0], [], [], backend="tf_eigen")
    assert r.batch_variance[0] == np.float32(s.tf)


def test_explain_chain_is_the_backend():
    # the all-float32 chain of refbn.explain is the tf_eigen backend's batch_variance, bit for bit
    for d in ("n4h5w5c13:f32:NHWC:train:mean3:std2", "n4h16w16c8:f32:NHWC:train:mean1e4:std0.01"):
        case = cases_mod.parse(d)
        x = cases_mod.make_inputs(case).x
        r = refbn.raw_ops.FusedBatchNormV3(x, np.ones(case.channels), np.zeros(case.channels), [], [],
                                           epsilon=case.eps, data_format=case.layout, backend="tf_eigen")
        chain = explain.chain(explain.rows_of(x, case.layout)).astype(np.float32)
        assert np.array_equal(chain.view(np.uint32), r.batch_variance.view(np.uint32))


def test_explain_cli_contract(capsys):
    from refbn import cli
    assert cli.main(["explain", "n4h5w5c8:f32:NHWC:infer"]) == 2
    assert "training-mode" in capsys.readouterr().err
    assert cli.main(["explain", "n4h5w5c8:f32:NHWC:train", "--channel", "8"]) == 2
    assert cli.main(["explain", "n4h5w5c8:f32:NHWC:train:mean3"]) == 0
    out = capsys.readouterr().out
    assert "sum_x" in out and "of TF's" in out
