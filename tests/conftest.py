import numpy as np
import pytest

import refbn
from refbn import backends, dtypes

BACKENDS = backends.available()
DTYPES = [dtypes.float16, dtypes.bfloat16, dtypes.float32, dtypes.float64]
# data_format -> (shape, channel axis) of a small test problem
LAYOUTS = {
    "NC": ((7, 3), 1),
    "NHWC": ((2, 3, 4, 3), 3),
    "NCHW": ((2, 3, 4, 5), 1),
    "NDHWC": ((2, 2, 3, 2, 4), 4),
    "NCDHW": ((2, 3, 2, 3, 2), 1),
}


def context(backend):
    """Tolerance context of a backend's results against the float64 closed form."""
    return "reference" if backend == "numpy" else backend


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


def make_x(shape, dtype, seed=0, loc=1.5, scale=2.0):
    rng = np.random.default_rng(seed)
    return (loc + scale * rng.standard_normal(shape)).astype(dtype)


def channel_params(c, seed=1):
    rng = np.random.default_rng(seed)
    return (rng.uniform(0.5, 2.0, c).astype(np.float32), rng.normal(0, 1, c).astype(np.float32),
            rng.normal(0, 1, c).astype(np.float32), rng.uniform(0.5, 3.0, c).astype(np.float32))
