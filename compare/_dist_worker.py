"""TensorFlow side of the distributed checks (``python -m refbn.compare._dist_worker``).

Runs the cases of :mod:`refbn.compare.distributed` for one engine in this
process and writes what TF computed to .npz files:

    --engine mirrored      one process per replica count, with that many logical
                           CPU devices and one MirroredStrategy over them
    --engine multiworker   one of the MultiWorkerMirroredStrategy workers
                           (TF_CONFIG is set here from --index and --ports,
                           127.0.0.1 only)

Each case runs ``keras.layers.BatchNormalization(synchronized=True)`` for a few
training steps: y = bn(x, training=True), loss = sum(y * sin(x)), the gradients
of gamma and beta all-reduced with SUM and applied by SGD.  Recorded per step
and replica: x, y, the synchronized batch moments (``keras.ops.moments(...,
synchronized=True)``, the function the layer calls), and every replica's copy
of moving_mean, moving_variance, gamma and beta after the step.

Then ``refbn.keras.recalibrate(model, data, strategy=strategy)`` (arrays, and a
tf.data pipeline) runs on the same strategy, next to the same data as one shard.
"""
import argparse
import json
import os
import sys
import time
import traceback


def _setup_env(args):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if args.engine == "multiworker":
        ports = args.ports.split(",")
        os.environ["TF_CONFIG"] = json.dumps({
            "cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
            "task": {"type": "worker", "index": args.index}})


def _copies(var):
    """Every replica's copy of a (Keras) variable, as numpy arrays."""
    v = getattr(var, "value", var)
    return [c.numpy() for c in getattr(v, "values", (v,))]


def _run_case(case, strategy, tf, keras, np, dist, worker_index):
    """Run one case; return the dict of arrays to save."""
    shape = (None,) + tuple(case.spatial) + (case.channels,)
    with strategy.scope():
        bn = keras.layers.BatchNormalization(synchronized=True, momentum=dist.MOMENTUM,
                                             epsilon=dist.EPSILON)
        bn.build(shape)
    axes = list(range(len(shape) - 1))

    def replica_fn(x):
        ctx = tf.distribute.get_replica_context()
        with tf.GradientTape() as tape:
            y = bn(x, training=True)
            loss = tf.reduce_sum(y * tf.sin(x))
        grads = tape.gradient(loss, [bn.gamma, bn.beta])
        grads = ctx.all_reduce(tf.distribute.ReduceOp.SUM, grads)
        bn.gamma.assign_sub(dist.LEARNING_RATE * grads[0])
        bn.beta.assign_sub(dist.LEARNING_RATE * grads[1])
        mean, var = keras.ops.moments(x, axes=axes, synchronized=True)
        return y, mean, var

    @tf.function
    def step(dist_x):
        return strategy.run(replica_fn, args=(dist_x,))

    out = {}
    if case.global_batch:
        steps_x = [dist.case_data(case, s)[0] for s in range(case.steps)]
        ds = tf.data.Dataset.from_tensor_slices(np.concatenate(steps_x)).batch(case.global_batch)
        batches = iter(strategy.experimental_distribute_dataset(ds))
    for s in range(case.steps):
        if case.global_batch:
            dist_x = next(batches)
        else:
            shards = dist.case_data(case, s)
            dist_x = strategy.experimental_distribute_values_from_function(
                lambda ctx: tf.constant(shards[ctx.replica_id_in_sync_group]))
        y, mean, var = step(dist_x)
        local = strategy.experimental_local_results
        # replica ids held by this process: all of them (mirrored), or this worker's
        ids = range(len(local(y))) if worker_index is None else [worker_index]
        for r, xr, yr, mr, vr in zip(ids, local(dist_x), local(y), local(mean), local(var)):
            out[f"x_{s}_{r}"], out[f"y_{s}_{r}"] = xr.numpy(), yr.numpy()
            out[f"mean_{s}_{r}"], out[f"var_{s}_{r}"] = mr.numpy(), vr.numpy()
        for name in ("moving_mean", "moving_variance", "gamma", "beta"):
            for r, c in zip(ids, _copies(getattr(bn, name))):
                out[f"{name}_{s}_{r}"] = c
    return out


