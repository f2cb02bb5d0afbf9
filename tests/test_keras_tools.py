"""refbn.keras on tiny models: the 100%-train / 33%-predict failure, diagnose, recalibrate, debias,
and the demo / diagnose CLIs."""
import json

import numpy as np
import pytest

pytest.importorskip("keras")
pytestmark = pytest.mark.tf

import refbn  # noqa: E402
import refbn.keras as rk  # noqa: E402
from refbn import cli, convergence as conv  # noqa: E402
from refbn.keras import capture as cap  # noqa: E402
from refbn.keras import demo  # noqa: E402
from refbn.keras._backend import keras  # noqa: E402
from refbn.keras.recalibrate import Moments, average_of_batch_moments  # noqa: E402
from refbn.testing import assert_close, compare  # noqa: E402

SIZE, CLASSES = 16, 3


def _data(seed=0):
    return demo.make_data(CLASSES, CLASSES, SIZE, seed)


def _model(momentum=None):
    keras.utils.set_random_seed(0)
    m = demo.build_model("tiny", SIZE, CLASSES)
    if momentum is not None:
        for layer in rk.bn_layers(m):
            layer.momentum = momentum
    return m


def _fit(model, x, y, steps, lr):
    model.compile(optimizer=keras.optimizers.Adam(lr) if lr else keras.optimizers.SGD(0.0),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model.fit(x, y, epochs=steps, batch_size=len(x), verbose=0)


def _copy(model):
    c = keras.models.clone_model(model)
    c.set_weights(model.get_weights())
    return c


def _acc(model, x, y, training=False, batch_size=None):
    return rk.accuracy(np.concatenate([cap.run(model, x[i:i + (batch_size or len(x))], training=training)
                                       for i in range(0, len(x), batch_size or len(x))]), y)


def _stats(model):
    return {layer.name: (cap.to_numpy(layer.moving_mean).copy(), cap.to_numpy(layer.moving_variance).copy())
            for layer in rk.bn_layers(model)}


def _same_stats(a, b):
    return all(np.array_equal(a[k][0], b[k][0]) and np.array_equal(a[k][1], b[k][1]) for k in a)


@pytest.fixture(scope="module")
def trained():
    """The failure: 3 images, 3 classes, 10 steps of Adam, BN momentum 0.99."""
    x, y = _data()
    model = _model()
    hist = _fit(model, x, y, steps=10, lr=1e-2)
    return model, x, y, float(hist.history["accuracy"][-1])


@pytest.fixture(scope="module")
def converged():
    """Weights fixed (learning rate 0), BN momentum 0.5, 60 steps: statistics converged."""
    x, y = _data()
    model = _model(momentum=0.5)
    _fit(model, x, y, steps=60, lr=0.0)
    return model, x, y


def test_failure_reproduces(trained):
    model, x, y, fit_acc = trained
    before = _stats(model)
    with cap.preserved_statistics(model):
        train_acc = _acc(model, x, y, training=True)
        moved = not _same_stats(before, _stats(model))
    assert moved, "a training=True call updates the moving statistics (that is why the demo restores them)"
    assert _same_stats(before, _stats(model))
    infer_acc = _acc(model, x, y)
    assert fit_acc == 1.0 and train_acc == 1.0
    assert infer_acc < train_acc
    assert rk.accuracy(model.predict(x, verbose=0), y) == infer_acc


def test_diagnose_flags_unconverged_layers_and_changes_nothing(trained):
    model, x, y, _ = trained
    before = _stats(model)
    d = rk.diagnose(model, x, y)
    assert _same_stats(before, _stats(model))
    assert not d.healthy
    assert d.steps == 10 and d.steps_source == "optimizer.iterations"
    assert [r.verdict for r in d.layers] == ["not converged"] * len(d.layers)
    first = d.layers[0]
    assert_close(first.initial_weight, 0.99 ** 10, "initial_weight", "float64", "layer")
    assert first.steps_needed == conv.steps_to_converge(0.99, 0.01) == 459
    assert first.output_error > 1.0 and first.variance_ratio_max < 0.5
    assert d.accuracy == _acc(model, x, y) < 1.0
    assert d.accuracy_recalibrated == 1.0
    doc = d.as_dict()
    json.dumps(doc)
    assert doc["unhealthy_layers"] == [r.name for r in d.layers] and "recalibrate" in doc["layers"][0]["remedy"]


def test_diagnose_passes_a_converged_model(converged):
    model, x, y = converged
    d = rk.diagnose(model, x, y)
    assert d.healthy, d.summary()
    assert d.steps == 60
    assert all(r.output_error <= d.tolerance for r in d.layers)
    assert d.accuracy == d.accuracy_recalibrated


def test_diagnose_verdicts_frozen_drifted_never_updated(converged):
    model, x, y = converged
    shifted = x * 0.5 + 60.0  # other data: converged statistics no longer describe them
    d = rk.diagnose(model, shifted, steps=1000)
    assert d.layers[0].verdict == "drifted"
    frozen = _copy(model)
    for layer in rk.bn_layers(frozen):
        layer.trainable = False
    d = rk.diagnose(frozen, shifted, steps=1000)
    assert d.layers[0].verdict == "frozen" and "trainable=False" in d.layers[0].reason
    fresh = _model()
    d = rk.diagnose(fresh, x)
    assert d.steps is None and d.steps_source == "unknown"
    assert d.layers[0].verdict == "frozen" and "initial values" in d.layers[0].reason


def _check_exact(model, x, batch_size):
    """Each layer's moving statistics are the exact pooled statistics of its inputs, which are
    captured after recalibration in inference mode, batch by batch as recalibrate ran them."""
    for layer in rk.bn_layers(model):
        xs = []
        for i in range(0, len(x), batch_size):
            _, io = cap.capture(model, x[i:i + batch_size], [layer])
            xs.append(io[layer][0])
        xin = np.concatenate(xs).astype(np.float64)
        axes = tuple(a for a in range(xin.ndim) if a != xin.ndim - 1)
        mean, var = xin.mean(axis=axes), xin.var(axis=axes)
        assert_close(cap.to_numpy(layer.moving_mean), mean, "moving_mean", "float32", "keras_recalibrate",
                     what=layer.name)
        assert_close(cap.to_numpy(layer.moving_variance), var, "moving_variance", "float32",
                     "keras_recalibrate", what=layer.name)


@pytest.mark.parametrize("batch_size", [3, 1], ids=["one-batch", "per-image"])
def test_recalibrate_restores_accuracy_with_exact_statistics(trained, batch_size):
    model, x, y, fit_acc = trained
    fixed = _copy(model)
    assert _acc(fixed, x, y) < fit_acc
    r = rk.recalibrate(fixed, x, batch_size=batch_size)
    assert len(r) == 3 and r.samples == 3 and r.batches == 3 // batch_size
    assert _acc(fixed, x, y) == fit_acc == 1.0
    assert rk.accuracy(fixed.predict(x, verbose=0), y) == 1.0
    _check_exact(fixed, x, batch_size)
    assert _same_stats(_stats(model), _stats(trained[0]))  # the original is untouched
    d = rk.diagnose(fixed, x, y)
    assert d.healthy


def test_chan_merge_is_exact_and_averaging_is_not():
    rng = np.random.default_rng(1)
    parts = [rng.normal(loc, 2.0, size=(n, 5, 5, 4)).astype(np.float32)
             for loc, n in ((0.0, 1), (3.0, 2), (-1.0, 3))]
    each = [Moments.from_array(p) for p in parts]
    merged = each[0]
    for m in each[1:]:
        merged = merged.merge(m)
    allx = np.concatenate(parts).astype(np.float64)
    assert merged.count == allx.size // 4
    assert_close(merged.mean, allx.mean(axis=(0, 1, 2)), "mean", "float64", "merge")
    assert_close(merged.variance, allx.var(axis=(0, 1, 2)), "variance", "float64", "merge")
    _, averaged = average_of_batch_moments(each)
    assert not compare(averaged, allx.var(axis=(0, 1, 2)), "variance", "float64", "merge").passed


def test_normalized_error_closed_form_matches_elementwise():
    rng = np.random.default_rng(2)
    x = rng.normal(3.0, 2.0, size=(64, 6)).astype(np.float64)
    mean, var = x.mean(axis=0), x.var(axis=0)
    used_m, used_v = mean * 0.3 - 1.0, var * 4.0 + 0.5
    bn = refbn.BatchNorm(dtype="float64", channels=6, epsilon=1e-3)
    bn.set_weights([np.ones(6), np.zeros(6), used_m, used_v])
    xhat_used = bn(x, training=False)
    xhat_true = bn(x, training=True)
    direct = np.mean((xhat_used - xhat_true) ** 2, axis=0)
    assert_close(conv.normalized_error_ms(mean, var, used_m, used_v, 1e-3), direct, "output_error", "float64")


def test_debiased_estimate_equals_batch_statistic_after_one_step_on_constant_data():
    rng = np.random.default_rng(3)
    x = rng.normal(5.0, 3.0, size=(8, 4, 4, 3))
    bn = refbn.BatchNorm(debias=True, dtype="float64")
    y_train, tr = bn(x, training=True, trace=True)
    mean, var = bn.debiased_statistics()
    assert_close(bn.initial_weight, 0.99, "initial_weight", "float64", "layer")
    assert_close(mean, tr["batch_mean"], "mean", "float64", "debias")
    assert_close(var, tr["biased_variance"], "variance", "float64", "debias")
    assert_close(bn(x, training=False), y_train, "y", "float64", "debias")
    # without the correction, inference is far off
    assert not compare(bn.moving_variance, tr["biased_variance"], "variance", "float64", "debias").passed


def test_keras_debias_on_constant_data():
    x, y = _data()
    model = _model()
    _fit(model, x, y, steps=1, lr=0.0)
    layers = rk.bn_layers(model)
    with cap.preserved_statistics(model):
        _, io = cap.capture(model, x, layers, training=True)  # what the one training step saw
    out = rk.debias(model)  # steps from the optimizer: 1
    assert [d.steps for d in out] == [1, 1, 1]
    assert_close(out[0].initial_weight, 0.99, "initial_weight", "float64", "layer")
    for layer in layers:
        xin = io[layer][0].astype(np.float64)
        mean, var = xin.mean(axis=(0, 1, 2)), xin.var(axis=(0, 1, 2))
        for got, want, name, initial in ((layer.moving_mean, mean, "moving_mean", 0.0),
                                         (layer.moving_variance, var, "moving_variance", 1.0)):
            scale = max(float(np.sqrt(np.mean(want ** 2))), initial)
            assert_close(cap.to_numpy(got), want, name, "float32", "keras_debias", scale=scale, what=layer.name)


def test_bad_input_changes_nothing(trained):
    model, x, _, _ = trained
    before = _stats(model)
    with pytest.raises(ValueError, match="layers"):
        rk.recalibrate(model, x, layers=["no_such_layer"])
    with pytest.raises(ValueError, match="batch_size"):
        rk.recalibrate(model, x, batch_size=0)
    with pytest.raises(ValueError, match="data"):
        rk.recalibrate(model, x[:0])
    with pytest.raises(ValueError, match="tolerance"):
        rk.diagnose(model, x, tolerance=-1)
    with pytest.raises(ValueError, match="steps"):
        rk.debias(_model())  # no optimizer to read the step count from
    no_bn = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="BatchNormalization"):
        rk.recalibrate(no_bn, np.zeros((2, 4), np.float32))
    assert _same_stats(before, _stats(model))


