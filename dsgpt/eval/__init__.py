"""Evaluation of a run's checkpoint: `harness` runs tasks and writes results; `perplexity`,
`bpb`, `generation` and `text_metrics` each compute one kind of score."""
