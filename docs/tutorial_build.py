"""Build docs/tutorial.ipynb from this script (cells only).

Regenerate: .venv/bin/python docs/tutorial_build.py docs/tutorial.ipynb && .venv/bin/python docs/tutorial_execute.py docs/tutorial.ipynb && .venv/bin/jupyter nbconvert --to html docs/tutorial.ipynb."""
import sys

import nbformat as nbf

cells = []


def md(text):
    cells.append(nbf.v4.new_markdown_cell(text.strip("\n")))


def code(text):
    cells.append(nbf.v4.new_code_cell(text.strip("\n")))


md(r"""
# Batch Normalization from the inside: the 100%-fit / 33%-predict failure, explained and fixed

This notebook walks a learner through Batch Normalization (BN) as TensorFlow and Keras compute
it, with [refbn](../README.md), a float64 reference of every BN step. It runs top to bottom on a
CPU in about two minutes. Every claim the text makes is checked by a cell, and every figure is
drawn from numbers computed here.

1. [The failure](#1.-The-failure): a small Keras model fits 3 images at accuracy 1.00 and predicts 0.33 on the same images.
2. [What BN computes in training mode](#2.-What-BN-computes-in-training-mode): `refbn.reference` step by step, the trace, reduction axes for NHWC and NCHW.
3. [Inference mode and the moving average](#3.-Inference-mode-and-the-moving-average): `variable -= (variable - value) * (1 - momentum)`, convergence as 1 - momentum^t in Keras, tf-keras, PyTorch and Flax.
4. [Why predict is wrong](#4.-Why-predict-is-wrong): the distortion layer by layer, and how it compounds.
5. [The fixes, measured](#5.-The-fixes,-measured): recalibration, bias correction, lower momentum, more steps, `training=True`.
6. [The backward pass](#6.-The-backward-pass): derived, its three terms, finite differences, training mode against frozen BN.
7. [float32 pitfalls](#7.-float32-pitfalls): TF's variance on offset data against the float64 truth, and why (summation order).
8. [BN across replicas](#8.-BN-across-replicas): why each framework's merge of the replicas' statistics differs, on uneven shards.

Set-up: the README's first command (`pip install -e ".[all]"`) installs everything this notebook
needs. Run it with the project's virtual environment as the kernel (`.venv/bin/jupyter lab
docs/tutorial.ipynb`, or `.venv/bin/jupyter nbconvert --to notebook --execute docs/tutorial.ipynb`).
""")

code(r"""
import json, os, subprocess, sys, tempfile, time
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")   # TensorFlow: no start-up chatter
T0 = time.perf_counter()

import numpy as np
import matplotlib.pyplot as plt
from IPython.display import Image, display

import refbn
from refbn import reference as ref, stats
from refbn.testing import assert_close, compare

plt.rcParams.update({"figure.dpi": 80, "axes.grid": True, "grid.alpha": 0.3, "legend.fontsize": 8})
FIGURES = tempfile.mkdtemp(prefix="refbn-tutorial-")   # where refbn's own plotting functions write
KEY = {}                                                  # key numbers, printed at the end

# Chapters 3 and 7 quote `refbn verify`, which runs TensorFlow in two worker processes (oneDNN
# and Eigen kernels, about 30 s). It starts now, in the background, and is read when needed.
VERIFY_CASES = ["n16h4w4c8:f32:NHWC:keras:mean3:std2:k20",         # refbn.BatchNorm vs Keras 3, 20 steps
                "n16h4w4c8:f32:NHWC:tf_fused:mean3:std2:k20",      # vs tf-keras' fused path
                "n16c8h4w4:f32:NCHW:torch:mean3:std2:k20",         # vs torch.nn.BatchNorm2d
                "n16h64w64c4:f32:NHWC:train",                      # N(0, 1) data
                "n16h64w64c4:f32:NHWC:train:mean10000:std0.01"]    # N(1e4, 0.01^2): offset data
VERIFY_JSON = os.path.join(FIGURES, "verify.json")
verify_proc = subprocess.Popen([sys.executable, "-m", "refbn.cli", "verify", *VERIFY_CASES, "--json", VERIFY_JSON,
                                "--format", "plain"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
print(f"refbn {refbn.__version__}, numpy {np.__version__}; refbn verify started (pid {verify_proc.pid})")
""")

# ------------------------------------------------------------------------------------------------
md(r"""
## 1. The failure

Three synthetic grey images of 16x16 pixels with raw values 0..255 (as loaded from files, not
rescaled), one class each. A three-block conv net with a BatchNormalization layer after every
convolution is trained for 5 epochs of one batch each (5 steps) with Adam. The layers are named
`conv1_bn`, `conv2_bn`, `conv3_bn` so that the plots below can say which is which.
""")

code(r"""
import contextlib

@contextlib.contextmanager
def tf_startup_lines_aside():
    # TensorFlow's C++ start-up lines (oneDNN on, no CUDA driver) bypass Python and go straight to
    # the process's stderr (file descriptor 2); they are set aside while TensorFlow starts.
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as aside:
        os.dup2(aside.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)

with tf_startup_lines_aside():
    import keras
    keras.ops.convert_to_numpy(keras.ops.ones(1))      # TensorFlow's first op starts its runtime
import refbn.keras
from refbn.keras import demo      # make_data: the synthetic images; stat_recorder: a Keras callback

def small_convnet(momentum=0.99, seed=0):
    keras.utils.set_random_seed(seed)                  # the same initial weights for every call
    L = keras.layers
    inp = keras.Input((16, 16, 1), name="image")
    h = inp
    for k, (filters, stride) in enumerate([(8, 1), (16, 2), (16, 1)], 1):
        h = L.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False, name=f"conv{k}")(h)
        h = L.BatchNormalization(momentum=momentum, name=f"conv{k}_bn")(h)
        h = L.ReLU(name=f"conv{k}_relu")(h)
    h = L.GlobalAveragePooling2D(name="pool")(h)
    out = L.Dense(3, activation="softmax", name="class_probabilities")(h)
    model = keras.Model(inp, out, name="small_convnet")
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    return model

x, y = demo.make_data(images=3, classes=3, size=16, seed=0)
model = small_convnet()
initial_weights = model.get_weights()
layers = refbn.keras.bn_layers(model)
recorder = demo.stat_recorder(layers)                 # channel-averaged moving statistics after each step
t = time.perf_counter()
history = model.fit(x, y, epochs=5, batch_size=3, verbose=0, callbacks=[recorder])
fit_seconds = time.perf_counter() - t
trained_weights = model.get_weights()
STEPS = refbn.keras.training_steps(model)

fit_acc = float(history.history["accuracy"][-1])
p_predict = model.predict(x, verbose=0)
pred_acc = refbn.keras.accuracy(p_predict, y)
with refbn.keras.preserved_statistics(model):         # training=True would update the moving statistics
    p_train = keras.ops.convert_to_numpy(model(x, training=True))
train_acc = refbn.keras.accuracy(p_train, y)
print(f"{model.name}: {len(layers)} BatchNormalization layers {[l.name for l in layers]}, "
      f"{model.count_params()} weights; fit took {fit_seconds:.1f} s for {STEPS} steps")
print(f"fit, last epoch:            accuracy {fit_acc:.2f}")
print(f"model.predict(x):           accuracy {pred_acc:.2f}, classes {p_predict.argmax(-1).tolist()} (labels {y.tolist()})")
print(f"model(x, training=True):    accuracy {train_acc:.2f}, classes {p_train.argmax(-1).tolist()}")
KEY.update(fit_accuracy=fit_acc, predict_accuracy=pred_acc, training_true_accuracy=train_acc, steps=STEPS)
""")

