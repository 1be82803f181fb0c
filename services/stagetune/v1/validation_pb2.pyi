from google.protobuf import struct_pb2 as _struct_pb2
from stagetune.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ValidationPrompt(_message.Message):
    __slots__ = ("name", "prompt")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    name: str
    prompt: str
    def __init__(self, name: _Optional[str] = ..., prompt: _Optional[str] = ...) -> None: ...

class Resolution(_message.Message):
    __slots__ = ("width", "height")
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    width: int
    height: int
    def __init__(self, width: _Optional[int] = ..., height: _Optional[int] = ...) -> None: ...

class SamplingOptions(_message.Message):
    __slots__ = ("guidance_scale", "num_inference_steps", "seed", "negative_prompt", "resolutions", "family_options", "preview_steps")
    GUIDANCE_SCALE_FIELD_NUMBER: _ClassVar[int]
    NUM_INFERENCE_STEPS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_PROMPT_FIELD_NUMBER: _ClassVar[int]
    RESOLUTIONS_FIELD_NUMBER: _ClassVar[int]
    FAMILY_OPTIONS_FIELD_NUMBER: _ClassVar[int]
    PREVIEW_STEPS_FIELD_NUMBER: _ClassVar[int]
    guidance_scale: float
    num_inference_steps: int
    seed: int
    negative_prompt: str
    resolutions: _containers.RepeatedCompositeFieldContainer[Resolution]
    family_options: _struct_pb2.Struct
    preview_steps: int
    def __init__(self, guidance_scale: _Optional[float] = ..., num_inference_steps: _Optional[int] = ..., seed: _Optional[int] = ..., negative_prompt: _Optional[str] = ..., resolutions: _Optional[_Iterable[_Union[Resolution, _Mapping]]] = ..., family_options: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., preview_steps: _Optional[int] = ...) -> None: ...

class StartValidationRequest(_message.Message):
    __slots__ = ("request_id", "model", "adapter_key", "step", "prompts", "sampling", "output_prefix")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_KEY_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    PROMPTS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_PREFIX_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: _common_pb2.ModelRef
    adapter_key: str
    step: int
    prompts: _containers.RepeatedCompositeFieldContainer[ValidationPrompt]
    sampling: SamplingOptions
    output_prefix: str
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., adapter_key: _Optional[str] = ..., step: _Optional[int] = ..., prompts: _Optional[_Iterable[_Union[ValidationPrompt, _Mapping]]] = ..., sampling: _Optional[_Union[SamplingOptions, _Mapping]] = ..., output_prefix: _Optional[str] = ...) -> None: ...
