"""Serving: a Ray Serve application for registered model packages."""
