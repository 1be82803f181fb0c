from stagetune.v1 import common_pb2 as _common_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class StartTrainingRequest(_message.Message):
    __slots__ = ("request_id", "config_json", "base_dir", "manifest_id", "latent_cache", "text_cache", "latent_keys", "text_keys", "validation_endpoint", "data_backend_config_json", "run_lock_owner")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    BASE_DIR_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_ID_FIELD_NUMBER: _ClassVar[int]
    LATENT_CACHE_FIELD_NUMBER: _ClassVar[int]
    TEXT_CACHE_FIELD_NUMBER: _ClassVar[int]
    LATENT_KEYS_FIELD_NUMBER: _ClassVar[int]
    TEXT_KEYS_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    DATA_BACKEND_CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    RUN_LOCK_OWNER_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    config_json: str
    base_dir: str
    manifest_id: str
    latent_cache: str
    text_cache: str
    latent_keys: str
    text_keys: str
    validation_endpoint: str
    data_backend_config_json: str
    run_lock_owner: str
    def __init__(self, request_id: _Optional[str] = ..., config_json: _Optional[str] = ..., base_dir: _Optional[str] = ..., manifest_id: _Optional[str] = ..., latent_cache: _Optional[str] = ..., text_cache: _Optional[str] = ..., latent_keys: _Optional[str] = ..., text_keys: _Optional[str] = ..., validation_endpoint: _Optional[str] = ..., data_backend_config_json: _Optional[str] = ..., run_lock_owner: _Optional[str] = ...) -> None: ...
