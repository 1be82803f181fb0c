from stagetune.v1 import common_pb2 as _common_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class StartEncodeLatentsRequest(_message.Message):
    __slots__ = ("request_id", "manifest_id", "model", "vae_batch_size", "write_batch_size", "data_backend_config_json", "base_dir", "keys_only")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VAE_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    WRITE_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    DATA_BACKEND_CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    BASE_DIR_FIELD_NUMBER: _ClassVar[int]
    KEYS_ONLY_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    manifest_id: str
    model: _common_pb2.ModelRef
    vae_batch_size: int
    write_batch_size: int
    data_backend_config_json: str
    base_dir: str
    keys_only: bool
    def __init__(self, request_id: _Optional[str] = ..., manifest_id: _Optional[str] = ..., model: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., vae_batch_size: _Optional[int] = ..., write_batch_size: _Optional[int] = ..., data_backend_config_json: _Optional[str] = ..., base_dir: _Optional[str] = ..., keys_only: _Optional[bool] = ...) -> None: ...
