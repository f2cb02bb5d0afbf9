"""``python -m refbn.compare.fw_worker --framework NAME``: one framework, in its own process.

The protocol is :mod:`refbn.compare.tf_worker`'s (one JSON object per line):

    stdin   {"id": 3, "case": "n16c8h4w4:f32:NCHW:torch:k20"}   or   {"id": 4, "probe": "conventions"}
    stdout  {"ready": true, "framework": "torch", "version": "2.13.0+cpu"}   (first line)
            {"id": 3, "path": "/tmp/.../3.npz", "info": {impl: {...}, ...}}

A case may run several implementations (``F.batch_norm`` and
``native_batch_norm``; ``flax.linen`` and ``flax.nnx``): the .npz names each
array ``impl|key`` and ``info`` holds one dict per implementation.  A probe
returns its facts in ``info`` and no arrays.  Inputs are regenerated from the
descriptor (refbn.compare.cases), so only descriptors go in.
"""
import argparse
import importlib
import json
import os
import sys
import traceback

ADAPTERS = {"torch": "torch_adapter", "jax": "jax_adapter", "tf_keras": "tf_keras_adapter",
            "onnxruntime": "onnx_adapter", "keras": "keras_adapter"}


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m refbn.compare.fw_worker")
    p.add_argument("--framework", required=True, choices=sorted(ADAPTERS))
    p.add_argument("--outdir", required=True)
    args = p.parse_args(argv)
    proto = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    sys.stdout = sys.stderr  # frameworks print to stdout; the protocol has its own copy
    import numpy as np

    from . import cases

    adapter = importlib.import_module(f"refbn.compare.{ADAPTERS[args.framework]}")
    proto.write(json.dumps(dict(adapter.hello(), ready=True)) + "\n")
    for line in sys.stdin:
        if not line.strip():
            continue
        job = json.loads(line)
        store, info = {}, {}
        try:
            if "probe" in job:
                info = {"probe": adapter.conventions()}
            else:
                for impl, (arrays, impl_info) in adapter.run(cases.parse(job["case"])).items():
                    info[impl] = impl_info
                    for k, v in arrays.items():
                        store[f"{impl}|{k}"] = np.asarray(v)
        except Exception as e:  # reported and judged (FAIL) by the parent
            info = {"error": f"{type(e).__name__}: {e}"[:400], "traceback": traceback.format_exc()[-2000:]}
        path = os.path.join(args.outdir, f"{job['id']}.npz")
        np.savez(path, **store)
        proto.write(json.dumps({"id": job["id"], "path": path, "info": info}, default=float) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
