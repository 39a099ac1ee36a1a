"""dsgpt: train GPT language models with DeepSpeed, from one CPU to a Slurm cluster."""

__version__ = "0.1.0"
