"""The training loop around a DeepSpeed engine, split into small parts a test can drive alone."""
