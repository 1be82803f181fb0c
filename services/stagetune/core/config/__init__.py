"""SimpleTuner-compatible configuration: config.json and multidatabackend.json."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from stagetune.core.config.train import TrainConfig, load_train_config

__all__ = ["TrainConfig", "load_train_config"]


def __getattr__(name: str) -> Any:
    """Import lazily: `stagetune --help` must not pay for pydantic before it needs a config."""
    if name in __all__:
        from stagetune.core.config import train

        return getattr(train, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
