"""Worker.GenerateStream against a real worker process (sim engine) over real gRPC, through the
scheduler's half (services/worker_stream.WorkerStream): each request on the stream behaves as
its own Generate call would — tokens, errors with their details, cancel, deadline — and the
stream's end (kill -9, drain) is handled; a worker without GenerateStream gets plain calls."""

from __future__ import annotations

import asyncio
import signal
import time

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from llm_mesh.v1 import sampling_pb2, worker_pb2, worker_pb2_grpc
from services.procs import Child, free_port, grpc_serving
from services.worker_stream import WorkerStream
from tests.conftest import SIM_ARGS
from tests.waiting import until

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(90)]


@pytest.fixture
def worker(etcd, tmp_path):
    port = free_port()
    child = Child.llm_mesh(f"worker-{port}", ["worker", *SIM_ARGS, "--port", str(port), "--etcd", etcd.endpoint,
                                              "--drain-seconds", "30"], tmp_path)
    child.start()
    address = f"127.0.0.1:{port}"
    child.wait_ready(lambda: grpc_serving(address), 60)
    yield address, child
    child.stop()


def generate_request(request_id: str, prompt: list[int], max_tokens: int) -> worker_pb2.WorkerGenerateRequest:
    return worker_pb2.WorkerGenerateRequest(request_id=request_id, prompt_token_ids=prompt,
                                            sampling=sampling_pb2.SamplingParams(max_tokens=max_tokens, temperature=0))


async def collect(call) -> tuple[list[int], int]:
    tokens, finish = [], 0
    async for out in call:
        tokens.extend(out.token_ids)
        finish = out.finish_reason or finish
    return tokens, finish


async def load(stub: worker_pb2_grpc.WorkerStub) -> worker_pb2.WorkerLoad:
    return await stub.GetLoad(worker_pb2.GetLoadRequest(), timeout=5)


async def test_requests_on_one_stream_get_what_separate_calls_get(worker):
    address, _ = worker
    async with grpc.aio.insecure_channel(address) as channel:
        stub = worker_pb2_grpc.WorkerStub(channel)
        stream = WorkerStream(stub, address)
        prompts = [[7, 8, 9, i] for i in range(20)]
        streamed = await asyncio.gather(*(collect(stream.generate(generate_request(f"s{i}", p, 12)))
                                          for i, p in enumerate(prompts)))
        direct = await asyncio.gather(*(collect(stub.Generate(generate_request(f"d{i}", p, 12)))
                                        for i, p in enumerate(prompts)))
        assert streamed == direct
        assert all(len(t) == 12 and f == sampling_pb2.FINISH_REASON_LENGTH for t, f in streamed)
        assert not stream.unary_only
        await stream.close()


async def test_an_invalid_request_fails_alone_with_generates_status_and_details(worker):
    address, _ = worker
    async with grpc.aio.insecure_channel(address) as channel:
        stub = worker_pb2_grpc.WorkerStub(channel)
        stream = WorkerStream(stub, address)
        good = asyncio.ensure_future(collect(stream.generate(generate_request("good", [1, 2, 3], 20))))
        with pytest.raises(grpc.aio.AioRpcError) as streamed:
            await collect(stream.generate(generate_request("bad", [], 5)))
        with pytest.raises(grpc.aio.AioRpcError) as direct:
            await collect(stub.Generate(generate_request("bad", [], 5)))
        assert streamed.value.code() == direct.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert streamed.value.details() == direct.value.details() == "prompt_token_ids must not be empty"
        details = dict(streamed.value.trailing_metadata())["grpc-status-details-bin"]
        status = status_pb2.Status.FromString(details)
        bad_request = error_details_pb2.BadRequest()
        assert status.details[0].Unpack(bad_request)
        assert bad_request.field_violations[0].field == "prompt_token_ids"
        tokens, _ = await good  # the stream and the other request are unaffected
        assert len(tokens) == 20
        await stream.close()


async def test_cancel_and_deadline_abort_the_engine_request(worker):
    address, _ = worker
    async with grpc.aio.insecure_channel(address) as channel:
        stub = worker_pb2_grpc.WorkerStub(channel)
        stream = WorkerStream(stub, address)
        aborted = (await load(stub)).requests_aborted
        call = stream.generate(generate_request("long", [4, 5, 6], 2000))
        first = await call.__anext__()
        assert first.token_ids
        assert call.cancel() and not call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call.__anext__()

        async def aborted_by(n: int) -> bool:
            now = await load(stub)
            return now.requests_aborted >= aborted + n and now.running == 0
        await until(lambda: aborted_by(1), 10, "first abort")
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as late:
            await collect(stream.generate(generate_request("slow", [4, 5, 7], 2000), timeout=0.3))
        assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - started < 2.0
        await until(lambda: aborted_by(2), 10, "second abort")
        # The id is free again once its request ended.
        tokens, _ = await collect(stream.generate(generate_request("long", [4, 5, 6], 3)))
        assert len(tokens) == 3
        await stream.close()


