"""refbn.compare: verification of refbn against TensorFlow's fused kernels and Keras (installed as refbn.compare)."""
