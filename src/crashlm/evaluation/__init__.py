"""Evaluation through lm-evaluation-harness, scored exactly as its HFLM scores."""