async def test_an_id_already_running_on_the_stream_is_refused(worker):
    address, _ = worker
    async with grpc.aio.insecure_channel(address) as channel:
        stub = worker_pb2_grpc.WorkerStub(channel)
        stream = WorkerStream(stub, address)
        first = asyncio.ensure_future(collect(stream.generate(generate_request("same", [1, 2], 30))))
        with pytest.raises(grpc.aio.AioRpcError) as twice:
            await collect(stream.generate(generate_request("same", [1, 2], 30)))
        assert twice.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert len((await first)[0]) == 30
        await stream.close()


async def test_a_killed_worker_fails_every_request_on_its_stream_as_unavailable(worker):
    address, child = worker
    async with grpc.aio.insecure_channel(address) as channel:
        stream = WorkerStream(worker_pb2_grpc.WorkerStub(channel), address)
        calls = [stream.generate(generate_request(f"k{i}", [3, i], 2000)) for i in range(3)]
        for call in calls:
            await call.__anext__()
        child.kill()
        for call in calls:
            with pytest.raises(grpc.aio.AioRpcError) as gone:
                await collect(call)
            assert gone.value.code() == grpc.StatusCode.UNAVAILABLE
        # A later request opens a new stream, which fails the same way while nobody listens.
        with pytest.raises(grpc.aio.AioRpcError) as later:
            await collect(stream.generate(generate_request("after", [1], 1), timeout=5))
        assert later.value.code() == grpc.StatusCode.UNAVAILABLE
        await stream.close()


async def test_a_draining_worker_finishes_its_streamed_requests_and_exits_without_waiting(worker):
    address, child = worker
    async with grpc.aio.insecure_channel(address) as channel:
        stub = worker_pb2_grpc.WorkerStub(channel)
        stream = WorkerStream(stub, address)
        call = stream.generate(generate_request("inflight", [9, 9], 150))  # ~0.75 s at 5 ms a token
        first = await call.__anext__()  # one token, or more when a loaded machine coalesced them
        started = time.monotonic()
        child.signal(signal.SIGTERM)
        tokens, finish = await collect(call)
        assert finish == sampling_pb2.FINISH_REASON_LENGTH and len(first.token_ids) + len(tokens) == 150
        # The open stream does not hold the drain (--drain-seconds 30) until its grace runs out.
        await asyncio.get_running_loop().run_in_executor(None, child.process.wait, 20)
        assert child.process.returncode == 0 and time.monotonic() - started < 15
        await stream.close()


class _GenerateOnly(worker_pb2_grpc.WorkerServicer):
    """A worker API of an older version: Generate, no GenerateStream (UNIMPLEMENTED)."""

    def __init__(self) -> None:
        self.calls = 0

    async def Generate(self, request, context):
        self.calls += 1
        for token in request.prompt_token_ids[: request.sampling.max_tokens]:
            yield worker_pb2.WorkerGenerateResponse(token_ids=[token])
        yield worker_pb2.WorkerGenerateResponse(finish_reason=sampling_pb2.FINISH_REASON_LENGTH)


async def test_a_worker_without_generate_stream_gets_plain_calls():
    server = grpc.aio.server()
    servicer = _GenerateOnly()
    worker_pb2_grpc.add_WorkerServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        address = f"127.0.0.1:{port}"
        async with grpc.aio.insecure_channel(address) as channel:
            stream = WorkerStream(worker_pb2_grpc.WorkerStub(channel), address)
            first = await collect(stream.generate(generate_request("a", [5, 6, 7], 2)))
            assert first == ([5, 6], sampling_pb2.FINISH_REASON_LENGTH) and stream.unary_only
            second = await collect(stream.generate(generate_request("b", [8], 1)))
            assert second == ([8], sampling_pb2.FINISH_REASON_LENGTH) and servicer.calls == 2
            await stream.close()
    finally:
        await server.stop(None)


async def test_a_malformed_message_ends_the_stream_with_invalid_argument(worker):
    address, _ = worker
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.stream_stream("/llm_mesh.v1.Worker/GenerateStream")(iter([b"\x0a\x05ab"]), timeout=10)
        with pytest.raises(grpc.aio.AioRpcError) as bad:
            async for _ in call:
                pass
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "malformed request message" in bad.value.details()
