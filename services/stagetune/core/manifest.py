"""The manifest: ingest's content-addressed output, read by the VAE, text and trainer stages.

`manifests/<manifest_id>/samples.jsonl` holds one row per sample *before* repeats are expanded (the
trainer expands them, so a 1000-repeat dreambooth set stays a few rows), and
`manifests/<manifest_id>/report.json` what was left out and why. The report is written last: its
presence marks a complete manifest, so a crash between the two writes is simply redone.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import xxhash

from stagetune.core.errors import InputError, NotFoundError
from stagetune.core.imaging import PIXEL_PIPELINE
from stagetune.core.store.base import Store

MANIFEST_VERSION = 1
MANIFEST_PREFIX = "manifests"


def hash_bytes(data: bytes) -> str:
    return xxhash.xxh3_128_hexdigest(data)


def canonical_json(obj: Any) -> bytes:
    """One byte string per value, so hashes of options do not depend on dict order or spacing."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def sample_id_for(dataset_id: str, relative_path: str) -> str:
    return hash_bytes(f"{dataset_id}\0{relative_path}".encode())


def pixel_key_for(
    content_hash: str,
    downsample_size: Sequence[int] | None,
    intermediary_size: Sequence[int],
    crop_box: Sequence[int],
    target_size: Sequence[int],
) -> str:
    """Everything that decides the pixels the VAE sees; the VAE cache key adds its own fingerprint."""
    return hash_bytes(
        canonical_json(
            [
                PIXEL_PIPELINE,
                content_hash,
                list(downsample_size) if downsample_size is not None else None,
                list(intermediary_size),
                list(crop_box),
                list(target_size),
            ]
        )
    )


def samples_key(manifest_id: str) -> str:
    return f"{MANIFEST_PREFIX}/{manifest_id}/samples.jsonl"


def report_key(manifest_id: str) -> str:
    return f"{MANIFEST_PREFIX}/{manifest_id}/report.json"


@dataclass(frozen=True)
class ManifestRow:
    """One sample. Sizes are [W, H]; `crop_box` is [left, top, right, bottom] in intermediary pixels."""

    sample_id: str
    dataset_id: str
    path: str
    content_hash: str
    captions: list[str]
    original_size: list[int]
    downsample_size: list[int] | None
    intermediary_size: list[int]
    crop_box: list[int]
    target_size: list[int]
    bucket: str
    repeats: int
    is_regularisation_data: bool
    pixel_key: str
    #: Masked loss: the mask image paired with this one, {"dataset_id", "path", "content_hash"}; else None
    #: (and absent from the stored row, so unmasked manifests read as before).
    mask: dict[str, str] | None = None

    @property
    def entry_key(self) -> str:
        """What the VAE stage caches for this row: its pixels' latent, plus the loss mask when it has one. The
        latent itself (its posterior sample is seeded by `pixel_key`) is the same with or without a mask."""
        if not self.mask:
            return self.pixel_key
        return hash_bytes(canonical_json([self.pixel_key, "mask", self.mask["content_hash"]]))

    def to_dict(self) -> dict[str, Any]:
        # Fields are JSON values (str, int, bool, lists of them): a shallow copy is enough, and
        # dataclasses.asdict's deep recursion was a sixth of a cold ingest's time.
        out = {name: (list(v) if isinstance(v := getattr(self, name), list) else v)
               for name in self.__dataclass_fields__}
        if out["mask"] is None:
            del out["mask"]
        return out

    # Rows also read like the JSON objects they are stored as (`row["target_size"]`), so stages can treat
    # rows loaded here and rows parsed from samples.jsonl alike.
    def __getitem__(self, key: str) -> Any:
        if key not in self.__dataclass_fields__:
            raise KeyError(key)
        return getattr(self, key)

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key) if key in self.__dataclass_fields__ else default

    def keys(self) -> list[str]:
        return list(self.__dataclass_fields__)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ManifestRow:
        fields = cls.__dataclass_fields__
        missing = [name for name, f in fields.items()
                   if name not in data and f.default is dataclasses.MISSING]
        if missing:
            raise InputError(f"manifest row lacks {', '.join(missing)}", field=missing[0])
        return cls(**{name: data[name] for name in fields if name in data})


def encode_rows(rows: Iterable[ManifestRow]) -> bytes:
    return b"".join(canonical_json(row.to_dict()) + b"\n" for row in rows)


def decode_rows(data: bytes) -> list[ManifestRow]:
    return [
        ManifestRow.from_dict(json.loads(line)) for line in data.decode("utf-8").splitlines() if line.strip()
    ]


def load_manifest(store: Store, manifest_id: str) -> list[ManifestRow]:
    """Rows of a complete manifest (its report exists); `NotFoundError` from the store otherwise."""
    if not store.exists(report_key(manifest_id)):
        raise NotFoundError(
            f"manifest {manifest_id} not found (or incomplete) in {store.url}", field="manifest_id"
        )
    return decode_rows(store.get_bytes(samples_key(manifest_id)))


def load_report(store: Store, manifest_id: str) -> dict[str, Any]:
    return json.loads(store.get_bytes(report_key(manifest_id)))


def expand_repeats(rows: Iterable[ManifestRow]) -> list[ManifestRow]:
    """Each row `repeats + 1` times: what an epoch iterates over."""
    return [row for row in rows for _ in range(row.repeats + 1)]


__all__ = [
    "MANIFEST_VERSION",
    "ManifestRow",
    "canonical_json",
    "decode_rows",
    "encode_rows",
    "expand_repeats",
    "hash_bytes",
    "load_manifest",
    "load_report",
    "pixel_key_for",
    "report_key",
    "sample_id_for",
    "samples_key",
]
