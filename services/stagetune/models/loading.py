"""Loading pretrained parts, the one way every family does it, under one process-wide lock.

Every loader goes through `load_pretrained(cls.from_pretrained, name_or_path, subfolder, …)`, the path a
hub id takes, so the tiny test models exercise exactly what production runs; a bad path fails naming
itself before `from_pretrained` would try the network. Frozen parts (VAEs, text encoders) are memoised
process-wide (`memoised`): in the embedded mode the five services share one interpreter and load each once.

The lock:

diffusers and transformers build models inside accelerate's `init_empty_weights`, which patches
`nn.Module` parameter registration for the whole process, not the calling thread. In the embedded
mode the vae and text services load at the same time on two threads, and a model built by one
thread while the other is inside that context gets meta tensors ("Cannot copy out of meta tensor").
Loading is I/O and allocation; serialising it costs little, and encoding still overlaps.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from stagetune.core.checks import is_hub_id
from stagetune.core.errors import InputError, NotFoundError

if TYPE_CHECKING:
    import torch

MODEL_LOAD_LOCK = threading.RLock()
MODEL_FIELD = "pretrained_model_name_or_path"
T = TypeVar("T")

_memo: dict[tuple[str, ...], Any] = {}
_memo_lock = threading.Lock()
_key_locks: dict[tuple[str, ...], threading.Lock] = {}


def default_dtype(dtype: torch.dtype | None) -> torch.dtype:
    import torch

    return torch.float32 if dtype is None else dtype


def source_key(name_or_path: str) -> str:
    """Local folders are keyed by their resolved path, so ``./m`` and ``/abs/m`` share one load."""
    if is_hub_id(name_or_path):
        return name_or_path
    return str(Path(name_or_path).expanduser().resolve())


def check_model_source(name_or_path: str, subfolder: str | None, *, field: str = MODEL_FIELD) -> None:
    """Fail with the path in the message before ``from_pretrained`` would try the network for a bad path."""
    if is_hub_id(name_or_path):
        return
    root = Path(name_or_path).expanduser()
    if not root.is_dir():
        raise NotFoundError(f"model folder {name_or_path} does not exist", field=field)
    if subfolder and not (root / subfolder).is_dir():
        raise NotFoundError(f"model folder {name_or_path} has no subfolder {subfolder!r}", field=field)


def load_pretrained(
    loader: Callable[..., T],
    name_or_path: str,
    subfolder: str | None,
    *,
    field: str = MODEL_FIELD,
    **kwargs: Any,
) -> T:
    """Call ``loader`` and turn its OSErrors (missing files, unknown hub id) into errors naming the input."""
    check_model_source(name_or_path, subfolder, field=field)
    where = f"{name_or_path}/{subfolder}" if subfolder else name_or_path
    try:
        with MODEL_LOAD_LOCK:
            if subfolder:
                return loader(name_or_path, subfolder=subfolder, **kwargs)
            return loader(name_or_path, **kwargs)
    except OSError as exc:
        if is_hub_id(name_or_path):
            raise NotFoundError(f"cannot load {where} from the Hugging Face hub: {exc}", field=field) from exc
        raise InputError(f"cannot load {where}: {exc}", field=field) from exc


def memoised(key: tuple[str, ...], load: Callable[[], T]) -> T:
    """Load once per key; concurrent callers of one key wait for the first load instead of repeating it."""
    with _memo_lock:
        if key in _memo:
            return _memo[key]
        key_lock = _key_locks.setdefault(key, threading.Lock())
    with key_lock:
        with _memo_lock:
            if key in _memo:
                return _memo[key]
        value = load()
        with _memo_lock:
            _memo[key] = value
            _key_locks.pop(key, None)
    return value


def clear_component_cache() -> None:
    """Forget the shared frozen models (tests, or to free memory once a stage is done with them)."""
    with _memo_lock:
        _memo.clear()


def freeze(module: T) -> T:
    module.requires_grad_(False)  # type: ignore[attr-defined]
    module.eval()  # type: ignore[attr-defined]
    return module