def _recalibrate_check(strategy, tf, keras, np, dist):
    """refbn.keras.recalibrate with strategy= (arrays and a tf.data pipeline) against the same
    data as one shard without a strategy.  Returns the arrays to save."""
    import refbn.keras

    x = dist.recalibrate_data()
    out = {}
    for kind in ("arrays", "dataset"):
        data = x if kind == "arrays" else tf.data.Dataset.from_tensor_slices(x).batch(16)
        for how in ("strategy", "one_shard"):
            model = dist.recalibrate_model(keras)
            with dist.recording_layer_inputs() as seen:
                if how == "strategy":
                    res = refbn.keras.recalibrate(model, data, strategy=strategy, batch_size=16)
                else:
                    res = refbn.keras.recalibrate(model, shards=[x], batch_size=16)
            for i, layer in enumerate(res.layers):
                # what TF fed this layer in this process (this worker's part under multiworker)
                channels = int(layer.mean.shape[0])
                out[f"{kind}_{how}_inputs_{i}"] = (np.concatenate([a.reshape(-1, channels) for a in seen[i]])
                                                   if seen[i] else np.zeros((0, channels), np.float32))
                out[f"{kind}_{how}_mean_{i}"] = layer.mean
                out[f"{kind}_{how}_variance_{i}"] = layer.variance
                out[f"{kind}_{how}_count_{i}"] = np.array(layer.moments.count)
                out[f"{kind}_{how}_written_{i}"] = np.asarray(layer.layer.moving_variance.numpy())
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--engine", choices=("mirrored", "multiworker"), required=True)
    p.add_argument("--outdir", required=True)
    p.add_argument("--replicas", type=int, required=True, help="replicas in sync (devices or workers)")
    p.add_argument("--index", type=int, default=0, help="worker index (multiworker)")
    p.add_argument("--ports", default="", help="comma-separated loopback ports, one per worker")
    p.add_argument("--cases", default="", help="comma-separated case names (default: all of the engine)")
    args = p.parse_args(argv)
    _setup_env(args)
    t0 = time.perf_counter()
    import numpy as np
    import tensorflow as tf

    from refbn.compare import distributed as dist

    cases = [c for c in dist.CASES if c.engine == args.engine and c.replicas == args.replicas]
    if args.cases:
        wanted = set(args.cases.split(","))
        cases = [c for c in cases if c.name in wanted]
    # TF's context must not be initialised before the strategy (multiworker) or the
    # logical devices (mirrored) are configured.
    if args.engine == "multiworker":
        options = tf.distribute.experimental.CommunicationOptions(
            timeout_seconds=dist.COLLECTIVE_TIMEOUT_S)
        strategy = tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
        worker_index = args.index
    else:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * args.replicas)
        # one strategy per process: two MirroredStrategy objects of different sizes would
        # reuse the same collective group keys
        strategy = tf.distribute.MirroredStrategy(
            [d.name for d in tf.config.list_logical_devices("CPU")])
        worker_index = None
    import keras

    if strategy.num_replicas_in_sync != args.replicas:
        raise RuntimeError(f"expected {args.replicas} replicas, TF made {strategy.num_replicas_in_sync}")
    info = {"tf": tf.__version__, "keras": keras.__version__, "engine": args.engine,
            "replicas": args.replicas, "index": args.index,
            "strategy": type(strategy).__name__,
            "cross_device_ops": type(getattr(strategy.extended, "_cross_device_ops", None)).__name__,
            "cases": {}}
    suffix = "" if worker_index is None else f".w{worker_index}"
    for case in cases:
        t1 = time.perf_counter()
        out = _run_case(case, strategy, tf, keras, np, dist, worker_index)
        np.savez(os.path.join(args.outdir, f"{case.name}{suffix}.npz"), **out)
        info["cases"][case.name] = {"seconds": time.perf_counter() - t1}
    t1 = time.perf_counter()
    name = os.path.join(args.outdir, f"recalibrate.{args.engine}{args.replicas}{suffix}")
    try:  # a failure here is reported by the recalibration check, not by the BN cases
        out = _recalibrate_check(strategy, tf, keras, np, dist)
        np.savez(name + ".npz", **out)
    except Exception:
        with open(name + ".error.txt", "w") as f:
            f.write(traceback.format_exc())
    info["recalibrate_seconds"] = time.perf_counter() - t1
    info["seconds"] = time.perf_counter() - t0
    with open(os.path.join(args.outdir, f"done.{args.engine}{args.replicas}{suffix}.json"), "w") as f:
        json.dump(info, f)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception:
        traceback.print_exc()
        sys.exit(1)
