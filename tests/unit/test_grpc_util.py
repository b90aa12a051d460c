"""services.grpc_util pieces that need no server: InputGuard's wrapped-handler cache and
settle_heap (a real server with malformed messages: tests/integration/test_fuzz.py)."""

from __future__ import annotations

import asyncio
import gc

import grpc

from llm_mesh.v1 import inference_pb2
from services.grpc_util import InputGuard, _Undecodable, settle_heap


def _handler() -> grpc.RpcMethodHandler:
    async def behavior(request, context):  # noqa: ANN001, ANN202
        return request
    return grpc.unary_unary_rpc_method_handler(behavior, request_deserializer=inference_pb2.GenerateRequest.FromString)


def _intercept(guard: InputGuard, method: str, handler: object) -> object:
    async def continuation(details):  # noqa: ANN001, ANN202
        return handler
    details = type("Details", (), {"method": method})()  # (grpc's HandlerCallDetails is abstract)
    return asyncio.run(guard.intercept_service(continuation, details))


def test_a_methods_handler_is_guarded_once_and_a_new_handler_anew() -> None:
    guard, first, second = InputGuard(), _handler(), _handler()
    a = _intercept(guard, "/s/M", first)
    assert _intercept(guard, "/s/M", first) is a  # the same registered handler: the same guard
    b = _intercept(guard, "/s/M", second)  # e.g. another interceptor's handler per call
    assert b is not a
    assert isinstance(b.request_deserializer(b"\xff"), _Undecodable)  # still guarded
    ok = inference_pb2.GenerateRequest(model="m")
    assert b.request_deserializer(ok.SerializeToString()) == ok
    assert _intercept(guard, "/s/Unknown", None) is None
    assert "/s/Unknown" not in guard._guarded  # methods without a handler are not kept


def test_settle_heap_freezes_startup_and_raises_the_young_threshold() -> None:
    before = gc.get_threshold()
    try:
        settle_heap(12_345)
        assert gc.get_threshold() == (12_345, before[1], before[2])
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
