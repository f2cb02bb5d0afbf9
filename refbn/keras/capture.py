"""Find a Keras model's BatchNormalization layers and capture what they see.

Capture works by wrapping each BatchNormalization layer's ``call`` for the
duration of an eager forward pass, so it works for Sequential, functional,
nested and subclassed models alike (no sub-model is built).  A hook may stop
the forward pass as soon as it has what it needs (:class:`StopForward`), so
capturing the input of layer k costs a forward pass up to layer k only.
"""
import contextlib

import numpy as np

from ._backend import keras

BatchNormalization = keras.layers.BatchNormalization


class StopForward(Exception):
    """Raised by a hook to end a forward pass early (caught by the capture helpers)."""


def bn_layers(model):
    """Every BatchNormalization layer in ``model``, nested models included (each once)."""
    if isinstance(model, BatchNormalization):
        return [model]
    if hasattr(model, "_flatten_layers"):
        layers = model._flatten_layers(include_self=False, recursive=True)
    else:  # pragma: no cover - every Keras 3 layer has _flatten_layers
        layers = getattr(model, "layers", [])
    seen, out = set(), []
    for layer in layers:
        if isinstance(layer, BatchNormalization) and id(layer) not in seen:
            seen.add(id(layer))
            out.append(layer)
    return out


@contextlib.contextmanager
def hooked(layers, before=None, after=None):
    """Wrap each layer's ``call``: ``before(layer, inputs, kwargs)`` runs before it and
    ``after(layer, inputs, outputs, kwargs)`` after it.  Restored on exit, even on error."""
    wrapped = []
    try:
        for layer in layers:
            original = layer.call

            def call(inputs, *args, _layer=layer, _original=original, **kwargs):
                if before is not None:
                    before(_layer, inputs, kwargs)
                outputs = _original(inputs, *args, **kwargs)
                if after is not None:
                    after(_layer, inputs, outputs, kwargs)
                return outputs

            layer.__dict__["call"] = call  # bypass Keras' attribute tracking
            wrapped.append(layer)
        yield
    finally:
        for layer in wrapped:
            layer.__dict__.pop("call", None)


def to_numpy(t):
    return np.asarray(keras.ops.convert_to_numpy(t))


def run(model, x, training=False):
    """One eager forward pass; returns the output as numpy, or None if a hook stopped it."""
    try:
        return to_numpy(model(x, training=training))
    except StopForward:
        return None


def call_order(model, x, layers=None):
    """The BatchNormalization layers in the order one forward pass calls them, and how many
    times each is called (a shared layer is called more than once).  Layers that the pass
    does not reach are left out."""
    layers = bn_layers(model) if layers is None else list(layers)
    order, counts = [], {}

    def before(layer, inputs, kwargs):
        if id(layer) not in counts:
            order.append(layer)
        counts[id(layer)] = counts.get(id(layer), 0) + 1

    with hooked(layers, before=before):
        run(model, x, training=False)
    return order, {id(layer): counts[id(layer)] for layer in order}


def capture(model, x, layers=None, training=False, outputs=False):
    """Run ``model(x, training=training)`` once and return ``(result, {layer: [inputs]})``
    (with ``outputs=True`` the values are ``[(input, output)]`` pairs), as float32/64 numpy.

    Careful: with ``training=True`` Keras updates the moving statistics as it goes; wrap the
    call in :func:`preserved_statistics` to keep them.
    """
    layers = bn_layers(model) if layers is None else list(layers)
    seen = {layer: [] for layer in layers}

    def after(layer, inputs, out, kwargs):
        seen[layer].append((to_numpy(inputs), to_numpy(out)) if outputs else to_numpy(inputs))

    with hooked(layers, after=after):
        result = run(model, x, training=training)
    return result, seen


def statistics(layers):
    """{layer: (moving_mean, moving_variance)} as numpy copies."""
    return {layer: (to_numpy(layer.moving_mean).copy(), to_numpy(layer.moving_variance).copy())
            for layer in layers}


def write_statistics(layer, mean, variance):
    """Assign a layer's moving statistics (cast to the variables' dtype)."""
    layer.moving_mean.assign(np.asarray(mean).astype(layer.moving_mean.dtype))
    layer.moving_variance.assign(np.asarray(variance).astype(layer.moving_variance.dtype))


@contextlib.contextmanager
def preserved_statistics(model_or_layers):
    """Restore every BatchNormalization layer's moving statistics on exit."""
    layers = (list(model_or_layers) if isinstance(model_or_layers, (list, tuple))
              else bn_layers(model_or_layers))
    saved = statistics(layers)
    try:
        yield layers
    finally:
        for layer in layers:
            write_statistics(layer, *saved[layer])
