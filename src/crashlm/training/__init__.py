"""The training engine: configuration, data, checkpoints, precision and the one loop."""