code(r"""
fig, axes = plt.subplots(1, 4, figsize=(13, 3.2), gridspec_kw={"width_ratios": [1, 1, 1, 2.2]})
for i in range(3):
    im = axes[i].imshow(x[i, :, :, 0], cmap="gray", vmin=0, vmax=255)
    axes[i].set_title(f"image {i}, label {y[i]}", fontsize=9)
    axes[i].set_xlabel("column (pixel)"); axes[i].grid(False)
axes[0].set_ylabel("row (pixel)")
fig.colorbar(im, ax=axes[:3], shrink=0.8, label="pixel value (0..255)")
w = 0.38
idx = np.arange(3)
ax = axes[3]
for shift, p, label in ((-w / 2, p_train, "model(x, training=True): batch statistics, as in fit"),
                        (w / 2, p_predict, "model.predict(x): moving statistics")):
    bars = ax.bar(idx + shift, p[idx, y], w, label=label)
    ax.bar_label(bars, fmt="%.2f", fontsize=8)
ax.axhline(1 / 3, color="k", ls=":", lw=1, label="chance (1/3)")
ax.set_xticks(idx, [f"image {i}" for i in idx]); ax.set_ylim(0, 1.1)
ax.set_xlabel("image"); ax.set_ylabel("probability given to the true class")
ax.set_title("The same images, the same weights: only the BN statistics differ", fontsize=9)
ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2)
plt.show()
""")

md(r"""
`fit` reports 1.00, and a forward pass in training mode classifies every image correctly, but
`predict` puts all three images in one class. The weights are the same in both calls. What
differs is the statistics each BatchNormalization layer normalises with: in training mode, the
batch's own; in `predict`, `moving_mean` and `moving_variance`. The next two chapters show both
computations, step by step.
""")

# ------------------------------------------------------------------------------------------------
md(r"""
## 2. What BN computes in training mode

For each channel $c$, over the $n$ values of that channel in the batch (every axis except the
channel axis):

$$\mu_c = \frac{1}{n}\sum_i x_{ic}, \qquad \sigma^2_c = \frac{1}{n}\sum_i (x_{ic}-\mu_c)^2, \qquad
\hat x_{ic} = \frac{x_{ic}-\mu_c}{\sqrt{\sigma^2_c+\epsilon}}, \qquad y_{ic} = \gamma_c\,\hat x_{ic} + \beta_c$$

$y$ uses the *biased* variance (divide by $n$). TF's `FusedBatchNormV3` also returns a
Bessel-corrected variance, $\sigma^2_c \cdot n/(n-1)$, as `batch_variance`. `refbn.reference`
holds each step as one short float64 function; here they are called one by one on an NHWC batch
and checked against `refbn.raw_ops.FusedBatchNormV3`, refbn's twin of TF's op.
""")

code(r"""
rng = np.random.default_rng(0)
xb = rng.normal(3.0, 2.0, size=(2, 3, 3, 4)).astype(np.float32)    # NHWC: N=2, H=3, W=3, C=4
scale = np.array([1.0, 2.0, 0.5, 1.0], np.float32)                 # gamma
offset = np.array([0.0, 1.0, -1.0, 0.5], np.float32)               # beta
eps, axis = 1e-3, 3                                                # NHWC: the channel axis is 3

n = ref.count(xb, axis)                               # values per channel: N*H*W = 18
mean, var = ref.moments(xb, axis)                     # two passes: the mean, then sum((x - mean)^2) / n
istd = ref.inv_std(var, eps)                          # 1 / sqrt(var + eps)
k = ref.y_coefficient(scale.astype(np.float64), istd) # scale * inv_std
per_channel = lambda v: np.asarray(v).reshape(1, 1, 1, -1)       # broadcast a C-vector against NHWC
y_steps = ref.batch_norm(xb.astype(np.float64), per_channel(mean), per_channel(k), per_channel(offset))
print(f"n = {n} values per channel; bessel_factor n/(n-1) = {ref.bessel_factor(n):.6f}")
for name, v in [("mean", mean), ("biased variance", var), ("unbiased variance", var * ref.bessel_factor(n)),
                ("inv_std", istd), ("scale * inv_std", k)]:
    print(f"{name:>18}: {np.array2string(v, precision=5)}")

out = refbn.raw_ops.FusedBatchNormV3(x=xb, scale=scale, offset=offset, mean=[], variance=[],
                                     epsilon=eps, data_format="NHWC", is_training=True)
assert_close(out.y, y_steps, "y", "float32")                                # within 0.5 ulp of the steps
assert_close(out.batch_mean, mean, "batch_mean", "float32")
assert_close(out.batch_variance, var * ref.bessel_factor(n), "batch_variance", "float32")   # Bessel-corrected
assert_close(out.reserve_space_2, var, "reserve_space_2", "float32")                      # biased: what y used
print("refbn.raw_ops.FusedBatchNormV3 agrees with the steps: y, batch_mean, batch_variance (n/(n-1)), "
      "reserve_space_2 (biased)")
""")

md(r"""
The trace records every intermediate of one call under a stable name, with the formula. Here
are its first steps and its record of the reduction axes:
""")

code(r"""
tr = refbn.trace(refbn.raw_ops.FusedBatchNormV3, xb, scale, offset, [], [], epsilon=eps)
print(tr.explain(channels=2, values=3))
print("trace names:", tr.names())
""")

md(r"""
**Layouts.** NHWC keeps the channel last; NCHW puts it second. The statistics reduce over every
other axis, so the same numbers come out of either layout: only the axes change. refbn views any
layout as a 3-D array (outer, C, inner) by a reshape, never a transpose.
""")

code(r"""
from refbn.layout import Layout
xb_nchw = np.ascontiguousarray(xb.transpose(0, 3, 1, 2))            # the same values, channels second
out_nchw = refbn.raw_ops.FusedBatchNormV3(x=xb_nchw, scale=scale, offset=offset, mean=[], variance=[],
                                          epsilon=eps, data_format="NCHW", is_training=True)
print(f"{'layout':<7}{'shape':<16}{'channel axis':<14}{'reduction axes':<16}{'3-D view (outer, C, inner)'}")
for fmt, arr in (("NHWC", xb), ("NCHW", xb_nchw)):
    lay = Layout.from_data_format(arr.shape, fmt)
    print(f"{fmt:<7}{str(arr.shape):<16}{lay.axis:<14}{str(lay.reduction_axes):<16}{lay.shape3}")
assert_close(out_nchw.batch_mean, mean, "batch_mean", "float32")
assert_close(out_nchw.y.transpose(0, 2, 3, 1), y_steps, "y", "float32")
print("NCHW gives the same statistics and the same y (transposed back)")
""")

code(r"""
fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.2))
bins_x = np.linspace(xb.min(), xb.max(), 16)
for c in range(4):
    a.hist(xb[..., c].ravel(), bins=bins_x, histtype="step", lw=1.5,
           label=f"channel {c}: mean {mean[c]:.2f}, std {np.sqrt(var[c]):.2f}")
    xhat = (xb[..., c].astype(np.float64) - mean[c]) * istd[c]
    b.hist(xhat.ravel(), bins=np.linspace(-2.6, 2.6, 14), histtype="step", lw=1.5,
           label=f"channel {c}: mean {xhat.mean():.1e}, std {xhat.std():.4f}")
a.set_xlabel("x (data units)"); a.set_ylabel("number of values (of n = 18)")
a.set_title("x: each channel has its own mean and spread", fontsize=9)
a.legend(loc="upper center", bbox_to_anchor=(0.5, -0.17), ncol=2)
b.set_xlabel("x_hat = (x - mean) * inv_std (standard deviations)"); b.set_ylabel("number of values (of n = 18)")
b.set_title("x_hat: every channel has mean 0 and std ~1 (epsilon shrinks it a little)", fontsize=9)
b.legend(loc="upper center", bbox_to_anchor=(0.5, -0.17), ncol=2)
plt.show()
""")

