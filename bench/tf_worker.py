"""``python -m refbn.bench.tf_worker REQUEST.json RESULT.json``: one TF CPU kernel family.

``refbn bench`` starts one worker per TF kernel it cannot run in its own
process, with ``TF_ENABLE_ONEDNN_OPTS`` set for that kernel (``1``: oneDNN,
``0``: Eigen; TF reads it once, at import, so each family needs its own
process).  The worker asks TF which kernel it really runs and reports that,
rebuilds the same inputs (same seed), validates TF against the float64
truth, and times it alternating with the memory floors of this process.  One
line per finished group goes to stdout (progress); the records go to
RESULT.json.
"""
import json
import sys


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    req_path, out_path = argv
    with open(req_path) as f:
        req = json.load(f)
    import numba

    from refbn.compare import tf_bench

    from . import data, floors, runner, specs

    if req.get("threads"):
        numba.set_num_threads(int(req["threads"]))
    tf_bench.configure_threads(req.get("threads"))
    kernel = tf_bench.info()["kernel"]        # what TF reports, whatever was asked for
    flush = floors.Flusher(req["cache"] == "cold")
    records = []
    for text in req["shapes"]:
        inp = data.add_truth(data.make(specs.parse(text), seed=req["seed"]), req["ops"])
        scales = data.scales(inp, "train")
        for op in req["ops"]:
            buffers = {}
            cs = runner.tf_contenders(inp, op, tf_bench, kernel)
            runner.validate(cs[0], inp, op, scales)
            cs += runner.floor_contenders(inp, op, buffers, req.get("threads"))
            calls = req.get("small_calls", 1) if inp.x.size < req.get("small_values", 0) else 1
            runner.time_group(cs, req["repeats"], req["warmup"], flush, req["gap_ms"] / 1e3, calls=calls)
            records.append(dict(runner.summarize(cs, inp, op), calls_per_sample=calls))
            print(json.dumps({"done": [text, op]}), flush=True)
        del inp
    with open(out_path, "w") as f:
        json.dump({"info": tf_bench.info(), "records": records}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
