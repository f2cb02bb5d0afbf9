"""``refbn trace``: the worked example runs, prints every step with numbers, writes its files,
and its numbers follow the moving-average closed form."""
import json
import subprocess
import sys

import numpy as np
import pytest

from refbn import cli
from refbn.testing import assert_close
from refbn.tolerances import tolerance


def _run(capsys, *argv):
    rc = cli.main(["trace", *argv])
    return rc, capsys.readouterr()


def test_trace_walks_through_every_step_and_writes_files(tmp_path, capsys):
    png, js = tmp_path / "gap.png", tmp_path / "trace.json"
    rc, out = _run(capsys, "--steps", "3", "--plot", str(png), "--json", str(js))
    assert rc == 0
    text = out.out
    for name in ("_fused_batch_norm_training", "_fused_batch_norm_inference", "update_delta",
                 "moving_mean_after", "moving_variance_after", "batch_mean", "biased_variance", "inv_std",
                 "0.99^t falls under 0.01 after 459 steps"):
        assert name in text, name
    assert png.stat().st_size > 0
    doc = json.loads(js.read_text())
    x = np.asarray(doc["x"], dtype=np.float64)
    mean, var = x.mean(axis=0), x.var(axis=0)
    m = doc["momentum"]
    assert [r["step"] for r in doc["gap_by_step"]] == [0, 1, 2, 3]
    for r in doc["gap_by_step"]:
        w = m ** r["step"]
        # constant data: moving = w * initial + (1 - w) * batch statistic
        assert_close(r["moving_mean"], (1 - w) * mean, "moving_mean", "float32", "refbn_layer")
        assert_close(r["moving_variance"], w + (1 - w) * var, "moving_variance", "float32", "refbn_layer")
    # the traced step-1 numbers are the batch statistics of x
    assert_close(doc["training_step_1"]["batch_mean"], mean, "batch_mean", "float64")
    assert_close(doc["inference"]["moving_mean"], doc["gap_by_step"][-1]["moving_mean"], "moving_mean", "float32",
                 "refbn_layer")


def test_gap_shrinks_with_steps_and_grows_with_momentum(tmp_path, capsys):
    js = tmp_path / "t.json"
    rc, _ = _run(capsys, "--json", str(js))
    assert rc == 0
    sweep = json.loads(js.read_text())["gap_sweep"]
    momenta = sorted(sweep, key=float)
    steps = sorted(sweep[momenta[0]], key=int)
    for mo in momenta:
        gaps = [sweep[mo][s] for s in steps]
        assert gaps == sorted(gaps, reverse=True), (mo, gaps)
    for s in steps:
        gaps = [sweep[mo][s] for mo in momenta]
        assert gaps == sorted(gaps), (s, gaps)
    doc = json.loads(js.read_text())
    # bias-corrected statistics close the gap on constant data (only float32 rounding is left)
    assert_close(doc["y_infer_debiased"], doc["y_train"], "y", "float32", "debias")
    assert not np.allclose(doc["y_infer"], doc["y_train"], rtol=0, atol=doc["gap_by_step"][-1]["gap"] / 2)


@pytest.mark.parametrize("argv", [["--steps", "0"], ["--convention", "torch", "--steps", "2"],
                                  ["--convention", "tf_fused", "--shape", "2x2x2x3", "--steps", "30"]])
def test_trace_variants_run(capsys, argv):
    rc, out = _run(capsys, *argv)
    assert rc == 0 and "_fused_batch_norm_inference" in out.out


@pytest.mark.parametrize("argv, word", [(["--shape", "4xa"], "--shape"), (["--shape", "1x3"], "--shape"),
                                        (["--steps", "-1"], "--steps"), (["--momentum", "1.5"], "momentum")])
def test_trace_bad_arguments(capsys, argv, word):
    rc, out = _run(capsys, *argv)
    assert rc == 2 and word in out.err


def test_trace_never_imports_tensorflow():
    code = ("import sys, refbn.cli; rc = refbn.cli.main(['trace', '--steps', '1']); "
            "assert rc == 0; assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def test_backward_traces_both_gradients_with_tf_names(tmp_path, capsys):
    js = tmp_path / "t.json"
    rc, out = _run(capsys, "--backward", "--steps", "2", "--json", str(js))
    assert rc == 0
    for name in ("FusedBatchNormGradV3", "FusedBatchNormGrad,", "FusedBatchNormFreezeGrad", "y_backprop",
                 "x_backprop", "scale_backprop", "offset_backprop", "coef1", "y_backprop_centered_mean",
                 "dx_term_mean_dy", "dx_term_x_hat", "max |dx_train - dx_infer|", "check: central finite"):
        assert name in out.out, name
    doc = json.loads(js.read_text())
    x = np.asarray(doc["x"], np.float64)
    b = doc["backward"]
    dy = np.asarray(b["dy"], np.float64)
    tr, inf = b["training"], b["inference"]
    # training: the closed form with the float32 reserve spaces the op was given
    mean32, var32 = (np.float32(v).astype(np.float64) for v in (x.mean(axis=0), x.var(axis=0)))
    eps = 1e-3
    istd = 1 / np.sqrt(var32 + eps)
    x_hat = (x - mean32) * istd
    want = istd * (dy - dy.mean(axis=0) - x_hat * (dy * x_hat).mean(axis=0))
    assert_close(tr["dx"], want, "x_backprop", "float32")
    assert_close(tr["dgamma"], (dy * x_hat).sum(axis=0), "scale_backprop", "float32")
    assert_close(tr["dbeta"], dy.sum(axis=0), "offset_backprop", "float32")
    terms = np.sum([tr[k] for k in ("dx_term_dy", "dx_term_mean_dy", "dx_term_x_hat")], axis=0)
    assert_close(terms, want, "x_backprop", "float64")
    # inference (frozen BN): dx = dy * scale / sqrt(moving_variance + eps); the other terms vanish
    mv = np.asarray(doc["inference"]["moving_variance"], np.float64)
    assert_close(inf["dx"], dy / np.sqrt(mv + eps), "x_backprop", "float32")
    assert not np.any(inf["dx_term_mean_dy"]) and not np.any(inf["dx_term_x_hat"])
    # the printed finite-difference check is within the declared finite-difference tolerance
    tol = tolerance("x_backprop", "float64", "finite_difference").ulps * np.finfo(np.float64).eps
    assert b["finite_difference_error"] <= tol


@pytest.mark.parametrize("shape", ["2x3x3x4", "2x2x2x2x2x3"])
def test_backward_any_rank(capsys, shape):
    rc, out = _run(capsys, "--backward", "--shape", shape, "--steps", "1")
    assert rc == 0 and out.out.count("FusedBatchNormGradV3(") == 2


def test_backward_never_imports_tensorflow():
    code = ("import sys, refbn.cli; rc = refbn.cli.main(['trace', '--backward', '--steps', '1']); "
            "assert rc == 0; assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
