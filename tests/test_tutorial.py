"""docs/tutorial.ipynb runs top to bottom in a fresh kernel of this interpreter, and the numbers its
text relies on hold (about 1-2 minutes: Keras trains a small model, refbn verify runs TF's kernels).

The kernel is this interpreter (``sys.executable -m ipykernel_launcher``), through a kernel spec
written for the test, so that a fresh CI virtual environment is used whatever kernels the machine
has registered.  The committed notebook is read, executed in memory and never written back.
"""
import json
import os
import sys

import numpy as np
import pytest

import nbformat
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

from refbn.tolerances import tolerance

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "docs", "tutorial.ipynb")
MARKER = "TUTORIAL_KEY_NUMBERS "
EPS32 = float(np.finfo(np.float32).eps)


def _key_numbers(nb):
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream" and MARKER in out.get("text", ""):
                line = next(ln for ln in out["text"].splitlines() if ln.startswith(MARKER))
                return json.loads(line[len(MARKER):])
    raise AssertionError(f"no {MARKER!r} line in the notebook's outputs")


def _errors(nb):
    return [(i, out.get("ename"), out.get("evalue")) for i, cell in enumerate(nb.cells)
            for out in cell.get("outputs", []) if out.get("output_type") == "error"]


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    kernels = tmp_path_factory.mktemp("kernels")
    os.makedirs(kernels / "refbn-test")
    with open(kernels / "refbn-test" / "kernel.json", "w") as f:
        json.dump({"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                   "display_name": "refbn (this interpreter)", "language": "python"}, f)
    km = KernelManager(kernel_name="refbn-test", kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernels)]))
    client = NotebookClient(nb, km=km, timeout=600, allow_errors=True,
                            resources={"metadata": {"path": os.path.dirname(NOTEBOOK)}})
    client.execute()
    return nb


def test_every_cell_runs_without_error(executed):
    assert _errors(executed) == []
    code = [c for c in executed.cells if c.cell_type == "code"]
    assert all(c.get("execution_count") for c in code), "a code cell was not executed"


def test_the_failure_and_the_fixes(executed):
    k = _key_numbers(executed)
    # chapter 1: fit 1.00, predict one class for all three images, training=True right again
    assert k["fit_accuracy"] == 1.0 and k["training_true_accuracy"] == 1.0
    assert k["predict_accuracy"] == pytest.approx(1 / 3, abs=1e-12)
    # chapter 3: the closed form the text quotes, from refbn.BatchNorm's own bookkeeping
    assert k["initial_weight_5_steps"] == pytest.approx(0.99 ** k["steps"], rel=1e-12)
    assert k["steps_to_1_percent"] == 459 and 0.99 ** 459 < 0.01 < 0.99 ** 458
    assert k["parity_verdicts"] == ["close"]
    assert k["flax_moving_mean_agrees"] and k["flax_moving_variance_agrees"]
    # chapter 4: the first layer sees the same input in both modes; the later ones drift
    drift = k["input_drift"]
    assert drift[0] == 0.0 and min(drift[1:]) > 1.0
    assert k["first_layer_output_error"] > 1.0
    # chapter 5: exact recalibration restores fit's accuracy; the untouched model does not
    rem = k["remedies"]
    assert rem["as trained"] == k["predict_accuracy"]
    assert rem["exact recalibration"] == k["fit_accuracy"]
    assert rem["training=True, batch of 3"] == k["training_true_accuracy"]


def test_backward_and_float32_numbers(executed):
    k = _key_numbers(executed)
    # chapter 6: the finite-difference check printed is within the declared tolerance
    allowed = tolerance("x_backprop", "float64", "finite_difference").ulps * np.finfo(np.float64).eps
    assert k["fd_allowed"] == pytest.approx(allowed) and k["fd_error"] <= allowed
    assert k["frozen_vs_training_gap"] > 0.01
    # chapter 7: refbn verify's TF Eigen variance error on N(1e4, 0.01^2) is what the bit-exact
    # tf_eigen emulation gives on the same data (up to the float64 truth's own rounding, as
    # both are relative errors against float64 sums in different orders), and far above eps;
    # refbn.explain puts nearly all of it on the float32 sum of x (the text's explanation)
    tf_err = k["tf_variance_error"]
    truth_noise = tolerance("batch_variance", "float64", "reference").ulps * np.finfo(np.float64).eps
    assert abs(tf_err["N(1e4, 0.01^2)/eigen"] - k["tf_eigen_variance_error"]) <= truth_noise * tf_err["N(1e4, 0.01^2)/eigen"]
    assert k["explain_sum_x_share"] > 0.99
    assert tf_err["N(1e4, 0.01^2)/onednn"] > 1.0 and tf_err["N(1e4, 0.01^2)/eigen"] > 1.0
    assert max(tf_err["N(0, 1)/onednn"], tf_err["N(0, 1)/eigen"]) < 1e3 * EPS32
    # chapter 8: uneven shards: Flax's equal weights are wrong, the count-weighted merges are not
    unev = k["uneven_variance_error"]
    assert unev["flax_pmean"] > 0.1
    assert max(unev["keras_sync"], unev["torch_sync"]) < 1e-4
    merge = k["merge_errors"]   # uneven, offset, var << eps: the cancellations the text names
    assert merge["keras_sync"][1] == 1.0 and merge["flax_pmean"][1] == 1.0   # variance came out 0
    # var << eps: PyTorch's round trip through 1/sqrt(var + eps) costs hundreds of eps, 100x Keras' sums
    assert merge["torch_sync"][2] > 100 * EPS32 and merge["torch_sync"][2] > 100 * merge["keras_sync"][2]


def test_committed_notebook_has_its_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.get("execution_count") for c in code), "commit docs/tutorial.ipynb executed"
    assert _errors(nb) == []
    images = sum("image/png" in out.get("data", {}) for c in code for out in c.get("outputs", []))
    assert images >= 10
    assert _key_numbers(nb)["fit_accuracy"] == 1.0
    assert os.path.exists(os.path.join(ROOT, "docs", "tutorial.html"))
