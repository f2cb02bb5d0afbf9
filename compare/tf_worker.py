"""``python -m refbn.compare.tf_worker``: runs cases through TensorFlow in its own process.

TF picks its CPU kernel family (oneDNN or Eigen) from ``TF_ENABLE_ONEDNN_OPTS``
once, at import, so the harness starts one worker per kernel with the
variable set.  Protocol (one JSON object per line):

    stdin   {"id": 3, "case": "n1h1w6c1:f32:NHWC:train"}      (EOF ends the worker)
    stdout  {"ready": true, "onednn": true, "tf_version": "2.21.0"}   (first line)
            {"id": 3, "path": "/tmp/.../3.npz", "info": {...}}        (one per case)

Inputs are regenerated from the descriptor (refbn.compare.cases.make_inputs),
so only descriptors go in and only TF's outputs come out, as .npz files in
the directory given by --outdir.
"""
import argparse
import json
import os
import sys


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m refbn.compare.tf_worker")
    p.add_argument("--outdir", required=True)
    args = p.parse_args(argv)
    # TF and absl write to fd 2; keep our protocol on a private copy of stdout
    proto = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    sys.stdout = sys.stderr
    import numpy as np

    from . import cases, tf_adapter

    proto.write(json.dumps({"ready": True, "onednn": tf_adapter.onednn_enabled(),
                            "tf_version": tf_adapter.tf.__version__}) + "\n")
    for line in sys.stdin:
        if not line.strip():
            continue
        job = json.loads(line)
        case = cases.parse(job["case"])
        arrays, info = tf_adapter.run(case)
        path = os.path.join(args.outdir, f"{job['id']}.npz")
        # bfloat16 is not an npz dtype: store its bits and name it
        store = {}
        for k, v in arrays.items():
            if v.dtype.name == "bfloat16":
                store[k + "@bf16"] = v.view(np.uint16)
            else:
                store[k] = v
        np.savez(path, **store)
        proto.write(json.dumps({"id": job["id"], "path": path, "info": info}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
