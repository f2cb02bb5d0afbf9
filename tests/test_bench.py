"""refbn bench: shape descriptors, refusal of wrong kernels, and a smoke run of the harness.
No timing is asserted anywhere: speed is measured by `refbn bench`, not by tests."""
import json

import numpy as np
import pytest

from refbn import cli
from refbn.bench import data, runner, specs


@pytest.mark.parametrize("text, shape, fmt", [
    ("32x56x56x64", (32, 56, 56, 64), "NHWC"),
    ("n32h56w56c64", (32, 56, 56, 64), "NHWC"),
    ("32x64x56x56:NCHW", (32, 64, 56, 56), "NCHW"),
    ("n32c64h56w56:nchw", (32, 64, 56, 56), "NCHW"),
    ("w56h56c64n32:NCHW", (32, 64, 56, 56), "NCHW"),   # letters in any order; the layout orders them
    ("2048x1024", (2048, 1024), "NC"),
    ("n8d4h5w6c3", (8, 4, 5, 6, 3), "NDHWC"),
    ("8x3x4x5x6:NCDHW", (8, 3, 4, 5, 6), "NCDHW"),
])
def test_descriptors_parse_and_round_trip(text, shape, fmt):
    s = specs.parse(text)
    assert (s.shape, s.data_format) == (shape, fmt)
    assert specs.parse(str(s)) == s
    assert specs.parse(str(s.channels_last_twin)).data_format in ("NHWC", "NDHWC", "NC")


@pytest.mark.parametrize("text, match", [
    ("2x3x4x5x6x7", "do not fit layout"),
    ("32x56x56x64:NCDHW", "do not fit layout"),
    ("n32h56c64", "needs the dimensions"),
    ("n3q4c5", "expected letters"),
    ("n3n4c5", "given twice"),
    ("0x4x4x4", "every size must be >= 1"),
    ("4x4x4x4:NHCW", "is not one of"),
])
def test_bad_descriptors_say_what_is_expected(text, match):
    with pytest.raises(ValueError, match=match):
        specs.parse(text)


def test_named_shape_lists_parse():
    for name in specs.named_lists():
        assert specs.load(name)
    r50 = specs.load("resnet50")
    for want in ("n32h56w56c64", "n64h28w28c128", "n128h14w14c256", "n256h7w7c512", "n2048c1024"):
        assert specs.parse(want) in r50
    with pytest.raises(ValueError, match="neither a shape list"):
        specs.load("resnet5")


def test_a_wrong_kernel_is_refused_and_never_timed():
    inp = data.add_truth(data.make(specs.parse("4x6x6x8")), ["train"])
    scales = data.scales(inp, "train")
    good = runner.refbn_contenders(inp, "train", ["numba"], {})[0]

    def off_by_three_ulps():
        out = good.outputs()
        y = out["y"].copy().reshape(-1)
        k = np.argmax(np.abs(y))     # 3 ulps off where |y| is largest: > 1.5 eps of the value itself
        for _ in range(3):
            y[k] = np.nextafter(y[k], np.inf)
        return dict(out, y=y.reshape(out["y"].shape))
    calls = []
    bad = runner.Contender("numba", "refbn", lambda: calls.append(1), off_by_three_ulps, "numba")
    assert runner.validate(good, inp, "train", scales)
    assert not runner.validate(bad, inp, "train", scales)
    assert "y (f32, numba)" in bad.refused and "allowed 1 eps" in bad.refused
    runner.time_group([good, bad], repeats=2, warmup=1, flush=lambda: None, gap_s=0)
    assert calls == [] and bad.times == [] and len(good.times) == 2


