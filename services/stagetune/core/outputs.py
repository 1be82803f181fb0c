"""Where a job's user-facing outputs go: a local `output_dir` (SimpleTuner's layout) or a store URL."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

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


def output_location(output_dir: str | Path, base_dir: Path | None = None) -> str:
    """How another service reopens the same output: the URL as the user gave it (with its options and any
    credentials in it), or the local folder resolved against the config's folder."""
    if "://" in str(output_dir):
        return str(output_dir)
    path = Path(output_dir).expanduser()
    return str(path if path.is_absolute() or base_dir is None else base_dir / path)


def join_output(location: str, folder: str) -> str:
    """`location` + `/folder`: in the path of a URL (before its ?options), or as a sub-folder of a local one."""
    if "://" not in location:
        return str(Path(location) / folder)
    parts = urlsplit(location)
    return urlunsplit(parts._replace(path=parts.path.rstrip("/") + "/" + folder.strip("/")))
