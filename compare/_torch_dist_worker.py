"""PyTorch side of the distributed checks (``python -m refbn.compare._torch_dist_worker``).

One rank of a ``torch.distributed`` gloo group on 127.0.0.1 (``--rank``,
``--world``, ``--port``).  SyncBatchNorm has no CPU path (``torch.batch_norm_stats``
and ``batch_norm_gather_stats_with_counts`` are CUDA-only), so each case runs the
steps of ``torch.nn.modules._functions.SyncBatchNorm.forward`` with the CPU
pieces that exist:

1. this rank's (mean, invstd) from ``torch.native_batch_norm`` (the CPU kernel, on
   an NCHW-contiguous float32 input) and its count; an empty input sends zeros;
2. ``dist.all_gather`` of the 2C + 1 values (SyncBatchNorm's gloo branch), rows
   with count < 1 dropped;
3. the reduce of ``batch_norm_gather_stats_with_counts`` (the kernel in
   ``aten/src/ATen/native/cuda/Normalization.cuh``) in float32 torch ops:
   M2_j = ((1/invstd_j)^2 - eps) * count_j, then Chan's merge of the rows in order
   with an integer running count; invstd = 1/sqrt(M2/n + eps).

Written per case and rank: this rank's x, the gathered table and the merged
mean, variance (M2/n) and invstd.  Collectives time out after
``distributed.COLLECTIVE_TIMEOUT_S``.
"""
import argparse
import datetime
import os
import sys
import traceback


def _gather_and_reduce(x, eps, world, torch, dist):
    """SyncBatchNorm's forward statistics for this rank's NCHW x; returns a dict of arrays."""
    c = x.shape[1]
    if x.numel() > 0:
        _, mean, invstd = torch.native_batch_norm(x, None, None, None, None, True, 0.0, eps)
        count = torch.full((1,), x.numel() // c, dtype=mean.dtype)
        combined = torch.cat([mean, invstd, count])
    else:
        combined = torch.zeros(2 * c + 1, dtype=x.dtype)
    rows = [torch.empty_like(combined) for _ in range(world)]
    dist.all_gather(rows, combined)
    table = torch.stack(rows)
    mean_all, invstd_all, count_all = torch.split(table, c, dim=1)
    keep = count_all.squeeze(-1) >= 1
    mean_all, invstd_all, count_all = mean_all[keep], invstd_all[keep], count_all[keep].view(-1)
    epsilon = torch.tensor(eps, dtype=torch.float32)
    avg = torch.zeros(c, dtype=torch.float32)
    var_n = torch.zeros(c, dtype=torch.float32)
    n = 0  # the kernel's index_t running count
    for j in range(mean_all.shape[0]):
        count, m = count_all[j], mean_all[j]
        s = 1.0 / invstd_all[j]
        m2 = (s * s - epsilon) * count
        factor = 1.0 / (n + count)
        d = avg - m
        var_n = var_n + (m2 + d * d * n * count * factor)
        avg = n * factor * avg + count * factor * m
        n += int(count.item())
    with torch.no_grad():
        var = var_n / n if n else torch.full((c,), float("nan"))
        merged_invstd = 1.0 / torch.sqrt(var + epsilon)
    return {"table": table.numpy(), "mean": avg.numpy(), "variance": var.numpy(),
            "invstd": merged_invstd.numpy()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--world", type=int, required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--outdir", required=True)
    p.add_argument("--cases", default="", help="comma-separated case names (default: every torch case)")
    args = p.parse_args(argv)
    import numpy as np
    import torch
    import torch.distributed as dist

    from refbn.compare import distributed as rd

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{args.port}", rank=args.rank,
                            world_size=args.world,
                            timeout=datetime.timedelta(seconds=rd.COLLECTIVE_TIMEOUT_S))
    try:
        cases = [c for c in rd.SYNC_CASES if c.engine == "torch"]
        if args.cases:
            cases = [c for c in cases if c.name in set(args.cases.split(","))]
        for case in cases:
            if len(case.batches) != args.world:
                raise RuntimeError(f"{case.name}: {len(case.batches)} replicas, world size {args.world}")
            x_nhwc = rd.sync_case_data(case)[args.rank]
            x = torch.from_numpy(np.ascontiguousarray(np.moveaxis(x_nhwc, -1, 1)))
            out = _gather_and_reduce(x, rd.TORCH_EPSILON, args.world, torch, dist)
            out["x"] = x_nhwc
            np.savez(os.path.join(args.outdir, f"{case.name}.r{args.rank}.npz"), **out)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception:
        traceback.print_exc()
        sys.exit(1)