def test_smoke_run_validates_times_and_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    png = tmp_path / "bench.png"
    md = tmp_path / "bench.md"
    rc = cli.main(["bench", "--shapes", "smoke", "--contenders", "numpy,numba", "--repeats", "2", "--warmup", "0",
                   "--cache", "warm", "--gap-ms", "0", "--json", str(out), "--plot", str(png), "--markdown", str(md)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "Times (median and min" in text and "x floor" in text
    res = json.loads(out.read_text())
    shapes = [str(s) for s in specs.load("smoke")]
    assert [(r["shape"], r["op"]) for r in res["records"]] == [(s, op) for s in shapes for op in data.OPS]
    for rec in res["records"]:
        assert rec["floor_ms"] > 0
        for name in ("numpy", "numba"):
            c = rec["contenders"][name]
            assert c["refused"] is None and len(c["times_ms"]) == 2
            assert {k["output"] for k in c["checks"]} == set(data.OUTPUTS[rec["op"]])
            assert all(k["passed"] for k in c["checks"])
    assert res["machine"]["cores"] >= 1 and res["config"]["cache"] == "warm"
    assert png.stat().st_size > 1000
    table = md.read_text()
    assert "| shape | op | floor ms (method) |" in table and all(f"| {s} | bwd |" in table for s in shapes)


def test_bad_arguments_exit_with_a_message(capsys):
    assert cli.main(["bench", "--ops", "train,fly"]) == 2
    assert "--ops" in capsys.readouterr().err
    assert cli.main(["bench", "--shapes", "nothing"]) == 2
    assert "neither a shape list" in capsys.readouterr().err


def test_tf_kernels_are_planned_from_what_tf_reports():
    """The kernel TF reports in this process is timed here; every other wanted one in a worker."""
    from refbn.bench import cli as bench_cli
    assert bench_cli.plan_tf(["onednn", "eigen"], "onednn") == (True, ["eigen"])
    assert bench_cli.plan_tf(["onednn", "eigen"], "eigen") == (True, ["onednn"])   # a CPU whose default is Eigen
    assert bench_cli.plan_tf(["onednn"], "eigen") == (False, ["onednn"])
    assert bench_cli.plan_tf(["eigen"], None) == (False, ["eigen"])
    assert bench_cli._parse_list("numba,tf", bench_cli.CONTENDERS, "--contenders", bench_cli.ALIASES) == \
        ["numba", "tf_onednn", "tf_eigen"]


def _check_tf_rows(res):
    """Both TF kernels have validated, timed rows, each named by the kernel TF reported."""
    m = res["machine"]
    reported = {m["tf"]["kernel"]} if m["tf"].get("process") == "this" else set()
    reported |= {info["kernel"] for info in m["tf_workers"].values()}
    assert set(m["tf_workers"]) == {info["kernel"] for info in m["tf_workers"].values()}
    assert reported == {"onednn", "eigen"}, (m, res["notes"])
    for rec in res["records"]:
        for kernel in ("onednn", "eigen"):
            tf = rec["contenders"][f"tf_{kernel}"]
            assert tf["refused"] is None and tf["times_ms"] and all(k["passed"] for k in tf["checks"])
            assert tf["process"] == ("worker" if kernel in m["tf_workers"] else "this")
            assert f"x_tf_{kernel}" in rec["contenders"]["numba"]
    return m


@pytest.mark.tf
def test_tf_contender_is_validated_and_timed(tmp_path):
    pytest.importorskip("tensorflow")
    out = tmp_path / "bench.json"
    rc = cli.main(["bench", "--shapes", "4x8x8x16,64x32", "--contenders", "numba,tf", "--repeats", "1",
                   "--warmup", "0", "--cache", "warm", "--gap-ms", "0", "--json", str(out)])
    assert rc == 0
    _check_tf_rows(json.loads(out.read_text()))


@pytest.mark.tf
def test_tf_onednn_is_forced_where_tf_defaults_to_eigen(tmp_path):
    """A CPU without AVX-512, where TF 2.21 runs Eigen by default, is what TF_ENABLE_ONEDNN_OPTS=0
    makes of this one: bench must still time oneDNN (forced in a worker) and label both rows."""
    pytest.importorskip("tensorflow")
    import os
    import subprocess
    import sys
    out = tmp_path / "bench.json"
    env = dict(os.environ, TF_ENABLE_ONEDNN_OPTS="0")
    r = subprocess.run([sys.executable, "-m", "refbn.cli", "bench", "--shapes", "4x8x8x16", "--ops", "train",
                        "--contenders", "numba,tf", "--repeats", "1", "--warmup", "0", "--cache", "warm",
                        "--gap-ms", "0", "--json", str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    m = _check_tf_rows(json.loads(out.read_text()))
    assert m["tf"]["kernel"] == "eigen" and list(m["tf_workers"]) == ["onednn"]
    assert "TF Eigen in this process, TF oneDNN in a worker" in " ".join(r.stdout.split())


def test_torch_contender_is_validated_timed_and_named_in_the_goals(tmp_path):
    """torch (channels_last for NHWC, contiguous for NCHW) is checked against the float64 truth
    before it is timed; the goals table names each target by what it measures; the floors list
    every method and the one that won.  No time is asserted."""
    pytest.importorskip("torch")
    out = tmp_path / "bench.json"
    rc = cli.main(["bench", "--shapes", "1x4x4x64,1x64x4x4:NCHW,2x4x4x8", "--contenders", "numba,torch",
                   "--repeats", "1", "--warmup", "0", "--cache", "warm", "--json", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["machine"]["torch"]["torch_version"]
    for rec in res["records"]:
        tc = rec["contenders"]["torch"]
        assert tc["refused"] is None and tc["times_ms"] and all(k["passed"] for k in tc["checks"])
        assert {k["output"] for k in tc["checks"]} == set(data.OUTPUTS[rec["op"]])
        assert rec["fastest_peer"] == "torch" and "x_torch" in rec["contenders"]["numba"]
        floors = {n.split(":")[1] for n in rec["contenders"] if ":" in n}
        assert {"numpy", "numpy-threads", "numba", "torch"} <= floors or res["machine"]["threads"] == 1
        assert all(v["by"] in rec["contenders"] for v in rec["floor_parts"].values())
        assert rec["calls_per_sample"] > 1          # small batches: per-call time of back-to-back calls
    goals = {g["goal"] for g in res["goals"]}
    assert "numba vs torch channels_last per call (small batch)" in goals
    assert "numba vs torch contiguous per call (small batch)" in goals


def test_goals_are_named_by_what_they_measure():
    from refbn.bench import report
    rec = {"shape": "n32h56w56c64", "op": "infer", "dtype": "float32", "data_format": "NHWC",
           "values": 32 * 56 * 56 * 64, "fastest_peer": "torch",
           "contenders": {"numba": {"median_ms": 1.0, "x_floor": 1.1, "x_fastest_peer": 0.95},
                          "torch": {"median_ms": 1.05}}}
    half = dict(rec, dtype="bfloat16", contenders={"numba": {"median_ms": 0.8}, "torch": {"median_ms": 1.0}})
    got = {(g["goal"], g["dtype"]): (round(g["value"], 2), g["target"], g["met"]) for g in report.goals([rec, half])}
    assert got == {("numba vs the fastest peer (torch channels_last)", "float32"): (0.95, 0.9, False),
                   ("inference vs the multi-threaded copy floor", "float32"): (1.1, 1.15, True),
                   ("numba vs torch channels_last, bfloat16 x", "bfloat16"): (0.8, 0.9, True)}


def _jax_installed():
    import importlib.util
    return importlib.util.find_spec("jax") is not None   # asked without importing jax


_NO_JAX = pytest.mark.skipif(not _jax_installed(), reason="jax not installed")


@_NO_JAX
def test_jax_contender_is_validated_and_timed_in_a_worker(tmp_path):
    """JAX (its own worker process, never this one) is checked against the float64 truth in both
    layouts and all three ops before it is timed; numba is timed alternating with it there, and
    numba's ratio to JAX comes from those runs."""
    import sys
    had_jax = "jax" in sys.modules
    out = tmp_path / "bench.json"
    rc = cli.main(["bench", "--shapes", "smoke", "--contenders", "numba,jax", "--repeats", "1", "--warmup", "0",
                   "--cache", "warm", "--json", str(out)])
    assert rc == 0
    assert had_jax or "jax" not in sys.modules
    res = json.loads(out.read_text())
    assert res["machine"]["jax"]["jax_version"] and res["machine"]["jax"]["process"] == "worker"
    assert {r["data_format"] for r in res["records"]} == {"NHWC", "NCHW", "NC"}
    assert {r["op"] for r in res["records"]} == set(data.OPS)
    for rec in res["records"]:
        jc, nb = rec["contenders"]["jax"], rec["contenders"]["numba"]
        assert jc["refused"] is None and jc["median_ms"] > 0 and jc["process"] == "worker"
        assert {k["output"] for k in jc["checks"]} == set(data.OUTPUTS[rec["op"]])
        assert all(k["passed"] and k["context"] == "jax_cpu" for k in jc["checks"])
        assert nb["x_jax"] == jc["numba_alternating_ms"] / jc["median_ms"]


@_NO_JAX
def test_a_wrong_jax_contender_is_refused_and_never_timed():
    """JAX ops built with a wrong epsilon (10x) fail their validation and are never timed (run in
    a subprocess: jax is never imported in the test process)."""
    import subprocess
    import sys
    code = """if True:
        import json
        from refbn.bench import data, jax_bench, runner, specs
        inp = data.add_truth(data.make(specs.parse("4x6x6x8")), ["train", "bwd"])
        scales = data.scales(inp, "train")
        got = {}
        for op in ("train", "bwd"):
            good = runner.jax_contenders(inp, op, jax_bench)[0]
            run, outputs = jax_bench.ops(inp, 10 * data.EPSILON, (op,))[op]
            calls = []
            bad = runner.Contender("jax", "jax", lambda: calls.append(1), outputs, "jax_cpu")
            ok = runner.validate(good, inp, op, scales), runner.validate(bad, inp, op, scales)
            runner.time_group([good, bad], repeats=2, warmup=1, flush=lambda: None, gap_s=0)
            got[op] = {"ok": ok, "refused": bad.refused, "calls": len(calls), "timed": len(good.times)}
        print(json.dumps(got))
    """
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    for op in ("train", "bwd"):
        assert got[op]["ok"] == [True, False] and got[op]["calls"] == 0 and got[op]["timed"] == 2
        assert "jax_cpu" in got[op]["refused"]


def test_a_missing_jax_is_a_note_not_an_error(tmp_path, monkeypatch):
    from refbn.bench import cli as bench_cli
    monkeypatch.setattr(bench_cli, "_have_jax", lambda: False)
    out = tmp_path / "bench.json"
    rc = cli.main(["bench", "--shapes", "4x8x8x16", "--ops", "infer", "--contenders", "numba,jax", "--repeats", "1",
                   "--warmup", "0", "--cache", "warm", "--json", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert "jax contender skipped: not installed" in res["notes"]
    assert "jax" not in res["records"][0]["contenders"]


def test_numba_vs_a_worker_peer_uses_numba_timed_alternating_with_it():
    rec = {"contenders": {"numba": {"median_ms": 1.0}, "numpy": {"median_ms": 4.0},
                          "jax": {"median_ms": 2.0, "numba_alternating_ms": 1.2}, "torch": {"median_ms": 2.5}}}
    cs = runner.add_ratios(rec)["contenders"]
    assert rec["fastest_peer"] == "jax"
    assert cs["numba"]["x_jax"] == 0.6 and cs["numba"]["x_fastest_peer"] == 0.6 and cs["numba"]["x_torch"] == 0.4
    assert cs["numpy"]["x_jax"] == 2.0


@pytest.mark.parametrize("text", ["2x3x3x16", "n2c16h3w3:NCHW"])
def test_percall_layers_validate_first_and_add_up(text):
    """python -m refbn.bench.percall: every op is checked against the float64 truth before it is
    timed, and each layer below raw_ops is timed (no figure is asserted, only that it exists)."""
    from refbn.bench import percall
    got = percall.layers(specs.parse(text), calls=40)
    assert set(got) == {"train", "infer", "bwd"}
    for op, t in got.items():
        assert {"raw_ops", "backend", "driver", "dispatch"} <= set(t), op
        assert all(v > 0 and np.isfinite(v) for v in t.values()), (op, t)


def test_percall_refuses_a_wrong_kernel(monkeypatch):
    """The per-call tool validates before timing: a numba driver that gets the maths wrong fails."""
    from refbn.backends import numba_kernels as nk
    from refbn.bench import percall
    real = nk.forward_inference

    def wrong(x3, scale, offset, mean, variance, epsilon, out3=None):
        return real(x3, scale * 1.001, offset, mean, variance, epsilon, out3)
    monkeypatch.setattr(nk, "forward_inference", wrong)   # what raw_ops calls (the backend module's)
    with pytest.raises(AssertionError, match="y"):
        percall.layers(specs.parse("2x3x3x16"), calls=8)
