"""Masked loss at ingest: each image of a dataset with a `conditioning_type: mask` dataset gets its mask, found
under the same relative path in the mask dataset (SimpleTuner's pairing), hashed, and checked to be the
image's size (the mask takes the image's crop, so any other size would mask the wrong pixels).

The mask's content hash goes into the row's pixel key, so a changed mask is a new latent cache entry (the
VAE stage caches the loss mask beside the latent), and into the manifest id.
"""

from __future__ import annotations

from typing import Any

from stagetune.core.config.dataset import DatasetConfig
from stagetune.core.errors import InputError
from stagetune.core.sources import source_for
from stagetune.core.store.base import Store
from stagetune.ingest.facts import ImageFacts, image_facts
from stagetune.ingest.hashcache import HashCache, hash_files


class MaskIndex:
    """One mask dataset's files, hashed (through the hash cache: an unchanged mask is not read again)."""

    def __init__(self, dataset: DatasetConfig, store: Store) -> None:
        self.dataset = dataset
        self.source = source_for(dataset)
        try:
            files = self.source.list_files()
        except InputError as exc:
            raise InputError(f"mask dataset {dataset.id!r}: {exc}", field="instance_data_dir") from None
        self.files = {f.relative: f for f in files}
        cache = HashCache(store, self.source.url).load()
        cache.retain(self.files)
        self.hashes = hash_files(self.source, files, cache, max_workers=self.source.read_workers, keep_bytes=False)
        self.facts = ImageFacts(store, self.source.url).load()

    def listing(self) -> list[list[Any]]:
        """What the manifest id covers of the masks: path, size and content hash of each."""
        return [[relative, self.files[relative].size, self.hashes[relative].digest] for relative in sorted(self.files)]

    def mask_for(self, relative: str, image_size: tuple[int, int]) -> tuple[dict[str, str] | None, str | None]:
        """`(mask, None)` for the image at `relative`, or `(None, reason)` why it cannot be trained masked."""
        where = f"mask dataset {self.dataset.id!r}"
        found = self.files.get(relative)
        if found is None:
            return None, (f"no mask {relative} in {where} ({self.source.url}): every image needs one, an all-white "
                          "mask trains on the whole image")
        hashed = self.hashes[relative]
        if hashed.digest is None:
            return None, f"mask {found.path} cannot be read: {hashed.error}"
        facts = self.facts.get(hashed.digest)
        if facts is None:
            facts = image_facts(self.source.read(found.path), found.path)
            self.facts.put(hashed.digest, facts)
        if "bad" in facts:
            return None, f"mask {found.path} is not a usable image: {facts['bad']}"
        size = (int(facts["size"][0]), int(facts["size"][1]))
        if size != image_size:
            return None, (f"mask {found.path} is {size[0]}x{size[1]} but its image is {image_size[0]}x{image_size[1]}: "
                          "a mask must have its image's size")
        return {"dataset_id": self.dataset.id, "path": found.path, "content_hash": hashed.digest}, None

    def save(self) -> None:
        self.facts.save()
