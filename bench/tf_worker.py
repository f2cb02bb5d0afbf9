"""``python -m refbn.bench.tf_worker REQUEST.json RESULT.json``: one framework in its own process.

``refbn bench`` starts one worker per framework kernel it does not run in its
own process; the request's ``framework`` says which: ``"tf"`` (the default)
or ``"jax"``.

tf   one TF CPU kernel family, with ``TF_ENABLE_ONEDNN_OPTS`` set by the
     parent for it (``1``: oneDNN, ``0``: Eigen; TF reads it once, at import,
     so each family needs its own process).  The worker asks TF which kernel
     it really runs and reports that.
jax  JAX on its CPU backend (refbn.bench.jax_bench), never in the bench
     process, where torch may be loaded.

The worker rebuilds the same inputs (same seed), validates the framework
(and, unless ``"numba": false``, refbn's numba backend) against the float64
truth, and times them alternating with the memory floors of this process, so
that numba/framework ratios come from alternating runs in one process.  One
line per finished group goes to stdout (progress); the records go to
RESULT.json.
"""
import json
import sys


def _framework(name, threads):
    """(module, contenders(inp, op)) for ``name``, its threads configured before its first op."""
    from . import runner
    if name == "jax":
        from . import jax_bench
        jax_bench.configure_threads(threads)
        return jax_bench, lambda inp, op: runner.jax_contenders(inp, op, jax_bench)
    from refbn.compare import tf_bench
    tf_bench.configure_threads(threads)
    kernel = tf_bench.info()["kernel"]        # what TF reports, whatever was asked for
    return tf_bench, lambda inp, op: runner.tf_contenders(inp, op, tf_bench, kernel)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    req_path, out_path = argv
    with open(req_path) as f:
        req = json.load(f)
    import numba

    from . import data, floors, runner, specs

    if req.get("threads"):
        numba.set_num_threads(min(int(req["threads"]), numba.config.NUMBA_NUM_THREADS))
    module, contenders = _framework(req.get("framework", "tf"), req.get("threads"))
    flush = floors.Flusher(req["cache"] == "cold")
    records = []
    for text in req["shapes"]:
        inp = data.add_truth(data.make(specs.parse(text), seed=req["seed"]), req["ops"])
        scales = data.scales(inp, "train")
        for op in req["ops"]:
            buffers = {}
            cs = contenders(inp, op)
            if req.get("numba", True):
                cs += runner.refbn_contenders(inp, op, ["numba"], buffers)
            for c in cs:
                runner.validate(c, inp, op, scales)
            cs += runner.floor_contenders(inp, op, buffers, req.get("threads"))
            calls = req.get("small_calls", 1) if inp.x.size < req.get("small_values", 0) else 1
            runner.time_group(cs, req["repeats"], req["warmup"], flush, req["gap_ms"] / 1e3, calls=calls)
            records.append(dict(runner.summarize(cs, inp, op), calls_per_sample=calls))
            print(json.dumps({"done": [text, op]}), flush=True)
        del inp
    with open(out_path, "w") as f:
        json.dump({"info": module.info(), "records": records}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
