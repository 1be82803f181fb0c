"""Checks a run passes before any work starts: model source, dataset folders, output_dir, the store.

A missing folder or a read-only output must be answered in about a second, by the CLI before it imports
torch and by a service's Start before it creates a job, never after an hour of encoding. Pure Python;
each check raises a `StagetuneError` naming the path and what to do.
"""

from __future__ import annotations

import os
import re
import uuid
from pathlib import Path

from stagetune.core.errors import InputError, NotFoundError, NotWritableError, StagetuneError
from stagetune.core.store.base import Store

MODEL_FIELD = "pretrained_model_name_or_path"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
PROBE_PREFIX = ".stagetune-probe-"  # top level: a probe leaves no folder behind


def is_hub_id(name_or_path: str) -> bool:
    """``org/name`` that is not an existing local path: what ``from_pretrained`` would look up on the hub."""
    return bool(_HUB_ID.match(name_or_path)) and not Path(name_or_path).expanduser().exists()


def check_model_source(name_or_path: str, *, revision: str | None = None, field: str = MODEL_FIELD) -> None:
    """A local model must be a diffusers folder; a hub id must be in the local cache when the hub is off."""
    if not name_or_path or not name_or_path.strip():
        raise InputError(f"{field} is empty: give a diffusers model folder or a hub id (org/name)", field=field)
    if is_hub_id(name_or_path):
        if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(name_or_path, "model_index.json", revision=revision)
            if not isinstance(cached, str):
                raise NotFoundError(
                    f"{field}: {name_or_path} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set: "
                    "download it first or give a local folder", field=field)
        return
    root = Path(name_or_path).expanduser()
    if not root.exists():
        raise NotFoundError(f"{field}: model folder {name_or_path} does not exist", field=field)
    if not root.is_dir():
        raise InputError(f"{field}: {name_or_path} is a file; give the model's folder (with model_index.json)",
                         field=field)
    if not (root / "model_index.json").is_file():
        raise InputError(
            f"{field}: {name_or_path} is not a diffusers model folder (no model_index.json); give the folder "
            "save_pretrained wrote, or a hub id", field=field)
    if not os.access(root, os.R_OK | os.X_OK):
        raise InputError(f"{field}: model folder {name_or_path} is not readable (permission denied)", field=field)


def check_dataset_folder(dataset_id: str, folder: Path) -> None:
    """A local dataset's instance_data_dir exists, is a folder and can be listed."""
    if not folder.exists():
        raise NotFoundError(f"dataset {dataset_id!r}: instance_data_dir {folder} does not exist",
                            field="instance_data_dir")
    if not folder.is_dir():
        raise InputError(f"dataset {dataset_id!r}: instance_data_dir {folder} is a file, not a folder",
                         field="instance_data_dir")
    if not os.access(folder, os.R_OK | os.X_OK):
        raise InputError(f"dataset {dataset_id!r}: instance_data_dir {folder} is not readable (permission denied)",
                         field="instance_data_dir")


def check_local_output(path: Path, *, what: str = "output_dir") -> None:
    """A local output folder is a folder (or can be made) and takes writes, checked without a traceback."""
    for parent in (path, *path.parents):
        if parent.exists():
            if not parent.is_dir():
                raise NotWritableError(
                    f"{what} {path}: {parent} is a file, not a folder; choose another {what}", field=what)
            if not os.access(parent, os.W_OK | os.X_OK):
                reason = "a read-only file system" if _read_only_fs(parent) else "permission denied"
                raise NotWritableError(f"{what} {path} cannot be written: {parent} is {reason}; choose another "
                                       f"{what} or fix its permissions", field=what)
            break


def _read_only_fs(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def probe_store(store: Store, *, what: str = "store") -> None:
    """The store is reachable and takes writes, now: a local folder is checked without creating it, any
    other store by writing, reading back and deleting a small object."""
    root = getattr(store, "root", None)
    if isinstance(root, Path):
        check_local_output(root, what=what)
        return
    key = f"{PROBE_PREFIX}{uuid.uuid4().hex}"
    try:
        store.put_bytes(key, b"stagetune write probe", durable=False)
        if store.get_bytes(key) != b"stagetune write probe":
            raise NotWritableError(f"{what} {store.url} returned other bytes than were written", field=what)
        store.delete(key)
    except StagetuneError as exc:
        raise type(exc)(f"{what}: {exc}", field=what) from None
