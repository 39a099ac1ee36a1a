"""Evaluation: perplexity and accuracy; more harnesses build on these."""
