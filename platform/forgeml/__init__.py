"""forgeml: one YAML experiment from data to a served model on Ray."""

__version__ = "0.1.0"
