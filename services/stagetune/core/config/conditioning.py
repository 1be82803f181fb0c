"""SimpleTuner's conditioning datasets, as far as stagetune trains with them: `conditioning_type: mask`
datasets that mask an image dataset's loss (DREAMBOOTH.md, "Masked loss").

An image dataset names its mask dataset with `conditioning_data`; the mask dataset (`dataset_type:
conditioning`, `conditioning_type: mask`) holds one mask per image under the same relative path. The pairing
is checked here, with the config, so a typo in an id is said before any file is read.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from stagetune.core.errors import Collector, ConfigError, NotSupportedError

CONDITIONING_TYPES = ("mask",)
#: SimpleTuner's other conditioning types (ControlNet, references, segmentation…): not trained here yet.
CONDITIONING_TYPES_LATER = ("segmentation", "controlnet", "reference_strict", "reference_loose", "depth",
                            "canny")


def conditioning_fields(data: Mapping[str, Any], dataset_id: str, dataset_type: str) -> dict[str, Any]:
    """`conditioning_data` (image datasets) and `conditioning_type` (conditioning datasets), typed."""
    where = f"dataset {dataset_id!r}"
    raw_pairs = data.get("conditioning_data")
    if raw_pairs in (None, "", []):
        pairs: tuple[str, ...] = ()
    elif isinstance(raw_pairs, str):
        pairs = (raw_pairs,)
    elif isinstance(raw_pairs, list) and all(isinstance(p, str) for p in raw_pairs):
        pairs = tuple(raw_pairs)
    else:
        raise ConfigError(f"{where}: conditioning_data must be a dataset id or a list of them",
                          field="conditioning_data")
    kind = data.get("conditioning_type")
    if dataset_type != "conditioning":
        if kind not in (None, ""):
            raise ConfigError(f"{where}: conditioning_type belongs on a dataset_type: conditioning entry",
                              field="conditioning_type")
        return {"conditioning_data": pairs}
    if kind in CONDITIONING_TYPES:
        return {"conditioning_type": kind}
    if kind in CONDITIONING_TYPES_LATER:
        raise NotSupportedError(f"not supported yet: {where}: conditioning_type={kind} (stagetune trains with "
                                "mask datasets: masked loss)", field="conditioning_type")
    raise ConfigError(f"{where}: a dataset_type: conditioning entry needs conditioning_type: mask "
                      f"(got {kind!r})", field="conditioning_type")


def check_pairs(datasets: Iterable[Any], problems: Collector) -> None:
    """Every `conditioning_data` names a mask dataset, and each mask dataset is used by an image dataset."""
    by_id = {d.id: d for d in datasets}
    used: set[str] = set()
    for dataset in by_id.values():
        for paired in dataset.conditioning_data:
            used.add(paired)
            target = by_id.get(paired)
            where = f"dataset {dataset.id!r}: conditioning_data {paired!r}"
            if target is None:
                problems.add(ConfigError(f"{where} is not a dataset id of this config (ids: "
                                         f"{', '.join(sorted(by_id))})", field="conditioning_data"))
            elif target.dataset_type != "conditioning":
                problems.add(ConfigError(f"{where} is an image dataset; it must be a dataset_type: conditioning "
                                         "entry with conditioning_type: mask", field="conditioning_data"))
        masks = [by_id[p] for p in dataset.conditioning_data if p in by_id and by_id[p].conditioning_type]
        if len(masks) > 1:
            problems.add(ConfigError(f"dataset {dataset.id!r}: conditioning_data names {len(masks)} mask "
                                     "datasets; one masks the loss", field="conditioning_data"))
    for dataset in by_id.values():
        if dataset.dataset_type == "conditioning" and not dataset.disabled and dataset.id not in used:
            problems.add(ConfigError(f"dataset {dataset.id!r} (conditioning_type {dataset.conditioning_type}) is not "
                                     "named by any image dataset's conditioning_data", field="conditioning_data"))
