"""Shared fixtures: tiny models, stores and a loopback Hugging Face Hub (the fixtures_*.py modules)."""

pytest_plugins = ["fixtures_models", "fixtures_store", "fixtures_hub"]