# ------------------------------------------------------------------------------------------------
md(r"""
## 3. Inference mode and the moving average

In inference mode (`predict`, `evaluate`, `model(x)`), BN normalises with stored statistics
instead of the batch's, so that a prediction does not depend on the rest of the batch:
$y = \gamma\,(x - \text{moving\_mean})/\sqrt{\text{moving\_variance}+\epsilon} + \beta$.
Every training step updates them. Keras writes the update as

```python
variable -= (variable - value) * (1 - momentum)        # value: the batch statistic
```

which is `(1 - decay) * variable + decay * value` with decay = 1 - momentum
(`refbn.reference.moving_average`; TF calls the decay `exponential_avg_factor`). The layer's
trace shows the update with Keras' `update_delta`:
""")

code(r"""
bn = refbn.BatchNorm(momentum=0.99)                   # Keras 3's defaults: momentum 0.99, epsilon 1e-3
_, tr_step = bn(xb, training=True, trace=True)
for name in ("decay", "moving_mean_before", "moving_mean_value", "moving_mean_update_delta", "moving_mean_after"):
    print(f"{name:>26}: {np.array2string(np.asarray(tr_step[name]), precision=6)}")
before, value = tr_step["moving_mean_before"], tr_step["moving_mean_value"]
keras_form = before - (before - value) * (1 - 0.99)                     # Keras' line, written out
assert_close(tr_step["moving_mean_after"], keras_form, "moving_mean", "float64")
assert_close(tr_step["moving_mean_after"], ref.moving_average(before, value, 0.01), "moving_mean", "float64")
print("Keras' `variable -= (variable - value) * (1 - momentum)` = refbn.reference.moving_average")
""")

md(r"""
**Convergence.** Fed the same statistic $v$ every step, a moving statistic that started at
$s_0$ is, after $t$ steps,

$$s_t = m^t\, s_0 + (1 - m^t)\, v ,$$

so the initial value still weighs $m^t$. The initial values are the same in all four frameworks:
moving mean 0, moving variance 1. With Keras' momentum 0.99, 5 steps leave
$0.99^5 = 0.951$ of them: the moving variance is still 95% "1" and 5% the data's. It takes 459
steps to get under 1%. The conventions differ in what momentum means, in which variance they
average, and in epsilon:
""")

code(r"""
conventions = [  # name, refbn.BatchNorm arguments, what is averaged, epsilon
    ("Keras 3 BatchNormalization", dict(convention="keras"), "biased variance"),
    ("tf-keras, fused=True", dict(convention="tf_fused"), "Bessel-corrected variance"),
    ("PyTorch nn.BatchNorm2d", dict(convention="torch"), "unbiased variance"),
    ("PyTorch, momentum=None", dict(convention="torch", momentum=None), "unbiased variance, cumulative"),
    ("Flax linen.BatchNorm", dict(convention="keras", epsilon=1e-5), "biased variance (Keras' form)"),
]
const_x = xb.reshape(-1, 4)                              # the same batch (18 values x 4 channels) every step
weights = {}
print(f"{'framework':<28}{'momentum':>9}{'decay, step 1':>15}{'weight of the initial value after t = 1, 5, 20, 100':>54}")
for name, kw, what in conventions:
    layer = refbn.BatchNorm(**kw)
    w = []
    for step in range(1, 1001):
        layer(const_x, training=True)
        w.append(layer.initial_weight)
    weights[name] = np.array(w)
    d1 = refbn.BatchNorm(**kw).decay()
    print(f"{name:<28}{str(layer.momentum):>9}{d1:>15.3g}{'':>6}" + "  ".join(f"{w[t - 1]:10.4g}" for t in (1, 5, 20, 100))
          + f"   ({what}, eps {layer.epsilon:g})")
# the closed form, checked against the layer's moving statistics after 5 steps on constant data
layer = refbn.BatchNorm(momentum=0.99)
for _ in range(5):
    layer(const_x, training=True)
m_c, v_c = ref.moments(const_x, 1)
w5 = 0.99 ** 5
assert_close(layer.moving_mean, (1 - w5) * m_c, "moving_mean", "float32", "refbn_layer")
assert_close(layer.moving_variance, w5 * 1.0 + (1 - w5) * v_c, "moving_variance", "float32", "refbn_layer")
print(f"\nafter 5 steps at momentum 0.99 the initial values weigh 0.99^5 = {w5:.4f}; "
      f"0.99^t < 0.01 from t = {refbn.convergence.steps_to_converge(0.99, 0.01)}")
KEY.update(initial_weight_5_steps=float(weights["Keras 3 BatchNormalization"][4]),
           steps_to_1_percent=int(refbn.convergence.steps_to_converge(0.99, 0.01)))
""")

code(r"""
t = np.arange(1, 1001)
fig, ax = plt.subplots(figsize=(9, 4))
styles = {"Keras 3 BatchNormalization": ("C0", "-", "Keras 3, tf-keras fused, Flax: momentum 0.99 -> 0.99^t"),
          "PyTorch nn.BatchNorm2d": ("C1", "-", "PyTorch: momentum 0.1 (the new value's weight) -> 0.9^t"),
          "PyTorch, momentum=None": ("C2", "-", "PyTorch momentum=None (cumulative average): 0 after step 1")}
for name, (color, ls, label) in styles.items():
    ax.plot(t, weights[name], color=color, ls=ls, lw=2, label=label)
for name in ("tf-keras, fused=True", "Flax linen.BatchNorm"):
    assert np.allclose(weights[name], weights["Keras 3 BatchNormalization"], rtol=0, atol=0)   # the same curve
ax.axvline(5, color="C3", ls=":", lw=1.2, label="fit stopped: 5 steps, 0.99^5 = 0.951")
ax.axvline(459, color="k", ls="--", lw=1, label="459 steps: 0.99^t < 0.01")
ax.set_xscale("log"); ax.set_ylim(-0.03, 1.05)
ax.set_xlabel("training steps t (log scale)")
ax.set_ylabel("weight of the initial value\nin the moving statistic (fraction)")
ax.set_title("How fast moving statistics forget their initial values (mean 0, variance 1)", fontsize=10)
ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=2)
plt.show()
""")

md(r"""
**Against the real frameworks.** `refbn verify` ran Keras 3, tf-keras' fused path and PyTorch
for 20 training steps on the same batches as `refbn.BatchNorm` with the matching convention, in
its TensorFlow worker processes, and compared the moving statistics and both modes' outputs.
Flax is not in `refbn verify`; it runs here in its own process (JAX and TensorFlow each in a
process of their own):
""")

code(r"""
verify_log, _ = verify_proc.communicate(timeout=600)
print("refbn verify:", verify_log.strip().splitlines()[-1])
with open(VERIFY_JSON) as f:
    VERIFY = json.load(f)
for r in VERIFY["results"]:
    if r["case"] in VERIFY_CASES[:3]:
        worst = max(r["outputs"], key=lambda o: o["refbn_vs_tf"]["max_ulps"])
        print(f"  {r['case']:<42} {r['kernel']:<7} {r['verdict']:<6} worst {worst['output']}: "
              f"{worst['refbn_vs_tf']['max_ulps']:.2g} eps (allowed {worst['refbn_vs_tf']['allowed_ulps']:.3g}); "
              f"{'; '.join(r['notes'])}")
KEY["parity_verdicts"] = sorted({r["verdict"] for r in VERIFY["results"] if r["case"] in VERIFY_CASES[:3]})
""")

