"""refbn verify --framework: PyTorch, JAX/Flax, tf-keras, ONNX Runtime, Keras 3 on jax/torch.

One module-scoped run sends a few cases through every installed framework's
worker (one process each) and the conventions probe; the truth is the float64
reference (refbn.compare judges every output three ways), and the conventions
rows are judged against refbn.BatchNorm's documented conventions.
"""
import numpy as np
import pytest

import refbn
from refbn.compare import cases, frameworks, probe, report, runner
from refbn.compare import divergences as dv

OTHERS = [n for n in frameworks.NAMES if n != "tf"]
INSTALLED = [n for n in OTHERS if not frameworks.missing(n)]
CASES = ["n5c7h11w4:f32:NCHW:train", "n2h3w4c5:f32:NHWC:infer:eps1e-6",      # torch, onnxruntime ops
         "n1c2d6h1w3:f32:NCDHW:train:eaf0.6",                                  # torch: momentum = eaf
         "n4h8w8c6:f32:NHWC:train:mean3:const",                                # torch's y cancels
         "n16c8h1w4:f32:NCHW:torch:mean3:std2:k20",                            # nn.BatchNorm1d
         "n16c8h4w4:f32:NCHW:torch:mean3:std2:k20:cumavg",                     # momentum=None
         "n16h4w4c8:f32:NHWC:flax:eps1e-5:mean3:std2:k20",                     # flax.linen, flax.nnx
         "n16h4w4c8:f32:NHWC:tf_fused:mean3:std2:k20:mom0.9",                  # tf_keras fused=True
         "n16c8h4w4:f32:NCHW:keras:mean3:std2:k20"]                            # tf_keras, keras_jax/torch


@pytest.fixture(scope="module")
def run():
    if not INSTALLED:
        pytest.skip("no framework besides TF is installed")
    conv = []
    res = list(runner.verify(CASES, frameworks=INSTALLED, conventions=conv))
    return res, {(r.framework, r.implementation): r for r in conv}


def _explain(r):
    return "\n".join(r.failures + r.notes) + f"\nrepro: {r.repro()}"


def test_every_check_passes_and_only_ill_conditioned_cases_diverge(run):
    res, _ = run
    assert {r.framework for r in res} == set(INSTALLED)
    for r in res:
        assert r.verdict in ("exact", "close", "divergence"), _explain(r)
        assert r.outputs, _explain(r)
        if r.verdict == "divergence":
            assert dv.ill_conditioned(r.case) and dv.ILL_CONDITIONED.name in r.divergences, _explain(r)
        for o in r.outputs:
            assert o.refbn_vs_truth.passed, o.refbn_vs_truth.message("refbn vs truth")


def _framework(name):
    if name not in INSTALLED:
        pytest.skip(f"{name}: {frameworks.not_installed_text(name)}")


def test_torch_ops_and_layers(run):
    _framework("torch")
    res, _ = run
    got = {(r.descriptor, r.kernel): r for r in res if r.framework == "torch"}
    native = got[("n5c7h11w4:f32:NCHW:train", "native_batch_norm")]
    assert {"y", "reserve_space_1", "reserve_space_2", "x_backprop", "scale_backprop",
            "offset_backprop"} <= {o.output for o in native.outputs}
    assert got[("n1c2d6h1w3:f32:NCDHW:train:eaf0.6", "F.batch_norm")].verdict in ("exact", "close")
    # torch's y = x*alpha + (bias - mean*alpha) cancels on a constant channel: torch is the one off
    const = got[("n4h8w8c6:f32:NHWC:train:mean3:const", "F.batch_norm")]
    assert const.verdict == "divergence"
    y = next(o for o in const.outputs if o.output == "y")
    assert y.tf_vs_truth.max_ulps > y.tf_vs_truth.allowed_ulps and y.closer == "refbn"
    one_d = got[("n16c8h1w4:f32:NCHW:torch:mean3:std2:k20", "nn.BatchNorm1d")]
    assert "num_batches_tracked = 20 after 20 steps" in one_d.notes
    assert ("n16c8h4w4:f32:NCHW:torch:mean3:std2:k20:cumavg", "nn.BatchNorm2d") in got


def test_flax_linen_and_nnx(run):
    _framework("jax")
    res, _ = run
    kernels = {r.kernel for r in res if r.framework == "jax"}
    assert "flax.linen" in kernels and ("flax.nnx" in kernels or not hello_has_nnx())


def hello_has_nnx():
    import importlib.util
    return importlib.util.find_spec("flax.nnx") is not None


