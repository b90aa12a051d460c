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
    __slots__ = ("worker_id", "score", "components", "filtered_reason", "prefix_blocks")
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
    PREFIX_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    score: float
    components: _containers.ScalarMap[str, float]
    filtered_reason: str
    prefix_blocks: PrefixBlocks
    def __init__(self, worker_id: _Optional[str] = ..., score: _Optional[float] = ..., components: _Optional[_Mapping[str, float]] = ..., filtered_reason: _Optional[str] = ..., prefix_blocks: _Optional[_Union[PrefixBlocks, _Mapping]] = ...) -> None: ...

class PrefixBlocks(_message.Message):
    __slots__ = ("engine", "host", "disk", "store")
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    DISK_FIELD_NUMBER: _ClassVar[int]
    STORE_FIELD_NUMBER: _ClassVar[int]
    engine: int
    host: int
    disk: int
    store: int
    def __init__(self, engine: _Optional[int] = ..., host: _Optional[int] = ..., disk: _Optional[int] = ..., store: _Optional[int] = ...) -> None: ...

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

class GetScalingPlanRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ScalingPlan(_message.Message):
    __slots__ = ("computed_at_unix_ms", "window_s", "disaggregated", "roles", "ttft_p90_slo_s", "itl_p90_slo_s", "load")
    COMPUTED_AT_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    WINDOW_S_FIELD_NUMBER: _ClassVar[int]
    DISAGGREGATED_FIELD_NUMBER: _ClassVar[int]
    ROLES_FIELD_NUMBER: _ClassVar[int]
    TTFT_P90_SLO_S_FIELD_NUMBER: _ClassVar[int]
    ITL_P90_SLO_S_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    computed_at_unix_ms: int
    window_s: float
    disaggregated: bool
    roles: _containers.RepeatedCompositeFieldContainer[RoleScaling]
    ttft_p90_slo_s: float
    itl_p90_slo_s: float
    load: PlannerLoad
    def __init__(self, computed_at_unix_ms: _Optional[int] = ..., window_s: _Optional[float] = ..., disaggregated: _Optional[bool] = ..., roles: _Optional[_Iterable[_Union[RoleScaling, _Mapping]]] = ..., ttft_p90_slo_s: _Optional[float] = ..., itl_p90_slo_s: _Optional[float] = ..., load: _Optional[_Union[PlannerLoad, _Mapping]] = ...) -> None: ...