code(r"""
FLAX = r'''
import json, sys
import numpy as np, jax, flax, flax.linen as nn
batches = np.load(sys.argv[1])["batches"]
bn = nn.BatchNorm(use_running_average=False, momentum=0.99, epsilon=1e-5)
v = bn.init(jax.random.PRNGKey(0), batches[0])        # init does not update the statistics
params, state = v["params"], v["batch_stats"]
for b in batches:
    _, upd = bn.apply({"params": params, "batch_stats": state}, b, mutable=["batch_stats"])
    state = upd["batch_stats"]
print(json.dumps({"flax": flax.__version__, "mean": np.asarray(state["mean"]).tolist(),
                  "var": np.asarray(state["var"]).tolist()}))
'''
rng = np.random.default_rng(5)
batches = (3.0 + 2.0 * rng.standard_normal((5, 64, 4))).astype(np.float32)   # 5 steps, 64 values x 4 channels
path = os.path.join(FIGURES, "flax_batches.npz")
np.savez(path, batches=batches)
flax_run = subprocess.run([sys.executable, "-c", FLAX, path], capture_output=True, text=True, timeout=300)
assert flax_run.returncode == 0, flax_run.stderr[-2000:]
flax_out = json.loads(flax_run.stdout.strip().splitlines()[-1])
twin = refbn.BatchNorm(convention="keras", momentum=0.99, epsilon=1e-5)
for b in batches:
    twin(b, training=True)
for what, theirs, ours in (("moving_mean", flax_out["mean"], twin.moving_mean),
                           ("moving_variance", flax_out["var"], twin.moving_variance)):
    c = compare(theirs, ours, what, "float32", "keras_parity")
    print(f"Flax {flax_out['flax']} vs refbn.BatchNorm('keras', 0.99), 5 steps: {what} {c.max_ulps:.2g} eps apart "
          f"(allowed {c.allowed_ulps:g}: {'agree' if c.passed else 'DIFFER'})")
    KEY[f"flax_{what}_agrees"] = bool(c.passed)
print(f"initial weight after 5 steps: {twin.initial_weight:.4f} (Flax's moving variance: "
      f"{np.mean(flax_out['var']):.3f}, batches' variance ~4)")
""")

# ------------------------------------------------------------------------------------------------
md(r"""
## 4. Why predict is wrong

`refbn.keras.demo.explain_layers` captures what every BatchNormalization layer of the trained
model receives in training mode (what `fit` saw) and in inference mode (what `predict` sees),
and runs refbn's float64 reference on it. For each layer it reports the **output error**: the
RMS difference between the layer's normalised output with its moving statistics and with the
batch's, on the very input `fit` saw, in standard deviations; and the **input drift**: how far
the layer's input in `predict` is from its input in `fit`, as a ratio of RMS values. The first
layer's input is the images themselves, so its drift is 0.
""")

code(r"""
model.set_weights(trained_weights)
rows, check = demo.explain_layers(model, layers, x, tolerance=0.01)
print(f"refbn reproduces Keras' BN outputs to {check:.2g} (relative, both modes)\n")
print(f"{'layer':<10}{'C':>4}{'batch var':>11}{'moving var':>12}{'ratio':>8}{'output error (std)':>20}{'input drift':>13}")
for r in rows:
    print(f"{r['name']:<10}{r['channels']:>4}{r['batch_var']:>11.4g}{r['moving_var']:>12.4g}{r['var_ratio']:>8.3g}"
          f"{r['output_error']:>20.3g}{r['input_drift']:>13.3g}")
KEY.update(first_layer_output_error=rows[0]["output_error"], input_drift=[r["input_drift"] for r in rows],
           explain_check=check)
""")

md(r"""
The raw pixels give `conv1_bn` a batch variance in the thousands; after 5 steps its moving
variance holds 95% of the initial 1 and 5% of that. Normalised with the moving statistics, its
output lands several standard deviations from what `fit` computed on the same input. Every later
layer then receives a distorted input (the drift), and its own moving statistics are off too:
the errors compound. The two figures below are the ones `refbn demo` writes, drawn by its
plotting functions for this model.
""")

code(r"""
p_dist = os.path.join(FIGURES, "distortion.png")
demo.plot_distortion(p_dist, rows)
display(Image(p_dist, width=720))
""")

code(r"""
p_mov = os.path.join(FIGURES, "moving_statistics.png")
demo.plot_moving(p_mov, rows, layers, recorder, STEPS, 0.01)
display(Image(p_mov, width=900))
""")

md(r"""
The red dots are Keras' moving statistics after each of the 5 training steps; the blue line is
refbn's update fed the last batch statistic for 1000 steps. For `conv1_bn`, whose input is the
data, the two agree: the update is the whole story. Later layers' batch statistics changed as
the weights trained, so Keras' points leave the line.

For the first layer the distortion can be seen directly, on one channel: the same input,
normalised with the batch statistics (what `fit` used) and with the moving statistics (what
`predict` uses).
""")

code(r"""
from refbn.keras import capture as cap
first = layers[0]
with refbn.keras.preserved_statistics(model):
    _, io = cap.capture(model, x, [first], training=True)
x_in = io[first][0].astype(np.float64)                            # conv1_bn's input in fit, (3, 16, 16, 8)
mm, mv = (cap.to_numpy(v).astype(np.float64) for v in (first.moving_mean, first.moving_variance))
C = x_in.shape[-1]
as_fit = refbn.BatchNorm(momentum=0.99, dtype="float64", channels=C)
xhat_fit = as_fit(x_in, training=True)                            # gamma 1, beta 0: x_hat
as_predict = refbn.BatchNorm(momentum=0.99, dtype="float64", channels=C)
as_predict.set_weights([np.ones(C), np.zeros(C), mm, mv])
xhat_predict = as_predict(x_in, training=False)
c = 0                                                             # channel 0
m_in, v_in = ref.moments(x_in, 3)                                 # the batch statistics fit used
fig, ax = plt.subplots(figsize=(8, 3.4))
bins = np.linspace(min(xhat_fit[..., c].min(), xhat_predict[..., c].min()), max(xhat_fit[..., c].max(), xhat_predict[..., c].max()), 50)
ax.hist(xhat_fit[..., c].ravel(), bins=bins, alpha=0.6, label="batch statistics (fit)")
ax.hist(xhat_predict[..., c].ravel(), bins=bins, alpha=0.6, label=f"moving statistics after {STEPS} steps (predict)")
ax.set_xlabel("normalised output x_hat of conv1_bn, channel 0 (standard deviations)")
ax.set_ylabel("number of values (of 768)")
ax.set_title(f"conv1_bn, channel {c}: moving mean {mm[c]:.3g} vs batch {m_in[c]:.3g}, "
             f"moving variance {mv[c]:.3g} vs batch {v_in[c]:.3g}", fontsize=9)
ax.legend()
plt.show()
""")

