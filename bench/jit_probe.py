"""``python -m refbn.bench.jit_probe``: the numba backend's start-up cost, in a fresh process.

Prints one JSON object: the import time of the backend and the first-call
time of each op (float32, channels last and first, one small input that
takes the serial build and one large input that takes the parallel build).
``refbn bench --jit`` runs it twice with an empty ``NUMBA_CACHE_DIR``: the
first run compiles everything (cold), the second loads the cached machine
code (warm start).
"""
import json
import sys
import time


def main():
    t0 = time.perf_counter()
    import numpy as np

    import refbn
    from refbn import backends
    backends.get("numba")
    out = {"import_s": time.perf_counter() - t0, "first_call_s": {}}
    rng = np.random.default_rng(0)
    empty = np.zeros(0, np.float32)
    for fmt, small, large in (("NHWC", (2, 4, 4, 8), (8, 32, 32, 64)), ("NCHW", (2, 8, 4, 4), (8, 64, 32, 32))):
        for size, shape in (("small", small), ("large", large)):
            x = rng.standard_normal(shape, dtype=np.float32)
            c = shape[3] if fmt == "NHWC" else shape[1]
            s = np.ones(c, np.float32)
            for op in ("train", "infer", "bwd"):
                t = time.perf_counter()
                if op == "train":
                    refbn.raw_ops.FusedBatchNormV3(x, s, s, empty, empty, data_format=fmt, backend="numba")
                elif op == "infer":
                    refbn.raw_ops.FusedBatchNormV3(x, s, s, s, s, data_format=fmt, is_training=False,
                                                   backend="numba")
                else:
                    refbn.raw_ops.FusedBatchNormGradV3(x, x, s, s, s, empty, data_format=fmt, backend="numba")
                out["first_call_s"][f"{op} {fmt} {size}"] = time.perf_counter() - t
    out["total_s"] = time.perf_counter() - t0
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