EXPECTED = {  # what refbn's README documents, per implementation
    ("torch", "torch.nn.BatchNorm2d"): ("Bessel-corrected", "0.1 = weight of the new value", "1e-05", "raises"),
    ("jax", "flax.linen.BatchNorm"): ("biased", "0.99 = weight of the old value", "1e-05", "y = beta"),
    ("tf_keras", "tf_keras fused=True"): ("Bessel-corrected", "0.99 = weight of the old value", "0.001", "y = beta"),
    ("tf_keras", "tf_keras fused=False"): ("biased", "0.99 = weight of the old value", "0.001", "y = beta"),
    ("onnxruntime", "onnxruntime BatchNormalization"): ("biased", "0.9 = weight of the old value", "1e-05",
                                                        "y = beta"),
    ("keras_jax", "keras.jax"): ("biased", "0.99 = weight of the old value", "0.001", "y = beta"),
    ("keras_torch", "keras.torch"): ("biased", "0.99 = weight of the old value", "0.001", "y = beta"),
}


@pytest.mark.parametrize("key", list(EXPECTED), ids=lambda k: k[1].replace(" ", "_"))
def test_conventions_rows(run, key):
    _framework(key[0])
    _, rows = run
    row = rows[key]
    assert row.verdict == "match", row.failures
    variance, momentum, eps, n1 = EXPECTED[key]
    assert row.cells["variance averaged"] == variance
    assert row.cells["momentum"] == momentum and row.cells["default eps"] == eps
    assert row.cells["initial mean, var"] == "0, 1"
    assert row.cells["one value per channel"].startswith(n1)
    n0 = row.cells["N = 0"]
    assert n0 == ("statistics unchanged, num_batches_tracked += 1" if key[0] == "torch"
                  else "NaN written into the moving statistics")


def _refbn_facts(convention, momentum_attr, **kw):
    """Probe facts of a 'framework' that is refbn.BatchNorm itself (no framework needed)."""
    def make(momentum=None):
        return refbn.BatchNorm(axis=1, convention=convention, **(kw if momentum is None else
                                                                  dict(kw, momentum=momentum)))

    def step(bn, x):
        return bn(x, training=True)

    def read(bn):
        bn.build(probe.CHANNELS) if not bn.built else None
        return bn.moving_mean.copy(), bn.moving_variance.copy()

    full = 1.0 if convention == "torch" else 0.0
    bn = make()
    return probe.run_probe(make, step, read, momentum_attr, bn.epsilon, full)


def test_derive_reads_the_convention_and_catches_a_mismatch():
    facts = _refbn_facts("torch", 0.1)
    row = frameworks.derive("torch", "torch.nn.BatchNorm2d", facts)
    assert row.verdict == "match", row.failures
    assert row.cells["variance averaged"] == "Bessel-corrected"
    assert row.cells["momentum"] == "0.1 = weight of the new value"
    assert row.cells["one value per channel"].startswith("raises ValueError")
    # the same numbers claimed for a Keras layer: refbn's keras convention does not reproduce them
    bad = frameworks.derive("keras_jax", "keras.jax", dict(facts, momentum=0.99, epsilon=1e-3))
    assert bad.verdict == "FAIL" and any("decay per step" in f for f in bad.failures)


def test_framework_names_and_not_installed(monkeypatch):
    assert frameworks.parse_list("torch, jax") == ["torch", "jax"]
    assert frameworks.parse_list("all") == list(frameworks.NAMES)
    with pytest.raises(ValueError, match="--framework: expected names from"):
        frameworks.parse_list("pytorch")
    monkeypatch.setattr(frameworks, "missing", lambda name: ["torch"] if name == "torch" else [])
    r = frameworks.not_installed_result("torch", "numpy")
    assert r.verdict == "not installed" and r.repro().endswith("--framework torch")
    line = report.final_line([r])
    assert line.startswith("OK: 1 check") and 'torch: not installed (pip install "refbn[torch]")' in line


def test_cumavg_descriptor_round_trips():
    c = cases.parse("n16c8h4w4:NCHW:torch:k20:cumavg")
    assert c.mom is None and cases.parse(c.descriptor()) == c
    with pytest.raises(cases.DescriptorError, match="cumavg"):
        cases.parse("n16h4w4c8:keras:cumavg")
    assert all(frameworks.supports("torch", c) for c in cases.registry(suite="frameworks")
               if c.mode == "torch")
    assert np.isfinite(probe.batches()["offset"]).all()
