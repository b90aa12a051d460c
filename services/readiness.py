"""What the standard gRPC health service (grpc.health.v1) says about a process.

Service names and what SERVING means:
- "liveness": the server runs and its event loop answers (SERVING from `start`
  until the server stops; `drain` leaves it alone: only readiness steers traffic);
- "" and the process's own services (e.g. llm_mesh.v1.Worker): ready to take
  traffic, i.e. the `ready_when` check holds. Re-evaluated every `interval_s`, so
  e.g. a scheduler's last worker leaving flips it back to NOT_SERVING;
  `drain` makes it NOT_SERVING for good (shutdown: first NOT_SERVING, then stop).

grpc's aio HealthServicer answers SERVING for "" from construction; `start`
must run before the server starts so that no probe sees a premature SERVING.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterable

from grpc_health.v1 import health, health_pb2

LIVENESS = "liveness"
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Readiness:
    def __init__(self, health_servicer: health.HealthServicer, service_names: Iterable[str],
                 interval_s: float = 0.25) -> None:
        self._health = health_servicer
        self._names = ["", *service_names]
        self.interval_s = interval_s
        self._check: Callable[[], bool] = lambda: False
        self._serving: bool | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()

    @property
    def serving(self) -> bool:
        return bool(self._serving)

    async def start(self) -> None:
        """Liveness SERVING, readiness NOT_SERVING until `ready_when`'s check holds."""
        await self._health.set(LIVENESS, _SERVING)
        await self._apply(False)
        self._task = asyncio.create_task(self._watch(), name="readiness")

    def ready_when(self, check: Callable[[], bool]) -> None:
        """Ready while `check()` is true (cheap: it runs every interval_s)."""
        self._check = check
        self._wake.set()

    async def drain(self) -> None:
        """NOT_SERVING for good: traffic should go elsewhere while we stop."""
        await self.close()
        await self._apply(False)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _watch(self) -> None:
        while True:
            await self._apply(self._check())
            with contextlib.suppress(asyncio.TimeoutError):
                async with asyncio.timeout(self.interval_s):
                    await self._wake.wait()
            self._wake.clear()

    async def _apply(self, ready: bool) -> None:
        if ready == self._serving:
            return
        self._serving = ready
        for name in self._names:
            await self._health.set(name, _SERVING if ready else _NOT_SERVING)
