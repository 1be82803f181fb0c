"""Shared fixtures: tiny models (fixtures_models.py) and stores (fixtures_store.py)."""

pytest_plugins = ["fixtures_models", "fixtures_store"]
