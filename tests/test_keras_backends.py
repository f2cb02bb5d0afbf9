"""The Keras tools on Keras 3's other backends (issue 13): ``refbn demo --model tiny``,
``refbn diagnose`` (with ``--recalibrated``) and ``refbn.keras.debias`` under
``KERAS_BACKEND=jax`` and ``torch``, each backend in its own process (Keras reads the
variable once, at import).  The TensorFlow backend is covered by tests/test_keras_tools.py."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("keras")
pytestmark = pytest.mark.tf

BACKENDS = {"jax": "jax", "torch": "torch"}
_DEBIAS = """
import sys, numpy as np
import refbn.keras as rk
from refbn.keras import capture as cap
from refbn.keras._backend import keras
assert keras.backend.backend() == sys.argv[2], keras.backend.backend()
model = keras.models.load_model(sys.argv[1] + "/model.keras")
data = np.load(sys.argv[1] + "/data.npz")
before = rk.accuracy(cap.run(model, data["x"]), data["y"])
rk.debias(model)          # the step count comes from the saved optimizer
after = rk.accuracy(cap.run(model, data["x"]), data["y"])
print(f"steps {rk.training_steps(model)} accuracy {before:.2f} -> {after:.2f}")
"""


def _run(args, backend, **kw):
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=600, **kw)


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_demo_diagnose_and_debias_on_backend(backend, tmp_path):
    if importlib.util.find_spec(BACKENDS[backend]) is None:
        pytest.fail(f"{backend} is not installed; CI installs it with pip install -e '.[all]'")
    refbn = [sys.executable, "-m", "refbn.cli"]
    demo = _run(refbn + ["demo", "--model", "tiny", "--out", str(tmp_path), "--extra-steps", "2", "--save"],
                backend)
    assert demo.returncode == 0, demo.stderr[-3000:]
    out = demo.stdout
    assert "predict: accuracy 0.33" in out and "training=True): accuracy 1.00" in out, out
    recal = [line for line in out.splitlines() if "refbn.keras.recalibrate" in line]
    assert recal and "1.00" in recal[0], out
    for name in ("moving_statistics.png", "distortion.png", "layers.csv", "model.keras", "data.npz"):
        assert (tmp_path / name).stat().st_size > 0, name

    fixed, report = tmp_path / "fixed.keras", tmp_path / "r.json"
    diag = _run(refbn + ["diagnose", str(tmp_path / "model.keras"), str(tmp_path / "data.npz"), "--json",
                         str(report), "--recalibrated", str(fixed)], backend)
    assert diag.returncode == 1, diag.stdout[-2000:] + diag.stderr[-2000:]
    doc = json.loads(report.read_text())
    assert doc["healthy"] is False and doc["steps"] == 10 and len(doc["unhealthy_layers"]) == 3
    assert doc["accuracy"] < 1.0 and doc["accuracy_recalibrated"] == 1.0
    again = _run(refbn + ["diagnose", str(fixed), str(tmp_path / "data.npz")], backend)
    assert again.returncode == 0 and "healthy" in again.stdout, again.stdout[-2000:] + again.stderr[-2000:]

    deb = _run([sys.executable, "-c", _DEBIAS, str(tmp_path), backend], backend)
    assert deb.returncode == 0, deb.stderr[-3000:]
    assert deb.stdout.startswith("steps 10 accuracy 0.33 -> "), deb.stdout