# ------------------------------------------------------------------------------------------------
md(r"""
## 5. The fixes, measured

Each remedy is applied to the same trained model (or, for the lower momentum, to the same
training from the same initial weights), and predict's accuracy is measured on the same 3
images.

- **Exact recalibration** (`refbn.keras.recalibrate(model, x)`, "precise BN"): for each BN layer
  in call order, with every earlier layer already recalibrated, measure the exact mean and
  biased variance of its input over the data and write them into the moving statistics.
- **Bias correction** (`refbn.keras.debias(model)`): remove the initial values' remaining weight
  $w = m^t$ as Adam does, $(s_t - w\,s_0)/(1 - w)$. Exact when the batch statistics stayed the
  same from step to step.
- **Lower momentum**: the same 5 steps with momentum 0.5 ($0.5^5 = 0.03$).
- **More steps**: keep training until $0.99^t < 0.01$ (460 steps).
- **`training=True` at inference**: batch statistics, with all 3 images in the batch, and with a
  batch of one image.
""")

code(r"""
remedies = []          # (name, how, predict accuracy, seconds)

def predict_acc(m, training=False, batch_size=None):
    return demo.predict_accuracy(m, x, y, training=training, batch_size=batch_size)[0]

model.set_weights(trained_weights)
remedies.append(("as trained", f"{STEPS} steps, momentum 0.99", predict_acc(model), 0.0))

model.set_weights(trained_weights)
t = time.perf_counter(); recal = refbn.keras.recalibrate(model, x); dt = time.perf_counter() - t
remedies.append(("exact recalibration", "refbn.keras.recalibrate(model, x)", predict_acc(model), dt))
# check: conv1_bn now holds the exact statistics of the input it receives (the images through conv1)
with refbn.keras.preserved_statistics(model):
    _, io = cap.capture(model, x, [first], training=False)
m_exact, v_exact = ref.moments(io[first][0], 3)
assert_close(cap.to_numpy(first.moving_mean), m_exact, "moving_mean", "float32", "keras_recalibrate")
assert_close(cap.to_numpy(first.moving_variance), v_exact, "moving_variance", "float32", "keras_recalibrate")

model.set_weights(trained_weights)
t = time.perf_counter(); deb = refbn.keras.debias(model); dt = time.perf_counter() - t
remedies.append(("bias correction", f"refbn.keras.debias(model): w = 0.99^{STEPS} = {deb[0].initial_weight:.3f}",
                 predict_acc(model), dt))

model.set_weights(trained_weights)
remedies.append(("training=True, batch of 3", "model(x, training=True)", predict_acc(model, training=True), 0.0))
remedies.append(("training=True, batch of 1", "model(x[i:i+1], training=True)",
                 predict_acc(model, training=True, batch_size=1), 0.0))

low = small_convnet(momentum=0.5)                                   # the same initial weights
t = time.perf_counter(); low.fit(x, y, epochs=STEPS, batch_size=3, verbose=0); dt = time.perf_counter() - t
remedies.append(("lower momentum", f"momentum 0.5, {STEPS} steps: 0.5^{STEPS} = {0.5 ** STEPS:.3f}",
                 predict_acc(low), dt))
""")

code(r"""
# more steps: continue the same training to 460 steps, measuring predict's accuracy on the way
class PredictAccuracy(keras.callbacks.Callback):
    def __init__(self, at):
        super().__init__(); self.at, self.seen = set(at), []
    def on_train_batch_end(self, batch, logs=None):
        step = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
        if step in self.at:
            self.seen.append((step, predict_acc(self.model)))

model.set_weights(trained_weights)
checkpoints = sorted(set(np.unique(np.geomspace(STEPS + 1, 460, 14).astype(int)).tolist()) | {460})
probe = PredictAccuracy(checkpoints)
extra = 460 - STEPS
t = time.perf_counter()
# the same batch of 3 images, 455 more times: one epoch of 455 batches (quicker than 455 epochs)
model.fit(np.tile(x, (extra, 1, 1, 1)), np.tile(y, extra), batch_size=3, epochs=1, shuffle=False, verbose=0,
          callbacks=[probe])
dt = time.perf_counter() - t
more = dict(probe.seen)
remedies.append(("more steps", f"460 steps: 0.99^460 = {0.99 ** 460:.4f}", more[460], dt))
for name, how, acc, sec in remedies:
    print(f"{name:<28}{how:<52} predict accuracy {acc:.2f}   ({sec:.1f} s)")
KEY["remedies"] = {name: acc for name, _, acc, _ in remedies}
""")

code(r"""
fig, (a, b) = plt.subplots(1, 2, figsize=(13, 4), gridspec_kw={"width_ratios": [1.3, 1]})
names = [r[0] for r in remedies]
accs = [r[2] for r in remedies]
colors = ["C3" if acc < fit_acc else "C2" for acc in accs]
a.barh(np.arange(len(names)), accs, color=colors)
a.axvline(fit_acc, color="k", lw=1, label=f"fit's accuracy ({fit_acc:.2f})")
a.axvline(1 / 3, color="k", ls=":", lw=1, label="chance (1/3)")
a.set_yticks(np.arange(len(names)), names); a.invert_yaxis(); a.set_xlim(0, 1.05)
a.set_xlabel("predict accuracy on the 3 training images (fraction)")
a.set_title("Each remedy, measured (green: matches fit)", fontsize=10)
a.legend(loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2)
steps_seen = [s for s, _ in probe.seen]
b.plot(steps_seen, [acc for _, acc in probe.seen], "o-", color="C0", label="predict accuracy (fraction)")
b.plot(np.arange(1, 461), 0.99 ** np.arange(1, 461), color="C1", label="initial weight 0.99^t (fraction)")
b.axvline(STEPS, color="C3", ls=":", lw=1.2, label=f"fit stopped ({STEPS} steps)")
b.set_xscale("log"); b.set_ylim(-0.03, 1.05)
b.set_xlabel("training steps (log scale)"); b.set_ylabel("fraction (accuracy; weight)")
b.set_title("More steps: the statistics converge while the weights keep changing", fontsize=10)
b.legend(loc="center left")
plt.show()
""")

md(r"""
Recalibration writes the exact statistics of the data each layer receives, so `predict` now
computes what `fit` computed, at the cost of one forward pass. Bias correction is free, and
here it is enough; but it is exact only when the batch statistics stayed the same from step to
step. In a deep network they do not (the weights move), and the README's ResNet50 still predicts
0.33 after debiasing, while recalibration fixes it. A lower momentum and more steps
only shrink the initial values' weight. `training=True` uses each batch's own statistics, so
every prediction depends on the rest of its batch, and a batch of one image gives every channel
of every layer only one image's values to normalise with. The check in the first cell of this
chapter confirms that `conv1_bn` holds the exact statistics of its input after recalibration.
""")

# ------------------------------------------------------------------------------------------------
md(r"""
## 6. The backward pass

Take a loss $L$ and its gradient $dy = \partial L/\partial y$ for one channel ($n$ values,
dropping the index $c$). In **training mode** $\mu$ and $\sigma^2$ depend on every $x_i$. With
$r = 1/\sqrt{\sigma^2+\epsilon}$ and $\hat x_i = (x_i-\mu)\,r$:

$$\frac{\partial \hat x_j}{\partial x_i} = r\left(\delta_{ij} - \frac{1}{n}\right) - \frac{r}{n}\,\hat x_j \hat x_i ,$$

using $\partial\mu/\partial x_i = 1/n$ and $\partial\sigma^2/\partial x_i = 2(x_i-\mu)/n$. Chain
$dx_i = \sum_j \gamma\, dy_j\, \partial\hat x_j/\partial x_i$:

$$dx_i = \underbrace{\gamma r\, dy_i}_{\texttt{dx\_term\_dy}}
\;\underbrace{-\;\gamma r\, \overline{dy}}_{\texttt{dx\_term\_mean\_dy}}
\;\underbrace{-\;\gamma r\, \hat x_i\, \overline{dy\,\hat x}}_{\texttt{dx\_term\_x\_hat}},
\qquad d\gamma = \sum_i dy_i\,\hat x_i, \qquad d\beta = \sum_i dy_i$$

(bars are means over the channel's $n$ values). The second term removes the part of $dy$ that
would shift every value of the channel (the mean subtracts it again); the third removes the part
that would stretch them (the variance normalises it away). In **inference mode** ("frozen BN":
`trainable=False` in Keras, or a layer called with `training=False` inside a training step) the
statistics are constants, so only the first term is left: $dx = \gamma r\, dy$.

Below: the derivation written out, against `refbn.reference.backward`, the trace of
`refbn.raw_ops.FusedBatchNormGradV3`, and central finite differences of the float64 forward
pass.
""")

