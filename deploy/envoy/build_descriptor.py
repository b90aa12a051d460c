"""Build the protobuf descriptor set Envoy's grpc_json_transcoder reads.

    python deploy/envoy/build_descriptor.py OUT.pb

Built from protos/ (with the imports: google/api/*.proto and the well-known
types), so it always matches the contract; the Dockerfile bakes it into the
image and tests/deploy builds it afresh. Nothing binary is committed.
"""

from __future__ import annotations

import pathlib
import sys

import grpc_tools
from grpc_tools import protoc

REPO = pathlib.Path(__file__).resolve().parents[2]
PROTOS = REPO / "protos"
THIRD_PARTY = PROTOS / "third_party"
WELL_KNOWN = pathlib.Path(grpc_tools.__file__).parent / "_proto"


def build_descriptor_set(out: pathlib.Path) -> pathlib.Path:
    """Write the descriptor set of every llm_mesh .proto (and its imports) to `out`."""
    out.parent.mkdir(parents=True, exist_ok=True)
    protos = sorted(str(p.relative_to(PROTOS)) for p in (PROTOS / "llm_mesh").rglob("*.proto"))
    args = [
        "protoc",
        f"-I{PROTOS}",
        f"-I{THIRD_PARTY}",
        f"-I{WELL_KNOWN}",
        "--include_imports",
        f"--descriptor_set_out={out}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {protos}")
    return out


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    print(build_descriptor_set(pathlib.Path(sys.argv[1])))
