"""A whole mesh on loopback — scheduler replicas and workers on a given etcd, as child processes
stopped by pid. Used by the integration tests (tests/conftest.py) and `llm-mesh chaos`."""

from __future__ import annotations

import dataclasses
import pathlib

from services.etcd_server import EtcdServer
from services.model_fetch import DEFAULT_MODEL_NAME
from services.procs import Child, free_port, grpc_serving
from services.tls import TlsFiles

# Fast sim workers: ~5 ms a token, prefill nearly free.
SIM_ARGS = ["--engine", "sim", "--sim-itl", "0.005", "--sim-prefill-per-token", "0.00002"]


@dataclasses.dataclass
class SchedulerReplica:
    address: str
    metrics_url: str
    child: Child
    port: int
    metrics_port: int


@dataclasses.dataclass
class Mesh:
    etcd: str
    scheduler_address: str  # the first replica's
    model: str
    workers: dict[str, Child]  # address → child
    scheduler: Child
    log_dir: pathlib.Path
    metrics_url: str
    children: list[Child] = dataclasses.field(default_factory=list)
    env: dict[str, str] | None = None  # extra environment of every process (e.g. OTEL_*)
    schedulers: list[SchedulerReplica] = dataclasses.field(default_factory=list)
    scheduler_args: list[str] = dataclasses.field(default_factory=list)  # argv every replica shares
    probe_tls: TlsFiles | None = None  # the client certificate health probes present (a mesh with mTLS)

    def start_worker(self, extra: list[str], lease_ttl: int = 10, timeout: float = 60) -> tuple[str, Child]:
        return self.start_workers([extra], lease_ttl, timeout)[0]

    def start_workers(self, extras: list[list[str]], lease_ttl: int = 10, timeout: float = 60
                      ) -> list[tuple[str, Child]]:
        """All started at once, then each waited for: startup costs one worker's, not the sum."""
        started = []
        for extra in extras:
            port = free_port()
            child = Child.llm_mesh(f"worker-{port}", ["worker", "--port", str(port), "--etcd", self.etcd,
                                                      "--lease-ttl", str(lease_ttl), *extra],
                                   self.log_dir, self.env)
            child.start()
            self.children.append(child)
            started.append((f"127.0.0.1:{port}", child))
        for address, child in started:
            child.wait_ready(lambda a=address: grpc_serving(a, tls=self.probe_tls), timeout)
            self.workers[address] = child
        return started

    def start_scheduler(self, port: int | None = None, metrics_port: int | None = None,
                        timeout: float = 60) -> SchedulerReplica:
        """One more scheduler replica (or a restart on the ports of a dead one)."""
        replica = self._spawn_scheduler(port or free_port(), metrics_port or free_port())
        self._wait_scheduler(replica, timeout)
        return replica

    def start_schedulers(self, count: int, timeout: float = 60) -> list[SchedulerReplica]:
        """All started at once, then each waited for (a scheduler's startup is the tokenizer's load)."""
        replicas = [self._spawn_scheduler(free_port(), free_port()) for _ in range(count)]
        for replica in replicas:
            self._wait_scheduler(replica, timeout)
        return replicas

    def _spawn_scheduler(self, port: int, metrics_port: int) -> SchedulerReplica:
        argv = ["scheduler", "--port", str(port), "--metrics-port", str(metrics_port), *self.scheduler_args]
        child = Child.llm_mesh(f"scheduler-{port}", argv, self.log_dir, self.env)
        child.start()
        self.children.append(child)
        return SchedulerReplica(f"127.0.0.1:{port}", f"http://127.0.0.1:{metrics_port}/metrics", child, port,
                                metrics_port)

    def _wait_scheduler(self, replica: SchedulerReplica, timeout: float) -> None:
        replica.child.wait_ready(lambda: grpc_serving(replica.address, tls=self.probe_tls), timeout)
        self.schedulers = [s for s in self.schedulers if s.port != replica.port] + [replica]

    def start_kvstore(self, store_id: str, disk_dir: pathlib.Path, port: int | None = None, lease_ttl: int = 10,
                      timeout: float = 60, ram_mib: int = 64) -> tuple[str, Child]:
        """A KV store with a disk tier at `disk_dir` (gRPC bytes path only). A restart after a kill
        passes the same id, disk and port: it comes back with what its disk tier held."""
        port = port or free_port()
        child = Child.llm_mesh(f"kvstore-{port}-{len(self.children)}", [
            "kvstore", "--port", str(port), "--id", store_id, "--etcd", self.etcd, "--lease-ttl", str(lease_ttl),
            "--ram-mib", str(ram_mib), "--disk-dir", str(disk_dir), "--disk-mib", "256", "--nixl", "off"],
            self.log_dir, self.env)
        child.start()
        self.children.append(child)
        address = f"127.0.0.1:{port}"
        child.wait_ready(lambda: grpc_serving(address, tls=self.probe_tls), timeout)
        return address, child

    def stop(self) -> None:
        for child in reversed(self.children):
            child.stop()


def start_mesh(etcd: EtcdServer, log_dir: pathlib.Path, model_dir: pathlib.Path, worker_args: list[list[str]],
               lease_ttl: int = 10, worker_timeout: float = 60, env: dict[str, str] | None = None,
               scheduler_args: list[str] | None = None, schedulers: int = 1, probe_tls: TlsFiles | None = None) -> Mesh:
    """Workers first, then `schedulers` replicas (ready only once they see a routable worker)."""
    mesh = Mesh(etcd.endpoint, "", DEFAULT_MODEL_NAME, {}, None, log_dir, "", [],  # type: ignore[arg-type]
                env,
                scheduler_args=["--etcd", etcd.endpoint, "--lease-ttl", str(lease_ttl),
                                "--model", f"{DEFAULT_MODEL_NAME}={model_dir}", *(scheduler_args or [])],
                probe_tls=probe_tls)
    try:
        mesh.start_workers(worker_args, lease_ttl, worker_timeout)
        mesh.start_schedulers(schedulers)
    except BaseException:
        mesh.stop()
        raise
    first = mesh.schedulers[0]
    mesh.scheduler_address, mesh.scheduler, mesh.metrics_url = first.address, first.child, first.metrics_url
    return mesh
