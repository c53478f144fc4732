"""The training engine: configuration, data, precision, checkpoints, the one loop, task training and full fine-tuning."""
