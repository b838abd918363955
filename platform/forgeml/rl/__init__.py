"""Reinforcement learning on RLlib: an experiment with an ``env`` and task
``reinforcement`` trains a policy as a Ray Tune trial, scores it on held-out episodes
and registers it; serving acts through the same policy."""
