"""JAX/Flax side of the distributed checks (``python -m refbn.compare._jax_dist_worker``).

Sets ``XLA_FLAGS=--xla_force_host_platform_device_count=<devices>`` before JAX is
imported, then runs ``flax.linen.BatchNorm(axis_name="batch")`` under ``jax.pmap``
over that many host CPU devices, one training step per case.  Every device gets
an array of the same shape (pmap needs it): its own samples, then padding
samples (a value far from the data, 1e6) that its ``mask`` excludes, so the
devices hold unequal numbers of values.  ``momentum=0`` makes the running
statistics after the step the synchronized batch statistics themselves
(0 * ra + 1 * stat, exact).  Written per case: x, mask, and every device's copy of
the merged mean and variance and of y.
"""
import argparse
import json
import os
import sys
import traceback

PAD_VALUE = 1e6


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", type=int, default=4)
    p.add_argument("--outdir", required=True)
    p.add_argument("--cases", default="", help="comma-separated case names (default: every flax case)")
    args = p.parse_args(argv)
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    os.environ["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={args.devices}"])
    os.environ["JAX_PLATFORMS"] = "cpu"
    import numpy as np
    import jax
    import jax.numpy as jnp
    import flax
    import flax.linen as nn

    from refbn.compare import distributed as rd

    if jax.local_device_count() != args.devices:
        raise RuntimeError(f"expected {args.devices} CPU devices, JAX made {jax.local_device_count()}")
    cases = [c for c in rd.SYNC_CASES if c.engine == "flax"]
    if args.cases:
        cases = [c for c in cases if c.name in set(args.cases.split(","))]
    info = {"jax": jax.__version__, "flax": flax.__version__, "devices": jax.local_device_count()}
    for case in cases:
        if len(case.batches) != args.devices:
            raise RuntimeError(f"{case.name}: {len(case.batches)} replicas, {args.devices} devices")
        shards = rd.sync_case_data(case)
        width = max(1, max(case.batches))
        x = np.full((args.devices, width) + tuple(case.spatial) + (case.channels,), PAD_VALUE, np.float32)
        mask = np.zeros((args.devices, width) + tuple(case.spatial) + (1,), bool)
        for d, s in enumerate(shards):
            x[d, :len(s)], mask[d, :len(s)] = s, True
        bn = nn.BatchNorm(use_running_average=False, axis_name="batch", momentum=0.0,
                          epsilon=rd.FLAX_EPSILON, use_fast_variance=case.fast_variance)
        variables = bn.init(jax.random.PRNGKey(0), x[0], mask=mask[0])

        def step(v, xd, md):
            y, updates = bn.apply(v, xd, mask=md, mutable=["batch_stats"])
            return y, updates["batch_stats"]["mean"], updates["batch_stats"]["var"]

        y, mean, var = jax.pmap(step, axis_name="batch", in_axes=(None, 0, 0))(
            variables, jnp.asarray(x), jnp.asarray(mask))
        np.savez(os.path.join(args.outdir, f"{case.name}.npz"), x=x, mask=mask, y=np.asarray(y),
                 mean=np.asarray(mean), variance=np.asarray(var))
    with open(os.path.join(args.outdir, "done.flax.json"), "w") as f:
        json.dump(info, f)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception:
        traceback.print_exc()
        sys.exit(1)