code(r"""
rng = np.random.default_rng(1)
xg = rng.normal(3.0, 2.0, size=(6, 2))            # NC, float64: 6 values per channel, 2 channels
dyg = rng.normal(0.0, 1.0, size=xg.shape)
gamma, beta, eps_g = np.array([1.5, 0.5]), np.array([0.1, -0.2]), 1e-3
mu, s2 = ref.moments(xg, 1)

# the derivation above, written out
r_ = 1 / np.sqrt(s2 + eps_g)
x_hat = (xg - mu) * r_
dx_derived = gamma * r_ * (dyg - dyg.mean(0) - x_hat * (dyg * x_hat).mean(0))

dx_ref, dgamma_ref, dbeta_ref = ref.backward(dyg, xg, gamma, mu, s2, eps_g, True, 1)
assert_close(dx_ref, dx_derived, "x_backprop", "float64")
g = refbn.raw_ops.FusedBatchNormGradV3(y_backprop=dyg, x=xg, scale=gamma, reserve_space_1=mu, reserve_space_2=s2,
                                       reserve_space_3=np.zeros(0), epsilon=eps_g, data_format="NC",
                                       is_training=True, trace=True)
terms = {k: g.trace[k] for k in ("dx_term_dy", "dx_term_mean_dy", "dx_term_x_hat")}
assert_close(sum(terms.values()), dx_derived, "x_backprop", "float64")
assert_close(g.x_backprop, dx_derived, "x_backprop", "float64")

def central_differences(f, z, h):
    out = np.zeros_like(z)
    for i in np.ndindex(z.shape):
        up, down = z.copy(), z.copy()
        up[i] += h; down[i] -= h
        out[i] = (f(up) - f(down)) / (2 * h)
    return out

loss_train = lambda z: np.sum(dyg * ref.forward_training(z, gamma, beta, eps_g, 1)[0])
h = 1e-5
fd_train = central_differences(loss_train, xg, h)
c_fd = assert_close(dx_ref, fd_train, "x_backprop", "float64", "finite_difference")
fd_gamma = central_differences(lambda gm: np.sum(dyg * ref.forward_training(xg, gm, beta, eps_g, 1)[0]), gamma, h)
assert_close(dgamma_ref, fd_gamma, "scale_backprop", "float64", "finite_difference")
print(f"derivation = refbn.reference.backward = sum of the trace's three terms = FusedBatchNormGradV3")
eps64 = np.finfo(float).eps
print(f"finite differences (h = {h:g}) agree with dx to {c_fd.max_ulps * eps64:.2g} of max(|dx_i|, rms(dx)) "
      f"(allowed {c_fd.allowed_ulps * eps64:.2g}, refbn/tolerances.py 'finite_difference'); dgamma too")
print(f"per-channel sums of dx in training mode: {np.array2string(dx_ref.sum(0), precision=3)} "
      "(0: the mean term removes any common shift)")
KEY["fd_error"], KEY["fd_allowed"] = c_fd.max_ulps * eps64, c_fd.allowed_ulps * eps64
""")

code(r"""
fig, (a, b) = plt.subplots(1, 2, figsize=(13, 3.8))
i = np.arange(xg.shape[0]); w = 0.2
for k_, (name, v) in enumerate(terms.items()):
    a.bar(i + (k_ - 1.5) * w, v[:, 0], w, label=name)
a.bar(i + 1.5 * w, dx_ref[:, 0], w, color="k", label="dx = the sum of the three")
a.axhline(0, color="k", lw=0.6)
a.set_xlabel("value i of channel 0 (of n = 6)"); a.set_ylabel("contribution to dx_i = dL/dx_i\n(units of L per unit of x)")
a.set_title("The three terms of dx in training mode, channel 0", fontsize=10); a.legend(ncol=2)
hs = np.geomspace(1e-12, 1e-1, 23)
err = [np.max(np.abs(central_differences(loss_train, xg, hh) - dx_ref)) / np.max(np.abs(dx_ref)) for hh in hs]
b.loglog(hs, err, "o-", label="central differences vs refbn.reference.backward")
b.loglog(hs, np.finfo(float).eps / hs, "k:", lw=1, label="round-off ~ eps / h")
b.loglog(hs, hs ** 2, "k--", lw=1, label="truncation ~ h^2")
b.axvline(h, color="C3", ls=":", label=f"h used above ({h:g})")
b.set_ylim(1e-12, 10)
b.set_xlabel("finite-difference step h (units of x)"); b.set_ylabel("max |fd - dx| / max |dx|\n(relative, no unit)")
b.set_title("Finite differences confirm dx to ~1e-10 at the best h", fontsize=10); b.legend()
plt.show()
""")

md(r"""
**Training mode against frozen BN.** Let the statistics be constants (inference mode with the
population statistics, here the batch's own values frozen): finite differences of the
inference forward pass match $\gamma r\, dy$, and not the training-mode gradient. The difference
is exactly the two terms that flow through $\mu$ and $\sigma^2$.
""")

code(r"""
loss_frozen = lambda z: np.sum(dyg * ref.forward_inference(z, gamma, beta, mu, s2, eps_g, 1))
fd_frozen = central_differences(loss_frozen, xg, h)
dx_frozen = ref.backward(dyg, xg, gamma, mu, s2, eps_g, False, 1)[0]
assert_close(dx_frozen, gamma * r_ * dyg, "x_backprop", "float64")                 # only the first term
assert_close(dx_frozen, fd_frozen, "x_backprop", "float64", "finite_difference")
gap = np.max(np.abs(dx_frozen - dx_ref)) / np.max(np.abs(dx_ref))
assert_close(dx_frozen - dx_ref, -(terms["dx_term_mean_dy"] + terms["dx_term_x_hat"]), "x_backprop", "float64")
print(f"frozen BN: dx = gamma * inv_std * dy, confirmed by finite differences of the inference forward pass")
print(f"training-mode dx and frozen dx differ by {gap:.2f} of max |dx|: the mean and variance terms")
KEY["frozen_vs_training_gap"] = float(gap)
""")

md(r"""
`refbn trace --backward` prints the same walk-through from the command line, for a training step
and an inference step, with TF's names for each quantity in its CPU kernel
(`FusedBatchNormGrad` in training mode, `FusedBatchNormFreezeGrad` in inference mode). Its
name table:
""")

code(r"""
cli = subprocess.run([sys.executable, "-m", "refbn.cli", "trace", "--backward", "--steps", "1"],
                     capture_output=True, text=True, timeout=120)
assert cli.returncode == 0, cli.stderr
import re
text = re.sub(r"\x1b\[[0-9;]*m", "", cli.stdout)          # rich's terminal styles, if any
start = text.index("The same steps in TF's CPU kernel (FusedBatchNormGrad,")
print(text[start:text.index("\n\n", text.index("check: central", start))])
""")

