"""Validation and timing of the contenders of one (shape, op) group.

Every contender is first run once and checked against the float64 truth
with the tolerance declared for it (refbn.tolerances: "numba",
"reference", "torch_cpu", "jax_cpu", "tf_onednn", "tf_eigen"); a contender that fails is refused
and never timed.  Then all contenders of the group are timed in rounds,
alternating (each round starts one contender later), each call preceded by
an optional cache flush and a short pause, so the threads of the previous
contender are asleep and every call starts from the same cache state.
"""
import statistics
import time
from dataclasses import dataclass, field

import numpy as np

import refbn
from refbn import dtypes
from refbn.testing import compare

from . import data, floors


@dataclass
class Contender:
    name: str                  # numpy, numba, torch, tf_onednn, tf_eigen, read:numpy, ...
    family: str                # refbn | torch | jax | tf | floor
    run: object
    outputs: object = None     # () -> {output: array}; None for floors
    context: str = None        # tolerance context for validation
    times: list = field(default_factory=list)
    checks: list = field(default_factory=list)   # per output: dict of the comparison
    refused: str = None
    first_call_s: float = None

    @property
    def median_ms(self):
        return 1e3 * statistics.median(self.times) if self.times else None

    @property
    def min_ms(self):
        return 1e3 * min(self.times) if self.times else None


def refbn_contenders(inp, op, backends, buffers):
    """refbn.raw_ops on the given backends, writing into preallocated buffers (out=)."""
    ro = refbn.raw_ops
    fmt, eps = inp.spec.data_format, data.EPSILON
    empty = np.zeros(0, np.float32)
    out = []
    for b in backends:
        ctx = "reference" if b == "numpy" else b
        buf = buffers.setdefault(b, np.empty_like(inp.x))
        if op == "train":
            def run(b=b, buf=buf):
                return ro.FusedBatchNormV3(inp.x, inp.scale, inp.offset, empty, empty, epsilon=eps,
                                           data_format=fmt, is_training=True, backend=b, out=buf)
        elif op == "infer":
            def run(b=b, buf=buf):
                return ro.FusedBatchNormV3(inp.x, inp.scale, inp.offset, inp.pop_mean, inp.pop_var, epsilon=eps,
                                           data_format=fmt, is_training=False, backend=b, out=buf)
        else:
            def run(b=b, buf=buf):
                return ro.FusedBatchNormGradV3(inp.dy, inp.x, inp.scale, inp.r1, inp.r2, empty, epsilon=eps,
                                               data_format=fmt, is_training=True, backend=b, out=buf)

        def outputs(run=run):
            r = run()
            return {k: getattr(r, k) for k in data.OUTPUTS[op]}
        out.append(Contender(b, "refbn", run, outputs, ctx))
    return out


def _framework_contender(inp, op, module, name, family, context):
    run, outputs = module.ops(inp, data.EPSILON, (op,))[op]
    return [Contender(name, family, run, outputs, context)]


def tf_contenders(inp, op, tf_module, kernel):
    return _framework_contender(inp, op, tf_module, f"tf_{kernel}", "tf", f"tf_{kernel}")


def torch_contenders(inp, op, torch_module):
    return _framework_contender(inp, op, torch_module, "torch", "torch", "torch_cpu")


def jax_contenders(inp, op, jax_module):
    return _framework_contender(inp, op, jax_module, "jax", "jax", "jax_cpu")


def floor_contenders(inp, op, buffers, threads=None, torch_module=None):
    """The floor passes of ``op``, each by every method (see refbn.bench.floors)."""
    buf = buffers.setdefault("floor", np.empty_like(inp.x))
    passes = floors.PASSES[op]
    extra = torch_module.floor_callables(inp.x, inp.dy, buf) if torch_module is not None else None
    return [Contender(name, "floor", fn) for name, (kind, fn) in
            floors.floor_callables(inp.x, inp.dy, buf, threads, extra).items() if kind in passes]


