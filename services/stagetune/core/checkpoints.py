"""Checkpoints in SimpleTuner's layout (`checkpoint-<step>/`), written so a kill never leaves a bad one.

A checkpoint is a set of objects in the output store; `training_state.json` is written last and
lists every other file with its size, so a checkpoint without it (or with a file of the wrong
size) is incomplete and ignored by resume. The same code works on a local `output_dir` and on S3.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

from stagetune.core.errors import NotFoundError
from stagetune.core.store.base import Store

log = logging.getLogger(__name__)

STATE_FILE = "training_state.json"
_NAME = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step}"


def _candidates(store: Store) -> list[int]:
    steps = set()
    for key in store.list("checkpoint-"):
        head = key.split("/", 1)[0]
        match = _NAME.match(head)
        if match and key.endswith("/" + STATE_FILE):
            steps.add(int(match.group(1)))
    return sorted(steps)


def is_complete(store: Store, step: int) -> bool:
    name = checkpoint_name(step)
    try:
        state = json.loads(store.get_bytes(f"{name}/{STATE_FILE}"))
    except (NotFoundError, ValueError):
        return False
    # Sizes from metadata: a checkpoint's optimizer state can be hundreds of MB, never read it to check.
    return all(store.size(f"{name}/{file}") == size for file, size in state.get("files", {}).items())


def list_checkpoints(store: Store) -> list[int]:
    """Steps of complete checkpoints, oldest first."""
    return [step for step in _candidates(store) if is_complete(store, step)]


def save_checkpoint(store: Store, step: int, files: dict[str, bytes], state: dict[str, Any],
                    total_limit: int | None = None) -> str:
    name = checkpoint_name(step)
    for file, data in files.items():
        store.put_bytes(f"{name}/{file}", data)
    record = dict(state, step=step, files={file: len(data) for file, data in files.items()})
    store.put_bytes(f"{name}/{STATE_FILE}", json.dumps(record, indent=2, sort_keys=True).encode())
    if total_limit and total_limit > 0:
        for old in list_checkpoints(store)[:-total_limit]:
            log.info("removing %s (checkpoints_total_limit=%d)", checkpoint_name(old), total_limit)
            # The state file goes first: a half-deleted checkpoint is then simply incomplete.
            store.delete(f"{checkpoint_name(old)}/{STATE_FILE}")
            store.delete_prefix(f"{checkpoint_name(old)}/")
    return name


def load_checkpoint(store: Store, step: int) -> tuple[dict[str, bytes], dict[str, Any]]:
    name = checkpoint_name(step)
    if not is_complete(store, step):
        raise NotFoundError(f"checkpoint {name} in {store.url} is missing or incomplete",
                            field="resume_from_checkpoint")
    state = json.loads(store.get_bytes(f"{name}/{STATE_FILE}"))
    files = {file: store.get_bytes(f"{name}/{file}") for file in state["files"]}
    return files, state


def resolve_resume(store: Store, resume_from_checkpoint: str | None) -> tuple[Store, int] | None:
    """Which checkpoint to resume from: `latest` in the output store, or an explicit path."""
    if not resume_from_checkpoint or str(resume_from_checkpoint).lower() in ("none", "false"):
        return None
    if resume_from_checkpoint == "latest":
        steps = list_checkpoints(store)
        return (store, steps[-1]) if steps else None
    path = Path(resume_from_checkpoint)
    match = _NAME.match(path.name)
    if not match:
        raise NotFoundError(
            f"resume_from_checkpoint must be 'latest' or a checkpoint-<step> folder, got {resume_from_checkpoint!r}",
            field="resume_from_checkpoint",
        )
    from stagetune.core.store.local import LocalStore

    source = LocalStore(path.parent) if path.is_absolute() or path.parent.exists() else store
    step = int(match.group(1))
    if not is_complete(source, step):
        raise NotFoundError(f"checkpoint {resume_from_checkpoint} is missing or incomplete",
                            field="resume_from_checkpoint")
    return source, step
