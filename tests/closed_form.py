"""Independent float64 closed forms of Batch Normalization, written from the textbook
formulas without any refbn code, to test refbn against."""
import numpy as np


def _b(v, ndim, axis):
    shape = [1] * ndim
    shape[axis] = -1
    return np.asarray(v, np.float64).reshape(shape)


def train_forward(x, axis, scale, offset, eps):
    x = np.asarray(x, np.float64)
    axes = tuple(i for i in range(x.ndim) if i != axis)
    n = x.size // x.shape[axis]
    mean = x.mean(axis=axes)
    var = np.var(x, axis=axes)  # biased
    y = (x - _b(mean, x.ndim, axis)) / np.sqrt(_b(var, x.ndim, axis) + eps) * _b(scale, x.ndim, axis) \
        + _b(offset, x.ndim, axis)
    unbiased = var * n / max(n - 1, 1)
    return y, mean, var, unbiased


def infer_forward(x, axis, scale, offset, mean, var, eps):
    x = np.asarray(x, np.float64)
    nd = x.ndim
    return (x - _b(mean, nd, axis)) / np.sqrt(_b(var, nd, axis) + eps) * _b(scale, nd, axis) + _b(offset, nd, axis)


def train_backward(dy, x, axis, scale, eps):
    """The textbook training-mode gradient (Ioffe & Szegedy 2015, eq. in section 3)."""
    x, dy = np.asarray(x, np.float64), np.asarray(dy, np.float64)
    axes = tuple(i for i in range(x.ndim) if i != axis)
    n = x.size // x.shape[axis]
    nd = x.ndim
    mu = x.mean(axis=axes)
    var = np.var(x, axis=axes)
    xmu = x - _b(mu, nd, axis)
    ivar = 1.0 / np.sqrt(var + eps)
    xhat = xmu * _b(ivar, nd, axis)
    dxhat = dy * _b(scale, nd, axis)
    dvar = np.sum(dxhat * xmu, axis=axes) * -0.5 * ivar ** 3
    dmu = np.sum(-dxhat * _b(ivar, nd, axis), axis=axes) + dvar * np.mean(-2.0 * xmu, axis=axes)
    dx = dxhat * _b(ivar, nd, axis) + _b(dvar, nd, axis) * 2.0 * xmu / n + _b(dmu, nd, axis) / n
    return dx, np.sum(dy * xhat, axis=axes), np.sum(dy, axis=axes)


def infer_backward(dy, x, axis, scale, mean, var, eps):
    x, dy = np.asarray(x, np.float64), np.asarray(dy, np.float64)
    axes = tuple(i for i in range(x.ndim) if i != axis)
    nd = x.ndim
    ivar = 1.0 / np.sqrt(np.asarray(var, np.float64) + eps)
    xhat = (x - _b(mean, nd, axis)) * _b(ivar, nd, axis)
    return dy * _b(np.asarray(scale, np.float64) * ivar, nd, axis), np.sum(dy * xhat, axis=axes), np.sum(dy, axis=axes)
