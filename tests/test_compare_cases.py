"""The case registry and descriptors of refbn.compare (no TensorFlow needed)."""
import numpy as np
import pytest

from refbn.compare import cases
from refbn.compare.cases import DescriptorError, parse

ALL = cases.registry()


@pytest.mark.parametrize("case", ALL, ids=[c.descriptor() for c in ALL])
def test_descriptor_round_trips(case):
    again = parse(case.descriptor())
    assert again == case
    assert again.descriptor() == case.descriptor()


def test_registry_has_no_duplicates():
    descs = [c.descriptor() for c in ALL]
    assert len(descs) == len(set(descs))


@pytest.mark.parametrize("text,shape,layout,channels", [
    ("n27h131w127c6:f32:NHWC:train:eaf0.6", (27, 131, 127, 6), "NHWC", 6),
    ("27x131x127x6:f32:NCHW:train", (27, 131, 127, 6), "NCHW", 131),
    ("n27c131h127w6:f32:NCHW:train", (27, 131, 127, 6), "NCHW", 131),
    ("c6w127h131n27", (27, 131, 127, 6), "NHWC", 6),           # any order, defaults
    ("1x2x6x1x3:bf16:NCDHW:infer", (1, 2, 6, 1, 3), "NCDHW", 2),
    ("n1d2h6w1c3:f16", (1, 2, 6, 1, 3), "NDHWC", 3),           # d => 5-D default layout
    ("n32c64h56w56", (32, 56, 56, 64), "NHWC", 64),            # benchdnn's style
])
def test_parse_shapes_and_layouts(text, shape, layout, channels):
    c = parse(text)
    assert (c.shape, c.layout, c.channels) == (shape, layout, channels)
    assert c.count * c.channels == int(np.prod(shape))


def test_parse_options():
    c = parse("n16h64w64c4:bf16:NHWC:train:mean1e4:std0.01:eaf0.6:eps1e-3:seed7:const")
    assert (c.dtype, c.mean, c.std, c.eaf, c.eps, c.seed, c.const) == ("bf16", 1e4, 0.01, 0.6, 1e-3, 7, True)
    assert parse(c.descriptor()) == c
    p = parse("n8h4w4c3:f32:NHWC:keras:k10:mom0.9")
    assert (p.kind, p.steps, p.mom, p.eps) == ("parity", 10, 0.9, 1e-3)
    assert parse("n8h4w4c3:keras").mom == 0.99 and parse("n8c3h4w4:NCHW:torch").mom == 0.1
    assert parse("n2h2w2c2").eps == 1e-4  # TF's raw-op default


@pytest.mark.parametrize("text,words", [
    ("n2h2w2", ["layout NHWC needs", "c"]),
    ("n2q2h2w2c2", ["letters n, c, d, h, w"]),
    ("2x2x2", ["rank 3", "4-D"]),
    ("n2h2w2c2:f64", ["float64"]),
    ("n2h2w2c2:bogus", ["option 'bogus'", "eaf<f>"]),
    ("n2h2w2c2:infer:eaf0.5", ["eaf applies to mode 'train'"]),
    ("n2h2w2c2:eaf1.5", ["[0, 1]"]),
    ("n2h2w2c2:eps0", ["epsilon must be > 0"]),
    ("n2h2w2c2:train:k3", ["parity modes"]),
    ("n1h1w1c2:keras", ["at least 2 values"]),
    ("n2h2w2c2:eafx", ["eaf<number>"]),
    ("", ["expected a descriptor"]),
])
def test_bad_descriptors_say_what_is_wrong(text, words):
    with pytest.raises(DescriptorError) as e:
        parse(text)
    for w in words:
        assert w in str(e.value)


def test_inputs_are_deterministic_and_per_case():
    c = parse("n2h3w4c5:bf16:NHWC:train:eaf0.6")
    a, b = cases.make_inputs(c), cases.make_inputs(c)
    for name in ("x", "scale", "offset", "mean", "variance", "dy", "grad_mean", "grad_variance"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert a.x.dtype.name == "bfloat16" and a.scale.dtype == np.float32
    other = cases.make_inputs(c.with_(seed=1))
    assert not np.array_equal(np.asarray(a.x, np.float32), np.asarray(other.x, np.float32))


def test_inputs_follow_the_descriptor():
    c = parse("n64h8w8c3:f32:NHWC:train:mean1e4:std0.01")
    x = cases.make_inputs(c).x.astype(np.float64)
    assert abs(x.mean() - 1e4) < 1e-2 and 0.005 < x.std() < 0.02
    const = cases.make_inputs(parse("n4c6h8w8:f32:NCHW:train:const")).x
    assert np.ptp(const[:, 0]) == 0 and np.ptp(const[:, 1]) > 0
    t = cases.make_inputs(parse("n2h3w4c5:f32:NHWC:train"))
    assert t.mean.size == 0 and t.variance.size == 0           # eaf == 1: TF ignores them
    m64 = t.x.astype(np.float64).reshape(-1, 5).mean(axis=0)
    np.testing.assert_array_equal(t.grad_mean, m64.astype(np.float32))  # the gradient gets the truth's stats
    i = cases.make_inputs(parse("n2h3w4c5:f32:NHWC:infer"))
    assert np.array_equal(i.grad_mean, i.mean) and (i.variance > 0).all()


def _descs(suite):
    return {c.descriptor() for c in cases.registry(suite=suite)}


def test_registry_covers_tf_test_matrix():
    tf = cases.registry(suite="tf_matrix")
    shapes = {c.shape for c in tf}
    for s in [(1, 1, 6, 1), (1, 1, 6, 2), (1, 2, 1, 6), (27, 131, 127, 6), (0, 131, 127, 6), (1, 1, 1, 1),
              (1, 2, 6, 1, 3), (5, 7, 11, 4)]:
        assert s in shapes
    assert {c.dtype for c in tf} == {"f16", "bf16", "f32"}
    assert {c.layout for c in tf} == {"NHWC", "NCHW", "NDHWC", "NCDHW"}
    assert {c.eaf for c in tf} == {1.0, 0.6}
    assert {c.mode for c in tf} == {"train", "infer"}


def test_registry_covers_resnet50_and_edges():
    r = cases.registry(suite="resnet50")
    assert {(c.shape[1], c.shape[2], c.channels) for c in r} == \
        {(h, w, ch) for h, w, ch, _ in cases.RESNET50_BN_SHAPES}
    assert all(c.shape[0] == 32 for c in r)
    edge = cases.registry(suite="edge")
    assert any(c.count == 1 for c in edge)
    assert any(c.const for c in edge)
    assert any(c.mean == 1e4 and c.std == 0.01 for c in edge)
    assert any(c.mean == 1e6 and c.std == 1 for c in edge)
    assert any(c.count == 2 ** 24 and c.channels == 1 for c in edge)


def test_ci_subset_keeps_a_large_offset_and_a_5d_case():
    fast = cases.registry(include_slow=False)
    assert any(abs(c.mean) >= 1e4 for c in fast)
    assert any(len(c.shape) == 5 for c in fast)
    assert all(c.size <= 1_000_000 for c in fast)  # the big ones are CLI-only (marked slow)
    assert {c.mode for c in fast} >= {"train", "infer", "keras", "tf_fused"}
