"""Regenerate the Python code for the llm_mesh.v1 protos.

    python protos/generate.py            # write *_pb2.py, *_pb2.pyi, *_pb2_grpc.py beside the .proto files
    python protos/generate.py --out DIR  # write them under DIR instead (the drift test uses this)

The generated modules are committed so that installing llm-mesh needs no protoc;
tests/unit/test_protos.py fails when they drift from the .proto files.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

from grpc_tools import protoc
import grpc_tools

PROTOS = pathlib.Path(__file__).resolve().parent
THIRD_PARTY = PROTOS / "third_party"
WELL_KNOWN = pathlib.Path(grpc_tools.__file__).parent / "_proto"


def proto_files() -> list[str]:
    return sorted(str(p.relative_to(PROTOS)) for p in (PROTOS / "llm_mesh").rglob("*.proto"))


def generate(out: pathlib.Path, descriptor_set: pathlib.Path | None = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    args = [
        "protoc",
        f"-I{PROTOS}",
        f"-I{THIRD_PARTY}",
        f"-I{WELL_KNOWN}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
    ]
    if descriptor_set is not None:
        # Envoy's grpc_json_transcoder reads this (deploy/envoy).
        args += [f"--descriptor_set_out={descriptor_set}", "--include_imports", "--include_source_info"]
    if protoc.main(args + proto_files()) != 0:
        raise SystemExit("protoc failed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=PROTOS)
    args = parser.parse_args()
    generate(args.out)
    print(f"generated {len(proto_files())} protos into {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
