"""What ingest learns from an image's bytes, remembered by content hash.

An image's size after EXIF rotation, or why it cannot be used, depends only on its bytes, so it is
keyed by the content hash and never goes stale. With the hash cache (which vouches for unchanged
files by size and mtime/ETag) this lets a re-ingest of an unchanged dataset read no image at all.
One JSON object per source; a lost update (two ingests of one source at once) costs a re-read, never a
wrong answer.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import xxhash

from stagetune.core.errors import InputError, NotFoundError
from stagetune.core.imaging import check_complete, read_image_size
from stagetune.core.store.base import Store

log = logging.getLogger(__name__)
#: 2: reasons no longer start with the file name (identical copies share one entry, so the name is the
#: reporter's to add, not the cache's).
FORMAT = 2


def image_facts(data: bytes, name: str) -> dict[str, Any]:
    """`{"size": [W, H]}` (after EXIF rotation), or `{"bad": reason}`; reads headers, never pixels.

    The reason does not name the file: the facts are keyed by content, and an identical copy elsewhere
    must be reported under its own name.
    """
    try:
        if not data:
            raise InputError(f"{name}: empty file (0 bytes)", field=name)
        check_complete(data, name=name)
        return {"size": list(read_image_size(data, name=name))}
    except InputError as exc:
        return {"bad": str(exc).removeprefix(f"{name}: ")}


class ImageFacts:
    def __init__(self, store: Store, source_url: str) -> None:
        self.store = store
        self.key = f"manifests/facts/{xxhash.xxh3_64_hexdigest(source_url.encode())}.json"
        self._facts: dict[str, dict[str, Any]] = {}
        self._dirty = False

    def load(self) -> ImageFacts:
        try:
            data = json.loads(self.store.get_bytes(self.key))
            if data.get("format") == FORMAT:
                self._facts = data["facts"]
        except NotFoundError:
            pass
        except (ValueError, KeyError) as exc:  # unreadable: start over, it is only a cache
            log.warning("ignoring unreadable image facts %s: %s", self.key, exc)
        return self

    def get(self, content_hash: str) -> dict[str, Any] | None:
        return self._facts.get(content_hash)

    def put(self, content_hash: str, facts: dict[str, Any]) -> None:
        self._facts[content_hash] = facts
        self._dirty = True

    def save(self) -> None:
        if self._dirty:
            payload = {"format": FORMAT, "facts": self._facts}
            self.store.put_bytes(self.key, json.dumps(payload, sort_keys=True).encode())
            self._dirty = False
