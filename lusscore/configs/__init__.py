"""Packaged run configurations (YAML)."""
