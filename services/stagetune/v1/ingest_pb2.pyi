from stagetune.v1 import common_pb2 as _common_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class StartIngestRequest(_message.Message):
    __slots__ = ("request_id", "data_backend_config_json", "dataset_defaults_json", "base_dir", "train_batch_size", "gradient_accumulation_steps", "world_size", "seed", "allow_dataset_oversubscription")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    DATA_BACKEND_CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    DATASET_DEFAULTS_JSON_FIELD_NUMBER: _ClassVar[int]
    BASE_DIR_FIELD_NUMBER: _ClassVar[int]
    TRAIN_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    GRADIENT_ACCUMULATION_STEPS_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    ALLOW_DATASET_OVERSUBSCRIPTION_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    data_backend_config_json: str
    dataset_defaults_json: str
    base_dir: str
    train_batch_size: int
    gradient_accumulation_steps: int
    world_size: int
    seed: int
    allow_dataset_oversubscription: bool
    def __init__(self, request_id: _Optional[str] = ..., data_backend_config_json: _Optional[str] = ..., dataset_defaults_json: _Optional[str] = ..., base_dir: _Optional[str] = ..., train_batch_size: _Optional[int] = ..., gradient_accumulation_steps: _Optional[int] = ..., world_size: _Optional[int] = ..., seed: _Optional[int] = ..., allow_dataset_oversubscription: _Optional[bool] = ...) -> None: ...
