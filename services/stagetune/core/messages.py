"""Family options as `google.protobuf.Struct` and back: the API carries them without knowing any family."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from google.protobuf import json_format, struct_pb2


def to_struct(values: Mapping[str, Any]) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    out.update({key: _plain(value) for key, value in values.items()})
    return out


def from_struct(message: struct_pb2.Struct) -> dict[str, Any]:
    """Numbers come back as floats (JSON's one number type): families convert what must be whole."""
    return json_format.MessageToDict(message)


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value
