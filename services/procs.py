"""Child processes of `llm-mesh up` (and of the tests): start, wait until ready,
stop by pid — SIGTERM first so members revoke their leases, SIGKILL after a
grace period. Never by name."""

from __future__ import annotations

import contextlib
import ctypes
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from services.tls import TlsFiles

_PR_SET_PDEATHSIG = 1
PARENT_PID_ENV = "LLM_MESH_PARENT_PID"


def die_with_parent_if_asked() -> None:
    """In a child started by `Child`: if the parent (`llm-mesh up`, a test) is killed -9, the
    kernel SIGTERMs us — no orphaned workers holding cores and ports. Done here at the child's
    start, not in a preexec_fn: Python code between fork and exec in a parent with gRPC threads
    can crash the child (grpc skips its fork handlers while other threads are in a call)."""
    parent = os.environ.pop(PARENT_PID_ENV, None)
    if parent is None:
        return
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != int(parent):  # the parent died before the prctl: nobody would stop us
        sys.exit(1)


# Runs any other program (etcd) the same way: arm the parent-death signal, then exec it (the
# signal survives exec).
_EXEC_WITH_PARENT = ("import os, sys; from services.procs import die_with_parent_if_asked; "
                     "die_with_parent_if_asked(); os.execvp(sys.argv[1], sys.argv[1:])")


class Child:
    def __init__(self, name: str, argv: Sequence[str], log_path: pathlib.Path,
                 env: dict[str, str] | None = None) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.env = env
        self.process: subprocess.Popen[bytes] | None = None

    @classmethod
    def llm_mesh(cls, name: str, args: Sequence[str], log_dir: pathlib.Path,
                 env: dict[str, str] | None = None) -> Child:
        """A `llm-mesh <args>` child running on this interpreter."""
        return cls(name, [sys.executable, "-m", "services.cli", *args], log_dir / f"{name}.log", env)

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, **(self.env or {}), **{PARENT_PID_ENV: str(os.getpid())})
        with open(self.log_path, "ab") as log:
            # Own session: a terminal Ctrl-C reaches only `up`, which stops the
            # children in order (members before etcd).
            argv = self.argv if self.argv[:3] == [sys.executable, "-m", "services.cli"] else [
                sys.executable, "-c", _EXEC_WITH_PARENT, *self.argv]
            self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            env=env, start_new_session=True)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def wait_ready(self, ready: Callable[[], bool], timeout: float, interval: float = 0.2) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}: {self.tail()}")
            if ready():
                return
            time.sleep(interval)
        raise TimeoutError(f"{self.name} not ready after {timeout:.0f}s: {dump_stacks([self])[0]}")

    def signal(self, sig: int) -> None:
        if self.alive():
            os.kill(self.pid, sig)

    def kill(self) -> None:
        """SIGKILL the child and everything it started (its own session and process group):
        a vLLM worker's engine-core processes must not outlive it, as they would not outlive
        a dead pod."""
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        self.process.wait()

    def stop(self, grace: float = 15.0) -> int | None:
        """SIGTERM, wait up to `grace`, then SIGKILL its process group. Returns the exit code;
        after a clean exit, whatever the child left in its group is killed too."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(grace)
            except subprocess.TimeoutExpired:
                self.kill()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)  # orphans of a child that died (e.g. a kill -9 of it)
        return self.process.returncode

    def tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(text[-lines:])



def dump_stacks(children: Sequence[Child], lines: int = 60) -> list[str]:
    """Ask each living `llm-mesh` child for its Python stacks (SIGUSR1: faulthandler, registered
    by services/cli.py), wait once, and return each one's log tail with them: what a process
    that hangs is doing. Other children are not signalled (SIGUSR1 would end them)."""
    asked = [c for c in children if c.alive() and c.argv[1:3] == ["-m", "services.cli"]]
    for child in asked:
        child.signal(signal.SIGUSR1)
    if asked:
        time.sleep(1.0)
    return [child.tail(lines) for child in children]


def grpc_serving(address: str, timeout: float = 1.0, tls: TlsFiles | None = None) -> bool:
    """True when the gRPC server at `address` answers the standard health check SERVING
    (over TLS with `tls`'s files: services/tls.py)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from services.tls import channel_credentials, channel_options

    credentials = channel_credentials(tls)
    with (grpc.insecure_channel(address) if credentials is None else
          grpc.secure_channel(address, credentials, options=channel_options(tls))) as channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
        except grpc.RpcError:
            return False
    return response.status == health_pb2.HealthCheckResponse.SERVING


def http_ok(url: str, timeout: float = 1.0) -> bool:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def free_port() -> int:
    """A free TCP port on loopback (the OS picks; tiny race until it is bound)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_port_pair() -> int:
    """A port p with p + 1 free too (etcd's client and peer ports)."""
    for _ in range(100):
        port = free_port()
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair")
