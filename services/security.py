"""The security flags of every process, in one call: TLS for gRPC links (services/tls.py),
etcd TLS/auth (services/membership.EtcdSettings), API keys where a process serves a public
API (services/auth.py), and whether request content may be logged.

Privacy: prompts and completions (text or token ids) are never logged unless `--log-content`
or LLM_MESH_LOG_CONTENT=1. Code that would log content asks `log_content()` first. (Traces
have their own switch, LLM_MESH_TRACE_CONTENT: services/tracing.py.)
"""

from __future__ import annotations

import argparse
import os

from services import auth, tls
from services.membership import add_etcd_arguments

LOG_CONTENT_ENV = "LLM_MESH_LOG_CONTENT"
_log_content = False


def add_arguments(parser: argparse.ArgumentParser, *, api_keys: bool) -> None:
    """TLS, etcd and content-logging flags; `--api-key-file` too where `api_keys`."""
    tls.add_arguments(parser)
    add_etcd_arguments(parser)
    if api_keys:
        auth.add_arguments(parser)
    parser.add_argument("--log-content", action="store_true", default=os.environ.get(LOG_CONTENT_ENV) == "1",
                        help=f"log prompts and completions (default: never; also ${LOG_CONTENT_ENV}=1)")


def configure(args: argparse.Namespace) -> None:
    """Apply the process-wide switch (call once at start)."""
    global _log_content
    _log_content = bool(getattr(args, "log_content", False))


def log_content() -> bool:
    return _log_content
