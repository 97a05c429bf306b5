"""Held-out evaluation: scores, the evaluator, sample logs."""
