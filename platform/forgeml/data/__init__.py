"""Data: sources, fitted preprocessing and the Ray Data pipeline."""
