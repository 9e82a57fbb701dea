"""hsa-jax models: SWA+HSA (and DRT) in Flax NNX, configs, PyTorch interop."""
