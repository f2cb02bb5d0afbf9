"""``refbn verify``: exit codes, report, JSON, repro lines and the final OK:/FAIL: line."""
import json
import os
import subprocess
import sys

import pytest

from refbn import cli
from refbn import tolerances

pytestmark = pytest.mark.tf


def _refbn(*args, cwd):
    env = dict(os.environ, COLUMNS="200")
    return subprocess.run([sys.executable, "-m", "refbn.cli", "verify", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_verify_from_any_directory_writes_json(tmp_path):
    out = tmp_path / "v.json"
    p = _refbn("n1d2h6w1c3:f32:NDHWC:train:eaf0.6", "1x2x1x6:bf16:NCHW:infer", "--json", str(out),
               cwd=tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "refbn vs TensorFlow" in p.stdout and "4 checks" in p.stdout
    # piped: plain records, and the last line says it all
    assert p.stdout.strip().splitlines()[-1].startswith("OK: 4 checks, refbn within tolerance everywhere")
    data = json.loads(out.read_text())
    assert data["summary"].get("FAIL", 0) == 0 and data["final"].startswith("OK: 4 checks")
    rows = data["results"]
    assert {(r["case"], r["kernel"]) for r in rows} == {
        (c, k) for c in ("n1d2h6w1c3:f32:NDHWC:train:eaf0.6", "n1c2h1w6:bf16:NCHW:infer")
        for k in ("onednn", "eigen")}
    y = next(o for o in rows[0]["outputs"] if o["output"] == "y")
    for side in ("refbn_vs_tf", "refbn_vs_truth", "tf_vs_truth"):
        assert {"max_abs", "max_rel", "max_ulp_distance", "max_ulps", "allowed_ulps"} <= set(y[side])


def test_list_and_divergences_need_no_tensorflow(tmp_path):
    p = _refbn("--list", "--fast", cwd=tmp_path)
    assert p.returncode == 0 and "n1h1w6c1:f32:NHWC:train" in p.stdout
    assert "n32h112w112c64" not in p.stdout  # slow cases are left out by --fast
    p = _refbn("--divergences", cwd=tmp_path)
    assert p.returncode == 0 and "ill_conditioned_sums" in p.stdout and "empty_batch" in p.stdout


def test_bad_descriptor_exits_2_with_the_reason(tmp_path):
    p = _refbn("n2h2w2c2:f64", cwd=tmp_path)
    assert p.returncode == 2 and "float64" in p.stderr


def test_failure_exits_1_with_a_repro_line(monkeypatch, capsys):
    # Declare an impossible tolerance for y under oneDNN: the harness must report FAIL, explain it
    # and print the command that reproduces it.
    monkeypatch.setitem(tolerances.TOLERANCES, ("tf_onednn", "y", "f32"),
                        tolerances.Tolerance(-1.0, "test: nothing passes"))
    monkeypatch.setenv("COLUMNS", "200")
    code = cli.main(["verify", "n1h1w6c2:f32:NHWC:train", "--tf-kernel", "onednn"])
    out = capsys.readouterr().out
    assert code == 1
    assert "FAIL" in out and "refbn vs TF: y (f32, tf_onednn)" in out
    assert "repro: refbn verify 'n1h1w6c2:f32:NHWC:train' --backend numpy --tf-kernel onednn" in out
    assert "FAIL n1h1w6c2:f32:NHWC:train [onednn]" in out  # the kernel is not eaten as markup
    assert out.strip().splitlines()[-1].startswith("FAIL: 1 of 1 check failed")
