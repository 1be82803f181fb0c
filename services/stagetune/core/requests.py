"""Checks a service's Start runs on its request before a job exists (JobServicer's `validate`).

A malformed or impossible request must come back at once as INVALID_ARGUMENT / NOT_FOUND /
FAILED_PRECONDITION naming the offending field, not as a job that fails a minute later. Each helper
adds what it finds to a `Collector`, so one reply names every bad field.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from stagetune.core import checks
from stagetune.core.errors import Collector, InputError, NotFoundError, NotSupportedError
from stagetune.core.store.base import Store


def non_negative(problems: Collector, request: Any, *fields: str, prefix: str = "") -> None:
    """Counts where 0 means "the default" and a negative number is a mistake."""
    for name in fields:
        value = getattr(request, name)
        if value < 0:
            problems.add(InputError(f"{prefix}{name} must be ≥ 0 (0: the default), got {value}",
                                    field=prefix + name))


def finite(problems: Collector, owner: Any, *fields: str, prefix: str = "") -> None:
    for name in fields:
        value = getattr(owner, name)
        if not math.isfinite(value):
            problems.add(InputError(f"{prefix}{name} must be a finite number, got {value}", field=prefix + name))


def model_ref(problems: Collector, model: Any, *, field: str = "model") -> None:
    """A ModelRef names a known family and a model that exists (a diffusers folder or a hub id)."""
    from stagetune.models.family import family_names

    family = model.family or "sd3"
    if family not in family_names():
        problems.add(NotSupportedError(f"{field}.family: not supported yet: {family!r} (supported: "
                                       f"{', '.join(family_names())})", field=f"{field}.family"))
    if model.dtype and model.dtype not in ("float32", "bfloat16", "float16", "fp32", "bf16", "fp16"):
        problems.add(InputError(f"{field}.dtype must be float32, bfloat16 or float16, got {model.dtype!r}",
                                field=f"{field}.dtype"))
    with problems.check():
        checks.check_model_source(model.name_or_path, revision=model.revision or None,
                                  field=f"{field}.name_or_path")
    if family in family_names():
        _quantisation(problems, family, model.quantisation, f"{field}.quantisation")


def _quantisation(problems: Collector, family: str, quantisation: Mapping[str, str], field: str) -> None:
    """Each entry names one of the family's text encoders and a precision this machine can run."""
    from stagetune.models.family import get_family
    from stagetune.models.quantise import check_precision

    components = get_family(family).text_encoder_components
    for name, precision in sorted(quantisation.items()):
        if name not in components:
            problems.add(InputError(f"{field}: {family} has no {name!r} (it has {', '.join(components)})",
                                    field=f"{field}.{name}"))
            continue
        with problems.check():
            check_precision(precision, f"{field}.{name}")


def family_options(problems: Collector, family: str, options: Mapping[str, Any], *,
                   field: str = "family_options") -> None:
    """The family's options as its config keys, checked by the family itself (SimpleTuner's rules)."""
    from stagetune.models.family import get_family

    try:
        owner = get_family(family or "sd3")
    except NotSupportedError:
        return  # model_ref reports the family
    unknown = sorted(set(options) - owner.option_keys)
    if unknown:
        problems.add(InputError(f"{field}: {', '.join(unknown)} are not options of model family {owner.name}",
                                field=f"{field}.{unknown[0]}"))
    known = {k: v for k, v in options.items() if k in owner.option_keys}
    owner.parse_options(known, context={}, problems=problems, warnings=[])


def manifest(problems: Collector, store: Store, manifest_id: str, *, required: bool = True) -> None:
    from stagetune.core.manifest import report_key

    if not manifest_id:
        if required:
            problems.add(InputError("manifest_id is empty: give the manifest_id an ingest job returned",
                                    field="manifest_id"))
        return
    if "/" in manifest_id or not manifest_id.isprintable():
        problems.add(InputError(f"manifest_id {manifest_id[:60]!r} is not a manifest id", field="manifest_id"))
        return
    with problems.check():
        if not store.exists(report_key(manifest_id)):
            problems.add(NotFoundError(f"manifest {manifest_id} not found (or incomplete) in {store.url}: "
                                       "run ingest first", field="manifest_id"))


def store_objects(problems: Collector, store: Store, keys: Iterable[tuple[str, str]]) -> None:
    """Each (field, key) names an object that exists in the store."""
    for field, key in keys:
        if not key:
            problems.add(InputError(f"{field} is empty", field=field))
            continue
        with problems.check():
            if not store.exists(key):
                problems.add(NotFoundError(f"{field}: no object {key!r} in {store.url}", field=field))


def json_list(problems: Collector, text: str, field: str) -> list[Any] | None:
    if not text:
        problems.add(InputError(f"{field} is empty", field=field))
        return None
    return _json(problems, text, field, list)


def json_object(problems: Collector, text: str, field: str) -> dict[str, Any] | None:
    return _json(problems, text, field, dict) if text else {}


def _json(problems: Collector, text: str, field: str, kind: type) -> Any:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        problems.add(InputError(f"{field} is not valid JSON: {exc}", field=field))
        return None
    if not isinstance(value, kind):
        wanted = "a JSON list" if kind is list else "a JSON object"
        problems.add(InputError(f"{field} must be {wanted}, got {type(value).__name__}", field=field))
        return None
    return value


def base_dir(problems: Collector, text: str) -> Path | None:
    if not text:
        return None
    path = Path(text)
    if not path.is_absolute():
        problems.add(InputError(f"base_dir must be an absolute path, got {text!r}", field="base_dir"))
        return None
    return path
