"""Hyperparameter search on Ray Tune, each trial one Ray Train run (``forgeml tune``)."""
