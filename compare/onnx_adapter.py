"""ONNX Runtime's ``BatchNormalization`` (``refbn verify --framework onnxruntime``).

Only :mod:`refbn.compare.fw_worker` imports this module, in its own process.
The model is one BatchNormalization node built with the onnx package
(opset 15), run on the CPU execution provider.  Inference (``training_mode=0``)
normalises with the given mean and variance; training (``training_mode=1``,
when the runtime supports it) uses the batch's and returns the running
statistics, here with momentum 0 (ONNX's momentum is the weight of the old
value), so they are the batch mean and the batch variance the runtime computed.
Channels-last cases are transposed to NCHW in numpy before the call.
"""
import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from . import cases as cases_mod
from . import probe

OPSET = 15
_TO_FIRST = {"NHWC": (0, 3, 1, 2), "NDHWC": (0, 4, 1, 2, 3)}


def hello():
    return {"framework": "onnxruntime", "version": f"onnxruntime {ort.__version__} (onnx {onnx.__version__})"}


def _session(training, epsilon, momentum=0.9):
    outs = ["y", "running_mean", "running_var"] if training else ["y"]
    attrs = {"epsilon": float(epsilon), "momentum": float(momentum)}
    if training:
        attrs["training_mode"] = 1
    node = helper.make_node("BatchNormalization", ["x", "scale", "bias", "mean", "var"], outs, **attrs)
    graph = helper.make_graph(
        [node], "bn", [helper.make_tensor_value_info(n, TensorProto.FLOAT, None)
                       for n in ("x", "scale", "bias", "mean", "var")],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outs])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _first(a, layout):
    return np.ascontiguousarray(a.transpose(_TO_FIRST[layout])) if layout in _TO_FIRST else a


def _back(a, layout):
    if layout not in _TO_FIRST:
        return a
    perm = _TO_FIRST[layout]
    return np.ascontiguousarray(a.transpose([perm.index(i) for i in range(len(perm))]))


def run(case):
    inp = cases_mod.make_inputs(case)
    x = _first(inp.x, case.layout)
    arrays, info = {}, {"implementation": f"onnxruntime {ort.__version__} BatchNormalization (opset {OPSET})"}
    C = case.channels
    try:
        if case.is_training:
            s = _session(True, case.eps, momentum=0.0)
            y, rm, rv = s.run(None, {"x": x, "scale": inp.scale, "bias": inp.offset,
                                     "mean": np.zeros(C, np.float32), "var": np.ones(C, np.float32)})
            arrays = {"fwd.y": _back(y, case.layout), "fwd.reserve_space_1": rm, "fwd.reserve_space_2": rv}
        else:
            s = _session(False, case.eps)
            (y,) = s.run(None, {"x": x, "scale": inp.scale, "bias": inp.offset, "mean": inp.mean,
                                "var": inp.variance})
            arrays = {"fwd.y": _back(y, case.layout)}
    except Exception as e:
        info["fwd_error"] = probe.error_text(e)
    return {"onnxruntime": (arrays, info)}


def conventions():
    # the operator's defaults (ONNX spec): momentum 0.9, epsilon 1e-5; its 'state' is the
    # mean/var inputs, fed back by the caller
    def make(momentum=0.9):
        return {"momentum": momentum, "mean": np.zeros(probe.CHANNELS, np.float32),
                "var": np.ones(probe.CHANNELS, np.float32)}

    def step(state, x):
        s = _session(True, 1e-5, state["momentum"])
        c = probe.CHANNELS
        y, rm, rv = s.run(None, {"x": x, "scale": np.ones(c, np.float32), "bias": np.zeros(c, np.float32),
                                 "mean": state["mean"], "var": state["var"]})
        state["mean"], state["var"] = rm, rv
        return y

    def read(state):
        return state["mean"], state["var"]

    return {"onnxruntime BatchNormalization": probe.run_probe(make, step, read, 0.9, 1e-5, full_weight=0.0)}
