"""Build hook: generate the protobuf and gRPC modules from the .proto files before packaging.

The .proto files live in the shared package (edgeward/v1/*.proto, edgeward/oip/*.proto), and their
proto package names match the Python package path (edgeward.v1, edgeward.oip), so the absolute
imports protoc writes between sibling modules (``from edgeward.v1 import common_pb2``) resolve
inside the installed package. The generated modules land beside their sources and are never
committed.
"""

from __future__ import annotations

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
# protoc's include root is the directory above the `edgeward` package, so that file paths and
# proto package names line up (edgeward/v1/api.proto is package edgeward.v1).
PROTO_ROOT = ROOT


def generate_protos() -> None:
    import grpc_tools
    from grpc_tools import protoc  # build-time only (see [build-system] requires)

    include = Path(grpc_tools.__file__).parent / "_proto"
    sources = sorted(str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / "edgeward").rglob("*.proto"))
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={PROTO_ROOT}",
        f"--pyi_out={PROTO_ROOT}",
        f"--grpc_python_out={PROTO_ROOT}",
        *sources,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed on " + " ".join(sources))


class BuildPyWithProtos(build_py):
    def run(self) -> None:
        generate_protos()
        super().run()


if __name__ == "__main__":  # setuptools runs this file as __main__; `make protos` imports it
    setup(cmdclass={"build_py": BuildPyWithProtos})
