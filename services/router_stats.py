"""What one scheduler replica saw of its own requests: counters and recent errors for the admin
API's GetStats, and the per-window load the scaling planner reads (services/planner_loop.py).

Bounded: the errors and routing latencies are ring buffers, the window's lists are drained
every planner window.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import math
import time
from collections.abc import Iterator, Sequence

from llm_mesh.v1 import scheduler_pb2
from services.grpc_util import RpcError

MAX_ERRORS = 50
MAX_ERROR_FIELD_CHARS = 512  # per recorded string: a huge request must not make GetStats huge
ROUTING_WINDOW_S = 60.0
MAX_ROUTING_SAMPLES = 10_000


@dataclasses.dataclass(frozen=True)
class RecordedError:
    time_s: float  # Unix time
    code: str  # gRPC status code name
    worker_id: str
    message: str
    request_id: str
    model: str


@dataclasses.dataclass
class WindowLoad:
    """One planner window of this replica's requests."""

    started_s: float  # monotonic
    arrivals: int = 0
    prompt_tokens: int = 0
    uncached_tokens: int = 0
    finished: int = 0
    output_tokens: int = 0
    ttfts: list[float] = dataclasses.field(default_factory=list)
    itls: list[float] = dataclasses.field(default_factory=list)  # per finished request: mean gap


class RequestRecord:
    """One request's bookkeeping (RouterStats.recording); `close()` counts its outcome."""

    def __init__(self, stats: RouterStats) -> None:
        self.stats = stats
        self.request_id = ""
        self.model = ""
        self.worker_id = ""
        self.error: tuple[str, str] | None = None  # (code name, message)
        self.done = False

    def routed(self, request_id: str, model: str, worker_id: str, rule: str, prompt_tokens: int,
               uncached_tokens: int, decision_s: float) -> None:
        self.request_id, self.model, self.worker_id = request_id, model, worker_id
        self.stats.routed(rule, prompt_tokens, uncached_tokens, decision_s)

    def first_token(self, ttft_s: float) -> None:
        self.stats.window.ttfts.append(ttft_s)

    def finished(self, prompt_tokens: int, cached_tokens: int, output_tokens: int, decode_s: float) -> None:
        self.done = True
        self.stats.finished(prompt_tokens, cached_tokens, output_tokens,
                            decode_s / (output_tokens - 1) if output_tokens > 1 else None)

    def failed(self, code: str, message: str) -> None:
        self.error = (code, message)

    def close(self) -> None:
        if self.error is not None:
            self.stats.failed(self, *self.error)
        else:
            self.stats.count("ok" if self.done else "cancelled")


class RouterStats:
    def __init__(self) -> None:
        self.scheduler_id = ""  # set once registered
        self.started_s = time.time()
        self.outcomes: collections.Counter[str] = collections.Counter()
        self.pd_rules: collections.Counter[str] = collections.Counter()
        self.prompt_tokens = 0
        self.cached_tokens = 0
        self.errors: collections.deque[RecordedError] = collections.deque(maxlen=MAX_ERRORS)
        self._routing: collections.deque[tuple[float, float]] = collections.deque(maxlen=MAX_ROUTING_SAMPLES)
        self.window = WindowLoad(time.monotonic())

    @contextlib.contextmanager
    def recording(self, model: str = "") -> Iterator[RequestRecord]:
        """Around one request: an RpcError (what the client gets) or a crash is recorded as its
        outcome and re-raised; leaving early (the client went away) counts as cancelled."""
        record = RequestRecord(self)
        record.model = model  # as requested: known even when validation fails
        try:
            yield record
        except RpcError as error:
            record.failed(error.code.name, error.message)
            raise
        except Exception as exc:
            record.failed("INTERNAL", f"{type(exc).__name__}: {exc}")
            raise
        finally:
            record.close()

    def count(self, outcome: str) -> None:
        self.outcomes[outcome] += 1

    def routed(self, rule: str, prompt_tokens: int, uncached_tokens: int, decision_s: float) -> None:
        self.pd_rules[rule] += 1
        self._routing.append((time.monotonic(), decision_s))
        w = self.window
        w.arrivals += 1
        w.prompt_tokens += prompt_tokens
        w.uncached_tokens += uncached_tokens

    def finished(self, prompt_tokens: int, cached_tokens: int, output_tokens: int, itl_s: float | None) -> None:
        self.prompt_tokens += prompt_tokens
        self.cached_tokens += cached_tokens
        w = self.window
        w.finished += 1
        w.output_tokens += output_tokens
        if itl_s is not None:
            w.itls.append(itl_s)

    def failed(self, record: RequestRecord, code: str, message: str) -> None:
        self.count(code)
        cut = MAX_ERROR_FIELD_CHARS
        self.errors.append(RecordedError(time.time(), code, record.worker_id, message[:cut], record.request_id[:cut],
                                         record.model[:cut]))

    def routing_latency(self, window_s: float = ROUTING_WINDOW_S) -> tuple[float, float, int]:
        """(p50, p99, count) of the decision times of the last `window_s` seconds."""
        since = time.monotonic() - window_s
        recent = [s for t, s in self._routing if t >= since]
        if not recent:
            return 0.0, 0.0, 0
        return percentile(recent, 50), percentile(recent, 99), len(recent)

    def to_proto(self, policy: str) -> scheduler_pb2.SchedulerStats:
        p50, p99, count = self.routing_latency()
        return scheduler_pb2.SchedulerStats(
            scheduler_id=self.scheduler_id, policy=policy, uptime_s=time.time() - self.started_s,
            requests_by_outcome=dict(self.outcomes), pd_decisions_by_rule=dict(self.pd_rules),
            routing_decision_p50_s=p50, routing_decision_p99_s=p99, routing_decisions_in_window=count,
            routing_window_s=ROUTING_WINDOW_S, prompt_tokens=self.prompt_tokens,
            cached_prompt_tokens=self.cached_tokens,
            prefix_hit_ratio=self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0,
            recent_errors=[scheduler_pb2.RequestError(
                time_unix_ms=int(e.time_s * 1000), code=e.code, worker_id=e.worker_id, message=e.message,
                request_id=e.request_id, model=e.model) for e in self.errors])

    def take_window(self) -> WindowLoad:
        """The window so far; a new one starts."""
        window, self.window = self.window, WindowLoad(time.monotonic())
        return window


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (as services/bench/des.py), NaN when empty."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]
