"""Loom's ml_collections config files. Each exposes ``get_config()``."""
