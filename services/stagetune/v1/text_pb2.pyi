from google.protobuf import struct_pb2 as _struct_pb2
from stagetune.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class StartEncodeTextRequest(_message.Message):
    __slots__ = ("request_id", "manifest_id", "extra_captions", "model", "family_options", "batch_size", "write_batch_size", "keys_only")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_ID_FIELD_NUMBER: _ClassVar[int]
    EXTRA_CAPTIONS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    FAMILY_OPTIONS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    WRITE_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    KEYS_ONLY_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    manifest_id: str
    extra_captions: _containers.RepeatedScalarFieldContainer[str]
    model: _common_pb2.ModelRef
    family_options: _struct_pb2.Struct
    batch_size: int
    write_batch_size: int
    keys_only: bool
    def __init__(self, request_id: _Optional[str] = ..., manifest_id: _Optional[str] = ..., extra_captions: _Optional[_Iterable[str]] = ..., model: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., family_options: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., batch_size: _Optional[int] = ..., write_batch_size: _Optional[int] = ..., keys_only: _Optional[bool] = ...) -> None: ...
