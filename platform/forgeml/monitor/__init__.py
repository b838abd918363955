"""Drift monitoring: reference statistics in the package, traffic recorded by Serve,
drift tests of one against the other, and retraining when they disagree."""
