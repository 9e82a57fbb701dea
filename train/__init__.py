"""Sharded pre-training loop (`hsa-train`): config, mesh and sharding, train step, checkpoints, metrics."""
