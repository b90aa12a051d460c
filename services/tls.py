"""TLS and mTLS for the mesh's own gRPC links (gateway → scheduler → workers).

One set of files per process serves both directions:
- as a server, `--tls-cert` + `--tls-key` turn TLS on; `--tls-ca` also requires every client
  to present a certificate signed by that CA (mTLS);
- as a client, the process verifies its peers against `--tls-ca` (the system roots without
  it) and presents `--tls-cert`/`--tls-key` as its own client certificate.

With none of the flags every link stays plaintext (the loopback default). Everything that
opens a gRPC server or channel goes through `server_credentials` / `open_channel` here.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
from collections.abc import Sequence
from typing import Any

import grpc


@dataclasses.dataclass(frozen=True)
class TlsFiles:
    cert: str | None = None
    key: str | None = None
    ca: str | None = None
    server_name: str | None = None  # the name to verify peers' certificates against, if not their address

    def __post_init__(self) -> None:
        if bool(self.cert) != bool(self.key):
            raise SystemExit("--tls-cert and --tls-key go together")
        for path in (self.cert, self.key, self.ca):
            if path and not pathlib.Path(path).is_file():
                raise SystemExit(f"TLS file not found: {path}")

    @property
    def client_enabled(self) -> bool:
        return bool(self.ca or self.cert)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("TLS for gRPC links (off when no flag is given)")
    group.add_argument("--tls-cert", default=None,
                       help="PEM certificate: served, and presented to peers as a client")
    group.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")
    group.add_argument("--tls-ca", default=None,
                       help="PEM CA bundle: peers are verified against it, and clients must present a certificate "
                            "it signed (mTLS)")
    group.add_argument("--tls-server-name", default=None,
                       help="verify peers' certificates against this name instead of the dialled host")


def from_args(args: argparse.Namespace) -> TlsFiles | None:
    files = TlsFiles(getattr(args, "tls_cert", None), getattr(args, "tls_key", None),
                     getattr(args, "tls_ca", None), getattr(args, "tls_server_name", None))
    return files if files.cert or files.ca else None


def cli_args(tls: TlsFiles | None) -> list[str]:
    """The flags that give a child process the same TLS files (`llm-mesh up`)."""
    if tls is None:
        return []
    pairs = [("--tls-cert", tls.cert), ("--tls-key", tls.key), ("--tls-ca", tls.ca),
             ("--tls-server-name", tls.server_name)]
    return [item for flag, value in pairs if value for item in (flag, value)]


def _read(path: str | None) -> bytes | None:
    return pathlib.Path(path).read_bytes() if path else None


def server_credentials(tls: TlsFiles | None) -> grpc.ServerCredentials | None:
    """None (plaintext) unless a certificate is configured; with a CA, client certificates are required."""
    if tls is None or not tls.cert:
        return None
    ca = _read(tls.ca)
    return grpc.ssl_server_credentials([(_read(tls.key), _read(tls.cert))], root_certificates=ca,
                                       require_client_auth=ca is not None)


def channel_credentials(tls: TlsFiles | None) -> grpc.ChannelCredentials | None:
    """None (plaintext) unless a CA or a certificate is configured."""
    if tls is None or not tls.client_enabled:
        return None
    return grpc.ssl_channel_credentials(root_certificates=_read(tls.ca), private_key=_read(tls.key),
                                        certificate_chain=_read(tls.cert))


def channel_options(tls: TlsFiles | None, options: Sequence[tuple[str, Any]] = ()) -> list[tuple[str, Any]]:
    out = list(options)
    if tls is not None and tls.client_enabled and tls.server_name:
        out.append(("grpc.ssl_target_name_override", tls.server_name))
    return out


def open_channel(address: str, tls: TlsFiles | None, *, options: Sequence[tuple[str, Any]] = (),
                 interceptors: Sequence[Any] | None = None) -> grpc.aio.Channel:
    """A grpc.aio channel to `address`: TLS with this process's files, or plaintext without any."""
    credentials = channel_credentials(tls)
    if credentials is None:
        return grpc.aio.insecure_channel(address, options=list(options), interceptors=interceptors)
    return grpc.aio.secure_channel(address, credentials, options=channel_options(tls, options),
                                   interceptors=interceptors)