class RoleScaling(_message.Message):
    __slots__ = ("role", "observed_replicas", "desired_replicas", "required_replicas", "min_replicas", "max_replicas", "reason")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    OBSERVED_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    DESIRED_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    REQUIRED_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    MIN_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    MAX_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    role: str
    observed_replicas: int
    desired_replicas: int
    required_replicas: float
    min_replicas: int
    max_replicas: int
    reason: str
    def __init__(self, role: _Optional[str] = ..., observed_replicas: _Optional[int] = ..., desired_replicas: _Optional[int] = ..., required_replicas: _Optional[float] = ..., min_replicas: _Optional[int] = ..., max_replicas: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class PlannerLoad(_message.Message):
    __slots__ = ("arrival_rate", "prompt_tokens_mean", "uncached_prompt_tokens_mean", "output_tokens_mean", "ttft_p90_s", "itl_p90_s", "prefill_queue", "decode_running", "kv_utilization", "predicted_prefill_tokens_per_s", "predicted_decode_tokens_per_s")
    ARRIVAL_RATE_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_MEAN_FIELD_NUMBER: _ClassVar[int]
    UNCACHED_PROMPT_TOKENS_MEAN_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKENS_MEAN_FIELD_NUMBER: _ClassVar[int]
    TTFT_P90_S_FIELD_NUMBER: _ClassVar[int]
    ITL_P90_S_FIELD_NUMBER: _ClassVar[int]
    PREFILL_QUEUE_FIELD_NUMBER: _ClassVar[int]
    DECODE_RUNNING_FIELD_NUMBER: _ClassVar[int]
    KV_UTILIZATION_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_PREFILL_TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_DECODE_TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    arrival_rate: float
    prompt_tokens_mean: float
    uncached_prompt_tokens_mean: float
    output_tokens_mean: float
    ttft_p90_s: float
    itl_p90_s: float
    prefill_queue: int
    decode_running: int
    kv_utilization: float
    predicted_prefill_tokens_per_s: float
    predicted_decode_tokens_per_s: float
    def __init__(self, arrival_rate: _Optional[float] = ..., prompt_tokens_mean: _Optional[float] = ..., uncached_prompt_tokens_mean: _Optional[float] = ..., output_tokens_mean: _Optional[float] = ..., ttft_p90_s: _Optional[float] = ..., itl_p90_s: _Optional[float] = ..., prefill_queue: _Optional[int] = ..., decode_running: _Optional[int] = ..., kv_utilization: _Optional[float] = ..., predicted_prefill_tokens_per_s: _Optional[float] = ..., predicted_decode_tokens_per_s: _Optional[float] = ...) -> None: ...

class GetStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SchedulerStats(_message.Message):
    __slots__ = ("scheduler_id", "policy", "uptime_s", "requests_by_outcome", "pd_decisions_by_rule", "routing_decision_p50_s", "routing_decision_p99_s", "routing_decisions_in_window", "routing_window_s", "prompt_tokens", "cached_prompt_tokens", "prefix_hit_ratio", "recent_errors")
    class RequestsByOutcomeEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class PdDecisionsByRuleEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    SCHEDULER_ID_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    UPTIME_S_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_BY_OUTCOME_FIELD_NUMBER: _ClassVar[int]
    PD_DECISIONS_BY_RULE_FIELD_NUMBER: _ClassVar[int]
    ROUTING_DECISION_P50_S_FIELD_NUMBER: _ClassVar[int]
    ROUTING_DECISION_P99_S_FIELD_NUMBER: _ClassVar[int]
    ROUTING_DECISIONS_IN_WINDOW_FIELD_NUMBER: _ClassVar[int]
    ROUTING_WINDOW_S_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHED_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_HIT_RATIO_FIELD_NUMBER: _ClassVar[int]
    RECENT_ERRORS_FIELD_NUMBER: _ClassVar[int]
    scheduler_id: str
    policy: str
    uptime_s: float
    requests_by_outcome: _containers.ScalarMap[str, int]
    pd_decisions_by_rule: _containers.ScalarMap[str, int]
    routing_decision_p50_s: float
    routing_decision_p99_s: float
    routing_decisions_in_window: int
    routing_window_s: float
    prompt_tokens: int
    cached_prompt_tokens: int
    prefix_hit_ratio: float
    recent_errors: _containers.RepeatedCompositeFieldContainer[RequestError]
    def __init__(self, scheduler_id: _Optional[str] = ..., policy: _Optional[str] = ..., uptime_s: _Optional[float] = ..., requests_by_outcome: _Optional[_Mapping[str, int]] = ..., pd_decisions_by_rule: _Optional[_Mapping[str, int]] = ..., routing_decision_p50_s: _Optional[float] = ..., routing_decision_p99_s: _Optional[float] = ..., routing_decisions_in_window: _Optional[int] = ..., routing_window_s: _Optional[float] = ..., prompt_tokens: _Optional[int] = ..., cached_prompt_tokens: _Optional[int] = ..., prefix_hit_ratio: _Optional[float] = ..., recent_errors: _Optional[_Iterable[_Union[RequestError, _Mapping]]] = ...) -> None: ...

class RequestError(_message.Message):
    __slots__ = ("time_unix_ms", "code", "worker_id", "message", "request_id", "model")
    TIME_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    time_unix_ms: int
    code: str
    worker_id: str
    message: str
    request_id: str
    model: str
    def __init__(self, time_unix_ms: _Optional[int] = ..., code: _Optional[str] = ..., worker_id: _Optional[str] = ..., message: _Optional[str] = ..., request_id: _Optional[str] = ..., model: _Optional[str] = ...) -> None: ...
