"""Where a job's user-facing outputs go: a local `output_dir` (SimpleTuner's layout) or a store URL."""

from __future__ import annotations

from pathlib import Path

from stagetune.core.store.base import Store


def open_output(output_dir: str | Path, base_dir: Path | None = None) -> Store:
    """`s3://…` opens that store; anything else is a local folder (relative to the config's folder)."""
    if "://" in str(output_dir):
        from stagetune.core.store import open_store

        return open_store(str(output_dir))
    from stagetune.core.store.local import LocalStore

    path = Path(output_dir).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    return LocalStore(path)
