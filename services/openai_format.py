"""Shape a stream of GenerateResponse into OpenAI's objects (as protos).

The gateway only serialises these; the shaping lives here once, so the gRPC
OpenAI-style RPCs and the REST gateway return the same thing.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from llm_mesh.v1 import inference_pb2, sampling_pb2
from services.requests import PreparedRequest

Stream = AsyncIterator[tuple[PreparedRequest, inference_pb2.GenerateResponse]]

FINISH_NAMES = {
    sampling_pb2.FINISH_REASON_UNSPECIFIED: "",
    sampling_pb2.FINISH_REASON_STOP: "stop",
    sampling_pb2.FINISH_REASON_LENGTH: "length",
    sampling_pb2.FINISH_REASON_ABORT: "abort",
}


async def _collect(stream: Stream) -> tuple[PreparedRequest, str, str, sampling_pb2.Usage]:
    parts: list[str] = []
    finish, usage, prepared = "", sampling_pb2.Usage(), None
    async for prepared, response in stream:
        parts.append(response.text)
        if response.finish_reason:
            finish = FINISH_NAMES[response.finish_reason]
            usage = response.usage
    assert prepared is not None, "a generation yields at least its final response"
    return prepared, "".join(parts), finish, usage


async def chat_completion(stream: Stream) -> inference_pb2.ChatCompletion:
    prepared, text, finish, usage = await _collect(stream)
    return inference_pb2.ChatCompletion(
        id=f"chatcmpl-{prepared.request_id}", object="chat.completion", created=int(time.time()),
        model=prepared.model, usage=usage,
        choices=[inference_pb2.ChatCompletionChoice(
            index=0, message=inference_pb2.ChatMessage(role="assistant", content=text), finish_reason=finish)],
    )


async def completion(stream: Stream) -> inference_pb2.Completion:
    prepared, text, finish, usage = await _collect(stream)
    return inference_pb2.Completion(
        id=f"cmpl-{prepared.request_id}", object="text_completion", created=int(time.time()),
        model=prepared.model, usage=usage,
        choices=[inference_pb2.CompletionChoice(index=0, text=text, finish_reason=finish)],
    )


async def chat_chunks(stream: Stream) -> AsyncIterator[inference_pb2.ChatCompletionChunk]:
    created = int(time.time())
    first = True
    async for prepared, response in stream:
        chunk = inference_pb2.ChatCompletionChunk(
            id=f"chatcmpl-{prepared.request_id}", object="chat.completion.chunk", created=created,
            model=prepared.model,
            choices=[inference_pb2.ChatChunkChoice(
                index=0, delta=inference_pb2.ChatDelta(role="assistant" if first else "", content=response.text),
                finish_reason=FINISH_NAMES[response.finish_reason])],
        )
        if response.finish_reason:
            chunk.usage.CopyFrom(response.usage)
        first = False
        yield chunk


async def completion_chunks(stream: Stream) -> AsyncIterator[inference_pb2.Completion]:
    created = int(time.time())
    async for prepared, response in stream:
        chunk = inference_pb2.Completion(
            id=f"cmpl-{prepared.request_id}", object="text_completion", created=created, model=prepared.model,
            choices=[inference_pb2.CompletionChoice(
                index=0, text=response.text, finish_reason=FINISH_NAMES[response.finish_reason])],
        )
        if response.finish_reason:
            chunk.usage.CopyFrom(response.usage)
        yield chunk
