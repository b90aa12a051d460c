"""One `VllmEngine` in its own process, driven over a pipe (P/D tests and `bench pd`).

    python -m services.engines.engine_proc SETTINGS_JSON REPLY_FD

reads one JSON command per line on stdin and writes one JSON reply per line to the
file descriptor REPLY_FD (vLLM logs to stdout and stderr, so replies go elsewhere):

    {"op": "generate", "request_id": "r1", "prompt": [ids], "max_tokens": 8,
     "remote_decode": false, "remote_prefill": {KVTransferParams fields} | null}
      → {"token_ids": [...], "text": "...", "finish_reason": "length", "prompt_tokens": n,
         "cached_prompt_tokens": n, "kv_transfer": {...} | null, "ttft_s": s, "e2e_s": s}
    {"op": "stats"} → PDStats fields
    {"op": "load"}  → EngineLoad fields
    {"op": "quit"}  → {} and the engine stops

`PDEngineProc` is the parent side. Greedy sampling (temperature 0) throughout.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import os
import pathlib
import subprocess
import sys
import time
from typing import Any

REPO = pathlib.Path(__file__).resolve().parents[2]


async def _serve(settings_json: str, reply_fd: int) -> None:
    from services.engines.base import EngineRequest, KVTransferParams, SamplingOptions
    from services.engines.vllm_engine import VllmEngine, VllmSettings

    reply = os.fdopen(reply_fd, "w", buffering=1)

    def send(obj: dict[str, Any]) -> None:
        # EngineInfo carries the NIXL agent metadata as bytes: base64 on this pipe.
        reply.write(json.dumps(obj, default=_jsonable) + "\n")
        reply.flush()

    engine = VllmEngine(VllmSettings(**settings_from_json(settings_json)))
    info = await engine.start()
    send({"ready": dataclasses.asdict(info), "kv_engine_id": engine.kv_engine_id})
    loop = asyncio.get_running_loop()
    try:
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line:
                break
            cmd = json.loads(line)
            if cmd["op"] == "quit":
                break
            if cmd["op"] == "stats":
                send(dataclasses.asdict(engine.pd_stats()))
                continue
            if cmd["op"] == "load":
                send(dataclasses.asdict(engine.load()))
                continue
            remote = cmd.get("remote_prefill")
            request = EngineRequest(
                request_id=cmd["request_id"], prompt_token_ids=list(cmd["prompt"]),
                sampling=SamplingOptions(max_tokens=cmd.get("max_tokens", 8), temperature=0.0,
                                         ignore_eos=True),
                remote_decode=bool(cmd.get("remote_decode")),
                remote_prefill=(KVTransferParams(**{**remote, "block_ids": tuple(remote["block_ids"])})
                                if remote else None))
            token_ids: list[int] = []
            text, last = "", None
            start = time.perf_counter()
            ttft = None
            try:
                async for out in engine.generate(request):
                    if ttft is None and out.token_ids:
                        ttft = time.perf_counter() - start
                    token_ids += out.token_ids
                    text += out.text
                    last = out
            except Exception as exc:  # noqa: BLE001 - reported to the parent
                send({"error": repr(exc)})
                continue
            assert last is not None
            send({"token_ids": token_ids, "text": text, "finish_reason": last.finish_reason,
                  "prompt_tokens": last.prompt_tokens, "cached_prompt_tokens": last.cached_prompt_tokens,
                  "kv_transfer": dataclasses.asdict(last.kv_transfer) if last.kv_transfer else None,
                  "ttft_s": ttft, "e2e_s": time.perf_counter() - start})
    finally:
        await engine.stop()
        send({})


def settings_to_json(settings: dict[str, Any]) -> str:
    """VllmSettings fields as JSON for the child's argv (its TLS/etcd settings as objects)."""
    return json.dumps({k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for k, v in settings.items()})


def settings_from_json(text: str) -> dict[str, Any]:
    """`settings_to_json`'s inverse: the TLS files and etcd settings as their dataclasses again."""
    from services.membership import EtcdSettings
    from services.tls import TlsFiles

    settings = json.loads(text)
    for key, cls in (("kvstore_tls", TlsFiles), ("kvstore_etcd_settings", EtcdSettings)):
        if isinstance(settings.get(key), dict):
            settings[key] = cls(**settings[key])
    return settings


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


class PDEngineProc:
    """Parent side: start the child, wait until its engine is ready, send commands."""

    def __init__(self, settings: dict[str, Any], log_path: pathlib.Path, env: dict[str, str] | None = None,
                 command: list[str] | None = None) -> None:
        read_fd, write_fd = os.pipe()
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [*(command or [sys.executable, "-m", "services.engines.engine_proc"]), settings_to_json(settings),
             str(write_fd)],
            cwd=REPO, stdin=subprocess.PIPE, stdout=self._log, stderr=subprocess.STDOUT, pass_fds=(write_fd,),
            env={**os.environ, **(env or {})}, text=True)
        os.close(write_fd)
        self._replies = os.fdopen(read_fd, "r")
        self.info: dict[str, Any] = {}
        self.kv_engine_id: str | None = None
        self.log_path = log_path

    def wait_ready(self) -> None:
        ready = self._read()
        if "ready" not in ready:
            raise RuntimeError(f"engine did not start (log: {self.log_path})")
        self.info, self.kv_engine_id = ready["ready"], ready["kv_engine_id"]

    def _read(self) -> dict[str, Any]:
        line = self._replies.readline()
        if not line:
            raise RuntimeError(f"engine process exited (rc {self.proc.poll()}, log: {self.log_path})")
        return json.loads(line)

    def call(self, **cmd: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        reply = self._read()
        if "error" in reply:
            raise RuntimeError(reply["error"])
        return reply

    def stop(self, timeout: float = 60) -> None:
        try:
            if self.proc.poll() is None and self.proc.stdin is not None:
                self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.proc.stdin.close()
                self.proc.wait(timeout)
        except (OSError, subprocess.TimeoutExpired):
            pass
        if self.proc.poll() is None:
            self.proc.terminate()  # this child only (by pid); vLLM's engine core follows its parent
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._replies.close()
        self._log.close()


if __name__ == "__main__":
    asyncio.run(_serve(sys.argv[1], int(sys.argv[2])))
