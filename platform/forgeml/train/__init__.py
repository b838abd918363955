"""Training: the per-worker loop (``loop.py``) and the TorchTrainer built from a config."""