def test_diagnose_cli_exit_codes_json_and_fix(trained, tmp_path, capsys):
    model, x, y, _ = trained
    mpath, dpath = tmp_path / "m.keras", tmp_path / "d.npz"
    model.save(mpath)
    np.savez(dpath, x=x, y=y)
    jpath, fixed = tmp_path / "r.json", tmp_path / "fixed.keras"
    rc = cli.main(["diagnose", str(mpath), str(dpath), "--json", str(jpath), "--recalibrated", str(fixed)])
    assert rc == 1
    out = capsys.readouterr().out
    assert "not converged" in out and "What to do" in out
    doc = json.loads(jpath.read_text())
    assert doc["healthy"] is False and doc["steps"] == 10 and len(doc["unhealthy_layers"]) == 3
    assert doc["accuracy"] < 1.0 and doc["accuracy_recalibrated"] == 1.0
    assert cli.main(["diagnose", str(fixed), str(dpath)]) == 0
    assert "healthy" in capsys.readouterr().out
    assert cli.main(["diagnose", str(mpath), str(tmp_path / "missing.npz")]) == 2
    assert cli.main(["diagnose", str(mpath), str(dpath), "--x", "images"]) == 2
    assert "images" in capsys.readouterr().err


def test_demo_cli_runs_and_writes_its_files(tmp_path, capsys):
    rc = cli.main(["demo", "--model", "tiny", "--out", str(tmp_path), "--extra-steps", "2", "--save"])
    assert rc == 0
    out = capsys.readouterr().out
    for name in ("moving_statistics.png", "distortion.png", "layers.csv", "model.keras", "data.npz"):
        assert (tmp_path / name).stat().st_size > 0
    assert len((tmp_path / "layers.csv").read_text().strip().splitlines()) == 1 + 3
    assert "fit" in out and "predict: accuracy 0.33" in out and "training=True): accuracy 1.00" in out
    assert "0.99^10 = 0.904" in out
    recal = [line for line in out.splitlines() if "refbn.keras.recalibrate" in line]
    assert recal and "1.00" in recal[0]
    saved = keras.models.load_model(tmp_path / "model.keras")  # the failing model, before any remedy
    data = np.load(tmp_path / "data.npz")
    assert _acc(saved, data["x"], data["y"]) < 1.0 and rk.training_steps(saved) == 10
