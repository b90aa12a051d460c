"""Security options with real processes: API keys at the gateway and on the scheduler's gRPC
services, mTLS on every gRPC link (gateway → scheduler → sim worker) over an etcd that itself
requires client certificates, and no request content in any log."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import pathlib
import re
import subprocess
import sys
import time
import uuid

import grpc
import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from etcd3aio import EtcdError
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llm_mesh.v1 import inference_pb2, inference_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc
from services import auth
from services.auth import ApiKeys, bearer_token
from services.etcd_server import EtcdServer, EtcdServerTls
from services.membership import EtcdConnection, EtcdSettings
from services.procs import Child, free_port, grpc_serving, http_ok
from services.tls import TlsFiles, channel_credentials
from tests.conftest import SIM_ARGS, start_mesh

KEYS = ["key-one-7f3a", "key-two-c91d"]


# ---------------------------------------------------------------- certificates


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write(path: pathlib.Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> tuple[str, str]:
    path.with_suffix(".pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    path.with_suffix(".key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                           serialization.PrivateFormat.PKCS8,
                                                           serialization.NoEncryption()))
    return str(path.with_suffix(".pem")), str(path.with_suffix(".key"))


class Ca:
    def __init__(self, directory: pathlib.Path, name: str) -> None:
        self.directory = directory
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        self.cert = (x509.CertificateBuilder().subject_name(_name(name)).issuer_name(_name(name))
                     .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                     .not_valid_before(now - datetime.timedelta(minutes=1))
                     .not_valid_after(now + datetime.timedelta(days=1))
                     .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                     .sign(self.key, hashes.SHA256()))
        self.path, _ = _write(directory / name, self.cert, self.key)

    def issue(self, name: str, *, server: bool) -> tuple[str, str]:
        """(cert, key) paths: a client certificate, or one for 127.0.0.1/localhost that serves and dials."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        usages = [ExtendedKeyUsageOID.CLIENT_AUTH] + ([ExtendedKeyUsageOID.SERVER_AUTH] if server else [])
        builder = (x509.CertificateBuilder().subject_name(_name(name)).issuer_name(self.cert.subject)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=1))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.ExtendedKeyUsage(usages), critical=False))
        if server:
            builder = builder.add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        return _write(self.directory / name, builder.sign(self.key, hashes.SHA256()), key)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, TlsFiles]:
    """mesh: serves and dials (workers, scheduler); client: dials only (gateway, test clients);
    no_cert: trusts the CA but presents nothing; rogue: a client certificate of another CA."""
    directory = tmp_path_factory.mktemp("pki")
    ca, rogue_ca = Ca(directory, "ca"), Ca(directory, "rogue-ca")
    return {"mesh": TlsFiles(*ca.issue("mesh", server=True), ca.path),
            "client": TlsFiles(*ca.issue("client", server=False), ca.path),
            "no_cert": TlsFiles(ca=ca.path),
            "rogue": TlsFiles(*rogue_ca.issue("rogue", server=False), ca.path)}


def tls_flags(files: TlsFiles) -> list[str]:
    return ["--tls-cert", files.cert, "--tls-key", files.key, "--tls-ca", files.ca]


def etcd_flags(files: TlsFiles) -> list[str]:
    return ["--etcd-ca", files.ca, "--etcd-cert", files.cert, "--etcd-key", files.key]


# ---------------------------------------------------------------- helpers


def start_gateway(log_dir: pathlib.Path, scheduler: str, extra: list[str], env: dict[str, str] | None = None
                  ) -> tuple[Child, str]:
    port = free_port()
    child = Child.llm_mesh(f"gateway-{port}", ["gateway", "--port", str(port), "--scheduler", scheduler, *extra],
                           log_dir, env)
    child.start()
    url = f"http://127.0.0.1:{port}"
    try:
        child.wait_ready(lambda: http_ok(f"{url}/health/live"), 30)
    except BaseException:
        child.stop()
        raise
    return child, url


def chat(url: str, content: str, key: str | None = None, max_tokens: int = 4) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{url}/v1/chat/completions", headers=headers, timeout=30, json={
        "model": "SmolLM2-135M-Instruct", "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": content}]})


def logs(log_dir: pathlib.Path) -> dict[str, str]:
    return {p.name: p.read_text(errors="replace") for p in log_dir.glob("*.log")}


def code_of(call) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


# ---------------------------------------------------------------- API keys and privacy


