"""Runnable examples: a tiny deterministic trainer and the single-node demo."""