# ------------------------------------------------------------------------------------------------
md(r"""
## 7. float32 pitfalls

TF computes BN's statistics in float32: the mean first, then $\sum (x-\mu)^2/n$, each with a
float32 running sum. `refbn verify` ran TF's two CPU kernels (oneDNN and Eigen) on 65,536 values
per channel of $N(0,1)$ data and of $N(10^4, 0.01^2)$ data ("offset" data: a large mean, a
small spread, as after a layer with a big bias), and compared each output with refbn's float64
truth:
""")

code(r"""
print(f"{'data':<16}{'kernel':<8}{'output':<16}{'TF error (eps)':>15}{'TF rel. error':>14}{'refbn rel. error':>17}{'verdict':>12}")
tf_err = {}
for r in VERIFY["results"]:
    if r["case"] not in VERIFY_CASES[3:]:
        continue
    data = "N(1e4, 0.01^2)" if "mean10000" in r["case"] else "N(0, 1)"
    for o in r["outputs"]:
        if o["output"] in ("batch_mean", "reserve_space_2"):     # reserve_space_2: the biased variance
            tf_err[data, r["kernel"], o["output"]] = o["tf_vs_truth"]["max_rel"]
            print(f"{data:<16}{r['kernel']:<8}{o['output']:<16}{o['tf_vs_truth']['max_ulps']:>15.3g}"
                  f"{o['tf_vs_truth']['max_rel']:>14.3g}{o['refbn_vs_truth']['max_rel']:>17.2g}{r['verdict']:>12}")
KEY["tf_variance_error"] = {f"{d}/{k}": v for (d, k, o), v in tf_err.items() if o == "reserve_space_2"}
""")

md(r"""
(The eps column is the harness's measure: the error in float32 machine epsilons of the value's
magnitude, or of the array's RMS where values are near 0, as for the mean of $N(0,1)$ data.)
On $N(0,1)$ data TF's mean is within an eps and its variance within a few dozen (about
$10^{-5}$ relative: the rounding of 65,536 float32 additions). On the offset data its variance is off by a factor of
about 15 (oneDNN) and 85,000 (Eigen), while refbn's float64 reference, rounded once to float32,
is within half an ulp. **Why: summation order.** A float32 running sum of 65,536 values near
$10^4$ grows to $6.6\cdot 10^8$, where one float32 step (ulp) is 64: every addition rounds away
up to 32, so the mean comes out off by $\delta$. The second pass then sums
$(x - \mu - \delta)^2$, whose mean is $\sigma^2 + \delta^2$: with $\sigma^2 = 10^{-4}$, even
$\delta = 0.04$ (oneDNN) makes the variance 16 times too large. Eigen's kernel sums strictly in
order in the C % 8 tail channels (here C = 4: all of them), which `np.cumsum` in float32 reproduces on the same inputs
(`refbn.compare.cases.make_inputs` draws the same data as `refbn verify`):
""")

code(r"""
from refbn.compare import cases
case = cases.parse(VERIFY_CASES[4])
xv = cases.make_inputs(case).x.reshape(-1, case.channels)          # (65536, 4) float32, NHWC flattened
nv = np.float32(xv.shape[0])
mean64, var64 = ref.moments(xv, 1)                                  # refbn's float64 truth
mean_seq = np.cumsum(xv, axis=0, dtype=np.float32)[-1] / nv          # float32, strictly in order
d = xv - mean_seq
var_seq = np.cumsum(d * d, axis=0, dtype=np.float32)[-1] / nv
rows_ = lambda a: np.ascontiguousarray(a.T)                          # each channel's values in one contiguous row
mean_pair = np.sum(rows_(xv), axis=1, dtype=np.float32) / nv          # float32, numpy's pairwise sum of a row
var_pair = np.sum(rows_((xv - mean_pair) ** 2), axis=1, dtype=np.float32) / nv
rel = lambda a, b: float(np.max(np.abs(np.asarray(a, np.float64) - b) / np.abs(b)))
emu = rel(var_seq, var64)
print(f"float32 in order (Eigen's order): mean off by {np.max(np.abs(mean_seq - mean64)):.3g}, "
      f"variance relative error {emu:.4g}")
print(f"   refbn verify, TF Eigen:          variance relative error {tf_err['N(1e4, 0.01^2)', 'eigen', 'reserve_space_2']:.4g}")
print(f"   var + delta^2 predicts:          {rel(var64 + (mean_seq.astype(float) - mean64) ** 2, var64):.4g}")
print(f"float32, pairwise sums:           mean off by {np.max(np.abs(mean_pair - mean64)):.3g}, "
      f"variance relative error {rel(var_pair, var64):.3g}")
out32 = refbn.raw_ops.FusedBatchNormV3(x=xv, scale=np.ones(4, np.float32), offset=np.zeros(4, np.float32),
                                       mean=[], variance=[], data_format="NC")
print(f"refbn (float64 sums, rounded once): variance relative error {rel(out32.reserve_space_2, var64):.2g}")
KEY.update(eigen_emulated_variance_error=emu)
""")

md(r"""
refbn goes further than this sketch: `backend="tf_eigen"` replays every float32 operation of
TF's Eigen kernel (4 interleaved sums for the first 8·⌊C/8⌋ channels, `rsqrt` as the CPU's
estimate plus a Newton step, ...), bit for bit (`refbn verify --backend tf_eigen` checks it
against TF on every case of the registry). `refbn.explain` then makes one of those steps exact
at a time, and so splits TF's error into the share of each step: the answer to "why does TF
differ from my numpy?".
""")

code(r"""
from refbn import explain
emu_tf = refbn.raw_ops.FusedBatchNormV3(x=xv, scale=np.ones(4, np.float32), offset=np.zeros(4, np.float32),
                                        mean=[], variance=[], data_format="NC", backend="tf_eigen")
print(f"tf_eigen emulation: variance relative error {rel(emu_tf.reserve_space_2, var64):.4g} "
      f"(refbn verify, TF Eigen: {tf_err['N(1e4, 0.01^2)', 'eigen', 'reserve_space_2']:.4g})")
sp = explain.split(explain.rows_of(xv, "NC"))
print("\n".join(sp.lines()))
KEY.update(explain_sum_x_share=sp.shares["sum_x"] / sp.total_eps,
           tf_eigen_variance_error=rel(emu_tf.reserve_space_2, var64))
""")

md(r"""
The in-order float32 sum reproduces TF Eigen's variance error to all printed digits, and
$\sigma^2 + \delta^2$ predicts it. Summing pairwise (a tree of partial sums, what numpy does
along a contiguous row) keeps the mean within $4\cdot 10^{-5}$ and the variance within
$2\cdot 10^{-5}$ relative, but still in float32. refbn sums in float64 and rounds once, which
leaves half a float32 ulp. The left figure follows the running sum of one channel value by
value; the right one sweeps the offset.
""")

