"""refbn.bench: benchmarks of the refbn kernels against TF and the memory floor (installed as refbn.bench)."""
