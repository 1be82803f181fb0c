"""Model fingerprints: one short digest for everything that changes a component's output.

Caches in the store are keyed by fingerprint (``cache/vae/<fp>/``, ``cache/text/<fp>/``), so a
fingerprint must change whenever weights, configs, tokenizers, dtype or options change, and must not change
otherwise, so that jobs share work. It is a content hash: the same weights in two folders (or on two
machines) get the same fingerprint, and a model edited in place under the same path gets a new one.

Hashing gigabytes of weights on every start would cost seconds, so each file's hash is memoised in
``$XDG_CACHE_HOME/stagetune/fingerprints.json`` (default ``~/.cache``), keyed by (path, size, mtime_ns).
Files in a Hugging Face cache snapshot are symlinks to blobs named by their content hash (sha256 for LFS
files, git's sha1 for others): those names are used directly and nothing is read.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import xxhash

from stagetune.core.atomic import atomic_write_text
from stagetune.core.checks import is_hub_id
from stagetune.core.errors import NotFoundError

FINGERPRINT_VERSION = "stagetune-fingerprint-v1"
_CHUNK = 8 * 1024 * 1024
_memo_lock = threading.Lock()


def memo_path() -> Path:
    """Where file hashes are memoised; honours ``XDG_CACHE_HOME`` like other per-user caches."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "stagetune" / "fingerprints.json"


def hash_file(path: Path) -> str:
    """xxh3-128 of a file's bytes (no memo)."""
    digest = xxhash.xxh3_128()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _load_memo(path: Path) -> dict[str, dict[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        # A missing or damaged memo only costs re-hashing; it must never stop a job.
        return {}
    return data if isinstance(data, dict) else {}


def _hf_blob_hash(path: Path) -> str | None:
    """The content hash a Hugging Face cache already gives a snapshot file, if it is one."""
    if not path.is_symlink():
        return None
    target = path.resolve()
    if target.parent.name == "blobs" and target.parent.parent.name.startswith(("models--", "datasets--")):
        return f"hf-blob:{target.name}"
    return None


def hash_files(paths: Iterable[Path]) -> dict[str, str]:
    """Hash files, reusing memoised hashes whose (path, size, mtime_ns) still match.

    The memo is rewritten only when something was hashed, atomically, and pruned of files that no longer
    exist, so that temporary models built by tests do not make it grow without bound.
    """
    results: dict[str, str] = {}
    pending: list[tuple[str, Path, os.stat_result]] = []
    for path in paths:
        key = str(path.absolute())
        blob = _hf_blob_hash(path)
        if blob is not None:
            results[key] = blob
            continue
        pending.append((key, path, path.stat()))
    if not pending:
        return results
    with _memo_lock:
        memo_file = memo_path()
        memo = _load_memo(memo_file)
        changed = False
        for key, path, stat in pending:
            entry = memo.get(key)
            if (
                isinstance(entry, dict)
                and entry.get("size") == stat.st_size
                and entry.get("mtime_ns") == stat.st_mtime_ns
                and isinstance(entry.get("xxh3_128"), str)
            ):
                results[key] = entry["xxh3_128"]
                continue
            value = hash_file(path)
            memo[key] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "xxh3_128": value}
            results[key] = value
            changed = True
        if changed:
            memo = {k: v for k, v in memo.items() if os.path.exists(k)}
            try:
                atomic_write_text(memo_file, json.dumps(memo, indent=1, sort_keys=True))
            except OSError:
                pass  # a read-only home only loses the memo, not the fingerprint
    return results


def resolve_model_root(name_or_path: str, subfolders: list[str], *, revision: str | None) -> Path:
    """The local folder holding a model: the folder itself, or the hub snapshot (downloaded if needed).

    Only the given subfolders (and top-level files) are fetched from the hub, which ``from_pretrained`` would
    fetch anyway; with ``HF_HUB_OFFLINE`` only the local cache is consulted.
    """
    local = Path(name_or_path).expanduser()
    if local.is_dir():
        return local
    if not is_hub_id(name_or_path):
        raise NotFoundError(
            f"model folder {name_or_path} does not exist", field="pretrained_model_name_or_path"
        )
    from huggingface_hub import snapshot_download

    patterns = [f"{sub.strip('/')}/*" for sub in subfolders if sub.strip("/")] + ["*.json"]
    try:
        return Path(
            snapshot_download(name_or_path, revision=revision, allow_patterns=patterns, local_files_only=True)
        )
    except Exception:  # noqa: BLE001 - not in the local cache (or stale): try the hub below
        pass
    try:
        return Path(snapshot_download(name_or_path, revision=revision, allow_patterns=patterns))
    except Exception as exc:
        at = f" at revision {revision}" if revision else ""
        raise NotFoundError(
            f"model {name_or_path}{at} is neither a local folder nor reachable on the Hugging Face hub: "
            f"{exc}",
            field="pretrained_model_name_or_path",
        ) from exc


def _component_files(root: Path, subfolder: str) -> list[Path]:
    """Files that make up a component: everything under its subfolder, or the top-level files for ``""``.

    Hidden files (``.cache``, ``.gitattributes``, editor droppings) never change outputs and are skipped.
    """
    sub = subfolder.strip("/")
    folder = root / sub if sub else root
    if not folder.is_dir():
        raise NotFoundError(
            f"model folder {root} has no subfolder {sub!r}", field="pretrained_model_name_or_path"
        )
    candidates = folder.rglob("*") if sub else folder.iterdir()
    files = []
    for path in candidates:
        relative = path.relative_to(folder)
        if any(part.startswith(".") for part in relative.parts) or not path.is_file():
            continue
        files.append(path)
    return sorted(files)


def model_fingerprint(
    name_or_path: str, subfolders: list[str], *, revision: str | None, extra: Mapping[str, Any]
) -> str:
    """A 32-hex digest of the named subfolders' files plus ``extra`` (dtype, options).

    ``subfolders`` lists the components the output depends on, tokenizers included (``""`` stands for a model
    whose files sit at the top, like a standalone VAE repository). The path and revision name are not part of
    the digest, only what they contain, so copies of one model share caches.
    """
    root = resolve_model_root(name_or_path, subfolders, revision=revision)
    listing = {sub.strip("/"): _component_files(root, sub) for sub in sorted(set(subfolders))}
    hashes = hash_files(path for files in listing.values() for path in files)
    content = {
        sub: {
            path.relative_to(root / sub if sub else root).as_posix(): hashes[str(path.absolute())]
            for path in files
        }
        for sub, files in listing.items()
    }
    payload = json.dumps(
        {"version": FINGERPRINT_VERSION, "content": content, "extra": dict(extra)},
        sort_keys=True,
        default=str,
        separators=(",", ":"),
    )
    return xxhash.xxh3_128_hexdigest(payload.encode("utf-8"))


def digest(*parts: Any) -> str:
    """A 32-hex key for a tuple of JSON-able parts (cache keys built on a fingerprint)."""
    payload = json.dumps(list(parts), sort_keys=True, default=str, separators=(",", ":"), ensure_ascii=False)
    return xxhash.xxh3_128_hexdigest(payload.encode("utf-8"))