code(r"""
fig, (a, b) = plt.subplots(1, 2, figsize=(13, 4))
col = xv[:, 0]
exact_run = np.cumsum(col.astype(np.float64))
seq_run = np.cumsum(col, dtype=np.float32).astype(np.float64)
k_ = np.arange(1, col.size + 1)
a.loglog(k_, np.abs(seq_run - exact_run), lw=0.8, label="float32 running sum, in order: |error|")
a.loglog(k_, np.spacing(seq_run.astype(np.float32)).astype(np.float64) / 2, "k", lw=1,
         label="half an ulp of the running sum (one rounding)")
a.set_xlabel("values added, k (log scale)"); a.set_ylabel("absolute error of sum(x[:k])\n(data units)")
a.set_title("Channel 0 of N(1e4, 0.01^2): the running sum's error grows with k", fontsize=10); a.legend()
offsets = np.array([0.0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6])
r2 = np.random.default_rng(7)
z = r2.standard_normal((65536, 1))
errs = {"float32 in order (Eigen-like)": [], "float32 pairwise": [], "refbn (float64 sums)": []}
for off in offsets:
    xo = (off + z).astype(np.float32)
    m64_, v64_ = ref.moments(xo, 1)
    ms = np.cumsum(xo, axis=0, dtype=np.float32)[-1] / np.float32(65536)
    errs["float32 in order (Eigen-like)"].append(rel(np.cumsum((xo - ms) ** 2, axis=0, dtype=np.float32)[-1] / np.float32(65536), v64_))
    mp = np.sum(rows_(xo), axis=1, dtype=np.float32) / np.float32(65536)
    errs["float32 pairwise"].append(rel(np.sum(rows_((xo - mp) ** 2), axis=1, dtype=np.float32) / np.float32(65536), v64_))
    o_ = refbn.raw_ops.FusedBatchNormV3(x=xo, scale=np.ones(1, np.float32), offset=np.zeros(1, np.float32),
                                        mean=[], variance=[], data_format="NC")
    errs["refbn (float64 sums)"].append(rel(o_.reserve_space_2, v64_))
ratio = np.maximum(offsets, 1.0)
for name, e in errs.items():
    b.loglog(ratio, np.maximum(e, 1e-9), "o-", label=name)
b.axhline(np.finfo(np.float32).eps / 2, color="k", ls=":", lw=1, label="half a float32 ulp (relative)")
b.set_xlabel("|mean| / std of the data (log scale; 0 drawn at 1)")
b.set_ylabel("relative error of the variance\n(no unit; values < 1e-9 drawn at 1e-9)")
b.set_title("N(offset, 1), n = 65,536, float32 data", fontsize=10); b.legend()
plt.show()
""")

# ------------------------------------------------------------------------------------------------
md(r"""
## 8. BN across replicas

With data parallelism each replica sees part of the batch. Synchronized BN merges the replicas'
statistics so that every replica normalises with the statistics of the whole batch, and each
framework sends different numbers across:

| framework | what crosses replicas | merged variance |
|---|---|---|
| Keras 3 / TF `BatchNormalization(synchronized=True)` (`keras_sync`) | SUM of $\sum x$, $\sum x^2$, count | $E[x^2]-E[x]^2$ in float32, clamped at 0 |
| PyTorch `SyncBatchNorm` (`torch_sync`) | all-gather of mean, $1/\sqrt{\sigma^2+\epsilon}$, count | Chan's merge in float32 |
| Flax `BatchNorm(axis_name=...)` (`flax_pmean`) | mean over replicas of mean($x$) and mean($x^2$), equal weights | $E[x^2]-E[x]^2$ |
| `exact` (refbn) | (count, mean, $M_2$) per replica | Chan's merge in float64 |

`refbn.stats.moments` gives each replica's (count, mean, $M_2$); `refbn.stats.merge` reproduces
each framework's arithmetic. Three replicas with uneven shards (5, 50 and 500 values per
channel, from different parts of the data, as with a masked or padded batch):
""")

code(r"""
rng = np.random.default_rng(3)
shards = [rng.normal(loc, 1.0, size=(size, 2)).astype(np.float32) for loc, size in ((0.0, 5), (2.0, 50), (4.0, 500))]
per_replica = [stats.moments(s, axis=-1) for s in shards]
truth = ref.moments(np.concatenate(shards), 1)                      # float64 moments of all 555 values
print("replicas:", [f"n={m.count}, mean {m.mean[0]:.2f}" for m in per_replica])
print(f"all the data: mean {truth[0][0]:.4f}, variance {truth[1][0]:.4f} (channel 0)\n")
merged = {}
for method in stats.METHODS:
    mr = stats.merge(per_replica, method)
    merged[method] = mr
    print(f"{method:<11} mean {mr.mean[0]:8.4f}  variance {mr.variance[0]:8.4f}   relative variance error "
          f"{mr.variance_error:.2g}, mean error {mr.mean_error:.2g} (in std)")
assert_close(merged["exact"].mean, truth[0], "mean", "float64", "merge")
assert_close(merged["exact"].variance, truth[1], "variance", "float64", "merge")
KEY["uneven_variance_error"] = {m: r.variance_error for m, r in merged.items()}
""")

md(r"""
Flax averages the replicas' means with equal weights, so the 5 values of the first replica
count as much as the 500 of the third: its mean lands near the middle of the three replica
means, far from the true mean, and the variance is wrong with it. Keras sums counts and
PyTorch sends them, so both are right here. The other two failure modes need other data:
$E[x^2]-E[x]^2$ cancels in float32 when $|\text{mean}| \gg \text{std}$ (Keras and Flax), and
PyTorch's round trip through $1/\sqrt{\sigma^2+\epsilon}$ loses the variance when
$\sigma^2 \ll \epsilon$:
""")

code(r"""
rng = np.random.default_rng(4)
datasets = {
    "uneven shards\n5 + 50 + 500 values": shards,
    "offset data N(1e4, 0.01^2)\n4 x 4096 values": [rng.normal(1e4, 0.01, (4096, 2)).astype(np.float32) for _ in range(4)],
    "variance 1e-8 << eps 1e-5\n4 x 4096 values": [rng.normal(0.0, 1e-4, (4096, 2)).astype(np.float32) for _ in range(4)],
}
floor = 1e-17
fig, ax = plt.subplots(figsize=(11, 4))
wid = 0.2
for j, method in enumerate(stats.METHODS):
    errs = []
    for data in datasets.values():
        pr = [stats.moments(s, axis=-1) for s in data]
        errs.append(max(stats.merge(pr, method, epsilon=1e-5).variance_error, floor))
    ax.bar(np.arange(len(datasets)) + (j - 1.5) * wid, errs, wid, label=method)
    KEY.setdefault("merge_errors", {})[method] = errs
ax.set_yscale("log")
ax.axhline(np.finfo(np.float32).eps, color="k", ls=":", lw=1, label="float32 eps (1.2e-7)")
ax.set_xticks(np.arange(len(datasets)), list(datasets))
ax.set_ylabel(f"relative error of the merged variance\n(no unit; < {floor:g} drawn at {floor:g})")
ax.set_xlabel("data split over the replicas")
ax.set_title("Each framework's cross-replica merge (refbn.stats.merge) against the exact float64 merge", fontsize=10)
ax.set_ylim(top=30)
ax.legend(ncol=5, loc="upper center", bbox_to_anchor=(0.5, -0.25))
plt.show()
""")

md(r"""
A variance error of 1 means the variance came out 0: after the clamp, $y = \gamma(x-\mu)/\sqrt{\epsilon}$,
and every later layer sees a channel blown up by $\sigma/\sqrt\epsilon$ or flattened. The same
merges are what `refbn.keras.recalibrate(model, data, strategy=...)` avoids: it merges the
replicas' (count, mean, $M_2$) exactly.

## Key numbers

The numbers the text relies on, in one place (the test `tests/test_tutorial.py` runs this
notebook and checks them against each other):
""")

code(r"""
KEY["seconds"] = round(time.perf_counter() - T0, 1)
print("TUTORIAL_KEY_NUMBERS " + json.dumps(KEY, sort_keys=True, default=float))
""")

nb = nbf.v4.new_notebook(cells=cells)
nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
nb.metadata["language_info"] = {"name": "python"}
nbf.write(nb, sys.argv[1])
print("wrote", sys.argv[1], len(cells), "cells")