def validate(c, inp, op, scales):
    """Run once and compare every output with the truth; sets c.refused on a failure."""
    from refbn.compare.metrics import with_reduction
    t0 = time.perf_counter()
    try:
        outs = c.outputs()
    except Exception as e:   # a contender that cannot run is refused, with the reason
        c.first_call_s = time.perf_counter() - t0
        c.refused = f"raised {type(e).__name__}: {e}"
        return False
    c.first_call_s = time.perf_counter() - t0
    truth = inp.truth[op]
    for name in data.OUTPUTS[op]:
        dt = inp.x.dtype if name in ("y", "x_backprop") else dtypes.stats_dtype(inp.x.dtype)
        cmp = compare(outs[name], truth[name], name, dt, c.context, scale=scales.get(name))
        if c.family not in ("refbn", "floor"):   # a framework's float32 sums: allowance grows with n
            with_reduction(cmp, inp.n)
        c.checks.append({"output": name, "dtype": cmp.dtype, "context": cmp.context,
                         "max_ulps": cmp.max_ulps, "allowed_ulps": cmp.allowed_ulps,
                         "max_rel": cmp.max_rel, "passed": cmp.passed})
        if not cmp.passed and c.refused is None:
            c.refused = cmp.message(f"{c.name} {op}")
    return c.refused is None


def time_group(contenders, repeats, warmup, flush, gap_s, tick=None, calls=1):
    """Alternate the accepted contenders for ``repeats`` rounds; times go to c.times (seconds).

    ``calls`` > 1 (small batches): each timed sample is the mean of that many back-to-back calls,
    without a flush, so that it measures the per-call cost in steady state (what a serving loop
    or a small layer sees), not the wake-up of sleeping threads after a pause."""
    active = [c for c in contenders if c.refused is None]
    for c in active:
        for _ in range(warmup):
            c.run()
    for r in range(repeats):
        k = r % len(active) if active else 0
        for c in active[k:] + active[:k]:
            if calls == 1:
                flush()
            if gap_s:
                time.sleep(gap_s)
            run = c.run
            t0 = time.perf_counter()
            for _ in range(calls):
                run()
            c.times.append((time.perf_counter() - t0) / calls)
        if tick:
            tick()


def summarize(contenders, inp, op):
    """The group's record: times, floor, GB/s on the floor's bytes, ratios to the floor and to TF."""
    nbytes = data.FLOOR_TRAFFIC[op] * inp.x.nbytes
    med = {c.name: c.median_ms for c in contenders if c.times}
    floor_ms = 0.0
    floor_parts = {}
    for kind in floors.PASSES[op]:
        best = min((m, n) for n, m in med.items() if n.startswith(kind + ":"))
        floor_parts[kind] = {"ms": best[0], "by": best[1]}
        floor_ms += best[0]
    rec = {"shape": str(inp.spec), "dims": list(inp.spec.shape), "data_format": inp.spec.data_format,
           "dtype": inp.x.dtype.name, "op": op, "n_per_channel": inp.n, "values": int(inp.x.size), "floor_bytes": nbytes,
           "floor_ms": floor_ms, "floor_parts": floor_parts, "contenders": {}}
    for c in contenders:
        d = {"family": c.family, "refused": c.refused, "checks": c.checks, "first_call_s": c.first_call_s,
             "times_ms": [1e3 * t for t in c.times]}
        if c.times:
            d.update(median_ms=c.median_ms, min_ms=c.min_ms, gbps=nbytes / (c.median_ms * 1e6),
                     x_floor=c.median_ms / floor_ms)
        rec["contenders"][c.name] = d
    return rec


#: the other frameworks' kernels, in the layout of the record (torch: channels_last for a
#: channels-last refbn layout, contiguous for channels first)
PEERS = ("torch", "jax", "tf_onednn", "tf_eigen")


def _ms(cs, name, peer):
    """name's median to set against peer's: for numba, the one timed alternating with the peer in
    the peer's worker process (``numba_alternating_ms`` on the peer's row) when there is one."""
    return (name == "numba" and cs[peer].get("numba_alternating_ms")) or cs[name]["median_ms"]


def add_ratios(rec):
    """numba/peer and numpy/peer ratios (medians), and numba/the fastest peer, once every
    contender of the record is in."""
    cs = rec["contenders"]
    for tf_name in PEERS:
        tf_ms = cs.get(tf_name, {}).get("median_ms")
        if not tf_ms:
            continue
        for name in ("numba", "numpy"):
            if cs.get(name, {}).get("median_ms"):
                cs[name][f"x_{tf_name}"] = _ms(cs, name, tf_name) / tf_ms
    peers = [(cs[p]["median_ms"], p) for p in PEERS if cs.get(p, {}).get("median_ms")]
    if peers:
        best_ms, best = min(peers)
        rec["fastest_peer"] = best
        for name in ("numba", "numpy"):
            if cs.get(name, {}).get("median_ms"):
                cs[name]["x_fastest_peer"] = _ms(cs, name, best) / best_ms
    return rec
