from llm_mesh.v1 import inference_pb2 as _inference_pb2
from llm_mesh.v1 import membership_pb2 as _membership_pb2
from llm_mesh.v1 import worker_pb2 as _worker_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class WorkerState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    WORKER_STATE_UNSPECIFIED: _ClassVar[WorkerState]
    WORKER_STATE_READY: _ClassVar[WorkerState]
    WORKER_STATE_UNAVAILABLE: _ClassVar[WorkerState]
WORKER_STATE_UNSPECIFIED: WorkerState
WORKER_STATE_READY: WorkerState
WORKER_STATE_UNAVAILABLE: WorkerState

class ListWorkersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WorkerStatus(_message.Message):
    __slots__ = ("member", "state", "inflight", "load")
    MEMBER_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    INFLIGHT_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    member: _membership_pb2.Member
    state: WorkerState
    inflight: int
    load: _worker_pb2.WorkerLoad
    def __init__(self, member: _Optional[_Union[_membership_pb2.Member, _Mapping]] = ..., state: _Optional[_Union[WorkerState, str]] = ..., inflight: _Optional[int] = ..., load: _Optional[_Union[_worker_pb2.WorkerLoad, _Mapping]] = ...) -> None: ...

class ListWorkersResponse(_message.Message):
    __slots__ = ("workers",)
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    workers: _containers.RepeatedCompositeFieldContainer[WorkerStatus]
    def __init__(self, workers: _Optional[_Iterable[_Union[WorkerStatus, _Mapping]]] = ...) -> None: ...

class ExplainRequest(_message.Message):
    __slots__ = ("request",)
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    request: _inference_pb2.GenerateRequest
    def __init__(self, request: _Optional[_Union[_inference_pb2.GenerateRequest, _Mapping]] = ...) -> None: ...

class WorkerScore(_message.Message):
    __slots__ = ("worker_id", "score", "components", "filtered_reason")
    class ComponentsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    COMPONENTS_FIELD_NUMBER: _ClassVar[int]
    FILTERED_REASON_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    score: float
    components: _containers.ScalarMap[str, float]
    filtered_reason: str
    def __init__(self, worker_id: _Optional[str] = ..., score: _Optional[float] = ..., components: _Optional[_Mapping[str, float]] = ..., filtered_reason: _Optional[str] = ...) -> None: ...

class ExplainResponse(_message.Message):
    __slots__ = ("chosen_worker_id", "scores", "prompt_tokens", "policy", "disaggregation", "prefill_scores")
    CHOSEN_WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    DISAGGREGATION_FIELD_NUMBER: _ClassVar[int]
    PREFILL_SCORES_FIELD_NUMBER: _ClassVar[int]
    chosen_worker_id: str
    scores: _containers.RepeatedCompositeFieldContainer[WorkerScore]
    prompt_tokens: int
    policy: str
    disaggregation: DisaggregationDecision
    prefill_scores: _containers.RepeatedCompositeFieldContainer[WorkerScore]
    def __init__(self, chosen_worker_id: _Optional[str] = ..., scores: _Optional[_Iterable[_Union[WorkerScore, _Mapping]]] = ..., prompt_tokens: _Optional[int] = ..., policy: _Optional[str] = ..., disaggregation: _Optional[_Union[DisaggregationDecision, _Mapping]] = ..., prefill_scores: _Optional[_Iterable[_Union[WorkerScore, _Mapping]]] = ...) -> None: ...

class DisaggregationDecision(_message.Message):
    __slots__ = ("remote", "prefill_worker_id", "rule", "reason", "uncached_tokens")
    REMOTE_FIELD_NUMBER: _ClassVar[int]
    PREFILL_WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    RULE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    UNCACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    remote: bool
    prefill_worker_id: str
    rule: str
    reason: str
    uncached_tokens: int
    def __init__(self, remote: _Optional[bool] = ..., prefill_worker_id: _Optional[str] = ..., rule: _Optional[str] = ..., reason: _Optional[str] = ..., uncached_tokens: _Optional[int] = ...) -> None: ...
