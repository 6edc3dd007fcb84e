"""Comparison with full precision, misalignment analysis, plots, lmms-eval."""