def test_key_file_and_bearer_parsing(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "keys"
    path.write_text("# ops team\n\n  alpha  \nbeta\n")
    keys = ApiKeys.load(path)
    assert keys.accepts("alpha") and keys.accepts("beta")
    assert not keys.accepts("alph") and not keys.accepts("") and not keys.accepts(None)
    assert not keys.accepts("# ops team")
    assert "alpha" not in repr(keys)
    assert bearer_token("Bearer alpha") == bearer_token("bearer  alpha ") == "alpha"
    assert bearer_token("Basic alpha") is None and bearer_token("Bearer") is None and bearer_token(None) is None
    assert auth.grpc_metadata("Bearer é") == ()  # gRPC metadata cannot carry it
    (tmp_path / "empty").write_text("# nothing\n")
    with pytest.raises(SystemExit):
        ApiKeys.load(tmp_path / "empty")


@pytest.fixture(scope="module")
def keyed_mesh(etcd: EtcdServer, model_dir: pathlib.Path, tmp_path_factory: pytest.TempPathFactory):
    """Plaintext links, API keys on the scheduler and the gateway, every process at DEBUG."""
    log_dir = tmp_path_factory.mktemp("keyed-mesh")
    keys = log_dir / "api-keys"
    keys.write_text(f"# comment lines and blank lines are skipped\n\n{KEYS[0]}\n{KEYS[1]}\n")
    env = {"LLM_MESH_LOG_LEVEL": "DEBUG"}
    mesh = start_mesh(etcd, log_dir, model_dir, [SIM_ARGS], env=env, scheduler_args=["--api-key-file", str(keys)])
    try:
        gateway, url = start_gateway(log_dir, mesh.scheduler_address, ["--api-key-file", str(keys)], env)
        mesh.children.append(gateway)
        yield mesh, url
    finally:
        mesh.stop()


def test_gateway_requires_an_api_key_on_v1_only(keyed_mesh) -> None:
    mesh, url = keyed_mesh
    for key in (None, "wrong-key", KEYS[0] + "x"):
        response = chat(url, "hello", key)
        assert response.status_code == 401, key
        assert response.headers["www-authenticate"] == "Bearer"
        assert response.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{url}/v1/models", timeout=10).status_code == 401
    assert httpx.post(f"{url}/v1/completions", json={"prompt": "x"}, timeout=10).status_code == 401
    assert httpx.post(f"{url}/v1/chat/completions", headers={"Authorization": f"Basic {KEYS[0]}"},
                      json={}, timeout=10).status_code == 401

    for key in KEYS:  # every key in the file works, and the gateway forwards it to the keyed scheduler
        response = chat(url, "hello", key)
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["message"]["content"]
    models = httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {KEYS[1]}"}, timeout=10)
    assert models.status_code == 200 and models.json()["data"]

    for path in ("/health", "/health/live", "/health/ready"):  # probes stay open
        assert httpx.get(f"{url}{path}", timeout=10).status_code == 200, path


def test_scheduler_grpc_requires_an_api_key(keyed_mesh) -> None:
    mesh, _ = keyed_mesh
    with grpc.insecure_channel(mesh.scheduler_address) as channel:
        inference = inference_pb2_grpc.InferenceStub(channel)
        admin = scheduler_pb2_grpc.SchedulerStub(channel)
        models = inference_pb2.ListModelsRequest()
        for metadata in ((), (("authorization", "Bearer wrong"),), (("authorization", KEYS[0]),)):
            assert code_of(lambda: inference.ListModels(models, metadata=metadata, timeout=5)) \
                == grpc.StatusCode.UNAUTHENTICATED
        assert code_of(lambda: admin.GetStats(scheduler_pb2.GetStatsRequest(), timeout=5)) \
            == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as refused:  # a streaming method is refused too, with the hint
            list(inference.Generate(inference_pb2.GenerateRequest(prompt="hi"), timeout=5))
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "Bearer" in refused.value.details()

        authorized = (("authorization", f"Bearer {KEYS[1]}"),)
        assert inference.ListModels(models, metadata=authorized, timeout=5).data
        stats = admin.GetStats(scheduler_pb2.GetStatsRequest(), metadata=authorized, timeout=5)
        assert stats.scheduler_id and stats.policy == "ours"
        replies = list(inference.Generate(inference_pb2.GenerateRequest(prompt="hi", sampling={"max_tokens": 3}),
                                          metadata=authorized, timeout=10))
        assert replies[-1].HasField("usage")
        # Health and reflection stay open (probes and grpcurl hold no key).
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_top_sends_the_api_key(keyed_mesh) -> None:
    mesh, _ = keyed_mesh
    keys = mesh.log_dir / "api-keys"
    argv = [sys.executable, "-m", "services.cli", "top", "--once", "--scheduler", mesh.scheduler_address]
    refused = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1 and "UNAUTHENTICATED" in refused.stdout, refused.stdout + refused.stderr
    shown = subprocess.run([*argv, "--api-key-file", str(keys)], capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0 and "UNAUTHENTICATED" not in shown.stdout, shown.stdout + shown.stderr


def test_no_prompt_completion_or_key_in_any_log_at_debug(keyed_mesh, etcd: EtcdServer, model_dir: pathlib.Path,
                                                         tmp_path: pathlib.Path) -> None:
    mesh, url = keyed_mesh
    marker = f"zebra-{uuid.uuid4().hex[:12]}"
    response = chat(url, f"Please repeat {marker} back to me", KEYS[0], max_tokens=24)
    assert response.status_code == 200, response.text
    completion = response.json()["choices"][0]["message"]["content"]
    assert len(completion) >= 20  # long enough not to occur in a log by chance
    texts = logs(mesh.log_dir)
    assert {"DEBUG" in text for text in texts.values()} == {True}, "the processes must log at DEBUG"
    for name, text in texts.items():
        assert marker not in text, name
        assert completion not in text, name
        assert KEYS[0] not in text and KEYS[1] not in text, name

    # The control: with --log-content the same check finds the prompt (so it can fail).
    port = free_port()
    loud = Child.llm_mesh("scheduler-log-content", [
        "scheduler", "--port", str(port), "--etcd", etcd.endpoint, "--log-content",
        "--model", f"SmolLM2-135M-Instruct={model_dir}"], tmp_path)
    loud.start()
    try:
        address = f"127.0.0.1:{port}"
        loud.wait_ready(lambda: grpc_serving(address), 60)
        with grpc.insecure_channel(address) as channel:
            list(inference_pb2_grpc.InferenceStub(channel).Generate(
                inference_pb2.GenerateRequest(prompt=f"say {marker}", sampling={"max_tokens": 2}), timeout=20))
    finally:
        loud.stop()
    assert marker in loud.log_path.read_text()


# ---------------------------------------------------------------- mTLS (and etcd with client certificates)


@pytest.fixture(scope="module")
def tls_etcd(pki: dict[str, TlsFiles], tmp_path_factory: pytest.TempPathFactory):
    """An etcd of its own (a plaintext mesh on the shared one must not meet a TLS scheduler)
    that serves TLS and requires client certificates."""
    mesh = pki["mesh"]
    server = EtcdServer(tmp_path_factory.mktemp("tls-etcd") / "data", free_port(), free_port(),
                        tls=EtcdServerTls(mesh.cert, mesh.key, mesh.ca, client_cert_auth=True,
                                          client_cert=pki["client"].cert, client_key=pki["client"].key))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def tls_mesh(tls_etcd: EtcdServer, pki: dict[str, TlsFiles], model_dir: pathlib.Path,
             tmp_path_factory: pytest.TempPathFactory):
    mesh_files = pki["mesh"]
    flags = tls_flags(mesh_files) + etcd_flags(mesh_files)
    mesh = start_mesh(tls_etcd, tmp_path_factory.mktemp("tls-mesh"), model_dir, [SIM_ARGS + flags],
                      scheduler_args=flags, probe_tls=pki["client"])
    try:
        gateway, url = start_gateway(mesh.log_dir, mesh.scheduler_address,
                                     tls_flags(pki["client"]) + ["--etcd", tls_etcd.endpoint,
                                                                 *etcd_flags(pki["client"])])
        mesh.children.append(gateway)
        yield mesh, url
    finally:
        mesh.stop()


def _secure_channel(address: str, files: TlsFiles) -> grpc.Channel:
    return grpc.secure_channel(address, channel_credentials(files))


def test_mtls_mesh_serves_requests(tls_mesh) -> None:
    """gateway → scheduler → worker all over mTLS, membership over etcd with client certificates:
    a request is routed to the worker (found in etcd), and its KV events reach the scheduler."""
    mesh, url = tls_mesh
    response = chat(url, "hello over mTLS " * 40)  # several KV blocks
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"]
    assert httpx.get(f"{url}/health/ready", timeout=10).status_code == 200
    deadline = time.monotonic() + 10
    while _index_entries(mesh.metrics_url) == 0:  # the KV event stream (its own TLS channel)
        assert time.monotonic() < deadline, "no KV events reached the scheduler"
        time.sleep(0.2)


def _index_entries(metrics_url: str) -> float:
    found = re.search(r"^llm_mesh_kv_index_entries (\S+)$", httpx.get(metrics_url, timeout=5).text, re.M)
    assert found, "the scheduler exports llm_mesh_kv_index_entries"
    return float(found.group(1))


def test_mtls_refuses_clients_without_a_trusted_certificate(tls_mesh, pki: dict[str, TlsFiles]) -> None:
    mesh, _ = tls_mesh
    worker = next(iter(mesh.workers))
    for address in (mesh.scheduler_address, worker):
        request = health_pb2.HealthCheckRequest()
        with _secure_channel(address, pki["client"]) as channel:
            assert health_pb2_grpc.HealthStub(channel).Check(request, timeout=5).status == \
                health_pb2.HealthCheckResponse.SERVING
        for refused in ("no_cert", "rogue"):
            with _secure_channel(address, pki[refused]) as channel:
                assert code_of(lambda: health_pb2_grpc.HealthStub(channel).Check(request, timeout=5)) \
                    == grpc.StatusCode.UNAVAILABLE, (address, refused)
        with grpc.insecure_channel(address) as channel:  # plaintext
            assert code_of(lambda: health_pb2_grpc.HealthStub(channel).Check(request, timeout=5)) \
                == grpc.StatusCode.UNAVAILABLE, address


def test_etcd_refuses_clients_without_a_certificate(tls_etcd: EtcdServer, pki: dict[str, TlsFiles]) -> None:
    """The TLS mesh's etcd really requires client certificates: the mesh got through only with them."""

    async def reads(settings: EtcdSettings) -> bool:
        connection = EtcdConnection([tls_etcd.endpoint], settings, rpc_max_attempts=1)
        await connection.connect()
        try:
            await connection.client.kv.get("/llm-mesh/v1/", timeout=3)
            return True
        except (grpc.aio.AioRpcError, EtcdError):
            return False
        finally:
            await connection.close()

    files = pki["client"]
    assert asyncio.run(reads(EtcdSettings(ca=files.ca, cert=files.cert, key=files.key)))
    assert not asyncio.run(reads(EtcdSettings(ca=files.ca)))  # TLS, but no client certificate
    assert not asyncio.run(reads(EtcdSettings(ca=pki["rogue"].ca, cert=pki["rogue"].cert, key=pki["rogue"].key)))


# ---------------------------------------------------------------- etcd user/password auth


def test_etcd_user_auth_registers_and_watches(tmp_path: pathlib.Path) -> None:
    """With etcd auth on, a Registration and a MemberDirectory given --etcd-user and
    --etcd-password-file work; without them, the registration never gets a lease."""
    from etcd3aio import Etcd3Client

    from llm_mesh.v1 import membership_pb2
    from services.membership import MemberDirectory, Registration

    server = EtcdServer(tmp_path / "data", free_port(), free_port())
    server.start()
    password_file = tmp_path / "etcd-password"
    password_file.write_text("s3cret-etcd\n")

    async def scenario() -> None:
        async with Etcd3Client([server.endpoint]) as admin:
            await admin.auth.user_add("root", "s3cret-etcd")
            await admin.auth.user_grant_role("root", "root")
            await admin.auth.auth_enable()
        settings = EtcdSettings(user="root", password_file=str(password_file))
        member = membership_pb2.Member(id="w-auth", kind=membership_pb2.MEMBER_KIND_WORKER, address="127.0.0.1:1")
        directory = MemberDirectory([server.endpoint], membership_pb2.MEMBER_KIND_WORKER, settings)
        await directory.start()
        try:
            async with Registration([server.endpoint], member, ttl=3, etcd=settings) as registration:
                await asyncio.wait_for(registration.registered.wait(), 10)
                deadline = time.monotonic() + 10
                while "w-auth" not in directory.members:
                    assert time.monotonic() < deadline, "the authenticated watch never saw the member"
                    await asyncio.sleep(0.05)
            anonymous = membership_pb2.Member(id="w-anon", kind=membership_pb2.MEMBER_KIND_WORKER, address="x:1")
            async with Registration([server.endpoint], anonymous, ttl=3) as refused:
                await asyncio.sleep(2.5)
                assert not refused.registered.is_set() and refused.keepalive_failures >= 1
        finally:
            await directory.stop()

    try:
        asyncio.run(scenario())
    finally:
        server.stop()
