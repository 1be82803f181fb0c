"""Tiny random-weight models, built once per test session (pytest plugin, see conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_sd3_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SD3 pipeline in diffusers format (seed 0); treat it as read-only, other tests share it."""
    from stagetune.models.sd3.tiny import build_tiny_sd3

    return build_tiny_sd3(tmp_path_factory.mktemp("models") / "tiny-sd3", seed=0)


@pytest.fixture(scope="session")
def tiny_sana_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Sana pipeline in diffusers format (seed 0); read-only, shared."""
    from stagetune.models.sana.tiny import build_tiny_sana

    return build_tiny_sana(tmp_path_factory.mktemp("models") / "tiny-sana", seed=0)
